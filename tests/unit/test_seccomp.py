"""--seccomp: the BPF programs (assembled and evaluated instruction by instruction), the allow-lists'
shape, the option, and the filters on this kernel (in a child process: a filter cannot be taken off)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pyvmm.config import ConfigError, parse_command_line, parse_vm_config
from pyvmm.host.tap import SockIoctl, TunIoctl
from pyvmm.kvm.bindings import KvmIoctl
from pyvmm.sandbox import BASE_KINDS, SeccompMode, ThreadKind
from pyvmm.seccomp import bpf
from pyvmm.seccomp.allowlists import API_ONLY_KINDS, CLONE_THREAD, O_CREAT, O_RDONLY, rules
from pyvmm.seccomp.bpf import AUDIT_ARCH_X86_64, ArgCheck, Insn, Rule, SeccompRet, compile_filter
from pyvmm.seccomp.install import default_action
from pyvmm.seccomp.syscalls import SYSCALLS
from pyvmm.vfio.bindings import VfioIoctl
from pyvmm.vhost.bindings import VhostIoctl

AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK = 10, 16, 17, 40  # <linux/socket.h>
ALLOW = SeccompRet.SECCOMP_RET_ALLOW
KILL = SeccompRet.SECCOMP_RET_KILL_PROCESS
LOG = SeccompRet.SECCOMP_RET_LOG
NR = SYSCALLS
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def run(prog: Sequence[Insn], nr: int, args: Sequence[int] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Evaluate `prog` on one syscall as the kernel runs a seccomp filter (the instructions compile_filter
    emits; anything else is refused here)."""
    data = [0] * 6
    data[: len(args)] = list(args)
    acc = 0
    pc = 0
    while True:
        insn = prog[pc]
        if insn.code == bpf.LD_W_ABS:
            if insn.k == bpf.SECCOMP_DATA_NR:
                acc = nr & 0xFFFF_FFFF
            elif insn.k == bpf.SECCOMP_DATA_ARCH:
                acc = arch
            elif 16 <= insn.k < 64 and insn.k % 8 == 0:
                acc = data[(insn.k - 16) // 8] & 0xFFFF_FFFF
            else:
                raise ValueError(f"load from offset {insn.k} at {pc}")
            pc += 1
        elif insn.code == bpf.ALU_AND_K:
            acc &= insn.k
            pc += 1
        elif insn.code == bpf.JEQ_K:
            pc += 1 + (insn.jt if acc == insn.k else insn.jf)
        elif insn.code == bpf.JGE_K:
            pc += 1 + (insn.jt if acc >= insn.k else insn.jf)
        elif insn.code == bpf.RET_K:
            return insn.k
        else:
            raise ValueError(f"unexpected BPF code {insn.code:#x} at {pc}")


def program(kind: ThreadKind, mode: SeccompMode = SeccompMode.TRUE) -> list[Insn]:
    return compile_filter(rules(kind), default_action(mode))


# --- the assembler ---------------------------------------------------------------------------------------


def test_a_small_program_instruction_by_instruction() -> None:
    prog = compile_filter([Rule(NR["read"]), Rule(NR["ioctl"], ArgCheck(1, (0xAE80, 0xAE03)))], int(KILL))
    L, J, JGE, R = bpf.LD_W_ABS, bpf.JEQ_K, bpf.JGE_K, bpf.RET_K
    assert prog == [
        Insn(L, k=4), Insn(J, 1, 0, AUDIT_ARCH_X86_64), Insn(R, k=KILL),  # another ABI: killed
        Insn(L, k=0), Insn(JGE, 0, 1, 0x40000000), Insn(R, k=KILL),  # x32: killed
        Insn(J, 0, 1, NR["read"]), Insn(R, k=ALLOW),
        Insn(J, 0, 5, NR["ioctl"]), Insn(L, k=24),  # args[1], low half
        Insn(J, 2, 0, 0xAE80), Insn(J, 1, 0, 0xAE03), Insn(R, k=KILL), Insn(R, k=ALLOW),
        Insn(R, k=KILL),
    ]
    # What the kernel is handed (seccomp_export_bpf's format): u16 code, u8 jt, u8 jf, u32 k, little-endian.
    raw = bpf.to_bytes(prog)
    assert len(raw) == 8 * len(prog)
    assert raw[:8] == bytes([0x20, 0, 0, 0, 4, 0, 0, 0])
    assert raw[8:16] == bytes([0x15, 0, 1, 0]) + AUDIT_ARCH_X86_64.to_bytes(4, "little")
    assert raw[-8:] == bytes([0x06, 0, 0, 0]) + int(KILL).to_bytes(4, "little")


def test_masked_check_and_own_action() -> None:
    prog = compile_filter(
        [Rule(NR["clone"], ArgCheck(0, (CLONE_THREAD,), mask=CLONE_THREAD)),
         Rule(NR["clone3"], action=bpf.ret_errno(errno.ENOSYS))],
        int(LOG),
    )
    assert Insn(bpf.ALU_AND_K, k=CLONE_THREAD) in prog
    assert run(prog, NR["clone"], [0x3D0F00]) == ALLOW  # pthread_create's flags
    assert run(prog, NR["clone"], [0x01200011]) == LOG  # fork(): no CLONE_THREAD
    assert run(prog, NR["clone3"]) == SeccompRet.SECCOMP_RET_ERRNO | errno.ENOSYS


def test_assembler_refuses_what_the_kernel_would() -> None:
    with pytest.raises(ValueError, match="two rules"):
        compile_filter([Rule(1), Rule(1)], int(KILL))
    with pytest.raises(ValueError, match="out of range"):
        Insn(bpf.JEQ_K, jt=256)
    with pytest.raises(ValueError, match="six"):
        ArgCheck(6, (1,))
    with pytest.raises(ValueError, match="4096"):
        compile_filter([Rule(n) for n in range(3000)], int(KILL))


# --- the lists ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not UNISTD.exists(), reason="no <asm/unistd_64.h> here")
def test_syscall_numbers_match_the_kernel_header() -> None:
    header = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()))
    assert {name: int(header[name]) for name in SYSCALLS} == SYSCALLS


