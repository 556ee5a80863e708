"""How much one request may decode to, and the errors for going over or for bad bytes.

Its own module so that every decoder (``codec``, ``codec_tensors``,
``codec_numpy``, ``codec_v2``) shares one definition without import cycles.

The bound is on the arrays a request decodes to, checked *before* they are
allocated or inflated: a small body can claim a huge array (an .npy header
saying shape (10**12, 4), a V2 ``shape``), or inflate to one (an .npz of
deflated zeros). Going over is a 413 naming the limit and its setting; bytes
that make no sense are a 400. No message built here or by the decoders quotes
the request's content: messages say what was wrong and where.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kubeinfer_runtime.errors import PayloadTooLarge, ValidationError

#: The setting that raises the bound, named in every 413 the decoders answer.
SETTING = "KUBEINFER_MAX_DECODED_BYTES"
#: The real-time payload limit (6 MB, as SageMaker): the default bound is 4 x that.
_DEFAULT_PAYLOAD_BYTES = 6 * 1024 * 1024
#: Text formats (JSON, CSV, V2) count this many bytes per value: what each value
#: becomes once parsed (a float64, an int64, or a pointer to a string).
TEXT_ITEM_BYTES = 8



@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """The bounds every decoder checks before allocating.

    ``max_decoded_bytes`` bounds the total size of the arrays one request
    decodes to, summed over its inputs: elements x item size, where binary
    formats (.npy, .npz members) count their own item size (and an .npz counts
    each member's inflated size) and text formats (JSON, CSV, V2) count
    :data:`TEXT_ITEM_BYTES` per value. Bodies longer than the bound are refused
    too, since parsing text allocates at least as much as the text.
    """

    max_decoded_bytes: int = 4 * _DEFAULT_PAYLOAD_BYTES
    #: Arrays in one .npz archive.
    max_npz_members: int = 64
    #: Bytes of one .npy header (numpy's own default bound).
    max_npy_header_bytes: int = 10_000
    #: JSON bodies up to this long cannot decode past the bound whatever they hold
    #: (at most one value per 2 bytes, each at most 4 bytes per character of the
    #: body as a numpy string): the JSON lane checks nothing else for them.
    small_json_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_decoded_bytes < 1 or self.max_npz_members < 1:
            raise ValueError("decode limits must be positive")
        # Largest n with worst_case_text_bytes(n) <= max_decoded_bytes (start
        # from the square root, then step to the exact value).
        n = math.isqrt(self.max_decoded_bytes // 2)
        while n > 0 and worst_case_text_bytes(n) > self.max_decoded_bytes:
            n -= 1
        while worst_case_text_bytes(n + 1) <= self.max_decoded_bytes:
            n += 1
        object.__setattr__(self, "small_json_bytes", n)

    @classmethod
    def for_settings(cls, max_payload_bytes: int,
                     max_decoded_bytes: int | None) -> DecodeLimits:
        """From ``ModelServerSettings``: None means 4 x the payload limit."""
        return cls(max_decoded_bytes if max_decoded_bytes is not None
                   else 4 * max_payload_bytes)


def worst_case_text_bytes(body_len: int) -> int:
    """The most a JSON body of ``body_len`` bytes can make numpy allocate.

    At most one value per 2 bytes (``0,``); numpy gives every value of an
    array with a string in it the width of the longest one, up to the body's
    length (or 64 characters for a number's text), at 4 bytes per character.
    """
    return (body_len // 2 + 1) * 4 * max(body_len, 64)


#: The default bound: 4 x the 6 MB real-time payload limit.
DEFAULT_LIMITS = DecodeLimits()


def too_large(what: str, size: int, limits: DecodeLimits) -> PayloadTooLarge:
    """The 413 for ``what`` decoding to ``size`` bytes (a lower bound when it is larger)."""
    limit = limits.max_decoded_bytes
    shown = str(size) if size < 10**18 else "more than 10^18"
    return PayloadTooLarge(
        f"{what} would decode to {shown} bytes, over the limit of {limit} bytes "
        f"({limit / 1048576:g} MB, {SETTING}): send smaller batches, or raise {SETTING} "
        "on the model server"
    )


def undecodable(media_type: str, e: Exception) -> ValidationError:
    """The 400 for anything else bad bytes made a parser raise (never a 500).

    numpy, zipfile, zlib, ``ast`` and ``tokenize`` (which numpy uses on .npy
    headers) raise whatever they raise on hostile input: the decode entry
    points catch every exception and answer this. The exception's type says
    what broke; its text may repeat the body, so it stays out.
    """
    return ValidationError(f"Request body cannot be decoded as {media_type} "
                           f"({type(e).__name__}): send a well-formed body")


def out_of_memory(limits: DecodeLimits) -> PayloadTooLarge:
    """The 413 for a decode that ran out of memory within the bound."""
    return PayloadTooLarge(
        "Request body is too large to decode in the memory left on the model server "
        f"(decode limit {limits.max_decoded_bytes} bytes, {SETTING}): send smaller batches")


def header_value(value: str) -> str:
    """A client's header value fit to quote in a message: at most 100 characters."""
    return repr(value[:100] + ("..." if len(value) > 100 else ""))
