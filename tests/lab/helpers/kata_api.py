"""Run inside the lab by tests/lab/test_api.py: Kata Containers' start and stop of a cloud-hypervisor VM,
replayed against `pyvmm --api-socket` (the requests as Kata's generated Go client writes them), the error
cases of the API, and `pyvmm-remote` driving the same VMM. Prints `STEP <name> <facts>` lines and, when
every check held, `KATA-API-DONE`; a failed check raises (the traceback and pyvmm's log are printed).

Usage: python3 kata_api.py WORKDIR   (env: PYVMM_GUEST_KERNEL, PYVMM_GUEST_INITRAMFS)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pyvmm.api.client import ApiResponse, read_response

WORK = Path(sys.argv[1])
SOCK = WORK / "clh-api.sock"
LOG = WORK / "pyvmm.log"
GUEST_CMD = (
    "echo KATA-GUEST-UP disks=$(ls /sys/block | grep -c vd); dmesg | grep 'PCI Root Bridge'; "
    "while true; do echo TICK; sleep 1; done"
)


def go_request(method: str, endpoint: str, body: bytes | None = None) -> bytes:
    """What Kata's openapi-generated Go client (net/http) puts on the socket."""
    head = f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n"
    head += "User-Agent: OpenAPI-Generator/1.0.0/go\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    head += "Accept: application/json\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    head += "Accept-Encoding: gzip\r\n\r\n"
    return head.encode() + (body or b"")


class Conn:
    """One keep-alive connection, as Go's transport keeps one."""

    def __init__(self, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(SOCK))

    def call(self, method: str, endpoint: str, body: bytes | None = None) -> ApiResponse:
        self.sock.sendall(go_request(method, endpoint, body))
        return read_response(self.sock)

    def close(self) -> None:
        self.sock.close()


def remote(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["pyvmm-remote", "--api-socket", str(SOCK), *args], capture_output=True, text=True, timeout=120
    )