@pytest.mark.parametrize("kind", list(ThreadKind), ids=lambda k: k.value)
@pytest.mark.parametrize("mode", [SeccompMode.TRUE, SeccompMode.LOG], ids=lambda m: m.value)
def test_every_filter_refuses_the_dangerous_calls(kind: ThreadKind, mode: SeccompMode) -> None:
    prog = program(kind, mode)
    refused = int(default_action(mode))
    for name in ("execve", "fork", "vfork", "ptrace", "mount", "socket", "kill", "setns",
                 "unshare", "bpf", "init_module", "finit_module", "kexec_load", "personality",
                 "process_vm_writev"):
        assert run(prog, NR[name]) == refused, name
    # No socket but a Unix one (--vsock), and the API_VMM's AF_INET datagram socket for --net's tap:
    # never netlink, packet, IPv6 or anything else.
    for family in (AF_INET6, AF_NETLINK, AF_PACKET, AF_VSOCK):
        assert run(prog, NR["socket"], [family]) == refused, family
    if kind is not ThreadKind.API_VMM:
        assert run(prog, NR["socket"], [socket.AF_INET]) == refused
    # connect() cannot be checked (its address is in memory): only the threads that connect to --vsock's
    # PATH_<port> have it (the queue worker, so the vCPU that starts it, and the bases under them).
    if kind in (ThreadKind.TERMINAL_INPUT, ThreadKind.HTTP_SERVER, ThreadKind.VSOCK_MUXER,
                ThreadKind.VHOST_USER):
        assert run(prog, NR["connect"]) == refused
    assert run(prog, NR["clone"], [0x01200011]) == refused  # fork through clone
    # A thread in a new namespace: the kernel allows CLONE_THREAD with a new mount, network, UTS, IPC or
    # cgroup namespace; no filter does.
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert run(prog, NR["clone"], [0x3D0F00 | flag]) == refused, hex(flag)
    assert run(prog, NR["clone"], [0x3D0F00]) == ALLOW  # pthread_create's flags
    assert run(prog, NR["prctl"], [4]) == refused  # PR_SET_DUMPABLE
    assert run(prog, NR["seccomp"], [0]) == refused  # SECCOMP_SET_MODE_STRICT
    # Another ABI is never pyvmm, whatever the mode.
    assert run(prog, NR["read"], arch=0x40000003) == KILL  # i386
    assert run(prog, NR["read"] | 0x40000000) == KILL  # x32


