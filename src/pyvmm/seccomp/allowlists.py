"""Which syscalls each kind of pyvmm thread may make once the guest runs: the allow-lists of
`--seccomp` (docs/seccomp.md). One entry per syscall (or ioctl request), each with the code path that
needs it. Found by running real VMs with `--seccomp log` in the lab and by `strace -f` of
`python -m pyvmm.kvm.selftest` (docs/seccomp.md#how-the-lists-were-found).

Filters stack: a base list (VMM for `pyvmm` with a VM on its command line, API_VMM for `pyvmm
--api-socket`) is installed on every thread at once (the main thread and every thread already running),
and each thread kind adds its own list when its thread starts. A thread may make a syscall only when
every filter on it allows it, so each kind's list is a subset of both base lists, and the vCPU list also
holds what the virtio workers need: a worker is started by a vCPU thread (the guest's DRIVER_OK write) and
inherits its filters.

Adding a thread kind: a member of sandbox.ThreadKind, its entries below (each with its code path) and in
ALLOWED, `sandbox.enter(kind)` first thing in the thread; tests/unit/test_seccomp.py then checks that both
base filters pass every call of the new list (docs/seccomp.md#adding-a-thread-kind).
"""

from __future__ import annotations

import errno
import termios
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pyvmm.host.tap import SockIoctl, TunIoctl
from pyvmm.kvm.bindings import KvmIoctl
from pyvmm.sandbox import ThreadKind
from pyvmm.seccomp.bpf import ArgCheck, Rule, ret_errno
from pyvmm.seccomp.syscalls import SYSCALLS
from pyvmm.vfio.bindings import VfioIoctl
from pyvmm.vhost.bindings import VhostIoctl

# <linux/sched.h>, <linux/prctl.h>, <linux/seccomp.h>, <asm-generic/fcntl.h>
CLONE_THREAD = 0x00010000
# A thread may still be cloned into new namespaces (the kernel refuses only a new user or PID namespace for
# one): clone's rule requires all of these clear.
CLONE_NEW_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
O_ACCMODE = 0o3
O_RDONLY = 0o0
O_CREAT = 0o100
O_TRUNC = 0o1000
AF_UNIX = 1  # <linux/socket.h>
AF_INET = 2


@dataclass(frozen=True)
class Allowed:
    """`syscall` allowed (with `check`, only when it holds; with `action`, answered so instead). `why`
    names the code path that needs it; it is documentation, kept next to the entry."""

    syscall: str
    why: str
    check: ArgCheck | None = None
    action: int | None = None


def _ioctls(requests: Iterable[int]) -> ArgCheck:
    return ArgCheck(1, tuple(sorted({int(r) & 0xFFFF_FFFF for r in requests})))


# ---------------------------------------------------------------------------------------------------
# What the Python runtime itself needs on every thread (CPython 3.11, glibc): allocation, the GIL,
# signals, thread start and end, time, and reading a source file for a traceback.

