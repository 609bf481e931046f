"""The three KVM file descriptors as objects: Kvm (/dev/kvm), Vm (a VM fd) and Vcpu (a vCPU fd)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

from pyvmm.errors import PyvmmError
from pyvmm.ioctl import IoctlError, ioctl, libc_ioctl
from pyvmm.kvm.bindings import (
    KVM_API_VERSION,
    KVM_MSI_VALID_DEVID,
    KVM_PIT_SPEAKER_DUMMY,
    KvmCap,
    KvmExit,
    KvmIoctl,
    KvmIoeventfdFlag,
    KvmIrqfdFlag,
    kvm_clock_data,
    kvm_coalesced_mmio_zone,
    kvm_cpuid2_array,
    kvm_cpuid_entry2,
    kvm_create_device,
    kvm_device_attr,
    kvm_enable_cap,
    kvm_fpu,
    kvm_ioeventfd,
    kvm_irq_level,
    kvm_irqfd,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_msi,
    kvm_msr_list_array,
    kvm_msrs_array,
    kvm_pit_config,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_userspace_memory_region,
    u64,
)
from pyvmm.kvm.routing import Route, encode_routes

_KVM_RUN = int(KvmIoctl.KVM_RUN)
_EXIT_INTR = int(KvmExit.KVM_EXIT_INTR)


class KvmError(PyvmmError):
    """KVM is unusable or refused a request; the message is one line."""


class _Fd:
    """An owned file descriptor with close() and context-manager support."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _enable_cap(self, cap: int, args: Sequence[int], flags: int) -> None:
        if len(args) > 4:
            raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, got {len(args)}")
        request = kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            request.args[i] = value
        ioctl(self.fd, KvmIoctl.KVM_ENABLE_CAP, request)


class Kvm(_Fd):
    """/dev/kvm: capability queries and VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}") from e
        super().__init__(fd)
        try:
            version = ioctl(fd, KvmIoctl.KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmError(f"{path}: KVM API version {version}, expected {KVM_API_VERSION}")
            self.vcpu_mmap_size = ioctl(fd, KvmIoctl.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            self.close()
            raise

    def check_extension(self, cap: KvmCap | int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else 1 or a capability-specific value."""
        return ioctl(self.fd, KvmIoctl.KVM_CHECK_EXTENSION, int(cap))

    @property
    def max_vcpus(self) -> int:
        # api.rst: KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS, else 4.
        return (
            self.check_extension(KvmCap.KVM_CAP_MAX_VCPUS)
            or self.check_extension(KvmCap.KVM_CAP_NR_VCPUS)
            or 4
        )

    def supported_cpuid(self) -> list[kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID as a list of independent entry copies."""
        n = 128
        while True:
            table = kvm_cpuid2_array(n)()
            table.nent = n
            try:
                ioctl(self.fd, KvmIoctl.KVM_GET_SUPPORTED_CPUID, table)
            except IoctlError as e:
                # E2BIG: our array was too small; the kernel does not say how big it must be.
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [kvm_cpuid_entry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs that KVM_GET_MSRS / KVM_SET_MSRS accept."""
        probe = kvm_msr_list_array(0)()
        try:
            ioctl(self.fd, KvmIoctl.KVM_GET_MSR_INDEX_LIST, probe)
        except IoctlError as e:
            if e.errno != errno.E2BIG:
                raise
        # The first call stores the needed count even though it fails with E2BIG.
        table = kvm_msr_list_array(probe.nmsrs)()
        table.nmsrs = probe.nmsrs
        ioctl(self.fd, KvmIoctl.KVM_GET_MSR_INDEX_LIST, table)
        return list(table.indices[: table.nmsrs])

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, KvmIoctl.KVM_CREATE_VM, 0))