def step(name: str, **facts: object) -> None:
    print(f"STEP {name} " + " ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


def errors(response: ApiResponse) -> list[str]:
    body = json.loads(response.body)
    assert isinstance(body, list) and all(isinstance(m, str) for m in body), response
    return body


def wait_for(text: str, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if text in LOG.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def wait_count(text: str, count: int, seconds: float) -> list[str]:
    """Wait until the guest's log has `count` lines starting with `text` (the kernel echoes its command
    line, which holds it too); those lines."""
    end = time.monotonic() + seconds
    while True:
        lines = [line for line in LOG.read_text(errors="replace").splitlines() if line.startswith(text)]
        if len(lines) >= count or time.monotonic() > end:
            return lines
        time.sleep(0.2)


def thread_names(pid: int) -> list[str]:
    """What Kata reads (/proc/PID/task/*/comm); a thread may end while they are read."""
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except (FileNotFoundError, ProcessLookupError):  # ENOENT or ESRCH: that thread has just ended
            continue
    return sorted(names)


def kata_config(**changes: object) -> dict:
    """Kata's VmConfig shape (clh.go CreateVM), kernel + initramfs payload, no virtio-fs/vsock/net."""
    config = {
        "payload": {
            "kernel": os.environ["PYVMM_GUEST_KERNEL"],
            "initramfs": os.environ["PYVMM_GUEST_INITRAMFS"],
            "cmdline": f'console=ttyS0 quiet panic=-1 pyvmm.cmd="{GUEST_CMD}"',
        },
        "cpus": {
            "boot_vcpus": 1,
            "max_vcpus": 1,
            "kvm_hyperv": False,
            "nested": True,
            "topology": {"threads_per_core": 1, "cores_per_die": 1, "dies_per_package": 1, "packages": 1},
        },
        "memory": {
            "size": 256 << 20,
            "shared": False,
            "hugepages": False,
            "mergeable": False,
            "hotplug_method": "Acpi",
            "prefault": False,
            "thp": True,
        },
        "platform": {"num_pci_segments": 2, "tdx": False, "sev_snp": False},
        "rng": {"src": "/dev/urandom", "iommu": False},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off", "iommu": False},
        "iommu": False,
        "watchdog": False,
        "pvpanic": False,
        "landlock_enable": False,
    }
    config.update(changes)
    return config


def sd_reader() -> str:
    for dev in sorted(Path("/sys/bus/pci/devices").iterdir()):
        if (dev / "vendor").read_text().strip() == "0x1b36" and (
            dev / "device"
        ).read_text().strip() == "0x0007":
            return str(dev)
    raise AssertionError("no SD reader in the lab")


def main() -> None:
    log = LOG.open("w")
    start = time.monotonic()
    vmm = subprocess.Popen(
        ["pyvmm", "--api-socket", str(SOCK)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        run(vmm, start)
    except BaseException:
        vmm.kill()
        vmm.wait()
        print("---- pyvmm log\n" + LOG.read_text(errors="replace"), flush=True)
        raise
    # pyvmm-remote's own start and stop on a second VMM, with nothing created
    other = subprocess.Popen(
        ["pyvmm", "--api-socket", f"path={SOCK}"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_socket(other)
    ping = remote("ping")
    assert ping.returncode == 0 and json.loads(ping.stdout)["pid"] == other.pid, ping
    down = remote("shutdown-vmm")
    assert down.returncode == 0, down
    assert other.wait(timeout=10) == 0
    assert not SOCK.exists()
    step("remote-shutdown-vmm", rc=other.returncode)
    print("KATA-API-DONE", flush=True)


def wait_socket(vmm: subprocess.Popen) -> float:
    """Kata's isClhRunning: wait4/kill(0), then vmm.ping with a 1 s timeout, every 10 ms, for 10 s. The lab
    is an emulated machine ~20x slower than a host: pyvmm's start there is given 120 s."""
    start = time.monotonic()
    while time.monotonic() - start < 120:
        assert vmm.poll() is None, f"pyvmm exited with {vmm.returncode}"
        try:
            conn = Conn(1.0)
            try:
                if conn.call("GET", "vmm.ping").status == 200:
                    return time.monotonic() - start
            finally:
                conn.close()
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError("vmm.ping never answered")


def run(vmm: subprocess.Popen, start: float) -> None:
    ready = wait_socket(vmm)
    step("ping-loop", seconds=f"{ready:.1f}")
    conn = Conn(60.0)
    ping = conn.call("GET", "vmm.ping")
    assert json.loads(ping.body)["pid"] == vmm.pid, ping

    # acceptance 4: errors answered with CH's status and a message; the VMM answers ping after each
    bad = conn.call("PUT", "vm.create", b'{"payload": {"kernel": ')
    assert bad.status == 400 and errors(bad), bad
    unknown = conn.call("GET", "vm.no-such-endpoint")
    assert (unknown.status, errors(unknown)) == (404, ["Not Found"]), unknown
    early = conn.call("PUT", "vm.boot")
    assert early.status == 500 and errors(early)[:2] == ["Error from API", "The VM could not boot"], early
    assert conn.call("GET", "vmm.ping").status == 200
    step("errors", bad_json=bad.status, unknown=unknown.status, boot_before_create=early.status)
    remote_boot = remote("boot")  # the same refusal through pyvmm-remote: exit 1, the message on stderr
    assert remote_boot.returncode == 1 and "500" in remote_boot.stderr, remote_boot
    step("remote-boot-before-create", rc=remote_boot.returncode)

    # a --device that is not bound to vfio-pci (the reader is on sdhci-pci): create takes it, boot refuses
    sd = sd_reader()
    (WORK / "bad.json").write_text(json.dumps(kata_config(devices=[{"path": sd, "iommu": False}])))
    created = remote("create", str(WORK / "bad.json"))
    assert created.returncode == 0, created
    refused = conn.call("PUT", "vm.boot")
    message = errors(refused)[-1]
    assert refused.status == 500 and Path(sd).name in message, refused
    assert conn.call("GET", "vmm.ping").status == 200
    assert remote("delete").returncode == 0
    step("unbound-device", status=refused.status, message=json.dumps(message))

    # Kata's start: vm.create, vm.info = Created, vm.boot, vm.info = Running
    created = conn.call("PUT", "vm.create", json.dumps(kata_config()).encode())
    assert created.status == 204, created
    info = json.loads(conn.call("GET", "vm.info").body)
    assert info["state"] == "Created", info
    assert info["config"]["platform"]["num_pci_segments"] == 2 and info["config"]["cpus"]["boot_vcpus"] == 1
    booted = conn.call("PUT", "vm.boot")
    assert booted.status == 204, booted
    info = json.loads(conn.call("GET", "vm.info").body)
    assert info["state"] == "Running", info
    bdfs = {name: node["pci_bdf"] for name, node in info["device_tree"].items()}
    assert bdfs.get("__rng", "").startswith("0000:00:"), bdfs
    comms = thread_names(vmm.pid)
    assert "vcpu0" in comms and "http-server" in comms, comms
    step("kata-start", state=info["state"], bdfs=json.dumps(bdfs), threads=",".join(comms))
    remote_info = remote("info")
    assert remote_info.returncode == 0 and json.loads(remote_info.stdout)["state"] == "Running", remote_info
    assert remote("ping").returncode == 0
    assert wait_for("KATA-GUEST-UP", 300), "the guest did not run its command"
    assert wait_for("(domain 0001 [bus 00])", 60), "the guest has no second PCI segment"
    step("guest-ran", segment1=True)
    # pause: no guest progress (no TICKs) until resume; then it goes on
    paused = remote("pause")
    assert paused.returncode == 0, paused
    assert json.loads(conn.call("GET", "vm.info").body)["state"] == "Paused"
    time.sleep(0.5)  # bytes already written are flushed as the vCPUs stop
    before = LOG.read_text(errors="replace").count("TICK")
    time.sleep(4)
    during = LOG.read_text(errors="replace").count("TICK") - before
    assert remote("resume").returncode == 0
    assert json.loads(conn.call("GET", "vm.info").body)["state"] == "Running"
    end = time.monotonic() + 60
    while LOG.read_text(errors="replace").count("TICK") < before + during + 2 and time.monotonic() < end:
        time.sleep(0.2)
    after = LOG.read_text(errors="replace").count("TICK") - before - during
    assert during == 0 and after >= 2, (during, after)
    step("pause-resume", ticks_while_paused=during, ticks_after=after)
    # a second vm.boot while running is refused, the VM goes on
    again = conn.call("PUT", "vm.boot")
    assert again.status == 500 and json.loads(conn.call("GET", "vm.info").body)["state"] == "Running"

    # vm.reboot, then vm.shutdown and vm.boot: each boots the VM as it was, a disk hot-plugged before them
    # included (the guest sees it at boot: virtio_blk loaded by modalias, /sys/block/vda), as in CH
    image = WORK / "kdisk.img"
    image.write_bytes(b"\0" * (1 << 20))
    plugged = conn.call("PUT", "vm.add-disk", json.dumps({"path": str(image), "id": "kdisk"}).encode())
    assert plugged.status == 200 and json.loads(plugged.body)["id"] == "kdisk", plugged
    rebooted = conn.call("PUT", "vm.reboot")
    assert rebooted.status == 204, rebooted
    ups = wait_count("KATA-GUEST-UP", 2, 300)
    assert ups[1:] == ["KATA-GUEST-UP disks=1"], ups
    assert json.loads(conn.call("GET", "vm.info").body)["state"] == "Running"
    shut = conn.call("PUT", "vm.shutdown")
    assert shut.status == 204, shut
    info = json.loads(conn.call("GET", "vm.info").body)
    assert info["state"] == "Created" and [d["id"] for d in info["config"]["disks"]] == ["kdisk"], info
    assert conn.call("PUT", "vm.boot").status == 204
    ups = wait_count("KATA-GUEST-UP", 3, 300)
    assert ups[2:] == ["KATA-GUEST-UP disks=1"], ups
    assert "vcpu0" in thread_names(vmm.pid)
    step("reboot", boots=len(ups), disks_at_boot=ups[-1].split("=")[-1])

    # Kata's stop: vmm.shutdown (3 s context), then the process must be gone within 3 s
    sent = time.monotonic()
    down = conn.call("PUT", "vmm.shutdown")
    answered = time.monotonic() - sent
    assert (down.status, down.body) == (200, b""), down
    rc = vmm.wait(timeout=30)
    exited = time.monotonic() - sent
    assert rc == 0, rc
    assert not SOCK.exists()
    step("kata-stop", answered=f"{answered:.2f}", exited=f"{exited:.2f}", rc=rc)
    conn.close()


if __name__ == "__main__":
    main()