@pytest.mark.parametrize("kind", list(ThreadKind), ids=lambda k: k.value)
def test_every_thread_can_run_python_and_take_its_own_filter(kind: ThreadKind) -> None:
    prog = program(kind)
    for name in ("futex", "mmap", "munmap", "read", "write", "close", "rt_sigreturn", "exit", "rseq",
                 "set_robust_list", "getrandom"):
        assert run(prog, NR[name]) == ALLOW, name
    assert run(prog, NR["clone"], [0x3D0F00]) == ALLOW
    assert run(prog, NR["clone3"]) == SeccompRet.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert run(prog, NR["openat"], [0, 0, O_RDONLY | 0o2000000]) == ALLOW  # O_CLOEXEC: a traceback's source
    assert run(prog, NR["seccomp"], [1]) == ALLOW and run(prog, NR["prctl"], [38]) == ALLOW


def test_only_the_vmm_filter_writes_files() -> None:
    for kind in set(ThreadKind) - BASE_KINDS:
        prog = program(kind)
        assert run(prog, NR["openat"], [0, 0, 1]) == KILL, kind  # O_WRONLY
        assert run(prog, NR["openat"], [0, 0, O_RDONLY | O_CREAT]) == KILL, kind
        assert run(prog, NR["unlink"]) == KILL
    # The main thread gives managed=on devices back (sysfs writes, the journal) under its filter.
    vmm = program(ThreadKind.VMM)
    assert run(vmm, NR["openat"], [0, 0, 1]) == ALLOW and run(vmm, NR["flock"]) == ALLOW


def test_ioctls_by_request_number() -> None:
    vcpu, worker, vmm = program(ThreadKind.VCPU), program(ThreadKind.VIRTIO_WORKER), program(ThreadKind.VMM)
    ioctl = NR["ioctl"]
    assert run(vcpu, ioctl, [0, KvmIoctl.KVM_RUN]) == ALLOW
    assert run(vcpu, ioctl, [0, VfioIoctl.VFIO_DEVICE_SET_IRQS]) == ALLOW
    assert run(worker, ioctl, [0, KvmIoctl.KVM_RUN]) == KILL  # a worker never runs a vCPU
    for creating in (KvmIoctl.KVM_CREATE_VM, KvmIoctl.KVM_CREATE_VCPU, KvmIoctl.KVM_CREATE_DEVICE,
                     KvmIoctl.KVM_SET_CPUID2, VfioIoctl.VFIO_GROUP_GET_DEVICE_FD, VfioIoctl.VFIO_SET_IOMMU):
        for prog in (vcpu, worker, vmm):
            assert run(prog, ioctl, [0, creating]) == KILL, creating.name  # all built before the filter
    # The kernel truncates the request to 32 bits; so does the filter.
    assert run(vcpu, ioctl, [0, (1 << 32) | KvmIoctl.KVM_RUN]) == ALLOW
    assert run(vcpu, ioctl, [0, 0x5401]) == ALLOW  # TCGETS: io.open reading a source for a traceback
    assert run(vcpu, ioctl, [0, 0x5402]) == KILL  # TCSETS: only the main thread restores the terminal
    # The guest's eject releases a function on its vCPU thread: the group leaves KVM and the container.
    for releasing in (KvmIoctl.KVM_SET_DEVICE_ATTR, VfioIoctl.VFIO_GROUP_UNSET_CONTAINER):
        assert run(vcpu, ioctl, [0, releasing]) == ALLOW, releasing.name


