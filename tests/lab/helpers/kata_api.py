"""Run inside the lab by tests/lab/test_api.py: Kata Containers' start and stop of a cloud-hypervisor VM,
replayed against `pyvmm --api-socket` (the requests as Kata's generated Go client writes them), the error
cases of the API, and `pyvmm-remote` driving the same VMM. Prints `STEP <name> <facts>` lines and, when
every check held, `KATA-API-DONE`; a failed check raises (the traceback and pyvmm's log are printed).

Usage: python3 kata_api.py WORKDIR   (env: PYVMM_GUEST_KERNEL, PYVMM_GUEST_INITRAMFS)
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyvmm.api.client import ApiResponse, read_response

WORK = Path(sys.argv[1])
SOCK = WORK / "clh-api.sock"
LOG = WORK / "pyvmm.log"
# The NICs (issue 18 part 2): eth0 is the one Kata adds before boot (tap pyvmmk0), eth1 the one
# pyvmm-remote hot-plugs (pyvmmk1); each pings the lab's side of its tap, then both are removed again.
NET_CMD = (
    "ip link set eth0 up; ip addr add 192.168.251.2/24 dev eth0; "
    "ping -c 2 -W 10 192.168.251.1 >/dev/null && echo NET0-PING''-OK; "
    "i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "ip link set eth1 up; ip addr add 192.168.252.2/24 dev eth1; "
    "ping -c 2 -W 10 192.168.252.1 >/dev/null && echo NET1-PING''-OK; "
    "i=0; while [ -e /sys/class/net/eth1 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo NET1-GO''NE; "
    "i=0; while [ -e /sys/class/net/eth0 ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; "
    "echo NET0-GO''NE; "
)
# Kata's shared directory: a virtio-fs on PCI segment 1, served by QEMU's virtiofsd (docs/virtio-fs.md)
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
FS_SOCK = WORK / "virtiofsd.sock"
VSOCK = WORK / "clh.sock"  # the agent's hybrid vsock (docs/vsock.md)
FS_NOTE = "shared-by-the-lab-through-virtiofsd"
# The disk Kata hot-plugs (vm.add-disk) into a VM whose RAM is shared (for virtio-fs): a qemu-storage-daemon
# serves it (pyvmm's spawner starts it), the guest reads its first bytes, and when it is ejected says so.
KDISK_NOTE = b"kdisk-by-a-daemon"
KDISK_CMD = ("if [ ! -e /tmp/kd ] && [ -b /dev/vda ]; then "
             f"echo KDISK''-READ=$(head -c {len(KDISK_NOTE)} /dev/vda); touch /tmp/kd; fi; "
             "if [ -e /tmp/kd ] && [ ! -b /dev/vda ]; then echo KDISK-GO''NE; rm /tmp/kd; fi; ")
# disks=: how many virtio-blk disks the guest found at boot (the reboot steps); on a boot after the NICs'
# removal the NIC part finds no eth0 and waits for eth1 in vain, which costs that guest nothing it is asked.
GUEST_CMD = ("mkdir -p /mnt; mount -t virtiofs kataShared /mnt && echo KATA-FS=$(cat /mnt/note); "
             "echo KATA-GUEST-UP disks=$(ls /sys/block | grep -c vd); dmesg | grep 'PCI Root Bridge'; "
             + NET_CMD + "modprobe virtio_blk; while true; do echo TICK; " + KDISK_CMD + "sleep 1; done")
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100


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


def lab_tap(name: str, address: str | None, flags: int = 0) -> int:
    """A tap as Kata's network endpoint opens it (one queue, vnet headers), the lab's side addressed."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | flags))
    if address is not None:
        subprocess.run(["ip", "addr", "add", address, "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
    return fd


def kata_add_net(body: dict, fds: list[int]) -> ApiResponse:
    """clh.go vmAddNetPutRequest: httputil.DumpRequest of the PUT, sent in one sendmsg with the tap fds
    (syscall.UnixRights), on a connection of its own."""
    data = json.dumps(body).encode()
    head = (f"PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Content-Length: {len(data)}\r\nContent-Type: application/json\r\n\r\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(SOCK))
        sock.sendmsg([head.encode() + data],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        return read_response(sock)


def open_files(pid: int) -> dict[str, int]:
    """pyvmm's open tap queue files and vhost-net instances (/proc/PID/fd)."""
    counts = {"tun": 0, "vhost": 0, "pipe": 0}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        key = {"/dev/net/tun": "tun", "/dev/vhost-net": "vhost"}.get(target)
        if key is None and target.startswith("pipe:"):
            key = "pipe"
        if key is not None:
            counts[key] += 1
    return counts


def nic_files(pid: int) -> dict[str, int]:
    """Only the tap queue files and vhost-nets (a running VM has pipes of its own)."""
    counts = open_files(pid)
    return {"tun": counts["tun"], "vhost": counts["vhost"]}


def wait_files(pid: int, want: dict[str, int], seconds: float) -> dict[str, int]:
    end = time.monotonic() + seconds
    while (now := nic_files(pid)) != want and time.monotonic() < end:
        time.sleep(0.1)
    return now


# What Kata's generated client sends for a NIC (clh.go, NetConfig): CH's default ip and mask, no tap.
KATA_NET = {"mac": "52:54:00:4b:00:01", "ip": "192.168.249.1", "mask": "255.255.255.0", "iommu": False,
            "num_queues": 2, "queue_size": 256, "vhost_user": False, "vhost_mode": "Client",
            "offload_tso": True, "offload_ufo": True, "offload_csum": True}


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


def hotplug_daemon(conn: Conn, kdisk: bytes) -> None:
    """vm.add-disk into the running VM (its RAM shared for virtio-fs): a qemu-storage-daemon serves the disk
    and the guest reads it; vm.remove-device: the guest ejects it, the daemon stops and the VM goes on (the
    socket left the hang-up watch before it closed: docs/hotplug.md)."""
    start = time.monotonic()
    plugged = conn.call("PUT", "vm.add-disk", kdisk)
    assert plugged.status == 200 and json.loads(plugged.body)["id"] == "kdisk", plugged
    added = storage_daemons()
    read = wait_count("KDISK-READ=", 1, 120)
    assert read == [f"KDISK-READ={KDISK_NOTE.decode()}"], read
    removed = conn.call("PUT", "vm.remove-device", json.dumps({"id": "kdisk"}).encode())
    assert removed.status == 204, removed
    assert wait_for("KDISK-GONE", 120), "the guest did not eject the hot-plugged disk"
    end = time.monotonic() + 10
    while storage_daemons() and time.monotonic() < end:
        time.sleep(0.1)
    left = storage_daemons()
    ticks = LOG.read_text(errors="replace").count("TICK")
    end = time.monotonic() + 30
    while LOG.read_text(errors="replace").count("TICK") < ticks + 2 and time.monotonic() < end:
        time.sleep(0.2)
    assert LOG.read_text(errors="replace").count("TICK") >= ticks + 2, "the guest stopped after the removal"
    state = json.loads(conn.call("GET", "vm.info").body)["state"]
    step("hotplug-daemon", daemons_added=added, read=read[0].split("=")[1], daemons_removed=left, state=state,
         seconds=f"{time.monotonic() - start:.1f}")


def storage_daemons() -> int:
    """How many qemu-storage-daemons run in the lab (their comm is the name's first 15 bytes)."""
    count = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            count += comm.read_text().strip() == "qemu-storage-da"
    return count


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
    """Kata's VmConfig shape (clh.go CreateVM), kernel + initramfs payload (virtio-fs and the agent's vsock:
    the `kata_fs` and `kata_vsock` changes; its NICs come by vm.add-net)."""
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


def kata_fs() -> dict:
    """What Kata adds for its shared directory: `memory.shared` and one `fs` on segment 1 (spec §B.2)."""
    memory = dict(kata_config()["memory"], shared=True)
    fs = [{"tag": "kataShared", "socket": str(FS_SOCK), "num_queues": 1, "queue_size": 1024, "pci_segment": 1,
           "iommu": False}]
    return {"memory": memory, "fs": fs}


def kata_vsock() -> dict:
    """Kata's agent channel: a hybrid vsock, cid 3, on the sandbox's clh.sock (spec §B.2)."""
    return {"vsock": {"cid": 3, "socket": str(VSOCK), "iommu": False}}


class Virtiofsd:
    """virtiofsd for every boot of the VM: QEMU's serves one connection and exits, and holds a lock on its
    socket path while it runs. So the socket is this object's, kept listening, and a new virtiofsd takes it
    (`--fd=`) each time the last one has ended: a VM booted again (vm.reboot, vm.shutdown + vm.boot)
    connects at once and is served as soon as the next one accepts (docs/virtio-fs.md)."""

    def __init__(self) -> None:
        self.share = WORK / "share"
        self.share.mkdir(exist_ok=True)
        (self.share / "note").write_text(FS_NOTE + "\n")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(FS_SOCK))
        self.listener.listen(4)
        self.log = (WORK / "virtiofsd.log").open("w")
        self.served: list[int] = []  # exit status of each virtiofsd that has ended
        self.stopping = False
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        fd = self.listener.fileno()
        while not self.stopping:
            self.proc = subprocess.Popen(
                [VIRTIOFSD, f"--fd={fd}", "-o", f"source={self.share}", "-o", "cache=none"],
                pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
            self.served.append(self.proc.wait())

    def close(self, boots: int) -> list[int]:
        """Stop serving once `boots` virtiofsd have ended (their VMs gone); their exit statuses."""
        end = time.monotonic() + 30
        while len(self.served) < boots and time.monotonic() < end:
            time.sleep(0.1)
        self.stopping = True
        while self.thread.is_alive():  # the next one waits for a connection that will not come
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
            self.thread.join(0.2)
        self.listener.close()
        return self.served[:boots]


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


def nics(vmm: subprocess.Popen, conn: Conn, tap1: int, base: dict[str, int]) -> None:
    """The boot-time NIC carries the guest's ping; pyvmm-remote hot-plugs a second on its own tap fd, which
    pings too; both are removed (the guest ejects them) and pyvmm's tap files and vhost-nets go."""
    assert wait_for("NET0-PING-OK", 120), "the guest could not ping through Kata's NIC"
    start = time.monotonic()
    running = nic_files(vmm.pid)
    # the VM's own copy of the queue file and one vhost-net, besides the VMM's copy
    assert running == {**base, "tun": base["tun"] + 2, "vhost": base["vhost"] + 1}, running
    plugged = subprocess.run(["pyvmm-remote", "--api-socket", str(SOCK), "add-net", f"fd=[{tap1}]"],
                             capture_output=True, text=True, timeout=120, pass_fds=[tap1])
    assert plugged.returncode == 0, plugged
    answer = json.loads(plugged.stdout)
    segment, bus, rest = answer["bdf"].split(":")
    assert (segment, bus, len(rest), rest[2:]) == ("0000", "00", 4, ".0"), answer  # Kata's bdf check
    assert wait_for("NET1-PING-OK", 120), "the guest could not ping through the hot-plugged NIC"
    two = nic_files(vmm.pid)
    assert two == {**base, "tun": base["tun"] + 4, "vhost": base["vhost"] + 2}, two
    info = json.loads(conn.call("GET", "vm.info").body)
    ids = [n["id"] for n in info["config"]["net"]]
    assert ids == ["_net0", answer["id"]] and answer["id"] in info["device_tree"], info
    removed = remote("remove-device", answer["id"])
    assert removed.returncode == 0, removed
    assert wait_for("NET1-GONE", 120), "the guest did not eject the hot-plugged NIC"
    one = wait_files(vmm.pid, running, 10)
    assert one == running, one
    removed = remote("remove-device", "_net0")
    assert removed.returncode == 0, removed
    assert wait_for("NET0-GONE", 120), "the guest did not eject the boot-time NIC"
    none = wait_files(vmm.pid, base, 10)
    assert none == base, none
    info = json.loads(conn.call("GET", "vm.info").body)
    assert "net" not in info["config"], info
    step("nics", hotplugged=json.dumps(answer), files_two=json.dumps(two), files_one=json.dumps(one),
         files_none=json.dumps(none), seconds=f"{time.monotonic() - start:.1f}")


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
    virtiofsd = Virtiofsd()
    created = conn.call("PUT", "vm.create", json.dumps(kata_config(**kata_fs(), **kata_vsock())).encode())
    assert created.status == 204, created
    info = json.loads(conn.call("GET", "vm.info").body)
    assert info["state"] == "Created", info
    assert info["config"]["platform"]["num_pci_segments"] == 2 and info["config"]["cpus"]["boot_vcpus"] == 1
    vsock = info["config"]["vsock"]
    assert (vsock["cid"], vsock["socket"]) == (3, str(VSOCK)), vsock
    shown = info["config"]["fs"]
    assert [(f["tag"], f["socket"], f["pci_segment"]) for f in shown] == [("kataShared", str(FS_SOCK), 1)], \
        shown
    # Kata's NIC before boot: first a pipe and a wrong queue count (400, the fds closed), then its request
    subprocess.run(["modprobe", "-a", "tun", "vhost_net"], check=True)
    tap0, tap1 = lab_tap("pyvmmk0", "192.168.251.1/24"), lab_tap("pyvmmk1", "192.168.252.1/24")
    nets_start = time.monotonic()
    base = open_files(vmm.pid)
    r, w = os.pipe()
    piped = kata_add_net(KATA_NET, [r])
    os.close(r)
    os.close(w)
    assert piped.status == 400 and "is not a tun/tap queue file" in errors(piped)[-1], piped
    counted = kata_add_net({**KATA_NET, "num_queues": 4}, [tap0])
    assert counted.status == 400 and "so num_queues is 2, not 4" in errors(counted)[-1], counted
    # one queue file of a multi-queue tap sent twice: two fds in pyvmm, one open file (kcmp, under API_VMM)
    multi = lab_tap("pyvmmk2", None, IFF_MULTI_QUEUE)
    twice = kata_add_net({**KATA_NET, "num_queues": 4}, [multi, multi])
    os.close(multi)
    assert twice.status == 400 and "are the same open file" in errors(twice)[-1], twice
    assert open_files(vmm.pid) == base, (open_files(vmm.pid), base)
    added = kata_add_net(KATA_NET, [tap0])
    assert (added.status, added.body) == (204, b""), added
    held = open_files(vmm.pid)
    assert held == {**base, "tun": base["tun"] + 1}, held  # the VMM keeps the tap's queue file
    info = json.loads(conn.call("GET", "vm.info").body)
    assert [n["mac"] for n in info["config"]["net"]] == [KATA_NET["mac"]], info
    step("kata-add-net", refused=f"{piped.status},{counted.status},{twice.status}", added=added.status,
         files=json.dumps(held), seconds=f"{time.monotonic() - nets_start:.1f}")
    booted = conn.call("PUT", "vm.boot")
    assert booted.status == 204, booted
    info = json.loads(conn.call("GET", "vm.info").body)
    assert info["state"] == "Running", info
    bdfs = {name: node["pci_bdf"] for name, node in info["device_tree"].items()}
    assert bdfs.get("__rng", "").startswith("0000:00:"), bdfs
    # CH's names from one counter (net, fs, vsock): the fs on segment 1 as Kata asked
    assert bdfs.get("_fs1", "").startswith("0001:00:"), bdfs
    assert bdfs.get("_vsock2", "").startswith("0000:00:"), bdfs
    assert [f["id"] for f in info["config"]["fs"]] == ["_fs1"] and info["config"]["vsock"]["id"] == "_vsock2"
    comms = thread_names(vmm.pid)
    assert "vcpu0" in comms and "http-server" in comms, comms
    assert VSOCK.is_socket(), "no listener on the vsock's socket"  # where Kata's runtime reaches its agent
    step("kata-start", state=info["state"], bdfs=json.dumps(bdfs), threads=",".join(comms))
    remote_info = remote("info")
    assert remote_info.returncode == 0 and json.loads(remote_info.stdout)["state"] == "Running", remote_info
    assert remote("ping").returncode == 0
    assert wait_for("KATA-GUEST-UP", 300), "the guest did not run its command"
    assert wait_for(f"KATA-FS={FS_NOTE}", 10), "the guest did not read the shared directory"
    assert wait_for("(domain 0001 [bus 00])", 60), "the guest has no second PCI segment"
    step("guest-ran", segment1=True)
    nics(vmm, conn, tap1, {"tun": base["tun"], "vhost": base["vhost"]})
    for fd in (tap0, tap1):
        os.close(fd)
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
    # included, as in CH. Both boot from the stored config (api/vmm.py): vm.reboot's VM is shown to have
    # the disk by vm.info (built from the new VM's devices) without waiting for that guest's boot; after
    # vm.shutdown and vm.boot the guest sees it at boot (virtio_blk loaded by modalias, /sys/block/vda).
    image = WORK / "kdisk.img"
    image.write_bytes(KDISK_NOTE + b"\0" * ((1 << 20) - len(KDISK_NOTE)))
    kdisk = json.dumps({"path": str(image), "id": "kdisk"}).encode()
    hotplug_daemon(conn, kdisk)
    plugged = conn.call("PUT", "vm.add-disk", kdisk)
    assert plugged.status == 200 and json.loads(plugged.body)["id"] == "kdisk", plugged
    sent = time.monotonic()
    rebooted = conn.call("PUT", "vm.reboot")
    assert rebooted.status == 204, rebooted
    reboot_answered = time.monotonic() - sent
    info = json.loads(conn.call("GET", "vm.info").body)
    disks = [d["id"] for d in info["config"].get("disks", [])]  # CH leaves "disks" out when there are none
    assert info["state"] == "Running" and disks == ["kdisk"], info
    assert "vcpu0" in thread_names(vmm.pid)
    # kdisk is a boot disk now: a qemu-storage-daemon serves it, started by pyvmm's spawner (pyvmm itself
    # may start no program under its filter), and stopped with the VM (docs/virtio-blk.md)
    daemons = [storage_daemons()]
    shut = conn.call("PUT", "vm.shutdown")
    assert shut.status == 204, shut
    daemons.append(storage_daemons())
    info = json.loads(conn.call("GET", "vm.info").body)
    assert info["state"] == "Created" and [d["id"] for d in info["config"]["disks"]] == ["kdisk"], info
    assert conn.call("PUT", "vm.boot").status == 204
    daemons.append(storage_daemons())
    ups = wait_count("KATA-GUEST-UP", 2, 300)
    assert ups[1:] == ["KATA-GUEST-UP disks=1"], ups
    assert "vcpu0" in thread_names(vmm.pid)
    boots = 3  # start, vm.reboot, vm.boot
    step("reboot", boots=boots, guest_ups=len(ups), disks_at_boot=ups[-1].split("=")[-1],
         daemons=",".join(map(str, daemons)))
    step("reboot-seconds", reboot=f"{reboot_answered:.1f}", to_guest_up=f"{time.monotonic() - sent:.1f}")

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
    # the guests that ran their command (start, vm.shutdown + vm.boot) mounted the directory and read the
    # file; every VM (vm.reboot's too, stopped before its guest mounted it) had its own virtiofsd, which
    # ended with it
    reads = re.findall(r"^KATA-FS=(\S*)", LOG.read_text(errors="replace"), re.MULTILINE)
    served = virtiofsd.close(boots=boots)
    step("kata-fs", reads=",".join(reads) or "none", served=",".join(map(str, served)))


if __name__ == "__main__":
    main()
