"""virtio-blk (virtio 1.x §5.2) over a raw image.

Every request ends with a status byte: a malformed chain, a buffer outside guest RAM, an out-of-range
sector, a request over the advertised limits or a write to a read-only disk fails that one request (IOERR,
or UNSUPP for unknown or unnegotiated commands); nothing the guest sends raises out of the device or
touches the image.

What one request may cost is bounded before any I/O or copy (docs/virtio-blk.md#limits): at most
`seg_max` data segments of at most SIZE_MAX bytes each, so at most seg_max * SIZE_MAX bytes (read and
written in place, never copied), and a discard/write-zeroes payload of exactly MAX_DISCARD_SEGMENTS
16-byte segments, judged from the descriptor lengths before it is gathered. A chain may name the same
guest page in every descriptor: only lengths are counted, never what they point at.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from enum import IntEnum

from pyvmm.devices.virtio.device import RateLimitedWarnings, VirtioDevice
from pyvmm.devices.virtio.image import SECTOR_SIZE, DiskImageError, RawImage
from pyvmm.devices.virtio.queue import (
    ChainError,
    DescriptorChain,
    gather,
    map_chain,
    scatter,
    split_views,
    status_byte,
)
from pyvmm.devices.virtio.spec import VirtioDeviceType, bit

log = logging.getLogger(__name__)

VIRTIO_BLK_ID_BYTES = 20
REQUEST_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
DISCARD_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
SIZE_MAX = 1 << 20  # size_max: largest data segment (descriptor) the driver may send
# seg_max is the queue size less header and status, but at most this: a request then moves at most
# SEG_MAX_CAP * SIZE_MAX = 1 GiB (and its used length fits the ring's 32 bits).
SEG_MAX_CAP = 1024
MAX_DISCARD_SECTORS = 0xFFFF_FFFF
MAX_DISCARD_SEGMENTS = 1
DISCARD_SECTOR_ALIGNMENT = 4096 // SECTOR_SIZE
WRITE_ZEROES_FLAG_UNMAP = 1


class BlkFeature(IntEnum):
    SIZE_MAX = 1
    SEG_MAX = 2
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class RequestType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


_IN, _OUT = int(RequestType.IN), int(RequestType.OUT)  # used for every request: plain ints
_SIZE_MAX = SIZE_MAX


class BlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


_OK = int(BlkStatus.OK)


@dataclass(frozen=True)
class BlockParams:
    num_queues: int = 1
    queue_size: int = 128
    serial: str | None = None


class VirtioBlock(VirtioDevice):
    device_type = VirtioDeviceType.BLOCK
    name = "blk"
    pci_class = (0x01, 0x00)  # mass storage

    def __init__(self, image: RawImage, params: BlockParams | None = None) -> None:
        params = params or BlockParams()
        super().__init__([params.queue_size] * params.num_queues)
        self.image = image
        serial = params.serial if params.serial is not None else image.identity
        self.device_id = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.seg_max = max(min(params.queue_size - 2, SEG_MAX_CAP), 1)
        self.max_request_bytes = self.seg_max * SIZE_MAX  # what seg_max and size_max allow together
        self._warn = RateLimitedWarnings(log)
        features = (
            bit(BlkFeature.SIZE_MAX)
            | bit(BlkFeature.SEG_MAX)
            | bit(BlkFeature.BLK_SIZE)
            | bit(BlkFeature.FLUSH)
        )
        if params.num_queues > 1:
            features |= bit(BlkFeature.MQ)
        if image.readonly:
            features |= bit(BlkFeature.RO)
        else:
            features |= bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES)
        self._features = features
        self._config = self._build_config(params.num_queues)
        # cloud-hypervisor's virtio-blk counters (vm.counters): requests that succeeded and their data
        self.read_bytes = self.write_bytes = self.read_ops = self.write_ops = 0

    @classmethod
    def open(cls, path: str, readonly: bool = False, direct: bool = False,
             params: BlockParams | None = None) -> VirtioBlock:
        """Open and lock the image; raises DiskImageError with a one-line message."""
        image = RawImage(path, readonly=readonly, direct=direct)
        try:
            return cls(image, params)
        except Exception as exc:
            image.close()
            raise DiskImageError(f"--disk {path}: {exc}") from exc

    @property
    def features(self) -> int:
        return self._features

    def _build_config(self, num_queues: int) -> bytes:
        # Logical blocks stay 512 bytes even with direct=on: the image layer bounces what O_DIRECT refuses.
        blk_size = SECTOR_SIZE
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.image.sectors,  # capacity
            SIZE_MAX,
            self.seg_max,
            0, 0, 0,  # geometry (unused)
            blk_size,
            0, 0, 0, 0,  # topology (not offered)
            0, 0,  # writeback, unused
            num_queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_DISCARD_SECTORS,  # max_write_zeroes_sectors
            MAX_DISCARD_SEGMENTS,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )

    def config_bytes(self) -> bytes:
        return self._config

    def close(self) -> None:
        self.image.close()

    def counters(self) -> dict[str, int]:
        return {"read_bytes": self.read_bytes, "write_bytes": self.write_bytes, "read_ops": self.read_ops,
                "write_ops": self.write_ops}

    # ---- requests -------------------------------------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        # The common cases first, in as few steps as possible (this runs for every request): a read or a
        # write laid out as Linux lays them out (header; data buffers; status byte). Anything else, and
        # any failure, takes the general path, which checks everything and reports problems.
        readable, writable = chain.readable, chain.writable
        if (
            chain.error is None
            and writable
            and len(writable[-1]) == 1
            and readable
            and len(readable[0]) == REQUEST_HEADER.size
        ):
            req_type, _reserved, sector = REQUEST_HEADER.unpack(readable[0])
            image = self.image
            if req_type == _IN and len(readable) == 1:
                data, transfer = writable[:-1], image.readv
            elif req_type == _OUT and len(writable) == 1 and not image.readonly:
                data, transfer = readable[1:], image.writev
            else:
                return self._handle_general(chain)
            length = sum(map(len, data))
            # The advertised limits, in O(1) for the common sizes: no segment can exceed SIZE_MAX when the
            # whole request does not (Linux's default largest request is 1280 KiB).
            if (
                length
                and len(data) <= self.seg_max
                and (length <= _SIZE_MAX or max(map(len, data)) <= _SIZE_MAX)
                and self._in_range(sector, length)
            ):
                try:
                    transfer(sector << 9, data, length)
                except OSError:
                    pass  # the general path tries again and reports it
                else:
                    writable[-1][0] = _OK
                    if req_type == _IN:
                        self.read_bytes += length
                        self.read_ops += 1
                        return length + 1
                    self.write_bytes += length
                    self.write_ops += 1
                    return 1
        return self._handle_general(chain)

    def _handle_general(self, chain: DescriptorChain) -> int:
        assert self.memory is not None
        try:
            buffers = map_chain(chain)
        except ChainError as exc:
            self._warn.warning("virtio-blk: %s", exc)
            return self._fail_broken_chain(chain)
        writable = buffers.writable
        status: memoryview | None
        if writable and len(writable[-1]) == 1:  # how drivers lay it out: the status byte on its own
            data_in, status = writable[:-1], writable[-1]
        else:
            data_in, status_views = split_views(writable, max(buffers.writable_len - 1, 0))
            status = next((v for v in status_views if len(v)), None)
            if status is None:
                self._warn.warning("virtio-blk: chain %d has no writable status byte", chain.head)
                return 0
        try:
            status_value, written = self._execute(buffers.readable, data_in)
        except Exception:  # never let a request take the device down
            log.exception("virtio-blk: request on chain %d failed", chain.head)
            status_value, written = BlkStatus.IOERR, 0
        status[0] = status_value
        return written + 1

    def _fail_broken_chain(self, chain: DescriptorChain) -> int:
        byte = status_byte(self.memory, chain) if self.memory is not None else None
        if byte is None:
            return 0
        byte[0] = BlkStatus.IOERR
        return 1

    def _execute(self, readable: list[memoryview], data_in: list[memoryview]) -> tuple[BlkStatus, int]:
        """Run one request; returns its status and the data bytes written for the driver."""
        if readable and len(readable[0]) == REQUEST_HEADER.size:  # the usual layout: header on its own
            raw: memoryview | bytes = readable[0]
            payload = readable[1:]
        else:  # a header split across descriptors, or sharing one with data
            header, payload = split_views(readable, REQUEST_HEADER.size)
            raw = header[0] if len(header) == 1 else gather(header)
            if len(raw) < REQUEST_HEADER.size:
                self._warn.warning("virtio-blk: request header of %d bytes", len(raw))
                return BlkStatus.IOERR, 0
        req_type, _reserved, sector = REQUEST_HEADER.unpack(raw)
        if req_type == _IN:
            return self._read(sector, data_in)
        if req_type == _OUT:
            return self._write(sector, payload), 0
        if req_type == RequestType.FLUSH:
            return self._flush(), 0
        if req_type == RequestType.GET_ID:
            data = self.device_id.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            return BlkStatus.OK, scatter(data_in, data)
        if req_type in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            return self._discard_or_zero(RequestType(req_type), payload), 0
        return BlkStatus.UNSUPP, 0

    def _in_range(self, sector: int, length: int) -> bool:
        """Whole sectors, all on the disk."""
        return not length % SECTOR_SIZE and sector + length // SECTOR_SIZE <= self.image.sectors

    def _range_ok(self, sector: int, length: int) -> bool:
        """_in_range, saying why not."""
        if self._in_range(sector, length):
            return True
        if length % SECTOR_SIZE:
            self._warn.warning("virtio-blk: transfer of %d bytes is not a whole number of sectors", length)
            return False
        self._warn.warning("virtio-blk: sectors %d+%d beyond the disk's %d", sector, length // SECTOR_SIZE,
                           self.image.sectors)
        return False

    def _segments_ok(self, data: list[memoryview]) -> bool:
        """seg_max and size_max as advertised, over the non-empty data buffers (lengths only: nothing is
        read or copied); together they cap the request at max_request_bytes."""
        lengths = [n for n in map(len, data) if n]
        if len(lengths) > self.seg_max:
            self._warn.warning("virtio-blk: request of %d data segments, more than seg_max %d", len(lengths),
                               self.seg_max)
            return False
        if lengths and max(lengths) > SIZE_MAX:
            self._warn.warning("virtio-blk: data segment of %d bytes, more than size_max %d", max(lengths),
                               SIZE_MAX)
            return False
        return True

    def _read(self, sector: int, data_in: list[memoryview]) -> tuple[BlkStatus, int]:
        if not self._segments_ok(data_in):
            return BlkStatus.IOERR, 0
        length = sum(map(len, data_in))
        if not self._range_ok(sector, length):
            return BlkStatus.IOERR, 0
        try:
            self.image.readv(sector * SECTOR_SIZE, data_in, length)
        except OSError as exc:
            self._warn.warning("virtio-blk: read at sector %d failed: %s", sector, exc)
            return BlkStatus.IOERR, 0
        self.read_bytes += length
        self.read_ops += 1
        return BlkStatus.OK, length

    def _write(self, sector: int, data_out: list[memoryview]) -> BlkStatus:
        if self.image.readonly or not self._segments_ok(data_out):
            return BlkStatus.IOERR
        length = sum(map(len, data_out))
        if not self._range_ok(sector, length):
            return BlkStatus.IOERR
        try:
            self.image.writev(sector * SECTOR_SIZE, data_out, length)
        except OSError as exc:
            self._warn.warning("virtio-blk: write at sector %d failed: %s", sector, exc)
            return BlkStatus.IOERR
        self.write_bytes += length
        self.write_ops += 1
        return BlkStatus.OK

    def _flush(self) -> BlkStatus:
        try:
            self.image.flush()
        except OSError as exc:  # EIO, or ENOSPC from a file system that allocates at writeback
            self._warn.warning("virtio-blk: flush failed: %s", exc)
            return BlkStatus.IOERR
        return BlkStatus.OK

    def _discard_or_zero(self, kind: RequestType, payload: list[memoryview]) -> BlkStatus:
        feature = BlkFeature.DISCARD if kind == RequestType.DISCARD else BlkFeature.WRITE_ZEROES
        if not self._features & bit(feature) or not self.acked_features & bit(feature):
            return BlkStatus.IOERR if self.image.readonly else BlkStatus.UNSUPP
        # Judged from the descriptor lengths, before anything is gathered: a chain may name the same
        # megabyte of guest RAM in every descriptor, and the copy would be as large as the chain says.
        length = sum(map(len, payload))
        if not length or length % DISCARD_SEGMENT.size:
            self._warn.warning("virtio-blk: %s payload of %d bytes is not a whole number of %d-byte segments",
                               kind.name.lower(), length, DISCARD_SEGMENT.size)
            return BlkStatus.IOERR
        if length // DISCARD_SEGMENT.size > MAX_DISCARD_SEGMENTS:
            self._warn.warning("virtio-blk: %s of %d segments, more than the %d advertised",
                               kind.name.lower(), length // DISCARD_SEGMENT.size, MAX_DISCARD_SEGMENTS)
            return BlkStatus.IOERR
        raw = gather(payload)  # at most MAX_DISCARD_SEGMENTS * 16 bytes
        allowed_flags = WRITE_ZEROES_FLAG_UNMAP if kind == RequestType.WRITE_ZEROES else 0
        for sector, count, flags in DISCARD_SEGMENT.iter_unpack(raw):
            if flags & ~allowed_flags:
                return BlkStatus.UNSUPP
            if sector + count > self.image.sectors:
                return BlkStatus.IOERR
            if count == 0:
                continue
            try:
                if kind == RequestType.DISCARD:
                    self.image.discard(sector * SECTOR_SIZE, count * SECTOR_SIZE)
                else:
                    self.image.write_zeroes(sector * SECTOR_SIZE, count * SECTOR_SIZE,
                                            bool(flags & WRITE_ZEROES_FLAG_UNMAP))
            except OSError as exc:
                self._warn.warning("virtio-blk: %s of sectors %d+%d failed: %s", kind.name.lower(), sector,
                                   count, exc)
                return BlkStatus.IOERR
        return BlkStatus.OK