def test_the_api_vmm_builds_and_hot_plugs_and_its_server_only_serves() -> None:
    """`pyvmm --api-socket`: the main thread builds VMs and hot-plugs under its filter (every KVM and VFIO
    request); the HTTP server thread answers on its socket and touches neither KVM, VFIO nor files."""
    api, http = program(ThreadKind.API_VMM), program(ThreadKind.HTTP_SERVER)
    ioctl = NR["ioctl"]
    for request in (*KvmIoctl, *VfioIoctl):
        assert run(api, ioctl, [0, request]) == ALLOW, request.name
        assert run(http, ioctl, [0, request]) == KILL, request.name
    assert run(api, NR["memfd_create"]) == ALLOW and run(api, NR["openat"], [0, 0, 2]) == ALLOW
    for name in ("accept4", "recvmsg", "sendto", "epoll_wait", "epoll_ctl"):
        assert run(http, NR[name]) == ALLOW, name
    assert run(http, ioctl, [0, 0x5421]) == ALLOW  # FIONBIO
    assert run(http, ioctl, [0, 0x5451]) == ALLOW  # FIOCLEX
    for name in ("socket", "connect", "bind", "listen", "memfd_create", "flock", "unlink", "eventfd2"):
        assert run(http, NR[name]) == KILL, name
    # The CLI's VMM filter (the VM built before it) creates nothing.
    assert run(program(ThreadKind.VMM), ioctl, [0, KvmIoctl.KVM_CREATE_VM]) == KILL


def test_the_vsock_muxer_serves_host_clients_and_the_worker_connects_to_the_host() -> None:
    """--vsock: the muxer thread accepts host clients, reads their CONNECT line and forwards data; the
    queue worker (started by a vCPU thread, so the vCPU's list too) makes the guest's connections to
    PATH_<port> and moves data both ways. Neither touches KVM beyond interrupts, nor files."""
    muxer, worker, vcpu = (program(k) for k in (ThreadKind.VSOCK_MUXER, ThreadKind.VIRTIO_WORKER,
                                                ThreadKind.VCPU))
    ioctl = NR["ioctl"]
    for name in ("accept4", "getsockname", "recvfrom", "sendto", "shutdown", "poll", "close", "read",
                 "write"):
        assert run(muxer, NR[name]) == ALLOW, name
    assert run(muxer, ioctl, [0, 0x5421]) == ALLOW  # FIONBIO: setblocking(False) on a host client
    for name in ("socket", "connect", "bind", "listen", "unlink", "recvmsg", "eventfd2"):
        assert run(muxer, NR[name]) == KILL, name
    assert run(muxer, ioctl, [0, KvmIoctl.KVM_SIGNAL_MSI]) == KILL  # the worker interrupts, not the muxer
    for prog in (worker, vcpu):
        assert run(prog, NR["socket"], [socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK]) == ALLOW
        for name in ("connect", "sendto", "recvmsg", "shutdown"):
            assert run(prog, NR[name]) == ALLOW, name
        for name in ("accept4", "bind", "listen", "unlink"):
            assert run(prog, NR[name]) == KILL, name


def test_vhost_user_disk_driver_ok_and_the_hangup_watch() -> None:
    """--disk vhost_user=on: the vCPU writing DRIVER_OK (and the main thread at teardown) send vhost-user
    messages with fds and read the acks; the hang-up watch only polls: no socket call, no KVM request."""
    vcpu, vmm, watch = (program(k) for k in (ThreadKind.VCPU, ThreadKind.VMM, ThreadKind.VHOST_USER))
    for prog in (vcpu, vmm):
        for name in ("sendmsg", "recvmsg", "poll", "ppoll"):
            assert run(prog, NR[name]) == ALLOW, name
    for name in ("poll", "ppoll", "read", "futex", "close"):
        assert run(watch, NR[name]) == ALLOW, name
    for name in ("sendmsg", "recvmsg", "sendto", "recvfrom", "socket", "connect", "accept4", "eventfd2"):
        assert run(watch, NR[name]) == KILL, name
    assert run(watch, NR["ioctl"], [0, KvmIoctl.KVM_SIGNAL_MSI]) == KILL


