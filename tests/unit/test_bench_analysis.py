"""bench/analysis.py and bench/report.py: console-marker spans, /proc parsing, statistics, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import analysis as an
import report


def stamped(*pairs: tuple[float, str]) -> list[tuple[float, str]]:
    return list(pairs)


def test_span_subtracts_one_console_line() -> None:
    lines = stamped(
        (10.0, "noise"),
        (10.00, "BENCH seq NL0"),
        (10.02, "BENCH seq NL1"),
        (10.05, "BENCH seq NL2"),  # spacings 0.02, 0.03, 0.02: median 0.02
        (10.07, "BENCH seq NL3"),
        (10.09, "BENCH seq START"),
        (12.11, "BENCH seq END"),
        (12.13, "BENCH seq STATS ios=100 bytes=104857600 guest_ns=1500000000"),
    )
    span = an.spans(lines)["seq"]
    assert span.console == pytest.approx(0.02)
    assert span.seconds == pytest.approx(2.0)
    assert an.mb_per_s(span) == pytest.approx(104857600 / 2.0 / 1e6)
    assert an.iops(span) == pytest.approx(50)
    assert an.micros_per_access(span) == pytest.approx(20000)
    assert an.guest_figure(span, "MB/s") == pytest.approx(104857600 / 1.5 / 1e6)


def test_spans_by_tag_incomplete_and_errors() -> None:
    lines = stamped(
        (1.0, "BENCH a START"),
        (2.0, "BENCH b START"),
        (3.0, "BENCH a END"),
        (3.1, "BENCH a STATS ios=3 offset=0x100"),
    )
    found = an.spans(lines)
    assert set(found) == {"a"}  # b never ended
    assert found["a"].seconds == pytest.approx(2.0) and found["a"].console == 0
    assert found["a"].stats == {"ios": 3, "offset": 0x100}
    assert found["a"].guest_seconds is None
    with pytest.raises(an.MarkerError, match="open: No such file"):
        an.spans(stamped((1.0, "BENCH x ERROR open: No such file")))


def test_first_stamp() -> None:
    lines = stamped((1.0, "x"), (2.5, "pyvmm-guest: init"), (3.0, "pyvmm-guest: init"))
    assert an.first_stamp(lines, "pyvmm-guest: init") == 2.5
    assert an.first_stamp(lines, "nothing") is None


def test_proc_parsing() -> None:
    stat = "1234 (qemu-system-x86) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 4"
    assert an.cpu_ticks(stat) == 281
    assert an.cpu_ticks("99 (a b) c) R 1 2 3 4 5 6 7 8 9 10 1 2") == 3  # comm with spaces and ')'
    assert an.status_kib("Name:\tx\nVmHWM:\t  204800 kB\nVmRSS:\t 1 kB\n", "VmHWM") == 204800
    with pytest.raises(ValueError):
        an.status_kib("Name: x\n", "VmHWM")
    smaps = "\n".join(
        [
            "7f0000000000-7f0020000000 rw-p 00000000 00:00 0 ",
            "Size:             524288 kB",
            "Rss:              131072 kB",
            "7f1000000000-7f1000800000 rw-p 00000000 00:00 0 ",  # a thread stack: too small
            "Size:               8192 kB",
            "Rss:                  16 kB",
            "55aa00000000-55aa30000000 r--p 00000000 08:01 1234  /usr/bin/big-file",  # file-backed
            "Size:             786432 kB",
            "Rss:                4096 kB",
            "7f2000000000-7f2010000000 rw-p 00000000 00:00 0                          [heap]",
            "Size:             262144 kB",
            "Rss:                 100 kB",
        ]
    )
    assert an.guest_ram_rss_kib(smaps, 512 << 20) == 131072 + 100
    shared = "\n".join(  # guest RAM from a memfd (--memory shared=on; QEMU's memory-backend-memfd)
        [
            "7f3000000000-7f3020000000 rw-s 00000000 00:01 4321                       /memfd:mem0 (deleted)",
            "Size:             524288 kB",
            "Rss:               65536 kB",
        ]
    )
    assert an.guest_ram_rss_kib(shared, 512 << 20) == 65536


def test_summary_ratio_goal() -> None:
    assert an.summarize([]) is None
    s = an.summarize([3.0, 1.0, 2.0])
    assert s == an.Summary(3, 1.0, 2.0, 3.0)
    metric = an.METRICS_BY_KEY["nvme_seq_read"]
    samples = {an.PYVMM: [90.0, 100.0], an.QEMU: [100.0], an.NATIVE: []}
    assert an.ratio(metric, samples, an.QEMU) == pytest.approx(0.95)
    assert an.ratio(metric, samples, an.NATIVE) is None
    goal = an.Goal(an.QEMU, 0.95)
    assert goal.met(0.95, "higher") and not goal.met(0.94, "higher")
    assert an.Goal(an.QEMU_Q35, 0.5).met(0.4, "lower") and not an.Goal(an.QEMU_Q35, 0.5).met(0.6, "lower")
    assert an.fmt(None) == "—" and an.fmt(1234.5) == "1,234" and an.fmt(0.01234) == "0.012"


def test_every_metric_has_pyvmm_first_and_a_baseline() -> None:
    assert len({m.key for m in an.METRICS}) == len(an.METRICS)
    for metric in an.METRICS:
        assert metric.vmms[0] == an.PYVMM and metric.baseline in (an.QEMU, an.QEMU_Q35)
        assert metric.better in ("lower", "higher")


def test_report_markdown_without_png(tmp_path, monkeypatch) -> None:
    samples = {m.key: {v: [1.0 + i for i in range(3)] for v in m.vmms} for m in an.METRICS}
    samples["boot_init"][an.PYVMM] = [1.0, 1.0, 1.0]
    samples["boot_init"][an.QEMU_Q35] = [4.0, 4.0, 4.0]
    data = {"samples": samples, "reps": 3, "date": "2026-01-01T00:00:00Z", "errors": ["one failed"],
            "note": "a busy host"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(report, "chart", lambda data, png: False)
    written = report.write(path)
    assert written == [tmp_path / "r.md"]
    text = written[0].read_text()
    row = next(line for line in text.splitlines() if line.startswith("| boot: VMM start to the guest"))
    assert "0.25x" in row and "≤ 0.5x QEMU q35 ✅" in row
    assert "**2.00** (1.00-3.00)" in text
    assert "- one failed" in text and ".png" not in text
    assert "**Note**: a busy host" in text


def test_kernel_log_stamp() -> None:
    assert an.kernel_log_stamp("[   12.345678] watchdog: BUG: soft lockup") == 12.345678
    assert an.kernel_log_stamp("[12345.000001] x") == 12345.000001
    assert an.kernel_log_stamp("a continuation line") is None


def test_harness_kills_a_vmm_past_its_timeout_and_keeps_its_output() -> None:
    import harness

    result = harness.run_vmm("sleeper", ["sh", "-c", "echo first; sleep 60; echo never"], timeout=1.0)
    assert result.status == -9  # SIGKILL
    assert [line for _, line in result.lines] == ["first"]
    assert result.exited - result.started < 30


def test_harness_stamps_lines_as_they_arrive() -> None:
    import harness

    result = harness.run_vmm("two", ["sh", "-c", "echo a; sleep 0.5; echo b"], timeout=30.0)
    assert result.status == 0
    (t_a, a), (t_b, b) = result.lines
    assert (a, b) == ("a", "b") and 0.4 < t_b - t_a < 5


def test_results_of_a_restarted_lab_are_joined() -> None:
    import run

    first = {
        "samples": {"boot": {"pyvmm": [1.0], "qemu": [2.0]}},
        "guest_clock_samples": {},
        "details": {"x": {"pyvmm": [5.0]}},
        "notes": {"n": ["a"]},
        "errors": [],
        "runs": [{"run": "r1"}],
        "reps_done": [1, 2],
        "lab_seconds": 10.0,
        "lab": {"kernel": "k"},
    }
    second = {
        "samples": {"boot": {"pyvmm": [3.0], "qemu": [4.0]}, "new": {"qemu": [9.0]}},
        "guest_clock_samples": {"boot": {"qemu": [8.0]}},
        "details": {"x": {"pyvmm": [6.0]}},
        "notes": {"n": ["a", "b"]},
        "errors": ["e"],
        "runs": [{"run": "r3"}],
        "reps_done": [3],
        "lab_seconds": 4.0,
        "lab": {"kernel": "other"},
    }
    out = run.merge(first, second)
    assert out["samples"] == {"boot": {"pyvmm": [1.0, 3.0], "qemu": [2.0, 4.0]}, "new": {"qemu": [9.0]}}
    assert out["guest_clock_samples"] == {"boot": {"qemu": [8.0]}}
    assert out["details"] == {"x": {"pyvmm": [5.0, 6.0]}}
    assert out["notes"] == {"n": ["a", "b"]}
    assert out["errors"] == ["e"] and out["reps_done"] == [1, 2, 3] and len(out["runs"]) == 2
    assert out["lab_seconds"] == 14.0 and out["lab"] == {"kernel": "k"}
    assert first["samples"]["boot"]["pyvmm"] == [1.0]  # the inputs are left as they were


def test_stats_of_a_lab_side_helper() -> None:
    out = "noise\nBENCH net-T STATS ios=12 bytes=3145728 ns=1000000000\n"
    assert an.stats(out, "net-T") == {"ios": 12, "bytes": 3145728, "ns": 1000000000}
    with pytest.raises(an.MarkerError, match="no STATS line"):
        an.stats(out, "net-R")  # another tag's line does not count
    with pytest.raises(an.MarkerError, match="connect: Connection refused"):
        an.stats("BENCH net-P ERROR connect: Connection refused\n", "net-P")


def test_data_plane_rows_and_their_goals() -> None:
    import harness

    blk = [m for m in an.METRICS if m.key.startswith("blk_")]
    vu = [m for m in an.METRICS if m.key.startswith("vu_")]
    net = [m for m in an.METRICS if m.key.startswith("net_")]
    # every virtio-blk row again on vhost-user, 256-segment and QD32 rows included; the network rows
    assert [m.key.removeprefix("vu_") for m in vu] == [m.key.removeprefix("blk_") for m in blk]
    assert sorted(harness.VHOST_TAGS.values()) == sorted(m.key for m in vu)
    assert sorted(harness.NET_MODES.values()) == sorted(m.key for m in net) == sorted(
        ["net_guest_to_lab", "net_lab_to_guest", "net_rr"]
    )
    for metric in (*blk, *vu, *net):  # the goal: 0.95x QEMU on each
        assert metric.vmms == an.VM_PAIR and metric.goals == (an.Goal(an.QEMU, 0.95),)


def test_data_plane_command_lines() -> None:
    import harness

    s = harness.Settings(1, "8M", 0.5, 0.3, 0, "K", "V", "I", "D", "H")
    pyvmm = " ".join(harness.pyvmm_argv(s, "c", shared=True, net=True, vhost_socket="/t/vu.sock"))
    assert "--memory size=512M,shared=on" in pyvmm
    assert "--disk vhost_user=on,socket=/t/vu.sock" in pyvmm
    assert f"--net tap={harness.TAP},ip=192.168.249.1,mask=255.255.255.0,mac={harness.GUEST_MAC}" in pyvmm
    qemu = " ".join(harness.qemu_argv(s, "c", shared=True, net=True, vhost_socket="/t/vu.sock"))
    assert "-M q35,memory-backend=mem0" in qemu and "memory-backend-memfd,id=mem0,size=512M,share=on" in qemu
    assert "socket,id=vu0,path=/t/vu.sock -device vhost-user-blk-pci,chardev=vu0,num-queues=1" in qemu
    assert f"tap,id=net0,ifname={harness.TAP},script=no,downscript=no,vhost=on" in qemu
    assert f"virtio-net-pci,netdev=net0,mac={harness.GUEST_MAC}" in qemu
    # without the options, the other rows' command lines are as before
    assert "shared" not in " ".join(harness.pyvmm_argv(s, "c", disk="/d"))
    assert "memory-backend" not in " ".join(harness.qemu_argv(s, "c", disk="/d"))


def test_boot_variant_command_lines() -> None:
    """Issue 17's boot rows: the vmlinux through PVH, and the console verbose (no `quiet`) for both VMMs."""
    import harness

    s = harness.Settings(1, "8M", 0.5, 0.3, 0, "K", "V", "I", "D", "H")
    for argv in (harness.pyvmm_argv(s, "true", kernel="V", quiet=False),
                 harness.qemu_argv(s, "true", kernel="V", quiet=False)):
        line = " ".join(argv)
        assert " V " in line and " K " not in line
        assert "quiet" not in line and 'panic=-1 hugepages=4 pyvmm.cmd="true"' in line
    assert "console=ttyS0 quiet panic=-1" in " ".join(harness.pyvmm_argv(s, "true"))


