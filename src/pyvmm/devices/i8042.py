"""Just enough of the i8042 keyboard controller for the guest to reset the machine through it.

Linux falls back to pulsing the reset line (command 0xFE to port 0x64) when other reboot methods do not
work; without a controller it would spin for seconds waiting for an input buffer that never drains.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
CMD_PULSE_RESET = 0xFE


class I8042Device:
    """Registered on the port bus at 0x60 with length 5 (0x60-0x64); offset 4 is the command port."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0  # status: output buffer empty, input buffer empty; data: nothing

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == I8042_COMMAND_PORT - I8042_DATA_PORT and value & 0xFF == CMD_PULSE_RESET:
            self._on_reset()