def test_net_driver_ok_reset_and_control_queue() -> None:
    """--net: the tap and /dev/vhost-net are opened and set up before the filter (VHOST_SET_OWNER,
    TUNSETIFF, the address ioctls); the guest's DRIVER_OK and reset on its vCPU thread hand the data
    queues to vhost-net and take them back; the control queue's worker changes the active queue pairs;
    the main thread stops the vrings at teardown. `pyvmm --api-socket` with --net builds it all under
    API_VMM."""
    vcpu, worker, vmm, api = (program(k) for k in (ThreadKind.VCPU, ThreadKind.VIRTIO_WORKER, ThreadKind.VMM,
                                                   ThreadKind.API_VMM))
    ioctl = NR["ioctl"]
    driver_ok = (TunIoctl.TUNSETOFFLOAD, TunIoctl.TUNSETQUEUE, VhostIoctl.VHOST_SET_FEATURES,
                 VhostIoctl.VHOST_SET_MEM_TABLE, VhostIoctl.VHOST_SET_VRING_NUM,
                 VhostIoctl.VHOST_SET_VRING_BASE,
                 VhostIoctl.VHOST_SET_VRING_ADDR, VhostIoctl.VHOST_SET_VRING_KICK,
                 VhostIoctl.VHOST_SET_VRING_CALL, VhostIoctl.VHOST_NET_SET_BACKEND,
                 VhostIoctl.VHOST_GET_VRING_BASE, KvmIoctl.KVM_IOEVENTFD, KvmIoctl.KVM_IRQFD)
    for request in driver_ok:
        assert run(vcpu, ioctl, [0, request]) == ALLOW, request.name
        assert run(vmm, ioctl, [0, request]) == ALLOW, request.name  # teardown: _stop_vhost, unbinding
    assert run(vcpu, NR["eventfd2"]) == ALLOW  # the call eventfd of a queue without a vector
    built_before = (VhostIoctl.VHOST_SET_OWNER, VhostIoctl.VHOST_RESET_OWNER, VhostIoctl.VHOST_GET_FEATURES,
                    TunIoctl.TUNSETIFF, TunIoctl.TUNSETVNETHDRSZ, TunIoctl.TUNGETIFF, *SockIoctl)
    for request in built_before:
        for prog in (vcpu, worker, vmm):
            assert run(prog, ioctl, [0, request]) == KILL, request.name
    assert run(worker, ioctl, [0, TunIoctl.TUNSETQUEUE]) == ALLOW  # VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
    for request in (VhostIoctl.VHOST_SET_MEM_TABLE, VhostIoctl.VHOST_NET_SET_BACKEND, TunIoctl.TUNSETOFFLOAD):
        assert run(worker, ioctl, [0, request]) == KILL, request.name  # the data queues are vhost-net's
    for request in (*TunIoctl, *SockIoctl, *VhostIoctl):
        assert run(api, ioctl, [0, request]) == ALLOW, request.name
    assert run(api, NR["socket"], [socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC]) == ALLOW
    assert run(vmm, NR["socket"], [socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC]) == KILL
    # a tap pyvmm created goes with its last file: nothing but close(2) removes it
    for prog in (vcpu, vmm, api):
        assert run(prog, NR["close"]) == ALLOW


def test_hot_plugged_disk_and_the_event_monitor() -> None:
    """vm.add-disk on the main thread under API_VMM (open, lock, probe, eventfds, ioeventfds, irqfds and
    routes); its worker is any virtio-blk worker; the guest's eject on a vCPU thread stops the worker,
    unbinds and closes it all and reports vm/device-removed on --event-monitor (a write, as the main
    thread's events)."""
    api, vcpu = program(ThreadKind.API_VMM), program(ThreadKind.VCPU)
    ioctl = NR["ioctl"]
    for name in ("openat", "fstat", "fcntl", "lseek", "preadv", "preadv2", "eventfd2", "mmap"):
        assert run(api, NR[name], [0, 0, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT, 0]) == ALLOW, name
    for request in (KvmIoctl.KVM_IOEVENTFD, KvmIoctl.KVM_IRQFD, KvmIoctl.KVM_SET_GSI_ROUTING):
        assert run(api, ioctl, [0, request]) == ALLOW and run(vcpu, ioctl, [0, request]) == ALLOW
    for name in ("write", "futex", "close", "munmap"):  # stop fd written, join, fds and the image closed
        assert run(vcpu, NR[name]) == ALLOW, name
    for kind in (ThreadKind.VMM, ThreadKind.API_VMM, ThreadKind.VCPU):  # --event-monitor's writers
        assert run(program(kind), NR["write"]) == ALLOW, kind


def _allowed_calls(kind: ThreadKind) -> list[tuple[int, list[int]]]:
    """A (nr, args) that each rule of `kind` allows, every ioctl request included."""
    calls = []
    for rule in rules(kind):
        if rule.check is None:
            calls.append((rule.nr, []))
        else:
            for value in rule.check.values:
                args = [0] * 6
                args[rule.check.arg] = value
                calls.append((rule.nr, args))
    return calls


