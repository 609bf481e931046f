"""Human-readable vCPU register dumps for error reports."""

from __future__ import annotations

from pyvmm.kvm.bindings import kvm_regs, kvm_segment, kvm_sregs

_GPR_ROWS = (
    ("rax", "rbx", "rcx", "rdx"),
    ("rsi", "rdi", "rsp", "rbp"),
    ("r8", "r9", "r10", "r11"),
    ("r12", "r13", "r14", "r15"),
    ("rip", "rflags"),
)


def _segment(name: str, seg: kvm_segment) -> str:
    return (
        f"{name.upper():<3}={seg.selector:04x} base={seg.base:016x} limit={seg.limit:08x} "
        f"type={seg.type:x} p={seg.present} dpl={seg.dpl} db={seg.db} s={seg.s} l={seg.l} g={seg.g}"
        + (" unusable" if seg.unusable else "")
    )


RESET_RIP = 0xFFF0
RESET_CS_SELECTOR = 0xF000
RESET_CS_BASE = 0xFFFF0000
CR0_PE = 1


def is_reset_state(regs: kvm_regs, sregs: kvm_sregs) -> bool:
    """The vCPU sits at the reset vector in real mode: the state INIT or RESET leaves.

    After a triple fault KVM on AMD re-initialises the vCPU before it returns KVM_EXIT_SHUTDOWN (the VMCB is
    undefined after a shutdown intercept), so a dump then shows this state, not where the guest faulted."""
    cs = sregs.cs
    return (regs.rip == RESET_RIP and cs.selector == RESET_CS_SELECTOR and cs.base == RESET_CS_BASE
            and not sregs.cr0 & CR0_PE)


def format_registers(regs: kvm_regs, sregs: kvm_sregs | None = None) -> str:
    """A multi-line dump (general registers, then segments and control registers when given)."""
    lines = [" ".join(f"{name.upper():>6}={getattr(regs, name):016x}" for name in row) for row in _GPR_ROWS]
    if sregs is not None:
        lines += [
            _segment(name, getattr(sregs, name)) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
        ]
        lines.append(
            f"GDT={sregs.gdt.base:016x}/{sregs.gdt.limit:04x} IDT={sregs.idt.base:016x}/{sregs.idt.limit:04x}"
        )
        lines.append(
            f"CR0={sregs.cr0:08x} CR2={sregs.cr2:016x} CR3={sregs.cr3:016x} CR4={sregs.cr4:08x} "
            f"CR8={sregs.cr8:x} EFER={sregs.efer:x} APIC_BASE={sregs.apic_base:x}"
        )
    return "\n".join(lines)
