"""Bounded readers for .npy and .npz request bodies.

Why not ``np.load``: it trusts what the bytes say. A 144-byte .npy whose
header claims shape (10**12, 4) makes it ask for 32 TB (numpy's allocation
error escaped as a 500), and an .npz is a zip archive whose members inflate
without bound (0.5 MB of deflated zeros is 512 MB in memory: a server grew by
6 GB and answered 200). These readers check the header, the archive's
directory and each member's declared size against :class:`DecodeLimits`
before allocating or inflating anything, inflate with a cap, refuse object
arrays (pickles), and never repeat the body in an error (numpy's own errors
quote the header, zipfile's the member names).

Pure: bytes in, arrays out, no files. Arrays are views of the body (or of
the inflated member) wherever the layout allows: no copy.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
from numpy.lib import format as npy_format

from kubeinfer_runtime.codec_limits import DecodeLimits, too_large
from kubeinfer_runtime.errors import ValidationError
from kubeinfer_runtime.models.base import Array

NPY_MAGIC = b"\x93NUMPY"
#: A zip's first local file header, or the end record of an empty archive.
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_FIX = "save arrays with numpy.save or numpy.savez, without pickled objects"
#: numpy's own limit on array dimensions.
_MAX_DIMS = 64
#: Array kinds a model input can take: bool, integers, floats, strings.
_KINDS = "biufUS"
#: Inflate members this many bytes at a time.
_CHUNK = 1 << 20
#: Directory bytes allowed per member (name, extra fields and the fixed 46 bytes).
_DIRECTORY_BYTES_PER_MEMBER = 4096
_END_RECORD = b"PK\x05\x06"
_END_RECORD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"


def _bad(what: str, problem: str) -> ValidationError:
    return ValidationError(f"{what} {problem}: {_FIX}")


def read_npy(data: bytes | bytearray, limits: DecodeLimits,
             what: str = "Request body (.npy)") -> Array:
    """The array an .npy holds, after checking its header against the bytes and the bound."""
    mv = memoryview(data)
    if len(mv) < 10 or mv[:6] != NPY_MAGIC:
        raise _bad(what, "is not an .npy array (no .npy magic bytes)")
    major = mv[6]
    if major == 1:
        (hlen,), start = struct.unpack_from("<H", mv, 8), 10
    elif major == 2:
        (hlen,), start = struct.unpack_from("<I", mv, 8), 12
    else:
        raise _bad(what, "uses an .npy format version other than 1 or 2")
    if hlen > limits.max_npy_header_bytes:
        raise _bad(what, f"has an .npy header over {limits.max_npy_header_bytes} bytes")
    end = start + hlen
    if end > len(mv):
        raise _bad(what, "is truncated inside its .npy header")
    try:
        fp = io.BytesIO(bytes(mv[:end]))
        npy_format.read_magic(fp)
        read_header = (npy_format.read_array_header_1_0 if major == 1
                       else npy_format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fp, max_header_size=limits.max_npy_header_bytes)
    except Exception:
        # numpy parses the header with tokenize and ast, which raise anything on
        # hostile text, and its messages repeat the header: say only that it is bad.
        raise _bad(what, "has an .npy header numpy cannot read") from None
    if dtype.hasobject:
        raise _bad(what, "holds Python objects (a pickle), which are never loaded")
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _bad(what, "holds a data type no model input takes (send bool, integer, float "
                         "or string arrays)")
    if len(shape) > _MAX_DIMS or any(d < 0 for d in shape):
        raise _bad(what, f"has an .npy shape that is not {_MAX_DIMS} or fewer non-negative "
                         "dimensions")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > limits.max_decoded_bytes:
        raise too_large(f"{what} ({count} values of {dtype.itemsize} bytes)", nbytes, limits)
    present = len(mv) - end
    if present != nbytes:
        raise _bad(what, f"holds {present} bytes of array data where its header describes "
                         f"{nbytes} (truncated or padded)")
    if count == 0:
        return np.empty(shape, dtype)
    flat = np.frombuffer(mv, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def read_npz(data: bytes | bytearray, limits: DecodeLimits,
             check_names: Callable[[list[str]], None]) -> dict[str, Array]:
    """The arrays an .npz holds, keyed by name; nothing inflated before every check.

    ``check_names`` sees the member names (``.npy`` stripped) before any is
    inflated and raises when they are not what the model takes, so names
    reaching later messages are the model's own.
    """
    what = "Request body (.npz)"
    _check_directory(data, limits, what)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_npz_members:
            raise _too_many(what, limits)
        keys: list[str] = []
        seen: dict[str, int] = {}
        for i, info in enumerate(infos, 1):
            name = info.filename
            if not name.endswith(".npy") or len(name) == 4 or "/" in name or "\\" in name:
                raise _bad(f"{what} member {i}", "is not a top-level .npy array")
            if info.flag_bits & 0x1:
                raise _bad(f"{what} member {i}", "is encrypted")
            key = name[:-4]
            if key in seen:
                raise _bad(f"{what} members {seen[key]} and {i}", "have the same name")
            seen[key] = i
            keys.append(key)
        check_names(keys)
        total = sum(info.file_size for info in infos)
        if total > limits.max_decoded_bytes:
            raise too_large(f"{what} ({len(infos)} arrays)", total, limits)
        out: dict[str, Array] = {}
        for key, info in zip(keys, infos, strict=True):
            member = f'{what} member "{key}"'
            out[key] = read_npy(_inflate(zf, info, member), limits, member)
        return out


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, member: str) -> bytearray:
    """A member's bytes, inflated in chunks into exactly its declared size, never past it."""
    declared = info.file_size
    buf = bytearray(declared)
    view = memoryview(buf)
    got = 0
    try:
        with zf.open(info) as f:
            while got < declared:
                chunk = f.read(min(_CHUNK, declared - got))
                if not chunk:
                    break
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
            # Reading to the end makes zipfile check the CRC; more data is a lie.
            extra = f.read(1) if got == declared else b""
    except (zipfile.BadZipFile, zlib.error, EOFError):
        # zipfile's messages name the member: say only that its data is bad.
        raise _bad(member, "is corrupt: its data does not inflate to what the archive "
                           "declares (size or CRC)") from None
    if got < declared:
        raise _bad(member, f"inflates to {got} bytes where the archive declares "
                           f"{declared} (truncated or corrupt)")
    if extra:
        raise _bad(member, f"inflates past the {declared} bytes the archive declares")
    return buf


