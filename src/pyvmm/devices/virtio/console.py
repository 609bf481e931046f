"""virtio-console (virtio 1.x §5.3) with one port and no MULTIPORT: the guest's `hvc0`.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) the guest's output. Output is
copied out of each chain (at most TX_CHAIN_MAX bytes of one chain) and the chain returned at once: Linux's
hvc driver spins until its buffer comes back, so a drained ring costs one write to the host sink, not one
per chain or byte. Input waits in a bounded buffer (INPUT_BUFFER_MAX) until the driver posts receive
buffers; when it is full the host's reader is held back (console.TerminalInput retries), nothing is dropped.
docs/virtio-console-rng.md says what the guest gets.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from enum import IntEnum

from pyvmm.devices.virtio.device import RateLimitedWarnings, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue, scatter
from pyvmm.devices.virtio.spec import VirtioDeviceType, bit

log = logging.getLogger(__name__)

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 256
INPUT_BUFFER_MAX = 16 << 10  # host input held while the guest has no receive buffer posted
TX_CHAIN_MAX = 64 << 10  # bytes taken from one transmit chain; Linux sends at most a page per chain
# struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
CONSOLE_CONFIG = struct.Struct("<HHII")


class ConsoleFeature(IntEnum):
    SIZE = 0
    MULTIPORT = 1
    EMERG_WRITE = 2


class VirtioConsole(VirtioDevice):
    """`output(data)` receives the guest's bytes (on the worker thread); `size` (columns, rows) offers
    VIRTIO_CONSOLE_F_SIZE, for a console on a terminal; `set_size` changes it (the transport must then
    notify the driver of the configuration change)."""

    device_type = VirtioDeviceType.CONSOLE
    name = "console"
    pci_class = (0x07, 0x80)  # simple communication controller, other
    filled_queues = frozenset({RECEIVEQ})

    def __init__(self, output: Callable[[bytes], None], size: tuple[int, int] | None = None,
                 queue_size: int = QUEUE_SIZE) -> None:
        super().__init__([queue_size, queue_size])
        self._output = output
        self._offer_size = size is not None
        self._size = size or (0, 0)
        self._input = bytearray()
        self._input_lock = threading.Lock()
        self._warn = RateLimitedWarnings(log, name="virtio-console")

    @property
    def features(self) -> int:
        return bit(ConsoleFeature.SIZE) if self._offer_size else 0

    def config_bytes(self) -> bytes:
        cols, rows = self._size
        return CONSOLE_CONFIG.pack(cols, rows, 1, 0)

    def set_size(self, cols: int, rows: int) -> bool:
        """A new terminal size (clamped to 16 bits); True when it changed and the driver should be told."""
        new = (min(max(cols, 0), 0xFFFF), min(max(rows, 0), 0xFFFF))
        if not self._offer_size or new == self._size:
            return False
        self._size = new
        return True

    # ---- host input -> receiveq ------------------------------------------------------------------

    def queue_input(self, data: bytes) -> int:
        """Buffer host input for the guest; returns how much fit (the caller retries the rest later)."""
        with self._input_lock:
            taken = data[: INPUT_BUFFER_MAX - len(self._input)]
            self._input += taken
        if taken:
            self.kick(RECEIVEQ)
        return len(taken)

    @property
    def pending_input(self) -> int:
        with self._input_lock:
            return len(self._input)

    def fill_queue(self, queue: Virtqueue) -> None:
        while True:
            with self._input_lock:
                pending = self._fill(queue)
            # Re-armed even when nothing is pending (event-idx drivers notify only past avail_event); go on
            # only if input is still waiting and the driver posted buffers meanwhile.
            if not queue.enable_notifications() or not pending:
                return

    def _fill(self, queue: Virtqueue) -> bool:
        buf = self._input
        while buf:
            chain = queue.pop()
            if chain is None:
                break
            if chain.error is not None or chain.readable:
                self._warn.warning("virtio-console: receive chain %d: %s", chain.head,
                                   chain.error or "has device-readable buffers")
                queue.push(chain.head, 0)
                continue
            n = scatter(chain.writable, bytes(buf[:INPUT_BUFFER_MAX]))
            del buf[:n]
            queue.push(chain.head, n)
        return bool(buf)

    # ---- transmitq -> host output ----------------------------------------------------------------

    def process_queue(self, queue: Virtqueue, every: int = 0, completed: Callable[[], None] | None = None
                      ) -> None:
        if queue.index != TRANSMITQ:
            return
        out: list[bytes] = []
        pop, push = queue.pop, queue.push
        count = 0
        while (chain := pop()) is not None:
            if chain.error is not None:
                self._warn.warning("virtio-console: transmit chain %d dropped: %s", chain.head, chain.error)
            else:
                budget = TX_CHAIN_MAX
                for view in chain.readable:
                    if len(view) > budget:
                        out.append(bytes(view[:budget]))
                        self._warn.warning("virtio-console: transmit chain %d is longer than %d bytes; the "
                                           "rest was dropped", chain.head, TX_CHAIN_MAX)
                        break
                    out.append(bytes(view))
                    budget -= len(view)
            push(chain.head, 0)
            count += 1
            if count == every and completed is not None:
                count = 0
                completed()
        if out:
            self._output(b"".join(out))