_RUNTIME = (
    Allowed("read", "eventfd_read, os.read of stdin, the rng source, tracebacks reading source files"),
    Allowed("write", "logging to stderr, console output, eventfd_write (irqfds, queue kicks, stop fds)"),
    Allowed("close", "closing an eventfd or a source file read for a traceback"),
    Allowed("futex", "the GIL, locks, condition variables, thread join"),
    Allowed("mmap", "the allocators (pymalloc arenas, malloc), thread stacks, mmap.mmap bounce buffers"),
    Allowed("munmap", "the allocators, thread stacks, mmap.mmap close"),
    Allowed("mprotect", "malloc's per-thread arenas, thread stack guard pages"),
    Allowed("madvise", "malloc trimming, glibc freeing an ended thread's stack (MADV_DONTNEED)"),
    Allowed("mremap", "realloc of large blocks"),
    Allowed("brk", "malloc's main arena"),
    Allowed("rt_sigprocmask", "glibc around thread creation, signal.pthread_sigmask"),
    Allowed("rt_sigreturn", "return from the kick signal's handler (it interrupts KVM_RUN) and others"),
    Allowed("sigaltstack", "glibc and CPython's fatal-error handling"),
    Allowed("getpid", "CPython's signal handling, logging records"),
    Allowed("gettid", "threading.get_native_id, glibc"),
    Allowed("tgkill", "signal.pthread_kill: the kick that stops a vCPU (VcpuLoop.request_stop)"),
    Allowed("clock_gettime", "time.monotonic/time.time when the vDSO falls back, timed waits"),
    Allowed("clock_nanosleep", "time.sleep (terminal input waiting for the guest to drain)"),
    Allowed("nanosleep", "time.sleep on older glibc"),
    Allowed("sched_yield", "glibc's lock back-off"),
    Allowed("exit", "a thread ending"),
    Allowed("exit_group", "pyvmm ending"),
    Allowed("restart_syscall", "a blocked call resumed after the kick signal"),
    Allowed("getrandom", "CPython's hash seed and random, on first use"),
    Allowed("set_robust_list", "glibc in every new thread, before its Python code runs"),
    Allowed("rseq", "glibc (2.35+) registers restartable sequences in every new thread"),
    Allowed("fstat", "opening a source file for a traceback"),
    Allowed("newfstatat", "linecache checking a source file for a traceback"),
    Allowed("lseek", "reading a source file for a traceback; disk images"),
    Allowed("poll", "the virtio and VFIO request workers' select.poll"),
    Allowed("ppoll", "select.poll on glibc that maps poll to ppoll"),
    Allowed(
        "openat",
        "tracebacks (linecache) and lazy imports read files: read-only, never creating or truncating",
        ArgCheck(2, (O_RDONLY,), mask=O_ACCMODE | O_CREAT | O_TRUNC),
    ),
    Allowed("getcwd", "tracebacks resolving relative source paths"),
    Allowed("getsockname", "socket repr: an unclosed socket's ResourceWarning formats it, ignored or not"),
    Allowed("getpeername", "socket repr: an unclosed socket's ResourceWarning formats it, ignored or not"),
    Allowed("uname", "an import on first use: uuid (ACPI tables, API answers) imports platform, which asks"),
    Allowed("getdents64", "an import on first use lists its package directory (importlib's FileFinder)"),
    Allowed("readlink", "tracebacks resolving source paths"),
    Allowed("fcntl", "io.open checking a file's flags"),
    Allowed(
        "clone",
        "threading.Thread.start (a vCPU starts a virtio worker at DRIVER_OK): threads only, never a process, "
        "and never into a new namespace",
        ArgCheck(0, (CLONE_THREAD,), mask=CLONE_THREAD | CLONE_NEW_NAMESPACES),
    ),
    Allowed(
        "clone3",
        "glibc tries clone3 first; its flags are in memory a filter cannot read, so it fails with ENOSYS "
        "and glibc falls back to clone, whose flags are checked",
        action=ret_errno(errno.ENOSYS),
    ),
    Allowed(
        "prctl",
        "installing a thread kind's own filter (sandbox.enter) and thread names; nothing else",
        ArgCheck(0, (PR_SET_NAME, PR_GET_NAME, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS)),
    ),
    Allowed(
        "seccomp",
        "installing a thread kind's own filter on top (filters only ever narrow what a thread may do)",
        ArgCheck(0, (SECCOMP_SET_MODE_FILTER,)),
    ),
)

# The ioctls every thread may need: io.open asks whether a file is a terminal (TCGETS) when it opens a
# source file for a traceback.
_RUNTIME_IOCTLS = (termios.TCGETS,)

# ---------------------------------------------------------------------------------------------------
# vCPU threads: KVM_RUN and the I/O and MMIO exits it returns, i.e. every emulated device register:
# PCI config space and BARs of virtio and VFIO devices, MSI/MSI-X tables, the UART, ACPI, i8042, RTC.

