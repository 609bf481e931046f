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
