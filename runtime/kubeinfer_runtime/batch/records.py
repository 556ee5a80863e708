"""Records out of a byte stream (SplitType Line, RecordIO, TFRecord), and gzip: PURE.

Readers are fed the bytes of one *part* of an object, chunk by chunk, as they
arrive (no whole-object reads), and hand back what is complete. A part is a
byte range ``[start, end)`` of the object; a record belongs to the part that
holds its first byte, so a part that does not start at 0 first skips to the
first record boundary at or after ``start``, and every part reads past ``end``
to finish its last record (RecordIO, TFRecord: and to check the framing of the
record after it, which the next part's skipping would not report). Every record
is in exactly one part, whatever the cut points (pinned by a property test).
Finding a boundary at an arbitrary offset:

* Line: the byte after a ``\\n`` (so a part from ``start > 0`` is read from
  ``start - 1``: a ``\\n`` there means a record starts right at ``start``);
* RecordIO (MXNet/dmlc): records are 4-byte aligned and begin with the magic
  0xced7230a; the writer splits a record wherever its data holds the magic at an
  aligned position (``cflag`` 1/2/3 continuation parts), so an aligned magic whose
  ``cflag`` is 0 or 1 is always a record start;
* TFRecord: ``uint64 length, uint32 masked crc32c(length), data, uint32 masked
  crc32c(data)``: a boundary is a position whose length CRC and data CRC validate
  (lengths of 2**48 and more are not looked for: the search is vectorised on that).

Record numbers count from 1 within the part (within the object when the part
starts at 0); byte offsets are exact, in the object's (decompressed) bytes.
Line records are the line with its ``\\n`` (added to a final line without one), less
a UTF-8 byte order mark at the start of the object;
blank lines (empty, or a lone ``\\r``) are not records: they are never sent, and
produce no output (a line of spaces is a record, sent as it is: for JSON Lines,
a bad one). Every buffer is bounded: a record over ``bound`` bytes is a
:class:`~kubeinfer_runtime.batch.errors.RecordTooLarge` naming the object, the
record and its offset, raised before more than ``bound`` bytes of it are held.
"""

from __future__ import annotations

import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache

import google_crc32c
import numpy as np
import numpy.typing as npt

from kubeinfer_runtime.batch.errors import CorruptInput, RecordTooLarge, cap, describe

#: A UTF-8 byte order mark: skipped at the start of an object split by Line.
UTF8_BOM = b"\xef\xbb\xbf"
#: RecordIO's magic number, as it is stored (little-endian).
RECORDIO_MAGIC = struct.pack("<I", 0xCED7230A)
_LENGTH_MASK = (1 << 29) - 1
_TF_MASK_DELTA = 0xA282EAD8
#: Bodies at least this long are counted with numpy.
_VECTOR_BYTES = 64 << 10
#: Decompressed bytes produced per step of gzip inflation (bounds a gzip bomb's step).
_INFLATE_STEP = 1 << 20
#: Positions a TFRecord sync checks per vectorised step (bounds its temporary arrays).
_SCAN_WINDOW = 1 << 20


@dataclass(frozen=True, slots=True)
class Where:
    """The part being read, for messages."""

    key: str
    part_start: int = 0

    def record(self, number: int, offset: int) -> str:
        return describe(self.key, number, offset, self.part_start)


@dataclass(frozen=True, slots=True)
class Record:
    #: 1-based, within the part.
    number: int
    #: Byte offset of its first byte in the object.
    offset: int
    #: Its bytes as stored (Line: the line and its ``\n``; RecordIO/TFRecord: framed).
    data: bytes
    #: What a SingleRecord request carries: the data without framing or padding.
    payload: bytes


@dataclass(frozen=True, slots=True)
class Block:
    """Complete lines of a part, as read (Line split): ``data`` ends with ``\\n``."""

    data: bytes
    #: Byte offset of ``data[0]`` in the object.
    offset: int
    #: Number of the first record in it.
    first: int
    #: Records in it (blank lines are not records).
    records: int


def _too_large(where: Where, number: int, offset: int, bound: int) -> RecordTooLarge:
    return RecordTooLarge(
        f"{cap(where.record(number, offset))} is over {bound} bytes, the largest "
        "request maxPayloadInMB allows: raise maxPayloadInMB, or split the record")