def test_distro_command_lines() -> None:
    """Issue 17's distro row: cloud-hypervisor's VFIO-guide line (less its --device) for pyvmm, the same
    guest for QEMU q35; the row is not in the suite's smoke run."""
    import harness

    s = harness.Settings(1, "8M", 0.5, 0.3, 0, "K", "V", "I", "D", "H", distro_disk="DD",
                         guest_initramfs="GI")
    pyvmm = harness.distro_pyvmm_argv(s, "/t/d.raw")
    assert pyvmm == ["pyvmm", "--kernel", "V", "--initramfs", "GI", "--disk", "path=/t/d.raw",
                     "--console", "off", "--serial", "tty", "--cmdline", "console=ttyS0 root=/dev/vda1 rw",
                     "--cpus", "4", "--memory", "size=512M"]
    qemu = " ".join(harness.distro_qemu_argv(s, "/t/d.raw"))
    assert "-smp 4 " in qemu and "-kernel V -initrd GI -append console=ttyS0 root=/dev/vda1 rw " in qemu
    assert "file=/t/d.raw,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0" in qemu
    metric = next(m for m in an.METRICS if m.key == "distro_multi_user")
    assert metric.vmms == an.VARIANT_VMMS and not metric.smoke


def test_a_run_whose_guest_died_is_taken_once_more_and_listed() -> None:
    """The emulated lab kills a nested guest now and then: such a measurement is taken again once (the
    first failure listed in `retried`); a second death, or any other failure, stays an error."""
    import harness

    bench = harness.Bench(harness.Settings(1, "8M", 0.5, 0.3, 0, "K", "V", "I", "D", "H"))
    calls: list[int] = []

    def dies_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            bench.fail("rep 1 boot qemu-q35", None, harness.GUEST_DIED)
        else:
            bench.add("boot_init", an.QEMU_Q35, 1.0)

    bench.again(dies_once)
    assert len(calls) == 2 and bench.errors == [] and bench.samples["boot_init"][an.QEMU_Q35] == [1.0]
    assert bench.retried == [f"rep 1 boot qemu-q35: {harness.GUEST_DIED}"]
    bench.again(lambda: bench.fail("rep 2 boot pyvmm", None, harness.GUEST_DIED))
    assert bench.errors == [f"rep 2 boot pyvmm: {harness.GUEST_DIED}"] and len(bench.retried) == 2
    bench.again(lambda: bench.fail("rep 3 virtio pyvmm", None, "idle probes missing"))
    assert bench.errors[-1] == "rep 3 virtio pyvmm: idle probes missing" and len(bench.retried) == 2
    assert bench.result()["retried"] == bench.retried