@pytest.mark.parametrize(
    ("inner", "outer"),
    # sorted: a frozenset's order changes with the hash seed, and pytest-xdist's workers must agree
    [*((kind, base) for base in sorted(BASE_KINDS, key=lambda k: k.value) for kind in ThreadKind
       if kind not in BASE_KINDS
       and not (base is ThreadKind.VMM and kind in API_ONLY_KINDS)),
     (ThreadKind.VMM, ThreadKind.API_VMM), (ThreadKind.VIRTIO_WORKER, ThreadKind.VCPU)],
    ids=lambda k: k.value,
)
def test_stacked_filters_allow_what_the_inner_list_allows(inner: ThreadKind, outer: ThreadKind) -> None:
    """Filters stack: a thread gets a base filter (VMM or API_VMM) and then its own; a worker, started by a
    vCPU thread, also inherits the vCPU filter. A call the inner list allows must pass the outer filters
    too. Every kind, the HTTP server's included, runs under either base (a kind added later gets this check
    without listing it here)."""
    outer_prog = program(outer)
    expected = {NR["clone3"]: SeccompRet.SECCOMP_RET_ERRNO | errno.ENOSYS}
    for nr, args in _allowed_calls(inner):
        assert run(outer_prog, nr, args) == expected.get(nr, ALLOW), (nr, [hex(a) for a in args])


# --- the option --------------------------------------------------------------------------------------------


def test_option_default_values_and_refusals() -> None:
    base = ["--kernel", "k"]
    assert parse_vm_config(base).seccomp is SeccompMode.TRUE
    for word in ("true", "false", "log"):
        assert parse_vm_config([*base, "--seccomp", word]).seccomp is SeccompMode(word)
    with pytest.raises(ConfigError, match=r"--seccomp: invalid value 'errno': use true, false or log") as e:
        parse_vm_config([*base, "--seccomp", "errno"])
    assert e.value.exit_status == 2
    with pytest.raises(ConfigError, match="more than once"):
        parse_vm_config([*base, "--seccomp", "true", "--seccomp", "log"])
    # --api-socket: the option is the VMM's, with or without a VM on the command line
    assert parse_command_line(["--api-socket", "/run/a.sock"]).seccomp is SeccompMode.TRUE
    only_api = parse_command_line(["--api-socket", "/run/a.sock", "--seccomp", "log"])
    assert only_api.vm is None and only_api.seccomp is SeccompMode.LOG
    with_vm = parse_command_line([*base, "--api-socket", "/run/a.sock", "--seccomp", "false"])
    assert with_vm.seccomp is SeccompMode.FALSE and with_vm.vm is not None


# --- on this kernel -----------------------------------------------------------------------------------------


def _child(body: str) -> subprocess.CompletedProcess[str]:
    code = "import sys\nfrom pyvmm.seccomp import SeccompMode, install\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def _seccomp_available() -> bool:
    status = Path("/proc/self/status").read_text()
    return "Seccomp:" in status


needs_seccomp = pytest.mark.skipif(not _seccomp_available(), reason="no seccomp in this kernel")


@needs_seccomp
def test_filter_on_every_thread_and_a_forbidden_call_kills() -> None:
    proc = _child("""
        import os, socket, threading
        from pyvmm import sandbox
        install(SeccompMode.TRUE)
        def status():
            return dict(l.split(":\\t", 1) for l in open("/proc/thread-self/status").read().splitlines())
        s = status()
        print("main", s["Seccomp"].strip(), s["NoNewPrivs"].strip(), s["Seccomp_filters"].strip(), flush=True)
        def vcpu():
            sandbox.enter(sandbox.ThreadKind.VCPU)
            s = status()
            print("vcpu", s["Seccomp"].strip(), s["Seccomp_filters"].strip(), flush=True)
            socket.socket()  # outside every list
            print("not killed", flush=True)
        t = threading.Thread(target=vcpu)
        t.start(); t.join()
        print("not killed either", flush=True)
    """)
    assert proc.returncode == -31, (proc.returncode, proc.stdout, proc.stderr)  # SIGSYS
    assert proc.stdout.splitlines() == ["main 2 1 1", "vcpu 2 2"], proc.stdout