def count_records(data: bytes) -> int:
    """Lines in ``data`` (which ends with ``\\n``) that are records (not blank)."""
    if len(data) >= _VECTOR_BYTES:
        # Vectorised: searching for "\n\n" is 4x slower than this on large bodies.
        a = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(a == 10)
        if not len(ends):
            return 0
        lengths = np.diff(ends, prepend=-1) - 1
        blank = lengths == 0
        if b"\r" in data:
            blank |= (lengths == 1) & (a[ends - 1] == 13)
        return int(len(ends) - np.count_nonzero(blank))
    lines = data.count(b"\n")
    if b"\n\n" in data or b"\n\r\n" in data or data.startswith((b"\n", b"\r\n")):
        lines -= sum(1 for line in data.split(b"\n")[:-1] if line in (b"", b"\r"))
    return lines


def lines_of(block: Block) -> Iterator[Record]:
    """The records of a block of lines, one by one (blank lines skipped)."""
    data, base = block.data, block.offset
    number = block.first
    pos = 0
    n = len(data)
    while pos < n:
        nl = data.index(b"\n", pos) + 1
        line = data[pos:nl]
        if line not in (b"\n", b"\r\n"):
            yield Record(number, base + pos, line, line)
            number += 1
        pos = nl


class LineReader:
    """Blocks of complete lines of one part. Feed it the object's bytes from
    :attr:`read_from` on; stop feeding once :attr:`done`.

    The bytes after the last ``\\n`` wait in a bytearray that chunks are appended
    to (a long line costs its length once, not once per chunk), and only each new
    chunk is searched for a ``\\n`` (what waits has none).
    """

    def __init__(self, where: Where, start: int, end: int | None, bound: int) -> None:
        self.where = where
        self.end = end
        self.bound = bound
        #: Where the caller starts reading: one byte early, to see a boundary at ``start``.
        self.read_from = start - 1 if start > 0 else 0
        self._pos = self.read_from
        self._buf = bytearray()
        self._synced = start == 0
        self._records = 0
        self.done = end is not None and start >= end

    def feed(self, chunk: bytes) -> Block | None:
        if self.done or not chunk:
            return None
        if not self._synced:  # nothing waits in the buffer until synced
            nl = chunk.find(b"\n")
            if nl < 0:  # still inside a record the previous part owns
                self._pos += len(chunk)
                if self.end is not None and self._pos >= self.end:
                    # No record starts in [start, end): a line that long is the
                    # previous part's, and reading on to its end is its reader's work.
                    self.done = True
                return None
            self._pos += nl + 1
            chunk = chunk[nl + 1:]
            self._synced = True
            if not chunk and (self.end is None or self._pos < self.end):
                return None
        if self.end is not None and self._pos >= self.end:
            self.done = True  # what is left starts in the next part
            return None
        last = chunk.rfind(b"\n")
        if last < 0:
            self._buf += chunk
            self._check_pending()
            return None
        if self._buf:
            self._buf += memoryview(chunk)[: last + 1]
            complete = bytes(self._buf)
            self._buf = bytearray(memoryview(chunk)[last + 1:])
        else:
            complete = chunk[: last + 1]
            self._buf += memoryview(chunk)[last + 1:]
        start = self._pos
        if self.end is not None and start + len(complete) > self.end:
            # Records starting at or after ``end`` belong to the next part.
            cut = complete.find(b"\n", max(self.end - 1 - start, 0)) + 1
            complete = complete[:cut]
            self._buf.clear()
            self.done = True
        else:
            self._check_pending(start + len(complete))
        self._pos = start + len(complete)
        if self.end is not None and self._pos >= self.end:
            self.done = True
            self._buf.clear()
        return self._block(complete, start)

    def finish(self) -> Block | None:
        """The end of the stream: a last line without ``\\n`` is a record."""
        if (self.done or not self._synced or not self._buf
                or (self.end is not None and self._pos >= self.end)):
            self.done = True
            return None
        self.done = True
        data = bytes(self._buf) + b"\n"
        self._buf.clear()
        if data in (b"\n", b"\r\n") or (self._pos == 0 and data == UTF8_BOM + b"\n"):
            return None
        return self._block(data, self._pos)

    def _block(self, data: bytes, offset: int) -> Block:
        if offset == 0 and data.startswith(UTF8_BOM):
            # The object's first bytes are a UTF-8 byte order mark (Excel's and Windows
            # tools' CSV and JSON): it marks the encoding, and is no part of record 1.
            data, offset = data[3:], 3
        n = count_records(data)
        block = Block(data, offset, self._records + 1, n)
        self._records += n
        return block

    def _check_pending(self, offset: int | None = None) -> None:
        if len(self._buf) > self.bound:
            at = self._pos if offset is None else offset
            raise _too_large(self.where, self._records + 1, at, self.bound)


