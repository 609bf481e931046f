"""The in-use checks added for issue 19 that can run on any Linux host: open device nodes found through
/proc, fbcon's vtconsole binding and DRM nodes of a function (over a sysfs-shaped tree), interfaces read
from inside a network namespace. The lab refuses real devices (tests/lab/test_host_sd.py)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pyvmm.host import inuse
from pyvmm.host.inuse import HostUse, UseKind


def test_a_use_reads_with_its_fix() -> None:
    assert str(HostUse(UseKind.SWAP, "/dev/sda2 is in use as swap", "swapoff /dev/sda2")) == (
        "/dev/sda2 is in use as swap (swapoff /dev/sda2)"
    )
    assert str(HostUse(UseKind.NINEP, "its 9p filesystem 'x' is mounted at /")) == (
        "its 9p filesystem 'x' is mounted at /"
    )


def test_a_device_node_open_in_another_process_is_found_with_its_pid_and_name() -> None:
    st = os.stat("/dev/null")
    key = (stat.S_IFCHR, os.major(st.st_rdev), os.minor(st.st_rdev))
    child = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)
    try:
        found = inuse.open_device_nodes()
        assert (child.pid, "sleep") in found.get(key, [])
        assert all(pid != os.getpid() for pid, _ in found.get(key, []))  # our own fds are not a use
    finally:
        child.kill()
        child.wait()


def _sysfs(tmp_path: Path, bind: str) -> tuple[Path, Path]:
    vt = tmp_path / "vtconsole"
    for n, name, bound in ((0, "(S) dummy device", "0"), (1, "(M) frame buffer device", bind)):
        (vt / f"vtcon{n}").mkdir(parents=True)
        (vt / f"vtcon{n}" / "name").write_text(name + "\n")
        (vt / f"vtcon{n}" / "bind").write_text(bound + "\n")
    fn = tmp_path / "devices" / "0000:00:05.0"
    (fn / "graphics" / "fb0").mkdir(parents=True)
    (fn / "drm" / "card0").mkdir(parents=True)
    (fn / "drm" / "card0" / "dev").write_text("226:0\n")
    (fn / "drm" / "renderD128").mkdir(parents=True)
    (fn / "drm" / "renderD128" / "dev").write_text("226:128\n")
    return vt, fn


def test_a_display_under_fbcon_or_with_an_open_drm_node_is_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vt, fn = _sysfs(tmp_path, bind="1")
    monkeypatch.setattr(inuse, "SYS_VTCONSOLE", vt)
    opened = {(stat.S_IFCHR, 226, 128): [(4242, "Xorg")], (stat.S_IFBLK, 226, 0): [(1, "init")]}
    uses = inuse._display_uses(str(fn), opened)
    assert [str(u) for u in uses] == [
        f"its framebuffer fb0 shows the host's text console (fbcon) (echo 0 > {vt}/vtcon1/bind)",
        "/dev/dri/renderD128 is open in process 4242 (Xorg) (stop it (a display server, a compositor): "
        "kill 4242)",
    ]
    (vt / "vtcon1" / "bind").write_text("0\n")  # fbcon unbound, nothing open: free
    assert inuse._display_uses(str(fn), {}) == []


def test_an_interface_belongs_to_the_function_or_a_child_device_of_it(tmp_path: Path) -> None:
    fn = tmp_path / "0000:00:02.0"
    (fn / "virtio0").mkdir(parents=True)
    assert inuse._bus_device_under("0000:00:02.0", str(fn))
    assert inuse._bus_device_under("virtio0", str(fn))
    for other in ("0000:00:03.0", "virtio1", "", "..", "virtio0/../x"):
        assert not inuse._bus_device_under(other, str(fn)), other


@pytest.mark.skipif(os.geteuid() != 0, reason="joining a network namespace needs CAP_SYS_ADMIN")
def test_interfaces_are_read_from_inside_a_namespace() -> None:
    here = inuse.Namespace(Path("/proc/self/ns/net"), "ours", "ip")
    names = [name for name, _, _ in inuse._interfaces_in(here)]
    with open("/proc/net/dev") as f:
        listed = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    assert names and set(names) <= set(listed)  # those ethtool answers for (not loopback)
    assert "lo" not in names
    assert all(ns.path != Path("/proc/self/ns/net") for ns in inuse.other_network_namespaces())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs root, unshare(1) and ip(8)")
def test_an_interface_in_a_namespace_only_a_process_holds_is_seen() -> None:
    script = "ip link add v0 type veth peer name v1 && ip link set v0 up && echo ready && exec sleep 30"
    holder = subprocess.Popen(["unshare", "--net", "sh", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout is None or holder.stdout.readline().strip() != "ready":
            pytest.skip("cannot make a veth pair here")
        for _ in range(200):  # "ready" comes just before the shell execs sleep: wait for the exec
            if Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.01)
        (ns,) = [n for n in inuse.other_network_namespaces() if n.path == Path(f"/proc/{holder.pid}/ns/net")]
        assert ns.label == f"the network namespace of process {holder.pid} (sleep)"
        assert ns.enter == f"nsenter -t {holder.pid} -n ip"
        assert sorted(inuse._interfaces_in(ns)) == [("v0", "", True), ("v1", "", False)]
    finally:
        holder.kill()
        holder.wait()
