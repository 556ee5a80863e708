"""Small request bodies that claim or inflate to huge arrays (the decode-bound tests' inputs).

Built in memory with zipfile and numpy's own header writer, streamed so that
building a 512 MB bomb never holds 512 MB.
"""

from __future__ import annotations

import io
import struct
import zipfile
from functools import lru_cache

import numpy as np
from numpy.lib import format as npy_format

MIB = 1 << 20


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A version 1.0 .npy header for ``shape`` (no data)."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                            "shape": shape})
    return buf.getvalue()


def npy_header_bomb() -> bytes:
    """144 bytes whose header claims a (10**12, 4) float32 array (16 TB)."""
    return npy_header((10**12, 4)) + bytes(16)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@lru_cache(maxsize=2)
def npz_bomb(total: int = 512 * MIB, name: str = "X") -> bytes:
    """An .npz of one float32 [N, 4] member of ``total`` bytes of zeros, deflated (~0.5 MB)."""
    rows = (total - 128) // 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, \
            zf.open(f"{name}.npy", "w", force_zip64=True) as member:
        member.write(npy_header((rows, 4)))
        zeros = bytes(MIB)
        left = rows * 16
        while left:
            n = min(left, MIB)
            member.write(zeros[:n])
            left -= n
    return buf.getvalue()


def npz(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """An .npz (a zip) holding ``members`` (name -> bytes) as given."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_declared_size(archive: bytes, size: int) -> bytes:
    """``archive`` with its (first) member's uncompressed size in the directory set to ``size``.

    zipfile trusts the central directory, so this is the lie a reader sees.
    """
    pos = archive.index(b"PK\x01\x02")
    return archive[:pos + 24] + struct.pack("<I", size) + archive[pos + 28:]


def with_compression_method(archive: bytes, method: int) -> bytes:
    """``archive`` with its first member's compression method set to ``method`` everywhere."""
    out = bytearray(archive)
    for sig, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        pos = archive.index(sig)
        out[pos + offset:pos + offset + 2] = struct.pack("<H", method)
    return bytes(out)
