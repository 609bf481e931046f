"""Fuzz target: the PCI platform driven through ECAM and 0xCF8 by a hostile guest.

A RuleBasedStateMachine builds one or two segments with random devices (every BAR kind, ROM, MSI, MSI-X,
a plain capability) and then interleaves raw config accesses of every width and offset, the Linux BAR
sizing sequence, BAR relocations (decode on or off, valid and hostile targets), command-register games,
capability walks, MSI/MSI-X programming through config space and the table BAR, and device-side interrupts.
After every step `check_platform` verifies the invariants (see pci_platform.py).
"""

from __future__ import annotations

import logging

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fuzz.pci_platform import (
    FIXED_PORTS,
    IO_SPACE_SIZE,
    Attached,
    BarSpec,
    FuzzDevice,
    MiB,
    Platform,
    bar_register,
    check_msi_routes,
    check_platform,
    decode_needed,
    device_specs,
    type_bits,
)
from fuzz.sinks import in_msi_window
from pyvmm import layout
from pyvmm.pci.bar import BarKind
from pyvmm.pci.bus import BarPlacement
from pyvmm.pci.config import Command, Reg
from pyvmm.pci.msi import MSIX_ENTRY_SIZE

U32 = 0xFFFF_FFFF
DECODE = Command.IO_SPACE | Command.MEMORY_SPACE
ECAM_SIZES = st.sampled_from([1, 2, 4, 4, 4, 3, 8])
ANY_SIZE = st.sampled_from([1, 2, 4, 8])
PICK = st.integers(0, 1 << 16)
MSI_ADDRESSES = st.one_of(
    st.integers(layout.MSI_WINDOW_START, layout.MSI_WINDOW_START + layout.MSI_WINDOW_SIZE - 1),
    st.sampled_from(
        [
            0,
            layout.MSI_WINDOW_START - 4,
            layout.MSI_WINDOW_START + layout.MSI_WINDOW_SIZE,
            layout.MSI_WINDOW_START | 1 << 32,
            layout.IOAPIC_START,
            U32,
        ]
    ),
    st.integers(0, (1 << 64) - 1),
)
# Registers the 0xCF8 mechanism and ECAM are aimed at: the header, capability area, extended space, edges.
REGISTERS = st.one_of(st.integers(0, 0x40), st.integers(0, 0xFFF), st.sampled_from([0xFC, 0xFD, 0xFF, 0xFFC]))


class FuzzAttached(Attached):
    """For type checkers only: an Attached whose device is a FuzzDevice."""

    device: FuzzDevice  # type: ignore[assignment]


class PciPlatformMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.p: Platform | None = None
        # Refused moves log a warning each; thousands of them only slow the fuzzer down.
        self._log = logging.getLogger("pyvmm.pci")
        self._log_level = self._log.level
        self._log.setLevel(logging.ERROR)

    def teardown(self) -> None:
        self._log.setLevel(self._log_level)

    @initialize(
        ram=st.sampled_from([256 * MiB, 2 << 30, 3 << 30, 6 << 30]),
        segments=st.integers(1, 2),
        weights=st.lists(st.integers(1, 3), min_size=4, max_size=4),
        specs=st.lists(st.tuples(st.integers(0, 1), device_specs()), min_size=1, max_size=5),
    )
    def build(self, ram: int, segments: int, weights: list[int], specs: list) -> None:
        self.p = Platform.build(ram, weights[:segments], weights[2 : 2 + segments])
        for seg, spec in specs:
            self.p.attach(self.p.segments[seg % segments], spec)

    # ---- helpers -----------------------------------------------------------------------------------

    @property
    def platform(self) -> Platform:
        assert self.p is not None
        return self.p

    def _dev(self, pick: int) -> FuzzAttached:
        devices = [a for a in self.platform.devices if isinstance(a.device, FuzzDevice)]
        return devices[pick % len(devices)]  # type: ignore[return-value]

    def _has_devices(self) -> bool:
        return self.p is not None and any(isinstance(a.device, FuzzDevice) for a in self.p.devices)

    def _bar(self, a: FuzzAttached, pick: int) -> BarSpec | None:
        bars = a.device.spec.bars
        return bars[pick % len(bars)] if bars else None

    def _placement(self, a: FuzzAttached, index: int) -> int:
        return next(p.address for p in a.segment.placements(a.slot) if p.index == index)

    def _set_command(self, a: FuzzAttached, value: int) -> None:
        self.platform.cfg_write(a, Reg.COMMAND, 2, value)

    def _command(self, a: FuzzAttached) -> int:
        return self.platform.cfg_read(a, Reg.COMMAND, 2)

    def _flush(self, a: FuzzAttached) -> None:
        """Turn decoding on so that moves the guest left pending on this device happen now."""
        self._set_command(a, self._command(a) | DECODE)
        assert not a.device.config.pending_moves

    # ---- raw accesses ------------------------------------------------------------------------------

    @precondition(lambda self: self.p is not None)
    @rule(
        seg=st.integers(0, 1),
        slot=st.integers(0, 31),
        function=st.sampled_from([0, 0, 0, 1, 7]),
        register=REGISTERS,
        size=ECAM_SIZES,
        value=st.integers(0, (1 << 64) - 1),
        write=st.booleans(),
    )
    def ecam(
        self, seg: int, slot: int, function: int, register: int, size: int, value: int, write: bool
    ) -> None:
        p = self.platform
        address = p.ecam_address(p.segments[seg % len(p.segments)], slot, register, function)
        if write:
            p.mmio.write(address, size, value & ((1 << (8 * size)) - 1))
        else:
            result = p.mmio.read(address, size)
            assert 0 <= result < 1 << (8 * size)

    @precondition(lambda self: self.p is not None)
    @rule(
        offset=st.integers(0, layout.PCI_MMCONFIG_SIZE_PER_SEGMENT - 1),
        size=ECAM_SIZES,
        value=st.integers(0, U32),
    )
    def ecam_anywhere(self, offset: int, size: int, value: int) -> None:
        p = self.platform
        p.mmio.write(p.segments[0].ecam_base + offset, size, value)
        assert 0 <= p.mmio.read(p.segments[0].ecam_base + offset, size) < 1 << (8 * size)

    @precondition(lambda self: self.p is not None)
    @rule(
        enable=st.booleans(),
        bus=st.sampled_from([0, 0, 0, 1, 255]),
        slot=st.integers(0, 31),
        function=st.sampled_from([0, 0, 0, 3]),
        register=st.integers(0, 0xFF),
        address_size=st.sampled_from([4, 4, 2, 1]),
        data_offset=st.integers(0, 3),
        data_size=st.sampled_from([1, 2, 4]),
        value=st.integers(0, U32),
        write=st.booleans(),
    )
    def cf8(
        self,
        enable: bool,
        bus: int,
        slot: int,
        function: int,
        register: int,
        address_size: int,
        data_offset: int,
        data_size: int,
        value: int,
        write: bool,
    ) -> None:
        p = self.platform
        address = (enable << 31) | bus << 16 | slot << 11 | function << 8 | register
        p.pio.write(layout.PCI_CONFIG_IO_PORT, address_size, address & ((1 << (8 * address_size)) - 1))
        port = layout.PCI_CONFIG_IO_PORT + 4 + data_offset
        if write:
            p.pio.write(port, data_size, value & ((1 << (8 * data_size)) - 1))
        else:
            assert 0 <= p.pio.read(port, data_size) < 1 << (8 * data_size)
        readback = p.pio.read(layout.PCI_CONFIG_IO_PORT, 4)
        assert readback & ~0x80FF_FFFC == 0, f"CONFIG_ADDRESS reads {readback:#x}"

    @precondition(_has_devices)
    @rule(
        pick=PICK,
        which=PICK,
        offset=st.integers(0, 1 << 20),
        size=ANY_SIZE,
        value=st.integers(0, (1 << 64) - 1),
    )
    def bar_access(self, pick: int, which: int, offset: int, size: int, value: int) -> None:
        """A guest access through a BAR's current bus range (MSI-X table and PBA included)."""
        a = self._dev(pick)
        bar = self._bar(a, which)
        if bar is None:
            return
        base = self._placement(a, bar.index)
        bus = self.platform.bus_for(bar.kind)
        addr = base + offset % bar.size
        bus.write(addr, size, value & ((1 << (8 * size)) - 1))
        assert 0 <= bus.read(addr, size) < 1 << (8 * size)

    # ---- Linux-like sequences ----------------------------------------------------------------------

    @precondition(_has_devices)
    @rule(
        pick=PICK,
        which=PICK,
        decode_off=st.booleans(),
        value=st.sampled_from([U32, 0xFFFF_FFFE, 0xFFFF_FFF0]),
    )
    def size_bar(self, pick: int, which: int, decode_off: bool, value: int) -> None:
        """pci_read_bases(): save, write all-ones, read the size, restore (each half of a 64-bit BAR)."""
        a = self._dev(pick)
        bar = self._bar(a, which)
        if bar is None:
            return
        p = self.platform
        self._flush(a)
        command = self._command(a)
        if decode_off:
            self._set_command(a, command & ~DECODE)
        placed = self._placement(a, bar.index)
        regs = [bar_register(bar.index)] + (
            [bar_register(bar.index) + 4] if bar.kind == BarKind.MEM64 else []
        )
        mask, fixed = type_bits(bar)
        for half, reg in enumerate(regs):
            original = p.cfg_read(a, reg, 4)
            p.cfg_write(a, reg, 4, value if half == 0 else U32)
            answer = p.cfg_read(a, reg, 4)
            if half == 1:
                assert answer == (~(bar.size - 1) >> 32) & U32, f"upper sizing answer {answer:#x}"
            elif bar.kind == BarKind.IO and value & 0xFFFF_FFFC != 0xFFFF_FFFC:
                pass  # not a sizing write for this kind: an ordinary (hostile) relocation attempt
            elif bar.kind == BarKind.ROM or value & 0xFFFF_FFF0 == 0xFFFF_FFF0:
                size_mask = ~mask & U32
                assert answer & ~mask & U32 == ~(bar.size - 1) & size_mask, f"sizing answer {answer:#x}"
                assert answer & mask == fixed
            p.cfg_write(a, reg, 4, original)
            back = p.cfg_read(a, reg, 4)
            assert back == original, (bar, half, hex(value), hex(original), hex(back), placed, hex(command))
        self._set_command(a, command)
        assert self._placement(a, bar.index) == placed
        assert not a.device.config.pending_moves

    @precondition(_has_devices)
    @rule(pick=PICK, decode_off=st.booleans())
    def size_all_bars(self, pick: int, decode_off: bool) -> None:
        """Newer Linux (__pci_size_bars): all-ones into every BAR register, read all, restore all in order."""
        a = self._dev(pick)
        p = self.platform
        self._flush(a)
        command = self._command(a)
        if decode_off:
            self._set_command(a, command & ~DECODE)
        placed = a.segment.placements(a.slot)
        # A 64-bit BAR whose low half the guest rewrote while decoding holds that half until its upper half
        # is written: restoring the saved registers then carries out that move (or the platform refuses it).
        held = any(self._register_address(a, pl) != pl.address for pl in placed)
        regs = [Reg.BAR0 + 4 * i for i in range(6)] + [Reg.ROM_ADDRESS]
        saved = [p.cfg_read(a, r, 4) for r in regs]
        for r in regs:
            p.cfg_write(a, r, 4, 0xFFFF_FFFE if r == Reg.ROM_ADDRESS else U32)
        for r in regs:
            p.cfg_read(a, r, 4)
        for r, value in zip(regs, saved, strict=True):
            p.cfg_write(a, r, 4, value)
        self._set_command(a, command)
        assert not a.device.config.pending_moves
        after = a.segment.placements(a.slot)
        if held:
            wrong = [pl for pl in after if self._register_address(a, pl) != pl.address]
            assert not wrong, wrong
        else:
            got = [p.cfg_read(a, r, 4) for r in regs]
            assert got == saved, ([hex(x) for x in saved], [hex(x) for x in got], placed, after, hex(command))
            assert after == placed

    def _register_address(self, a: FuzzAttached, placement: BarPlacement) -> int:
        """The address BAR `placement.index`'s register(s) read back."""
        reg = bar_register(placement.index)
        value = self.platform.cfg_read(a, reg, 4)
        if placement.kind == BarKind.MEM64:
            value |= self.platform.cfg_read(a, reg + 4, 4) << 32
        low_bits = {BarKind.IO: 0x3, BarKind.ROM: 0x7FF}.get(placement.kind, 0xF)
        return value & ~low_bits

    @precondition(_has_devices)
    @rule(
        pick=PICK,
        which=PICK,
        data=st.data(),
        decode_off=st.booleans(),
        upper_first=st.booleans(),
        only_changed=st.booleans(),
    )
    def move_bar(
        self,
        pick: int,
        which: int,
        data: st.DataObject,
        decode_off: bool,
        upper_first: bool,
        only_changed: bool,
    ) -> None:
        """pci_update_resource(): write the new address (decode off around 64-bit BARs) and turn decode on.

        With decoding off, a guest may also write the upper half first, or only the half that changes."""
        a = self._dev(pick)
        bar = self._bar(a, which)
        if bar is None:
            return
        p = self.platform
        self._flush(a)
        old = self._placement(a, bar.index)
        target = data.draw(self._targets(a, bar).filter(lambda t: not self._sizing(bar, t)), label="target")
        command = self._command(a)
        if decode_off:
            self._set_command(a, command & ~DECODE)
        reg = bar_register(bar.index)
        low = target & U32
        if bar.kind == BarKind.MEM64:
            writes = [(reg, low), (reg + 4, target >> 32)]
            if decode_off:  # legal while decoding is off: nothing is decoded in between
                if upper_first:
                    writes.reverse()
                if only_changed:
                    current = {reg: p.cfg_read(a, reg, 4) & ~0xF, reg + 4: p.cfg_read(a, reg + 4, 4)}
                    writes = [(r, v) for r, v in writes if current[r] != v & ~0xF & U32] or writes
        else:
            writes = [(reg, low)]
        for r, v in writes:
            p.cfg_write(a, r, 4, v)
        self._set_command(a, command | decode_needed(bar.kind))
        assert not a.device.config.pending_moves
        new = self._placement(a, bar.index)
        wanted = self._effective(bar, target)
        assert new in (old, wanted), f"BAR{bar.index} moved to {new:#x}, neither {old:#x} nor {wanted:#x}"
        expected = wanted if self._acceptable(a, bar, old, wanted) else old
        assert new == expected, f"BAR{bar.index} {bar.kind.name}: {old:#x} -> {wanted:#x} gave {new:#x}"
        reg_value = p.cfg_read(a, reg, 4)
        if bar.kind == BarKind.MEM64:
            reg_value |= p.cfg_read(a, reg + 4, 4) << 32
        mask, _ = type_bits(bar)
        assert reg_value & ~mask == new, f"register reads {reg_value:#x} but the BAR is at {new:#x}"

    @staticmethod
    def _sizing(bar: BarSpec, target: int) -> bool:
        """Whether writing `target` is the sizing protocol rather than a relocation."""
        if bar.kind == BarKind.IO:
            return target & 0xFFFF_FFFC == 0xFFFF_FFFC
        if bar.kind == BarKind.ROM:
            return target & 0xFFFF_F800 == 0xFFFF_F800
        if bar.kind == BarKind.MEM64:
            return target & 0xFFFF_FFF0 == 0xFFFF_FFF0 or target >> 32 == U32
        return target & 0xFFFF_FFF0 == 0xFFFF_FFF0

    def _effective(self, bar: BarSpec, target: int) -> int:
        """Where a write of `target` points the BAR: address bits below its size read as zero."""
        mask, _ = type_bits(bar)
        return target & ~mask & ~(bar.size - 1) & ((1 << 64) - 1 if bar.kind == BarKind.MEM64 else U32)

    def _targets(self, a: FuzzAttached, bar: BarSpec) -> st.SearchStrategy[int]:
        p = self.platform
        if bar.kind == BarKind.IO:
            lo, hi, top = 0, IO_SPACE_SIZE - 1, U32
        elif bar.kind == BarKind.MEM64:
            w = a.segment.windows.mmio64
            lo, hi, top = w.start, w.end, (1 << 64) - 1
        else:
            w = a.segment.windows.mmio32
            lo, hi, top = w.start, w.end, U32
        others = [pl.address for d in p.devices for pl in d.segment.placements(d.slot)]
        slots = max(1, (hi - lo + 1) // bar.size)
        aligned = st.integers(0, slots - 1).map(
            lambda k: (lo + bar.size - 1) // bar.size * bar.size + k * bar.size
        )
        hostile = st.sampled_from(
            [
                0,
                lo - bar.size,
                hi + 1 - bar.size // 2,
                hi + 1,
                layout.LOW_RAM_END - bar.size,
                layout.MSI_WINDOW_START,
                layout.PCI_MMCONFIG_START,
                layout.IOAPIC_START,
                *(port for port, _ in FIXED_PORTS),
            ]
        )
        return st.one_of(aligned, aligned, st.sampled_from(others), hostile, st.integers(0, top)).map(
            lambda t: t & top if t >= 0 else 0
        )

    def _acceptable(self, a: FuzzAttached, bar: BarSpec, old: int, new: int) -> bool:
        if new == old:
            return True
        align = 4 if bar.kind == BarKind.IO else bar.size
        if new % align:
            return False
        if bar.kind == BarKind.IO:
            if new + bar.size > IO_SPACE_SIZE:
                return False
            if any(new < port + n and port < new + bar.size for port, n in FIXED_PORTS):
                return False
        elif bar.kind == BarKind.MEM64:
            if not a.segment.windows.mmio64.contains(new, bar.size):
                return False
        elif not a.segment.windows.mmio32.contains(new, bar.size):
            return False
        for d in self.platform.devices:
            for pl in d.segment.placements(d.slot):
                if d is a and pl.index == bar.index:
                    continue
                same_space = (pl.kind == BarKind.IO) == (bar.kind == BarKind.IO)
                if same_space and new < pl.address + pl.size and pl.address < new + bar.size:
                    return False
        return True

    @precondition(_has_devices)
    @rule(pick=PICK, value=st.integers(0, 0xFFFF), size=st.sampled_from([1, 2, 4]))
    def command(self, pick: int, value: int, size: int) -> None:
        a = self._dev(pick)
        self.platform.cfg_write(a, Reg.COMMAND, size, value)
        command = self._command(a)
        for move in a.device.config.pending_moves:  # only moves whose decoding is still off may wait
            assert not command & decode_needed(a.device.config.bar_info(move.bar_index).kind), move

    @precondition(_has_devices)
    @rule(pick=PICK)
    def walk_capabilities(self, pick: int) -> None:
        a = self._dev(pick)
        p = self.platform
        status = p.cfg_read(a, Reg.STATUS, 2)
        ptr = p.cfg_read(a, Reg.CAPABILITIES_POINTER, 1) if status & 0x10 else 0
        seen: dict[int, int] = {}
        while ptr:
            assert 0x40 <= ptr <= 0xFC and ptr % 4 == 0, f"capability pointer {ptr:#x}"
            assert ptr not in seen, f"capability list loops at {ptr:#x}"
            header = p.cfg_read(a, ptr, 2)
            seen[ptr] = header & 0xFF
            ptr = header >> 8
        assert seen == a.device.caps
        # The 0xCF8 mechanism sees the same list head.
        if a.segment is p.segments[0]:
            p.pio.write(layout.PCI_CONFIG_IO_PORT, 4, 0x8000_0000 | a.slot << 11 | Reg.CAPABILITIES_POINTER)
            via_io = p.pio.read(layout.PCI_CONFIG_IO_PORT + 4, 1)
            assert via_io == p.cfg_read(a, Reg.CAPABILITIES_POINTER, 1)

    # ---- MSI and MSI-X -----------------------------------------------------------------------------

    def _cap_offset(self, a: FuzzAttached, cap_id: int) -> int | None:
        return next((off for off, i in a.device.caps.items() if i == cap_id), None)

    @precondition(_has_devices)
    @rule(
        pick=PICK,
        address=MSI_ADDRESSES,
        data=st.integers(0, 0xFFFF),
        mme=st.integers(0, 7),
        enable=st.booleans(),
        mask=st.integers(0, U32),
        width=st.sampled_from([1, 2, 4]),
    )
    def program_msi(
        self, pick: int, address: int, data: int, mme: int, enable: bool, mask: int, width: int
    ) -> None:
        a = self._dev(pick)
        msi = a.device.msi
        off = self._cap_offset(a, 0x05)
        if msi is None or off is None:
            return
        p = self.platform
        data_off = 0x0C if msi.address_64 else 0x08
        fields = [(4, 4, address & U32), (data_off, 2, data)]
        if msi.address_64:
            fields.append((8, 4, address >> 32))
        if msi.per_vector_mask:
            fields.append((data_off + 4, 4, mask))
        fields.append((2, 2, mme << 4 | int(enable)))
        for field, length, value in fields:
            for i in range(0, length, width):
                n = min(width, length - i)
                p.cfg_write(a, off + field + i, n, (value >> (8 * i)) & ((1 << (8 * n)) - 1))
        control = p.cfg_read(a, off + 2, 2)
        assert control & 1 == int(enable)
        assert (control >> 1) & 7 == msi.vectors.bit_length() - 1  # capable count is read-only

    @precondition(_has_devices)
    @rule(pick=PICK, enable=st.booleans(), function_mask=st.booleans(), width=st.sampled_from([1, 2, 4]))
    def msix_control(self, pick: int, enable: bool, function_mask: bool, width: int) -> None:
        a = self._dev(pick)
        off = self._cap_offset(a, 0x11)
        if off is None:
            return
        p = self.platform
        high = (0x80 if enable else 0) | (0x40 if function_mask else 0)
        if width == 1:
            p.cfg_write(a, off + 3, 1, high)
        elif width == 2:
            p.cfg_write(a, off + 2, 2, high << 8 | 0xFF)
        else:
            p.cfg_write(a, off, 4, high << 24 | 0xFF_FFFF)
        control = p.cfg_read(a, off + 2, 2)
        assert control >> 14 == (enable << 1 | function_mask)
        assert control & 0x7FF == a.device.msix.table_size - 1  # type: ignore[union-attr]

    @precondition(_has_devices)
    @rule(
        pick=PICK,
        vector=PICK,
        address=MSI_ADDRESSES,
        data=st.integers(0, U32),
        masked=st.booleans(),
        qword=st.booleans(),
    )
    def program_msix_entry(
        self, pick: int, vector: int, address: int, data: int, masked: bool, qword: bool
    ) -> None:
        """The guest writes one table entry through the table BAR's current address."""
        a = self._dev(pick)
        x = a.device.msix
        if x is None:
            return
        p = self.platform
        bar = next(b for b in a.device.spec.bars if b.index == x.table_bir)
        entry = self._placement(a, bar.index) + x.table_offset + (vector % x.table_size) * MSIX_ENTRY_SIZE
        if qword:
            p.mmio.write(entry, 8, address)
            p.mmio.write(entry + 8, 8, (int(masked) << 32) | data)
            assert p.mmio.read(entry, 8) == address & ~3
        else:
            for i, dword in enumerate((address & U32, address >> 32, data, int(masked))):
                p.mmio.write(entry + 4 * i, 4, dword)
        assert p.mmio.read(entry + 12, 4) == int(masked)

    @precondition(_has_devices)
    @rule(pick=PICK, vector=st.integers(0, 2048), msix=st.booleans())
    def fire(self, pick: int, vector: int, msix: bool) -> None:
        """The device raises a vector: the message it sends is the sink's route, or nothing."""
        a = self._dev(pick)
        cap, sink = (a.device.msix, a.device.msix_sink) if msix else (a.device.msi, a.device.msi_sink)
        if cap is None:
            return
        message = cap.fire(vector)
        if message is not None:
            assert in_msi_window(message.address)
            assert sink.routes.get(vector) == message

    @precondition(_has_devices)
    @rule(pick=PICK, msix=st.booleans())
    def read_pending_bits(self, pick: int, msix: bool) -> None:
        a = self._dev(pick)
        p = self.platform
        if msix and a.device.msix is not None:
            x = a.device.msix
            base = self._placement(a, x.pba_bir) + x.pba_offset
            for off in range(0, x.pba_length, 8):
                assert 0 <= p.mmio.read(base + off, 8) < 1 << 64
        check_msi_routes(a.device)

    # ---- invariants --------------------------------------------------------------------------------

    @invariant()
    def platform_is_consistent(self) -> None:
        if self.p is not None:
            check_platform(self.p)


__all__ = ["PciPlatformMachine"]