_VCPU_IOCTLS = (
    KvmIoctl.KVM_RUN,  # the run loop
    KvmIoctl.KVM_GET_REGS, KvmIoctl.KVM_GET_SREGS,  # the register dump when a vCPU fails
    KvmIoctl.KVM_IRQ_LINE,  # UART, RTC, ACPI SCI and INTx levels
    KvmIoctl.KVM_SET_GSI_ROUTING,  # MSI/MSI-X vectors the guest programs or unmasks (interrupts.py)
    KvmIoctl.KVM_IRQFD,  # attaching/detaching a vector's eventfd to its route
    KvmIoctl.KVM_SIGNAL_MSI,  # an MSI sent directly (no route)
    KvmIoctl.KVM_IOEVENTFD,  # virtio notify areas moved with their BAR
    KvmIoctl.KVM_SET_USER_MEMORY_REGION,  # a VFIO BAR mmap moved, enabled or disabled by the guest
    KvmIoctl.KVM_CHECK_EXTENSION,  # capability questions while reprogramming routes
    VfioIoctl.VFIO_DEVICE_SET_IRQS,  # MSI/MSI-X/INTx of a passed-through device enabled, masked, unmasked
    VfioIoctl.VFIO_DEVICE_GET_IRQ_INFO,  # how many vectors a device has, when the guest enables them
    VfioIoctl.VFIO_DEVICE_GET_REGION_INFO,  # a region's offset for a trapped BAR access
    VfioIoctl.VFIO_IOMMU_MAP_DMA, VfioIoctl.VFIO_IOMMU_UNMAP_DMA,  # peer-to-peer BAR mappings that move
    VfioIoctl.VFIO_DEVICE_RESET,  # a function-level reset the guest asks for through config space
    # The guest's eject (B0EJ write, hotplug.PciHotplug._eject) releases the function on this thread, as
    # cloud-hypervisor does: VfioPassthrough.release takes its group out of the KVM VFIO device and out of
    # the container when no other function uses it. A managed=on give-back is not done here (sysfs writes):
    # a thread started at hot-plug time does it (docs/seccomp.md#hot-plug).
    KvmIoctl.KVM_SET_DEVICE_ATTR,  # release: KVM_DEV_VFIO_FILE_DEL of the group
    VfioIoctl.VFIO_GROUP_UNSET_CONTAINER,  # release: the group leaves the container
    # --net (devices/virtio/net.py): the guest's DRIVER_OK write hands the data queues to vhost-net
    # (VirtioNet.start_external: offloads, then per queue pair features, memory table, both vrings and the
    # tap queue as backend, then the tap's active queues); a reset, or a DRIVER_OK again, stops them
    # (_stop_vhost: backend unset, base read back, kick/call eventfds unbound). The kick eventfds are the
    # transport's ioeventfds and the call eventfds the vectors' irqfd-bound ones: KVM_IOEVENTFD and
    # KVM_IRQFD above.
    TunIoctl.TUNSETOFFLOAD,  # DRIVER_OK: the acked offloads; reset: none
    TunIoctl.TUNSETQUEUE,  # DRIVER_OK: one active pair; also the control queue (its worker, started here)
    VhostIoctl.VHOST_SET_FEATURES, VhostIoctl.VHOST_SET_MEM_TABLE,  # DRIVER_OK, per queue pair
    VhostIoctl.VHOST_SET_VRING_NUM, VhostIoctl.VHOST_SET_VRING_BASE,  # DRIVER_OK: VhostKernel.set_vring
    VhostIoctl.VHOST_SET_VRING_ADDR,  # DRIVER_OK: the rings' host addresses (checked inside guest RAM)
    VhostIoctl.VHOST_SET_VRING_KICK, VhostIoctl.VHOST_SET_VRING_CALL,  # DRIVER_OK; reset: unbound (-1)
    VhostIoctl.VHOST_NET_SET_BACKEND,  # DRIVER_OK: a tap queue's file; reset: unset
    VhostIoctl.VHOST_GET_VRING_BASE,  # reset (and a second DRIVER_OK): the vring stopped
)

# The virtio-vsock's queue worker (devices/virtio/vsock.py, vsock_muxer.py), on the muxer's connections:
# guest packets from the transmit queue (VsockMuxer.guest_packet), host data into the receive queue
# (VsockMuxer.fill). Part of the worker's list and, as the worker inherits it, of the vCPU's.
_VSOCK_WORKER = (
    Allowed("socket", "_guest_connect: the guest connects to host port P, a Unix socket for PATH_P",
            ArgCheck(0, (AF_UNIX,))),
    Allowed("connect", "_guest_connect: to PATH_P (the socket above: AF_UNIX only)"),
    Allowed("sendto", "_send: guest data to the host peer; _host_connected: the OK line (socket.send)"),
    Allowed("recvmsg", "_packet_into: host data straight into the guest's receive buffer (recvmsg_into)"),
    Allowed("shutdown", "_after_forward: the guest's SHUTDOWN(SEND) becomes SHUT_WR on the host socket"),
)

