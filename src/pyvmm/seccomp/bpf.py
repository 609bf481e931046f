"""A seccomp filter as a classic BPF program: the instructions, the `struct seccomp_data` it reads, and the
compiler from an allow-list (`Rule`s) to instructions. Pure: nothing here talks to the kernel (install.py).

The program (docs/seccomp.md#the-filter):

    load arch;  not x86-64          -> kill the process (whatever the mode: another ABI is never ours)
    load nr;    >= 0x40000000 (x32) -> kill the process
    for each rule, in order:   nr == rule's number ?  its body : next rule
    the mode's default action (KILL_PROCESS under --seccomp true, LOG under log)

A rule's body is `ret ALLOW` (or the rule's own action) when it has no argument checks; otherwise, for each
check, load the low 32 bits of the argument, AND its mask, compare with each allowed value (a match jumps
to the final `ret`), and falls through to the default action when none matched. Every jump is forward and
short (a body is at most a few hundred instructions), so the 8-bit jump offsets of classic BPF suffice.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

# <linux/bpf_common.h>
BPF_LD = 0x00
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_AND = 0x50
BPF_JEQ = 0x10
BPF_JGE = 0x30
BPF_K = 0x00

LD_W_ABS = BPF_LD | BPF_W | BPF_ABS
ALU_AND_K = BPF_ALU | BPF_AND | BPF_K
JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
JGE_K = BPF_JMP | BPF_JGE | BPF_K
RET_K = BPF_RET | BPF_K

BPF_MAXINSNS = 4096  # the kernel refuses longer filters
AUDIT_ARCH_X86_64 = 0xC000003E  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of args[index] in struct seccomp_data (little-endian x86-64)."""
    if not 0 <= index < 6:
        raise ValueError(f"syscall argument {index}: there are six (0-5)")
    return 16 + 8 * index


class SeccompRet(IntEnum):
    """<linux/seccomp.h> return values (the action; ERRNO takes its errno in the low 16 bits)."""

    SECCOMP_RET_KILL_PROCESS = 0x80000000
    SECCOMP_RET_KILL_THREAD = 0x00000000
    SECCOMP_RET_TRAP = 0x00030000
    SECCOMP_RET_ERRNO = 0x00050000
    SECCOMP_RET_LOG = 0x7FFC0000
    SECCOMP_RET_ALLOW = 0x7FFF0000


def ret_errno(errno: int) -> int:
    return int(SeccompRet.SECCOMP_RET_ERRNO) | (errno & 0xFFFF)


class sock_filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)
    ]


class sock_fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(sock_filter))]


assert ctypes.sizeof(sock_filter) == 8 and ctypes.sizeof(sock_fprog) == 16


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.jt <= 255 and 0 <= self.jf <= 255):
            raise ValueError(f"BPF jump out of range: {self}")
        if not 0 <= self.k <= 0xFFFF_FFFF:
            raise ValueError(f"BPF constant out of range: {self}")


@dataclass(frozen=True)
class ArgCheck:
    """Allowed when `(args[arg] & mask) in values`, on the argument's low 32 bits (ioctl's request and
    the flags pyvmm checks are 32-bit in the kernel: it truncates them before use)."""

    arg: int
    values: tuple[int, ...]
    mask: int = 0xFFFF_FFFF

    def __post_init__(self) -> None:
        arg_low(self.arg)
        if not self.values:
            raise ValueError("ArgCheck without values would allow nothing")


@dataclass(frozen=True)
class Rule:
    """Syscall `nr` is answered with `action` (ALLOW by default); with `check`, only when it holds (else
    the filter's default action)."""

    nr: int
    check: ArgCheck | None = None
    action: int = SeccompRet.SECCOMP_RET_ALLOW


def _body(rule: Rule, default: int) -> list[Insn]:
    if rule.check is None:
        return [Insn(RET_K, k=rule.action)]
    check = rule.check
    out = [Insn(LD_W_ABS, k=arg_low(check.arg))]
    if check.mask != 0xFFFF_FFFF:
        out.append(Insn(ALU_AND_K, k=check.mask))
    n = len(check.values)
    for i, value in enumerate(check.values):
        # a match jumps over the remaining compares and the default return to `ret action`
        out.append(Insn(JEQ_K, jt=n - i, jf=0, k=value))
    out += [Insn(RET_K, k=default), Insn(RET_K, k=rule.action)]
    return out


def compile_filter(rules: Iterable[Rule], default: int) -> list[Insn]:
    """The program of docs/seccomp.md#the-filter; each syscall number may have one rule."""
    kill = int(SeccompRet.SECCOMP_RET_KILL_PROCESS)
    prog = [
        Insn(LD_W_ABS, k=SECCOMP_DATA_ARCH),
        Insn(JEQ_K, jt=1, jf=0, k=AUDIT_ARCH_X86_64),
        Insn(RET_K, k=kill),
        Insn(LD_W_ABS, k=SECCOMP_DATA_NR),
        Insn(JGE_K, jt=0, jf=1, k=X32_SYSCALL_BIT),
        Insn(RET_K, k=kill),
    ]
    seen: set[int] = set()
    for rule in rules:
        if rule.nr in seen:
            raise ValueError(f"syscall {rule.nr} has two rules")
        seen.add(rule.nr)
        body = _body(rule, default)
        # The accumulator still holds nr when a body is skipped: a body always ends in `ret`.
        prog.append(Insn(JEQ_K, jt=0, jf=len(body), k=rule.nr))
        prog += body
    prog.append(Insn(RET_K, k=default))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp filter of {len(prog)} instructions: the kernel takes {BPF_MAXINSNS}")
    return prog


def to_sock_filters(prog: Sequence[Insn]) -> ctypes.Array[sock_filter]:
    array = (sock_filter * len(prog))()
    for slot, insn in zip(array, prog, strict=True):
        slot.code, slot.jt, slot.jf, slot.k = insn.code, insn.jt, insn.jf, insn.k
    return array


def to_bytes(prog: Sequence[Insn]) -> bytes:
    """The program as the kernel reads it (what libseccomp's seccomp_export_bpf writes)."""
    return bytes(to_sock_filters(prog))

