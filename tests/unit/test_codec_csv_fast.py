"""The CSV decoder's fast path (numpy's C parser) agrees with the exact path, or steps aside.

Whatever the body, ``_csv_fast`` either returns exactly what the exact (Python)
parser would, or None — then the exact path decodes it and explains any problem.
"""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeinfer_runtime import codec
from kubeinfer_runtime.codec import _csv_fast, _csv_lines
from kubeinfer_runtime.models.base import TensorSpec

LIMITS = codec.DecodeLimits.for_settings(1 << 20, None)


def exact(body: bytes) -> list[list[float]] | None:
    try:
        text = body.decode("utf-8-sig")
        rows = [[float(c) for c in line.split(",")] for line in _csv_lines(text)]
    except (ValueError, UnicodeDecodeError):
        return None
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return rows


cells = st.one_of(st.floats(allow_nan=False).map(repr), st.integers().map(str),
                  st.sampled_from(["nan", "inf", "-Infinity", " 1.5", "1e3", "+2", "1_0", "",
                                   "0x1", "1.5.", "\u0661", "abc", '"1"', "1 2"]))
bodies = st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6).flatmap(
    lambda rows: st.sampled_from(["\n", "\r\n", "\r", "\x0c", "\n\n", "\n \n"]).map(
        lambda sep: sep.join(",".join(r) for r in rows)))


@settings(max_examples=500, deadline=None)
@given(text=bodies | st.text(max_size=40))
def test_fast_path_agrees_with_the_exact_one(text: str) -> None:
    body = text.encode()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path never warns
        fast = _csv_fast(body, LIMITS)
    if fast is None:
        return
    want = exact(body)
    assert want is not None
    np.testing.assert_array_equal(fast, np.array(want, dtype=np.float64))


def test_fast_path_decodes_a_large_body_like_the_exact_one() -> None:
    x = np.round(np.random.default_rng(0).normal(size=(5000, 4)), 4)
    body = ("\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n").encode()
    spec = TensorSpec("X", np.dtype(np.float32), (None, 4))
    fast = codec.decode_request(body, "text/csv", [spec], LIMITS)["X"]
    np.testing.assert_array_equal(fast, x.astype(np.float32))
    assert _csv_fast(b"\n\n", LIMITS) is None and _csv_fast(b"", LIMITS) is None


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.lists(st.floats(allow_nan=False, width=64).map(repr)
                              | st.integers(-10**40, 10**40).map(str),
                              min_size=3, max_size=3), min_size=1, max_size=8))
def test_parsing_straight_to_float32_equals_the_float64_cast(rows: list[list[str]]) -> None:
    """A float32 input skips the float64 array: numpy rounds each parsed double once,
    the same rounding the cast does (huge values become inf in both)."""
    body = "\n".join(",".join(r) for r in rows).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the cast's overflow warning
        wide = _csv_fast(body, LIMITS)
        narrow = _csv_fast(body, LIMITS, np.float32)
        assert wide is not None and narrow is not None
        np.testing.assert_array_equal(narrow, wide.astype(np.float32))
    assert narrow.dtype == np.float32