_VCPU = (
    Allowed("ioctl", "see _VCPU_IOCTLS", _ioctls((*_VCPU_IOCTLS, *_RUNTIME_IOCTLS))),
    Allowed("pread64", "trapped VFIO config space and BAR reads (vfio/device.py); virtio-blk reads"),
    Allowed("pwrite64", "trapped VFIO config space and BAR writes; virtio-blk writes"),
    Allowed("preadv", "virtio-blk reads straight into guest RAM (a worker this thread starts)"),
    Allowed("pwritev", "virtio-blk writes from guest RAM (a worker this thread starts)"),
    Allowed("preadv2", "os.preadv: CPython calls preadv2 where the kernel has it (seen in the lab)"),
    Allowed("pwritev2", "os.pwritev: CPython calls pwritev2 where the kernel has it (seen in the lab)"),
    Allowed("readv", "virtio-rng reads the entropy source into guest RAM (worker)"),
    Allowed("fdatasync", "virtio-blk FLUSH (worker)"),
    Allowed("fallocate", "virtio-blk DISCARD and WRITE_ZEROES (worker)"),
    Allowed("eventfd2", "a vector's irqfd created when the guest first enables MSI/MSI-X; --net: the call "
                        "eventfd of a queue without a vector, at DRIVER_OK"),
    # What the virtio-vsock's queue worker does (see _WORKER): the worker is started by this thread and
    # inherits its filter, so the calls are here too. Only AF_UNIX sockets, as for the worker.
    *_VSOCK_WORKER,
    # --disk vhost_user=on (devices/virtio/vhost_user_blk.py): the guest's DRIVER_OK write hands the rings
    # to the backend (SET_FEATURES, SET_MEM_TABLE with the RAM memfd, SET_VRING_* with the kick and call
    # eventfds, SET_VRING_ENABLE), a reset takes them back (GET_VRING_BASE); each answer or ack is read
    # with recvmsg (above) after a poll bounded by the socket's timeout (the runtime's poll).
    Allowed("sendmsg", "VhostUserFrontend._send: a vhost-user message, its fds as SCM_RIGHTS"),
)

# virtio worker threads: draining queues, disk and entropy I/O, interrupts through irqfds.
_WORKER_IOCTLS = (
    KvmIoctl.KVM_IRQ_LINE,  # INTx of a virtio device whose driver did not enable MSI-X
    KvmIoctl.KVM_SIGNAL_MSI,  # an MSI sent directly (no route)
    TunIoctl.TUNSETQUEUE,  # --net's control queue: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (VirtioNet._control)
)

_WORKER = (
    Allowed("ioctl", "see _WORKER_IOCTLS", _ioctls((*_WORKER_IOCTLS, *_RUNTIME_IOCTLS))),
    Allowed("pread64", "virtio-blk reads through the O_DIRECT bounce buffer"),
    Allowed("pwrite64", "virtio-blk writes through the O_DIRECT bounce buffer"),
    Allowed("preadv", "virtio-blk reads straight into guest RAM"),
    Allowed("pwritev", "virtio-blk writes from guest RAM"),
    Allowed("preadv2", "os.preadv: CPython calls preadv2 where the kernel has it (seen in the lab)"),
    Allowed("pwritev2", "os.pwritev: CPython calls pwritev2 where the kernel has it (seen in the lab)"),
    Allowed("readv", "virtio-rng reads the entropy source into guest RAM"),
    Allowed("fdatasync", "virtio-blk FLUSH"),
    Allowed("fallocate", "virtio-blk DISCARD and WRITE_ZEROES"),
    *_VSOCK_WORKER,
)

# Terminal input (console.TerminalInput): reads stdin, hands bytes to the UART or virtio-console.
_TERMINAL_INPUT = (
    Allowed(
        "ioctl", "the UART's receive interrupt (KVM_IRQ_LINE); virtio-console's MSI",
        _ioctls((KvmIoctl.KVM_IRQ_LINE, KvmIoctl.KVM_SIGNAL_MSI, *_RUNTIME_IOCTLS)),
    ),
)

# The API socket's thread (api.server.ApiServer._serve): HTTP over a Unix socket. It parses requests and
# hands each to the main thread (ApiVmm.submit, a queue): it never touches KVM, VFIO or files itself.
_HTTP_SERVER_IOCTLS = (
    termios.FIONBIO,  # socket.settimeout on an accepted connection (CPython sets O_NONBLOCK by FIONBIO)
    termios.FIOCLEX,  # socket.set_inheritable(False) on an accepted connection
)