@needs_seccomp
def test_an_unclosed_socket_dropped_on_any_thread_does_not_kill() -> None:
    """CPython formats an unclosed socket's ResourceWarning (its repr asks getsockname and getpeername) even
    when the warning is ignored: dropping one on a worker thread must not end pyvmm."""
    proc = _child("""
        import gc, socket, threading
        from pyvmm import sandbox
        pairs = [socket.socketpair() for _ in range(2)]  # made before the filter, as the muxer's
        install(SeccompMode.TRUE)
        def worker():
            sandbox.enter(sandbox.ThreadKind.VIRTIO_WORKER)
            pairs.pop(); gc.collect()
            print("worker alive", flush=True)
        t = threading.Thread(target=worker)
        t.start(); t.join()
        pairs.pop(); gc.collect()
        print("main alive", flush=True)
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.splitlines() == ["worker alive", "main alive"], proc.stdout


@needs_seccomp
def test_api_vmm_filter_and_the_http_server_thread() -> None:
    """As `pyvmm --api-socket` runs: the API_VMM filter on every thread, the server thread's own on top; a
    socket() from the server thread kills the process."""
    proc = _child("""
        import socket, threading
        from pyvmm import sandbox
        r, w = socket.socketpair()  # as the listener, opened before the filter
        install(SeccompMode.TRUE, sandbox.ThreadKind.API_VMM)
        def server():
            sandbox.enter(sandbox.ThreadKind.HTTP_SERVER)
            s = dict(l.split(":\t", 1) for l in open("/proc/thread-self/status").read().splitlines())
            w.settimeout(2.0); w.set_inheritable(False)
            w.sendall(b"x"); print("server", s["Seccomp_filters"].strip(), r.recv(1), flush=True)
            socket.socket()
            print("not killed", flush=True)
        t = threading.Thread(target=server)
        t.start(); t.join()
    """)
    assert proc.returncode == -31, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.splitlines() == ["server 2 b'x'"], proc.stdout


@needs_seccomp
def test_a_program_pyvmm_host_would_run_under_the_filter_is_refused_not_fatal() -> None:
    """A managed=on hot-plug that needs `modprobe vfio-pci` (no program may run under the filter): one line
    instead of a fork that kills pyvmm."""
    proc = _child("""
        from pyvmm import sandbox
        from pyvmm.host.actions import Changer
        from pyvmm.host.errors import HostError
        install(SeccompMode.TRUE, sandbox.ThreadKind.API_VMM)
        try:
            Changer().run("vfio-pci", ["modprobe", "vfio-pci"])
        except HostError as exc:
            print(exc, flush=True)
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.startswith("vfio-pci: `modprobe vfio-pci` cannot run under --seccomp"), proc.stdout


@needs_seccomp
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a network namespace of its own needs root and unshare(1)")
def test_a_managed_hot_plug_under_the_filter_refuses_what_it_cannot_check() -> None:
    """The in-use check joins other network namespaces to read their interfaces (setns, a socket there),
    which no list allows: under the filter (a managed=on hot-plug) it says so instead of being killed."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        for _ in range(200):
            if Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.01)
        proc = _child("""
            from pyvmm import sandbox
            from pyvmm.host import inuse
            install(SeccompMode.TRUE, sandbox.ThreadKind.API_VMM)
            print(inuse._other_netns_uses("/sys/devices/pci0000:00/0000:00:03.0"), flush=True)
        """)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "other network namespace(s) cannot be checked under --seccomp" in proc.stdout, proc.stdout
    assert "pyvmm-host bind" in proc.stdout, proc.stdout


@needs_seccomp
def test_vsock_muxer_and_queue_worker_under_their_filters(tmp_path: Path) -> None:
    """A real VsockMuxer on this kernel as `pyvmm --vsock` runs it: the listener made before the VMM filter,
    the muxer's thread started after it (its own filter on top), the guest's packets handed over on a
    worker started by a "vCPU" thread (three filters): a host client's CONNECT line, the guest's answer, a
    guest connection to PATH_5000 and its data, the teardown (PATH removed) on the main thread."""
    body = """
        import os, socket, threading
        from pyvmm import sandbox
        from pyvmm.devices.virtio.vsock_muxer import FIRST_HOST_PORT, VsockMuxer, listen_unix
        from pyvmm.devices.virtio.vsock_proto import Header, VsockOp, VsockType
        path = PATH
        listener = listen_unix(path)
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.bind(path + "_5000"); peer.listen(1)
        kicked = threading.Event()
        mux = VsockMuxer(3, listener, path, kicked.set)
        install(SeccompMode.TRUE)
        def filters(tid="thread-self"):
            with open(f"/proc/{tid}/status") as f:
                return dict(l.split(":\\t", 1) for l in f.read().splitlines())["Seccomp_filters"].strip()
        mux.start()  # as machine.start() starts the services
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path); client.sendall(b"CONNECT 1234\\n")
        assert kicked.wait(5)  # the muxer accepted, read the line and queued the guest's REQUEST
        def packet(src, dst, op, data=b""):
            mux.guest_packet(Header(3, 2, src, dst, len(data), VsockType.STREAM, op, 0, 65536, 0),
                             [memoryview(data)])
        def worker():
            sandbox.enter(sandbox.ThreadKind.VIRTIO_WORKER)
            packet(1234, FIRST_HOST_PORT, VsockOp.RESPONSE)  # the guest accepted: OK to the client
            packet(7000, 5000, VsockOp.REQUEST)  # the guest connects to host port 5000
            packet(7000, 5000, VsockOp.RW, b"from the guest")
            print("worker", filters(), flush=True)
        def vcpu():
            sandbox.enter(sandbox.ThreadKind.VCPU)
            t = threading.Thread(target=worker); t.start(); t.join()
        t = threading.Thread(target=vcpu); t.start(); t.join()
        print("client", client.recv(64), flush=True)
        conn, _ = peer.accept()
        print("peer", conn.recv(64), flush=True)
        muxer = next(t for t in threading.enumerate() if t.name == "vsock-muxer")
        print("muxer", filters(f"self/task/{muxer.native_id}"), flush=True)
        mux.close()
        print("removed", not os.path.exists(path), flush=True)
        # closed here: an unclosed socket's finalizer formats its repr (getsockname, getpeername)
        for s in (client, conn, peer):
            s.close()
    """
    proc = _child(body.replace("PATH", repr(str(tmp_path / "v.sock")), 1))
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.splitlines() == [
        "worker 3", f"client b'OK {1 << 30}\\n'", "peer b'from the guest'", "muxer 2", "removed True",
    ], proc.stdout


@needs_seccomp
def test_log_mode_lets_the_call_through() -> None:
    proc = _child("""
        import socket
        install(SeccompMode.LOG)
        socket.socket().close()
        print("went on")
    """)
    assert proc.returncode == 0 and proc.stdout == "went on\n", (proc.stdout, proc.stderr)


@needs_seccomp
def test_false_installs_nothing() -> None:
    proc = _child("""
        import socket
        install(SeccompMode.FALSE)
        socket.socket().close()
        print([l for l in open("/proc/self/status") if l.startswith(("Seccomp:", "NoNewPrivs:"))])
    """)
    assert proc.returncode == 0 and "Seccomp:\\t0" in proc.stdout and "NoNewPrivs:\\t0" in proc.stdout


@needs_seccomp
@pytest.mark.parametrize("mode", ["TRUE", "LOG", "API"])
def test_kvm_selftest_runs_and_tears_down_under_the_filter(mode: str) -> None:
    """The real-mode program on this host's KVM (where it is usable): built, then the filters, then run,
    stopped by the kick signal and closed. API: as `pyvmm --api-socket`, the API_VMM filter goes on first
    and the VM is built under it."""
    api = "install(SeccompMode.TRUE, ThreadKind.API_VMM)" if mode == "API" else "pass"
    before_run = "None" if mode == "API" else f"lambda: install(SeccompMode.{mode})"
    proc = _child(f"""
        from pyvmm.kvm import selftest
        from pyvmm.kvm.system import Kvm, KvmError
        from pyvmm.sandbox import ThreadKind
        try:
            Kvm().close()
        except KvmError as e:
            print("no KVM:", e); sys.exit(77)
        {api}
        run = selftest.run_program(before_run={before_run})
        problems = selftest.check(run, irqchip=True)
        print(problems or "ok", flush=True)
    """)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr)