def _check_directory(data: bytes | bytearray, limits: DecodeLimits, what: str) -> None:
    """Bound the central directory from its end record before zipfile parses all of it.

    zipfile builds one object per directory entry before anything can count
    them; the end record says how large the directory is. Found the way
    zipfile finds it (the last 22 bytes, else the last occurrence in the
    archive's comment range).
    """
    end = len(data) - _END_RECORD_SIZE
    if end >= 0 and data[end:end + 4] == _END_RECORD:
        pos = end
    else:
        pos = data.rfind(_END_RECORD, max(0, end - 65535))
        if pos < 0 or pos + _END_RECORD_SIZE > len(data):
            raise _bad(what, "is not a zip archive (no end record)")
    if pos >= 20 and data[pos - 20:pos - 16] == _ZIP64_LOCATOR:
        raise _bad(what, "is a zip64 archive, which no request within the size limits needs")
    _, _, _, _, members, directory, _, _ = struct.unpack_from("<4s4H2LH", data, pos)
    if (members > limits.max_npz_members
            or directory > limits.max_npz_members * _DIRECTORY_BYTES_PER_MEMBER):
        raise _too_many(what, limits)


def _too_many(what: str, limits: DecodeLimits) -> ValidationError:
    return ValidationError(f"{what} holds more than {limits.max_npz_members} arrays: send one "
                           "array per model input")