_HTTP_SERVER = (
    Allowed("ioctl", "see _HTTP_SERVER_IOCTLS", _ioctls((*_HTTP_SERVER_IOCTLS, *_RUNTIME_IOCTLS))),
    Allowed("accept4", "ApiServer._new_connection: listener.accept() (SOCK_CLOEXEC)"),
    Allowed("getsockname", "listener.accept(): CPython's socket object asks the accepted fd its address"),
    Allowed("recvmsg", "_Connection.receive: a request and the fds a client passes (SCM_RIGHTS: add-net)"),
    Allowed("recvfrom", "socket.recv on a connection (CPython's recv)"),
    Allowed("sendto", "socket.sendall of a response or a 100 Continue (CPython's send)"),
    Allowed("sendmsg", "socket.sendmsg, should a response carry ancillary data"),
    Allowed("epoll_wait", "selectors.DefaultSelector.select: the listener, connections, the wake pipe"),
    Allowed("epoll_pwait", "as epoll_wait, where glibc maps it so"),
    Allowed("epoll_ctl", "registering and unregistering connections and the listener"),
)

# The --vsock muxer's thread (devices/virtio/vsock_muxer.py, VsockMuxer._run; a service started beside
# the vCPUs): host clients on PATH and the host sockets of every connection. It connects nowhere (the
# guest's connections are made on the queue worker) and removes no file (PATH is unlinked by the device's
# close, on the main thread).
_VSOCK_MUXER_IOCTLS = (
    termios.FIONBIO,  # _accept: sock.setblocking(False) on a host client (CPython sets it by FIONBIO)
    termios.FIOCLEX,  # socket.accept where accept4 is missing (CPython's set_inheritable fallback)
)

_VSOCK_MUXER = (
    Allowed("ioctl", "see _VSOCK_MUXER_IOCTLS", _ioctls((*_VSOCK_MUXER_IOCTLS, *_RUNTIME_IOCTLS))),
    Allowed("accept4", "_accept: a host client on PATH (listener.accept(), SOCK_CLOEXEC)"),
    Allowed("getsockname", "listener.accept(): CPython may ask the accepted fd its address (seen for the "
                           "API server's accept in the lab)"),
    Allowed("recvfrom", "_read_handshake: the CONNECT line, a byte at a time (socket.recv)"),
    Allowed("sendto", "_flush: guest data the host peer did not take at once (socket.send)"),
    Allowed("shutdown", "_flush -> _after_forward: SHUT_WR once the guest's data is all written"),
    # poll (poll_once), eventfd read/write (the wake fd, the receive queue's kick), close (_reset, _drop,
    # _close_handshake) and time.sleep are the runtime's.
)

# The vhost-user hang-up watch (vhost/hangup.py, HangupWatch._run; a service started beside the vCPUs): it
# polls the backends' sockets for POLLHUP and its wake eventfd (a socket added or removed, the watch
# stopped), and on a hang-up sets the VM's exit latch (a lock). poll/ppoll, the eventfd read and the
# thread's end are all the runtime's: nothing on top.
_VHOST_USER = (
    Allowed("ioctl", "nothing of its own: the runtime's (a traceback's TCGETS)", _ioctls(_RUNTIME_IOCTLS)),
    # The stop message of a disk served by a qemu-storage-daemon pyvmm started says whether the daemon
    # exited (StorageDaemon.hangup_cause polls its pidfd: the runtime's poll) and its last line of output
    # (its log: the runtime's read-only open): nothing on top either.
)

# ---------------------------------------------------------------------------------------------------
# The VMM filter, on every thread: the union of the lists above, and what the main thread needs while
# the guest runs (signals, the terminal's size) and to tear the VM down: closing KVM and VFIO, and
# giving managed=on devices back (sysfs writes, the journal under /run/pyvmm).

_VMM_IOCTLS = (
    *_VCPU_IOCTLS,
    KvmIoctl.KVM_UNREGISTER_COALESCED_MMIO,  # teardown of the coalesced zones
    KvmIoctl.KVM_SET_DEVICE_ATTR,  # teardown: VFIO groups leave the KVM VFIO device
    VfioIoctl.VFIO_GROUP_UNSET_CONTAINER,  # teardown: groups leave their container
    termios.TCSETS, termios.TCSETSW, termios.TCSETSF,  # the terminal restored from raw mode at the end
    termios.TIOCGWINSZ,  # the terminal's size on SIGWINCH (virtio-console resize)
    *_VSOCK_MUXER_IOCTLS,  # the muxer's list stacks on this one
)