class Vm(_Fd):
    """A VM fd. Closing it also closes the vCPUs and KVM devices created through it."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.vcpus: list[Vcpu] = []
        self._device_fds: list[int] = []

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        for fd in self._device_fds:
            os.close(fd)
        self._device_fds.clear()
        super().close()

    def check_extension(self, cap: KvmCap | int) -> int:
        """Per-VM KVM_CHECK_EXTENSION (KVM_CAP_CHECK_EXTENSION_VM); more precise than the system one."""
        return ioctl(self.fd, KvmIoctl.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: KvmCap | int, *args: int, flags: int = 0) -> None:
        self._enable_cap(cap, args, flags)

    # --- memory --------------------------------------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Map `memory_size` bytes of host memory at `userspace_addr` into the guest (size 0 deletes)."""
        for name, value in (("guest address", guest_phys_addr), ("size", memory_size)):
            if value % mmap.PAGESIZE:
                raise KvmError(f"memory slot {slot}: {name} {value:#x} is not page aligned")
        region = kvm_userspace_memory_region(
            slot=slot,
            flags=int(flags),
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fd, KvmIoctl.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_IDENTITY_MAP_ADDR, u64(addr))

    # --- interrupts ----------------------------------------------------------------------------------------

    def create_irqchip(self) -> None:
        """In-kernel PIC + IOAPIC + LAPICs; must precede create_vcpu."""
        ioctl(self.fd, KvmIoctl.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        """In-kernel i8254 PIT; the dummy speaker makes KVM answer port 0x61 too."""
        ioctl(self.fd, KvmIoctl.KVM_CREATE_PIT2, kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: bool | int) -> None:
        """Drive GSI `irq` high or low (KVM_IRQ_LINE)."""
        request = kvm_irq_level(level=1 if level else 0)
        request.irq = irq
        ioctl(self.fd, KvmIoctl.KVM_IRQ_LINE, request)

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        """Inject GSI `gsi` whenever eventfd `fd` is signalled (or stop doing so with deassign)."""
        request = kvm_irqfd(fd=fd, gsi=gsi)
        if deassign:
            request.flags = KvmIrqfdFlag.KVM_IRQFD_FLAG_DEASSIGN
        elif resample_fd is not None:
            request.flags = KvmIrqfdFlag.KVM_IRQFD_FLAG_RESAMPLE
            request.resamplefd = resample_fd
        ioctl(self.fd, KvmIoctl.KVM_IRQFD, request)

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """Signal eventfd `fd` on guest writes to `addr`.

        `length` 0 matches writes of any size (KVM_CAP_IOEVENTFD_NO_LENGTH); `datamatch` restricts to
        one written value; `pio` selects the port-I/O space instead of MMIO.
        """
        if length not in (0, 1, 2, 4, 8):
            raise KvmError(f"ioeventfd length must be 0, 1, 2, 4 or 8, not {length}")
        flags = KvmIoeventfdFlag(0)
        request = kvm_ioeventfd(addr=addr, len=length, fd=fd)
        if datamatch is not None:
            flags |= KvmIoeventfdFlag.KVM_IOEVENTFD_FLAG_DATAMATCH
            request.datamatch = datamatch
        if pio:
            flags |= KvmIoeventfdFlag.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= KvmIoeventfdFlag.KVM_IOEVENTFD_FLAG_DEASSIGN
        request.flags = flags
        ioctl(self.fd, KvmIoctl.KVM_IOEVENTFD, request)

    def register_coalesced_zone(
        self, addr: int, size: int, pio: bool = False, unregister: bool = False
    ) -> None:
        """Let KVM queue guest writes to [addr, addr+size) in the coalesced ring instead of exiting
        (KVM_REGISTER_COALESCED_MMIO; `pio` needs KVM_CAP_COALESCED_PIO). Reads still exit."""
        zone = kvm_coalesced_mmio_zone(addr=addr, size=size)
        zone.pio = 1 if pio else 0
        if unregister:
            ioctl(self.fd, KvmIoctl.KVM_UNREGISTER_COALESCED_MMIO, zone)
        else:
            ioctl(self.fd, KvmIoctl.KVM_REGISTER_COALESCED_MMIO, zone)

    def set_gsi_routing(self, routes: Sequence[Route]) -> None:
        """Replace the whole GSI routing table (see routing.default_irqchip_routes)."""
        ioctl(self.fd, KvmIoctl.KVM_SET_GSI_ROUTING, encode_routes(routes))

    def signal_msi(self, address: int, data: int, devid: int | None = None) -> bool:
        """Inject one MSI; False when the guest blocked it (e.g. masked / no destination)."""
        request = kvm_msi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        if devid is not None:
            request.flags = KVM_MSI_VALID_DEVID
            request.devid = devid
        return ioctl(self.fd, KvmIoctl.KVM_SIGNAL_MSI, request) > 0

    # --- devices, clock ------------------------------------------------------------------------------------

    def create_device(self, type_: int) -> int:
        """KVM_CREATE_DEVICE; returns the device fd, which this Vm closes on close()."""
        request = kvm_create_device(type=type_)
        ioctl(self.fd, KvmIoctl.KVM_CREATE_DEVICE, request)
        self._device_fds.append(request.fd)
        return request.fd

    def set_device_attr(
        self, device_fd: int, group: int, attr: int, data: ctypes._CData | None = None, flags: int = 0
    ) -> None:
        """KVM_SET_DEVICE_ATTR on a device fd; `data` is passed by address (e.g. ctypes.c_int32(group_fd))."""
        request = kvm_device_attr(flags=flags, group=group, attr=attr)
        if data is not None:
            request.addr = ctypes.addressof(data)
        ioctl(device_fd, KvmIoctl.KVM_SET_DEVICE_ATTR, request)

    def has_device_attr(self, device_fd: int, group: int, attr: int) -> bool:
        try:
            ioctl(device_fd, KvmIoctl.KVM_HAS_DEVICE_ATTR, kvm_device_attr(group=group, attr=attr))
        except IoctlError as e:
            if e.errno == errno.ENXIO:
                return False
            raise
        return True

    def get_clock(self) -> kvm_clock_data:
        data = kvm_clock_data()
        ioctl(self.fd, KvmIoctl.KVM_GET_CLOCK, data)
        return data

    # --- vCPUs ---------------------------------------------------------------------------------------------

    def create_vcpu(self, index: int) -> Vcpu:
        """KVM_CREATE_VCPU with vCPU id `index` (the initial APIC id)."""
        vcpu = Vcpu(index, ioctl(self.fd, KvmIoctl.KVM_CREATE_VCPU, index), self.kvm.vcpu_mmap_size)
        self.vcpus.append(vcpu)
        return vcpu


class Vcpu(_Fd):
    """A vCPU fd and its shared kvm_run page.

    `run_address` / `kvm_run` point into the mapping: they must not be used after close(), so stop the
    vCPU's run loop before closing.
    """

    def __init__(self, index: int, fd: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.index = index
        try:
            self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:  # Python's mmap dups the fd first: EMFILE shows here before anywhere else
            super().close()
            raise KvmError(f"vCPU {index}: cannot map its kvm_run area: {exc.strerror}") from exc
        self.mmap_size = mmap_size
        # Take the address and drop the buffer export at once, so that close() can unmap.
        self.run_address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.kvm_run: kvm_run = kvm_run.from_address(self.run_address)

    def close(self) -> None:
        if not self.closed:
            del self.kvm_run
            self._map.close()
        super().close()

    def run(self) -> int:
        """One KVM_RUN; returns kvm_run.exit_reason, or KVM_EXIT_INTR when interrupted by a signal."""
        return self.run_call()()

    def run_call(self) -> Callable[[], int]:
        """`run` as a closure over what it needs (the fd, the kvm_run page): the vCPU loop's KVM_RUN
        without an attribute or method lookup per exit. Returns kvm_run.exit_reason, or KVM_EXIT_INTR when
        interrupted by a signal."""
        fd, index, kvm_run = self.fd, self.index, self.kvm_run
        ioctl, request, get_errno = libc_ioctl, _KVM_RUN, ctypes.get_errno

        def run() -> int:
            if ioctl(fd, request, 0) < 0:
                err = get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    return _EXIT_INTR
                raise IoctlError(err, f"KVM_RUN failed on vCPU {index}: {os.strerror(err)}")
            return kvm_run.exit_reason

        return run

    def enable_cap(self, cap: KvmCap | int, *args: int, flags: int = 0) -> None:
        self._enable_cap(cap, args, flags)

    # --- register state ------------------------------------------------------------------------------------

    def get_regs(self) -> kvm_regs:
        regs = kvm_regs()
        ioctl(self.fd, KvmIoctl.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs()
        ioctl(self.fd, KvmIoctl.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        fpu = kvm_fpu()
        ioctl(self.fd, KvmIoctl.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: kvm_fpu) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises KvmError naming the first MSR that KVM could not read."""
        wanted = list(indices)
        table = kvm_msrs_array(len(wanted))()
        table.nmsrs = len(wanted)
        for entry, index in zip(table.entries, wanted, strict=True):
            entry.index = index
        done = ioctl(self.fd, KvmIoctl.KVM_GET_MSRS, table)
        if done != len(wanted):
            raise KvmError(f"vCPU {self.index}: KVM_GET_MSRS could not read MSR {wanted[done]:#x}")
        return {entry.index: entry.data for entry in table.entries}

    def set_msrs(self, values: Mapping[int, int] | Iterable[tuple[int, int]]) -> None:
        """Write MSRs; raises KvmError naming the first MSR that KVM refused."""
        pairs = list(values.items() if isinstance(values, Mapping) else values)
        table = kvm_msrs_array(len(pairs))()
        table.nmsrs = len(pairs)
        for entry, (index, data) in zip(table.entries, pairs, strict=True):
            entry.index = index
            entry.data = data
        done = ioctl(self.fd, KvmIoctl.KVM_SET_MSRS, table)
        if done != len(pairs):
            index, data = pairs[done]
            raise KvmError(f"vCPU {self.index}: KVM_SET_MSRS refused MSR {index:#x} = {data:#x}")

    def set_cpuid2(self, entries: Sequence[kvm_cpuid_entry2]) -> None:
        table = kvm_cpuid2_array(len(entries))()
        table.nent = len(entries)
        for i, entry in enumerate(entries):
            table.entries[i] = entry
        ioctl(self.fd, KvmIoctl.KVM_SET_CPUID2, table)

    def get_cpuid2(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        table = kvm_cpuid2_array(max_entries)()
        table.nent = max_entries
        ioctl(self.fd, KvmIoctl.KVM_GET_CPUID2, table)
        return [kvm_cpuid_entry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]

    def get_lapic(self) -> kvm_lapic_state:
        state = kvm_lapic_state()
        ioctl(self.fd, KvmIoctl.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: kvm_lapic_state) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_LAPIC, state)

    def get_mp_state(self) -> int:
        state = kvm_mp_state()
        ioctl(self.fd, KvmIoctl.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_MP_STATE, kvm_mp_state(mp_state=mp_state))