class _FramedReader(ABC):
    """Shared by the binary formats: a buffer, a sync phase, records until ``end``.

    Chunks are appended to a bytearray, and parsing waits until the buffer reaches
    the end of the record whose header it has read (``_want``): a record of many
    chunks costs its length once, not once per chunk. A part stops at the first
    record at or after ``end``, the next part's, once its framing checks out: the
    next part's sync skips whatever is not a record, so a corrupt record right at a
    cut point would otherwise vanish instead of failing as a whole-object read does.
    """

    def __init__(self, where: Where, start: int, end: int | None, bound: int) -> None:
        self.where = where
        self.start = start
        self.end = end
        self.bound = bound
        self.read_from = start
        self._pos = start  # offset of _buf[0]
        self._buf = bytearray()
        #: Object offset the buffer must reach before parsing can go on.
        self._want = 0
        self._synced = start == 0
        self._number = 0
        self.done = end is not None and start >= end

    def feed(self, chunk: bytes) -> list[Record]:
        if self.done or not chunk:
            return []
        self._buf += chunk
        if self._pos + len(self._buf) < self._want:
            return []
        return self._drain()

    def finish(self) -> list[Record]:
        out = [] if self.done else self._drain()
        if not self.done and self._synced and self._buf:
            raise CorruptInput(
                f'Object "{self.where.key}" ends inside a record at byte offset {self._pos} '
                f"({len(self._buf)} bytes of it): the object is truncated, re-upload it")
        self.done = True
        return out

    def _drain(self) -> list[Record]:
        out: list[Record] = []
        if not self._synced:
            skip = self._sync()
            if skip is None:
                return out
            del self._buf[:skip]
            self._pos += skip
            self._synced = True
        buf = bytes(self._buf)  # records are slices of it
        i = 0
        while not self.done:
            parsed = self._parse(buf, i)
            if parsed is None:
                break
            if self.end is not None and self._pos + i >= self.end:
                self.done = True  # the next part's first record, whole and valid
                break
            size, payload = parsed
            self._number += 1
            out.append(Record(self._number, self._pos + i, buf[i:i + size], payload))
            i += size
        if self.done:
            self._buf.clear()
        else:
            del self._buf[:i]
        self._pos += i
        return out

    def _need(self, i: int, n: int) -> None:
        """Parsing at ``_buf[i]`` goes on once ``n`` bytes from there are in."""
        self._want = self._pos + i + n

    @abstractmethod
    def _sync(self) -> int | None:
        """Index in ``_buf`` of the first record start at or after ``start``; None: need more."""

    @abstractmethod
    def _parse(self, buf: bytes, i: int) -> tuple[int, bytes] | None:
        """(framed size, payload) of the record at ``buf[i]``; None: need more bytes."""

    def _here(self, i: int) -> str:
        return self.where.record(self._number + 1, self._pos + i)