_VMM = (
    Allowed("ioctl", "see _VMM_IOCTLS", _ioctls((*_VMM_IOCTLS, *_WORKER_IOCTLS, *_RUNTIME_IOCTLS))),
    *(entry for entry in _VCPU if entry.syscall != "ioctl"),
    Allowed("rt_sigaction", "signal.signal: the main thread's SIGINT/SIGTERM/SIGWINCH handlers, restored"),
    Allowed("eventfd2", "stop fds of workers (created before, listed for a worker restarted by a reset)"),
    Allowed("dup", "console output duplicating stdout"),
    Allowed("flock", "give-back: the journal's lock under /run/pyvmm"),
    Allowed("fsync", "give-back: the journal written through"),
    Allowed("ftruncate", "give-back: the journal rewritten"),
    Allowed("unlink", "give-back: a journal record removed; --vsock's PATH removed at teardown "
                      "(VsockMuxer.close)"),
    Allowed("unlinkat", "give-back: a journal record removed (relative to the checked directory)"),
    Allowed("rename", "give-back: the journal replaced atomically"),
    Allowed("renameat", "give-back: the journal replaced atomically (relative to its directory)"),
    Allowed("renameat2", "give-back: as renameat, on newer glibc"),
    Allowed("mkdir", "give-back: /run/pyvmm re-created if it vanished"),
    # A --disk's qemu-storage-daemon (vhost/storage_daemon.py) is stopped through the pidfd opened when it
    # was started, so pyvmm can signal no other process (kill stays refused).
    Allowed("pidfd_send_signal", "teardown: the qemu-storage-daemon of a --disk stopped "
                                 "(StorageDaemon.close: SIGTERM, SIGKILL after 5 s)"),
    Allowed("waitid", "teardown: that daemon reaped (waitid(P_PIDFD))"),
    Allowed("rmdir", "teardown: that daemon's private directory removed (its socket and log unlinked)"),
    Allowed("mkdirat", "give-back: as mkdir, relative"),
    Allowed("fchmod", "give-back: journal files kept at mode 0600"),
    Allowed("getuid", "give-back: the journal directory's owner checked"),
    Allowed("geteuid", "give-back: the journal directory's owner checked"),
    Allowed("access", "give-back: sysfs attributes probed"),
    Allowed("faccessat2", "give-back: as access, on newer glibc"),
    Allowed("statx", "pathlib and os.stat on newer glibc"),
    Allowed("sysinfo", "give-back: waiting for a device to settle"),
    Allowed("openat", "give-back: sysfs attributes written (unbind, driver_override, drivers_probe) and "
                      "the journal opened with O_NOFOLLOW; also every read-only open"),
    # --vsock: the muxer's thread and the queue worker stack on this filter (_VSOCK_MUXER, _VSOCK_WORKER);
    # at teardown the main thread closes the sockets and removes PATH (unlink above, lstat is newfstatat).
    *(entry for entry in _VSOCK_MUXER if entry.syscall != "ioctl"),
)


# ---------------------------------------------------------------------------------------------------
# The API_VMM filter, on every thread of `pyvmm --api-socket`: the filter goes on before the first call is
# served (no VM yet), so the main thread builds, boots, reboots and tears VMs down under it (ApiVmm), and
# runs vm.add-device (hotplug.PciHotplug.add_vfio_devices: opening groups and devices, BAR mmaps, DMA
# maps, eventfds, memslots, managed=on binding through sysfs). As cloud-hypervisor's VMM thread, it may make
# every KVM and VFIO request pyvmm has bindings for. What it still may not do: run programs, fork, open or
# connect sockets, trace, mount, load modules or BPF, change namespaces.

_API_VMM_IOCTLS = (
    *KvmIoctl,  # ApiVmm._boot -> builder.build_vm: KVM_CREATE_VM, KVM_CREATE_VCPU, vCPU setup, irqchip, ...
    *VfioIoctl,  # builder and vm.add-device: groups, container, devices, regions, resets, DMA mappings
    *_HTTP_SERVER_IOCTLS,  # the HTTP server thread's list stacks on this one
    # `--net` on the command line of `pyvmm --api-socket`, and the API's nets (vm.create, vm.add-net,
    # hot-plugged ones too): the main thread builds
    # them under this filter (host/tap.py, vhost/): TUNSETIFF/TUNSETVNETHDRSZ per queue file (TUNGETIFF
    # for the queue files of fd=[...] and of vm.add-net's SCM_RIGHTS fds), the offloads
    # probed, the tap's address, netmask, MAC, MTU and flags through an AF_INET socket, then per queue
    # pair VHOST_SET_OWNER and VHOST_GET_FEATURES on /dev/vhost-net; the rest at DRIVER_OK (_VCPU_IOCTLS).
    *TunIoctl,
    *SockIoctl,
    *VhostIoctl,
)

