"""Kvm / Vm / Vcpu and the run loop on the real /dev/kvm (skipped where it is absent or unusable)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyvmm import layout
from pyvmm.devices.bus import IoBus
from pyvmm.ioctl import IoctlError
from pyvmm.kvm import bindings as b
from pyvmm.kvm import selftest
from pyvmm.kvm.routing import IrqchipRoute, MsiRoute, default_irqchip_routes
from pyvmm.kvm.runloop import StopReason, VcpuLoop, install_kick_handler
from pyvmm.kvm.system import Kvm, KvmError, Vcpu, Vm
from pyvmm.memory import GuestMemory


def _kvm_or_skip() -> Kvm:
    try:
        return Kvm()
    except KvmError as e:
        pytest.skip(f"KVM unavailable: {e}")


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with _kvm_or_skip() as k:
        yield k


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm() as v:
        v.set_tss_addr(layout.KVM_TSS_START)
        v.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
        yield v


def _real_mode_vcpu(vm: Vm, memory: GuestMemory, code: bytes, rip: int = 0x1000) -> Vcpu:
    for slot, region in enumerate(memory.regions):
        vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address)
    memory.write(rip, code)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base = 0
    sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = rip
    regs.rflags = 2
    vcpu.set_regs(regs)
    return vcpu


class Log:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_open_failure_is_one_clear_error() -> None:
    with pytest.raises(KvmError, match=r"cannot open /nonexistent/kvm: No such file"):
        Kvm("/nonexistent/kvm")


def test_system_queries(kvm: Kvm) -> None:
    assert kvm.vcpu_mmap_size >= ctypes.sizeof(b.kvm_run)
    assert kvm.max_vcpus >= 1
    assert kvm.check_extension(b.KvmCap.KVM_CAP_USER_MEMORY) == 1
    leaves = {e.function for e in kvm.supported_cpuid()}
    assert {0, 1, 0x8000_0000} <= leaves
    assert 0x174 in kvm.msr_index_list()  # IA32_SYSENTER_CS


def test_real_mode_program_through_the_run_loop() -> None:
    _kvm_or_skip().close()
    run = selftest.run_program(irqchip=False)
    assert run.result.reason == StopReason.HALTED
    assert run.pio == [
        ("w", 0x10, 1, 0x42),
        ("w", 0x3F8, 1, 0x41),
        ("w", 0x12, 4, 0x12345678),
        ("w", 0x3F8, 1, ord("x")),
        ("w", 0x3F8, 1, ord("y")),
        ("w", 0x3F8, 1, ord("z")),
        ("r", 0x13, 1, 0x61),
        ("r", 0x13, 1, 0x62),
        ("w", 0x11, 2, 0xA55A),
        ("w", 0x14, 2, 0x6261),
    ]
    assert run.mmio == [("w", 0xD0010, 2, 0xBEEF), ("r", 0xD0020, 2, 0xA55A)]
    assert run.in_data == b"ab"


def test_full_irqchip_vcpu_halted_in_kernel_is_kicked_out() -> None:
    _kvm_or_skip().close()
    run = selftest.run_program(irqchip=True)
    assert selftest.check(run, irqchip=True) == []
    assert run.stop_latency < 2.0


def test_selftest_module_exit_status() -> None:
    _kvm_or_skip().close()
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm.kvm.selftest"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("kvm selftest: OK") and proc.stdout.count("\n") == 1


def test_guest_fault_ends_with_error_and_registers(vm: Vm) -> None:
    # 32-bit protected mode with an empty IDT: int3 -> #GP -> #DF -> triple fault (KVM_EXIT_SHUTDOWN).
    # PVM cannot run this natively and reports an emulation internal error instead; both are ERRORs.
    install_kick_handler()
    memory = GuestMemory([(0, 0x10000)])
    vcpu = _real_mode_vcpu(vm, memory, b"\xcc")
    sregs = vcpu.get_sregs()
    for seg, selector, type_ in (
        (sregs.cs, 8, 0xB),
        (sregs.ds, 0x10, 3),
        (sregs.es, 0x10, 3),
        (sregs.ss, 0x10, 3),
    ):
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFF_FFFF, selector, type_
        seg.present = seg.s = seg.db = seg.g = 1
    sregs.cr0 |= 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    vcpu.set_sregs(sregs)
    result = VcpuLoop(vcpu, IoBus(), IoBus()).run()
    assert result.reason == StopReason.ERROR
    assert "triple fault" in result.message or "KVM_INTERNAL_ERROR" in result.message
    assert "CS =0008 base=0000000000000000 limit=ffffffff" in result.registers


def test_ioeventfd_takes_port_writes_off_the_exit_path(vm: Vm) -> None:
    install_kick_handler()
    memory = GuestMemory([(0, 0x10000)])
    # mov al,5; out 0x10,al; mov al,6; out 0x10,al; mov al,7; out 0x11,al; hlt
    code = bytes([0xB0, 5, 0xE6, 0x10, 0xB0, 6, 0xE6, 0x10, 0xB0, 7, 0xE6, 0x11, 0xF4])
    vcpu = _real_mode_vcpu(vm, memory, code)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(efd, 0x10, 1, datamatch=5, pio=True)
        pio = IoBus("pio", 1 << 16)
        log = Log()
        pio.insert(0x10, 2, log)
        assert VcpuLoop(vcpu, pio, IoBus()).run().reason == StopReason.HALTED
        assert os.eventfd_read(efd) == 1  # the write of 5 signalled the eventfd...
        assert log.writes == [(0, 1, 6), (1, 1, 7)]  # ...and did not exit; 6 (no datamatch) did
        vm.ioeventfd(efd, 0x10, 1, datamatch=5, pio=True, deassign=True)
        with pytest.raises(IoctlError, match="KVM_IOEVENTFD"):
            vm.ioeventfd(efd, 0x10, 1, datamatch=5, pio=True, deassign=True)  # no longer registered
    finally:
        os.close(efd)
    with pytest.raises(KvmError, match="length"):
        vm.ioeventfd(0, 0x10, 3)


def test_interrupt_plumbing(vm: Vm) -> None:
    vm.create_irqchip()
    vm.create_pit2()
    vm.irq_line(4, True)
    vm.irq_line(4, False)
    efd, resample = os.eventfd(0), os.eventfd(0)
    try:
        vm.set_gsi_routing([*default_irqchip_routes(), MsiRoute(24, 0xFEE0_0000, 0x4031)])
        vm.irqfd(efd, 24)
        vm.irqfd(efd, 24, deassign=True)
        vm.irqfd(efd, 5, resample_fd=resample)
        vm.irqfd(efd, 5, deassign=True)
        vm.create_vcpu(0)
        assert isinstance(vm.signal_msi(0xFEE0_0000, 0x31), bool)
    finally:
        os.close(efd)
        os.close(resample)
    with pytest.raises(ValueError, match="MSI address"):
        vm.set_gsi_routing([MsiRoute(25, 1 << 64, 0)])
    with pytest.raises(IoctlError, match="KVM_SET_GSI_ROUTING"):
        vm.set_gsi_routing([IrqchipRoute(0, b.KvmIrqchip.KVM_IRQCHIP_IOAPIC, 99)])  # no pin 99


def test_vcpu_state_round_trips(kvm: Kvm, vm: Vm) -> None:
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    cpuid = kvm.supported_cpuid()
    vcpu.set_cpuid2(cpuid)
    # KVM may adjust values (e.g. leaf 7.1) but keeps every leaf it was given.
    assert [(e.function, e.index) for e in vcpu.get_cpuid2()] == [(e.function, e.index) for e in cpuid]

    vcpu.set_msrs({0x174: 0x10, 0x175: 0x8000})  # IA32_SYSENTER_CS / _ESP
    assert vcpu.get_msrs([0x174, 0x175]) == {0x174: 0x10, 0x175: 0x8000}
    with pytest.raises(KvmError, match="refused MSR 0xdeadbeef"):
        vcpu.set_msrs([(0x174, 0x10), (0xDEADBEEF, 1)])

    fpu = vcpu.get_fpu()
    fpu.fcw = 0x27F
    fpu.xmm[1][15] = 0x5A
    vcpu.set_fpu(fpu)  # (mxcsr is not compared: PVM reads it back as 0 whatever was set)
    fpu = vcpu.get_fpu()
    assert (fpu.fcw, fpu.xmm[1][15]) == (0x27F, 0x5A)

    lapic = vcpu.get_lapic()
    lapic.regs[0x80] = 0x20  # TPR
    vcpu.set_lapic(lapic)
    assert vcpu.get_lapic().regs[0x80] == 0x20

    assert vcpu.get_mp_state() == b.KvmMpState.KVM_MP_STATE_RUNNABLE
    vcpu.set_mp_state(b.KvmMpState.KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == b.KvmMpState.KVM_MP_STATE_HALTED

    regs = vcpu.get_regs()
    regs.rax, regs.r15 = 0x1122334455667788, 7
    vcpu.set_regs(regs)
    assert (vcpu.get_regs().rax, vcpu.get_regs().r15) == (0x1122334455667788, 7)


def test_kvm_vfio_device(vm: Vm) -> None:
    fd = vm.create_device(b.KvmDevType.KVM_DEV_TYPE_VFIO)
    assert vm.has_device_attr(fd, b.KVM_DEV_VFIO_FILE, b.KVM_DEV_VFIO_FILE_ADD)
    assert not vm.has_device_attr(fd, 99, 1)
    not_a_group = ctypes.c_int32(os.open("/dev/null", os.O_RDONLY))
    try:
        with pytest.raises(IoctlError, match="KVM_SET_DEVICE_ATTR"):
            vm.set_device_attr(fd, b.KVM_DEV_VFIO_FILE, b.KVM_DEV_VFIO_FILE_ADD, not_a_group)
    finally:
        os.close(not_a_group.value)


def test_memory_slot_validation_and_close(vm: Vm) -> None:
    with pytest.raises(KvmError, match="not page aligned"):
        vm.set_user_memory_region(0, 0x1001, 0x1000, 0)
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert vcpu.closed and vm.closed
    with pytest.raises(KvmError, match="Vm is closed"):
        vm.irq_line(1, True)
    vm.close()  # idempotent