class RecordIOReader(_FramedReader):
    """MXNet RecordIO: ``magic, lrecord (cflag << 29 | length), data, pad to 4 bytes``."""

    def _sync(self) -> int | None:
        buf = self._buf
        i = (-self._pos) % 4  # records are 4-byte aligned in the object
        while True:
            i = buf.find(RECORDIO_MAGIC, i)
            if i < 0:
                # Keep the last 7 bytes (a magic and header may straddle chunks), aligned.
                drop = max(len(buf) - 7, 0)
                drop -= (self._pos + drop) % 4
                if drop > 0:
                    del buf[:drop]
                    self._pos += drop
                if self.end is not None and self._pos >= self.end:
                    self.done = True
                return None
            if (self._pos + i) % 4 == 0:
                if len(buf) < i + 8:
                    return None
                cflag = struct.unpack_from("<I", buf, i + 4)[0] >> 29
                if cflag in (0, 1):
                    if self.end is not None and self._pos + i >= self.end:
                        self.done = True
                        return None
                    return i
            i += 1

    def _parse(self, buf: bytes, i: int) -> tuple[int, bytes] | None:
        pieces: list[bytes] = []
        j = i
        first = True
        while True:
            if len(buf) < j + 8:
                self._need(i, j + 8 - i)
                return None
            if buf[j:j + 4] != RECORDIO_MAGIC:
                raise CorruptInput(
                    f"RecordIO header of {self._here(i)} has no magic number at byte offset "
                    f"{self._pos + j}: the object is not RecordIO, or is corrupt")
            lrec = struct.unpack_from("<I", buf, j + 4)[0]
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if cflag not in ((0, 1) if first else (2, 3)):
                raise CorruptInput(
                    f"RecordIO header of {self._here(i)} has continuation flag {cflag} out of "
                    "sequence: the object is corrupt")
            padded = (length + 3) & ~3
            if j + 8 + padded - i > self.bound:
                raise _too_large(self.where, self._number + 1, self._pos + i, self.bound)
            if len(buf) < j + 8 + padded:
                self._need(i, j + 8 + padded - i)
                return None
            pieces.append(buf[j + 8:j + 8 + length])
            j += 8 + padded
            first = False
            if cflag in (0, 3):
                # dmlc's reader puts the magic back where the writer split the data.
                return j - i, RECORDIO_MAGIC.join(pieces)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: crc32c rotated right by 15 bits plus a constant."""
    crc = int(google_crc32c.value(data))
    return (((crc >> 15) | (crc << 17)) + _TF_MASK_DELTA) & 0xFFFFFFFF


@cache
def _crc32c_tables() -> npt.NDArray[np.uint32]:
    """Slicing-by-8 tables of CRC-32C (Castagnoli, reflected): row ``k`` is the CRC
    of a byte followed by ``k`` zero bytes."""
    t0 = np.zeros(256, np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        t0[byte] = crc
    rows = [t0]
    for _ in range(7):
        prev = rows[-1]
        rows.append((prev >> 8) ^ t0[prev & 0xFF])
    return np.stack(rows)


def _header_candidates(buf: bytearray, lo: int, hi: int) -> list[int]:
    """Positions ``i`` in ``[lo, hi)`` whose 8 bytes are a plausible TFRecord length
    (under 2**48) followed by its masked CRC (``buf`` holds ``hi + 11`` bytes at least).

    Vectorised: a Python CRC per byte took 14 s to cross a 6 MiB record. The length
    test comes first and is nearly free: most bytes are not followed by two zeros.
    """
    n = hi - lo
    a = np.frombuffer(buf, np.uint8, n + 11, lo)
    idx = np.flatnonzero((a[6:n + 6] == 0) & (a[7:n + 7] == 0))
    if not len(idx):
        return []
    t = _crc32c_tables()
    crc = t[7][a[idx] ^ 0xFF]
    for k in range(1, 8):
        byte = a[idx + k]
        crc ^= t[7 - k][byte ^ 0xFF if k < 4 else byte]
    crc ^= 0xFFFFFFFF
    masked = ((crc >> 15) | (crc << 17)) + np.uint32(_TF_MASK_DELTA)
    stored = np.zeros(len(idx), np.uint32)
    for k in range(4):
        stored |= a[idx + 8 + k].astype(np.uint32) << (8 * k)
    found: list[int] = (idx[masked == stored] + lo).tolist()
    return found


class TFRecordReader(_FramedReader):
    """TFRecord: ``uint64 length, uint32 masked crc(length), data, uint32 masked crc(data)``.

    A part from ``start > 0`` is read from 12 bytes earlier: the header before a
    candidate tells a look-alike from a record (see :meth:`_sync`).
    """

    def __init__(self, where: Where, start: int, end: int | None, bound: int) -> None:
        super().__init__(where, start, end, bound)
        self.read_from = self._pos = max(start - 12, 0)
        #: Index in the buffer where the boundary search goes on.
        self._scan = start - self.read_from

    def _sync(self) -> int | None:
        buf = self._buf
        i = self._scan
        stop = len(buf) - 11  # a candidate needs its whole header in the buffer
        if self.end is not None:
            stop = min(stop, self.end - self._pos)  # and starts before ``end``
        waiting = False
        while i < stop and not waiting:
            window = min(stop, i + _SCAN_WINDOW)
            for c in _header_candidates(buf, i, window):
                length = struct.unpack_from("<Q", buf, c)[0]
                if 16 + length > self.bound:
                    # Any 8-byte record's data, followed by its own CRC, looks like a
                    # header: that one is recognised by the real header before it.
                    if not self._lookalike(buf, c):
                        raise _too_large(self.where, 1, self._pos + c, self.bound)
                    continue
                if len(buf) < c + 16 + length:
                    self._need(c, 16 + length)  # the data, to check its CRC too
                    i, waiting = c, True
                    break
                crc = struct.unpack_from("<I", buf, c + 12 + length)[0]
                if masked_crc32c(bytes(memoryview(buf)[c + 12:c + 12 + length])) == crc:
                    return c
            else:
                i = window
        if not waiting and self.end is not None and self._pos + i >= self.end:
            self.done = True
            return None
        # Scanned up to i: keep 12 bytes before it (the header a look-alike follows).
        drop = max(i - 12, 0)
        del buf[:drop]
        self._pos += drop
        self._scan = i - drop
        return None

    @staticmethod
    def _lookalike(buf: bytearray, i: int) -> bool:
        """Whether the header-like bytes at ``i`` are an 8-byte record's data and CRC."""
        j = i - 12
        return (j >= 0 and struct.unpack_from("<Q", buf, j)[0] == 8
                and masked_crc32c(bytes(buf[j:j + 8])) == struct.unpack_from("<I", buf, j + 8)[0])

    def _parse(self, buf: bytes, i: int) -> tuple[int, bytes] | None:
        if len(buf) < i + 12:
            self._need(i, 12)
            return None
        head = buf[i:i + 8]
        if masked_crc32c(head) != struct.unpack_from("<I", buf, i + 8)[0]:
            raise CorruptInput(
                f"TFRecord length of {self._here(i)} fails its CRC: the object is not "
                "TFRecord, or is corrupt")
        length = struct.unpack("<Q", head)[0]
        if 16 + length > self.bound:
            raise _too_large(self.where, self._number + 1, self._pos + i, self.bound)
        if len(buf) < i + 16 + length:
            self._need(i, 16 + length)
            return None
        data = buf[i + 12:i + 12 + length]
        if masked_crc32c(data) != struct.unpack_from("<I", buf, i + 12 + length)[0]:
            raise CorruptInput(
                f"TFRecord data of {self._here(i)} fails its CRC: the object is corrupt")
        return 16 + length, data


def gunzip(chunks: Iterable[bytes], key: str) -> Iterator[bytes]:
    """Inflate a gzip stream (several members, as ``cat a.gz b.gz`` makes), chunk by
    chunk, at most ``_INFLATE_STEP`` bytes at a time: never the whole object."""
    inflater = zlib.decompressobj(wbits=31)
    seen = 0
    try:
        for chunk in chunks:
            seen += len(chunk)
            pending = chunk
            while True:
                if inflater.eof:
                    if not pending:
                        break
                    inflater = zlib.decompressobj(wbits=31)  # the next member
                out = inflater.decompress(pending, _INFLATE_STEP)
                if out:
                    yield out
                pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
                if not pending and (inflater.eof or len(out) < _INFLATE_STEP):
                    break
    except zlib.error:
        raise CorruptInput(f'Object "{key}" is not valid gzip (within its first {seen} '
                           "bytes): set compressionType None, or re-compress it") from None
    if seen and not inflater.eof:
        raise CorruptInput(f'Object "{key}" ends inside its gzip stream: the object is '
                           "truncated, re-upload it")