_API_VMM = (
    Allowed(
        "ioctl", "see _API_VMM_IOCTLS and _VMM_IOCTLS",
        _ioctls((*_API_VMM_IOCTLS, *_VMM_IOCTLS, *_WORKER_IOCTLS, *_RUNTIME_IOCTLS)),
    ),
    *(entry for entry in _VMM if entry.syscall != "ioctl"),
    *(entry for entry in _HTTP_SERVER if entry.syscall != "ioctl"),
    Allowed("memfd_create", "vm.boot: guest RAM with --memory shared=on or hugepages (memory.py)"),
    Allowed(
        "socket",
        "vm.boot: --vsock listens on PATH (vsock_muxer.listen_unix: AF_UNIX); --net's tap configured "
        "through an AF_INET datagram socket (Tap._configure); the queue worker's AF_UNIX connects",
        ArgCheck(0, (AF_UNIX, AF_INET)),
    ),
    Allowed("sched_getaffinity", "vm.boot: the CPUs pyvmm may run on, against the vCPUs (whether a disk's "
                                 "qemu-storage-daemon polls: builder._disk_services)"),
    Allowed("kcmp", "vm.boot and vm.add-net: tap fds (--net fd=[...], SCM_RIGHTS), two of them the same "
                    "open file? (host/tap.check_tap_fds; fstat cannot tell queue files apart)"),
    Allowed("bind", "vm.boot: --vsock's listener bound to PATH"),
    Allowed("listen", "vm.boot: --vsock's listener"),
    Allowed(
        "epoll_create1",
        "importing selectors probes epoll (creates and closes one): pyvmm.host (subprocess) is imported at "
        "the first managed=on hot-plug (seen in the lab)",
    ),
    Allowed(
        "prlimit64",
        "resource.getrlimit(RLIMIT_MEMLOCK): memlock.py at vm.boot, host facts of a managed=on hot-plug "
        "(seen in the lab); a filter cannot tell a get from a set by the pointer; raising needs "
        "CAP_SYS_RESOURCE",
    ),
)


def _rules(entries: Iterable[Allowed], base: Iterable[Allowed] = _RUNTIME) -> tuple[Rule, ...]:
    """Rules from `base` then `entries`, an entry of `entries` replacing the base's for its syscall."""
    merged: dict[str, Allowed] = {}
    for entry in (*base, *entries):
        merged[entry.syscall] = entry
    rules = []
    # ioctl first: KVM_RUN, the most frequent call of all, then meets the fewest compares.
    for name, entry in sorted(merged.items(), key=lambda item: item[0] != "ioctl"):
        kwargs = {} if entry.action is None else {"action": entry.action}
        rules.append(Rule(SYSCALLS[name], entry.check, **kwargs))
    return tuple(rules)


ALLOWED: Mapping[ThreadKind, tuple[Allowed, ...]] = {
    ThreadKind.VMM: _VMM,
    ThreadKind.VCPU: _VCPU,
    ThreadKind.VIRTIO_WORKER: _WORKER,
    ThreadKind.TERMINAL_INPUT: _TERMINAL_INPUT,
    ThreadKind.API_VMM: _API_VMM,
    ThreadKind.HTTP_SERVER: _HTTP_SERVER,
    ThreadKind.VSOCK_MUXER: _VSOCK_MUXER,
    ThreadKind.VHOST_USER: _VHOST_USER,
}


# Kinds whose threads exist only in `pyvmm --api-socket`, so only under the API_VMM base; every other kind
# must pass both bases (tests/unit/test_seccomp.py checks it).
API_ONLY_KINDS = frozenset({ThreadKind.HTTP_SERVER})


def rules(kind: ThreadKind) -> tuple[Rule, ...]:
    """The rules of `kind`'s filter: the Python runtime's list plus the kind's own."""
    return _rules(ALLOWED[kind])
