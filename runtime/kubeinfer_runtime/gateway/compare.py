"""How two answers to the same request compare: PURE, no I/O.

Used by the shadow and mirror taps (``gateway.shadow``) on each pair of 2xx
answers: production's and the peer's. What "agree" means is decided from the
shapes of the answers, output by output (outputs present in both):

* **labels** — every value is a string, integer or boolean (a list of class
  labels, V2 outputs of datatype INT*/UINT*/BOOL/BYTES): agree when equal.
* **probability vectors** — rows of two or more numbers (a list of vectors, a
  V2 FP output of shape ``[n, k]`` with ``k`` > 1, scikit-learn ZipMap rows
  ``{label: probability}``): agree when each row's argmax is the same; the
  numbers are also diffed.
* **regression** — other numbers (a flat list, a scalar): agree when every
  value is within ``atol + rtol * |production|``; diffed.
* anything else (binary bodies, mismatched shapes): agree when the bodies are
  byte for byte the same, or, for parsed answers, equal.

A request agrees when all its rows and outputs agree. Numeric pairs also give
the largest absolute and relative difference (relative to production's value),
which the metrics keep as summaries. Bodies are parsed as JSON when their
content type says JSON (or none is given and the body looks like it), as CSV
when it says text/csv; every parse is bounded by the body (bounded by the
gateway's ``KUBEINFER_MAX_RESPONSE_BYTES``) and a depth limit.

What a comparison costs grows with the number of values it parses (a Python
object or two each, a few microseconds), not with bytes: ``cost`` counts, in
C and without parsing, an upper bound of them (JSON separators and brackets,
CSV separators). ``gateway.shadow`` compares small pairs of at most
``INLINE_COMPARE_VALUES`` on the event loop, larger ones in a thread one at a
time (``compare_bounded``), and parses none over ``MAX_COMPARE_VALUES`` or
``MAX_COMPARE_BYTES`` (those agree when byte for byte equal and are otherwise
not compared). Nothing here raises for
what a model answers: numbers beyond a float's range compare as infinities,
and nesting is followed as far as the depth limit, never by recursion on the
answer's own depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

#: Default tolerances of regression agreement.
RTOL = 1e-3
ATOL = 1e-6
#: Nesting deeper than this is not compared element-wise (compared as a whole).
MAX_DEPTH = 8
#: Values (``cost``) of a pair compared at most: about 0.2 s of a thread and tens of
#: MiB; a larger pair is compared byte for byte only.
MAX_COMPARE_VALUES = 100_000
#: Bytes of a pair (both answers) parsed at most, whatever their values (counting
#: values is a pass over the bytes too).
MAX_COMPARE_BYTES = 8 << 20
#: Pairs of at most this many values are compared on the event loop (about a
#: millisecond at worst); larger ones in a thread.
INLINE_COMPARE_VALUES = 512
_LABEL_DATATYPES = ("INT", "UINT", "BOOL", "BYTES")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The comparison of one pair of answers."""

    agreed: bool
    #: Largest |production - peer| over numeric values (None: nothing numeric compared).
    max_abs: float | None = None
    #: Largest |production - peer| / |production| (None: nothing numeric compared).
    max_rel: float | None = None


class _Unparsed:
    """An answer that is neither JSON nor CSV: compared as bytes."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body


def _format(body: bytes, content_type: str | None) -> str:
    """How ``parse`` reads ``body``: "json", "csv" or "" (opaque)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if "json" in kind or (not kind and body[:1] in (b"[", b"{")):
        return "json"
    return "csv" if kind == "text/csv" else ""


def _values(body: bytes, content_type: str | None) -> int:
    """An upper bound of the values ``parse`` makes of ``body`` (0: opaque), counted in C:
    a JSON value is a leaf or a container, and every leaf but one per container follows
    a comma; a CSV cell follows a comma or a line break, or starts the body."""
    found = _format(body, content_type)
    if found == "json":
        return body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    if found == "csv":
        return body.count(b",") + body.count(b"\n") + 1
    return 0


def cost(production: bytes, production_type: str | None, peer: bytes,
         peer_type: str | None) -> int:
    """An upper bound of the values comparing the two answers parses (see the module's
    docstring); 0 when both are compared as bytes."""
    return _values(production, production_type) + _values(peer, peer_type)


def parse(body: bytes, content_type: str | None) -> Any:
    """The answer as data: JSON value, CSV rows (numbers where they parse), or opaque."""
    found = _format(body, content_type)
    if found == "json":
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return _Unparsed(body)
    if found == "csv":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _Unparsed(body)
        # Rows end at "\n" ("\r\n" too: cells are stripped), never at the other line
        # breaks of str.splitlines (which ``cost`` does not count).
        rows = [[_cell(c) for c in line.split(",")] for line in text.split("\n")
                if line.strip()]
        # One column: a flat list (one value per row), as a JSON answer would be.
        if rows and all(len(r) == 1 for r in rows):
            return [r[0] for r in rows]
        return rows
    return _Unparsed(body)


#: A cell that starts with anything else is no number: no int() or float() is tried
#: (each failure costs a raised exception). Digits of other scripts are tried.
_NUMBER_START = frozenset("0123456789+-.iInN")


def _cell(text: str) -> Any:
    text = text.strip()
    if not text or (text[0] not in _NUMBER_START and not text[0].isdigit()):
        return text
    # int() takes a sign, decimal digits and underscores: try it only on those (a float
    # cell would cost a raised exception first).
    digits = text[1:] if text[0] in "+-" else text
    if digits.isdecimal() or "_" in text:
        try:
            return int(text)
        except ValueError:
            pass  # over int()'s digit limit, or misplaced underscores: float() may take it
    try:
        return float(text)
    except ValueError:
        return text


def _outputs(value: Any) -> dict[str, tuple[Any, str | None]]:
    """Named outputs of an answer: name -> (values, V2 datatype or None)."""
    # {"predictions": ...} as deep as it goes (a loop: the answer chooses the depth).
    while isinstance(value, dict) and len(value) == 1 and "predictions" in value:
        value = value["predictions"]
    if isinstance(value, dict):
        v2 = value.get("outputs")
        if isinstance(v2, list) and all(isinstance(o, dict) and "data" in o for o in v2):
            out: dict[str, tuple[Any, str | None]] = {}
            for i, o in enumerate(v2):
                data = o["data"]
                shape = o.get("shape")
                if (isinstance(shape, list) and len(shape) == 2 and isinstance(data, list)
                        and all(isinstance(x, int) for x in shape) and shape[1] > 1
                        and len(data) == shape[0] * shape[1]):
                    data = [data[r * shape[1]:(r + 1) * shape[1]] for r in range(shape[0])]
                out[str(o.get("name", i))] = (data, str(o.get("datatype", "")) or None)
            return out
        return {str(k): (v, None) for k, v in value.items()}
    return {"": (value, None)}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_label(x: Any) -> bool:
    return isinstance(x, str | bool) or (isinstance(x, int) and not isinstance(x, bool))


def _flat(value: Any, depth: int = 0) -> list[Any] | None:
    """Leaves of nested lists in order (None: too deep, or a dict inside)."""
    if depth > MAX_DEPTH:
        return None
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            leaves = _flat(item, depth + 1)
            if leaves is None:
                return None
            out.extend(leaves)
        return out
    if isinstance(value, dict):
        return None
    return [value]


def _zipmap_labels(value: Any) -> list[Any] | None:
    """scikit-learn ZipMap rows (``[{label: p, ...}, ...]``) as each row's most likely
    label; None when ``value`` is not that shape."""
    if not (isinstance(value, list) and value and all(isinstance(r, dict) and r for r in value)):
        return None
    labels: list[Any] = []
    for row in value:
        best: Any = None
        best_p = -math.inf
        for label, p in row.items():
            if not _is_number(p):
                return None
            if p > best_p:
                best, best_p = label, p
        labels.append(best)
    return labels


def _argmax(row: list[Any]) -> int:
    best = 0
    for i, x in enumerate(row):
        if x > row[best]:
            best = i
    return best


def _float(x: Any) -> float:
    """``float(x)``, an integer beyond a float's range as an infinity of its sign (a CSV
    cell or a JSON number of 400 digits: float() raises OverflowError on them)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _diffs(a: list[float], b: list[float]) -> tuple[float, float]:
    max_abs = max_rel = 0.0
    for x, y in zip(a, b, strict=True):
        d = abs(x - y)
        if math.isnan(d):
            d = 0.0 if (math.isnan(x) and math.isnan(y)) else math.inf
        max_abs = max(max_abs, d)
        scale = abs(x)
        max_rel = max(max_rel, d / scale if scale > 0 else (0.0 if d == 0 else math.inf))
    return max_abs, max_rel


def _compare_output(a: Any, b: Any, datatype: str | None, rtol: float,
                    atol: float) -> Verdict:
    zip_a, zip_b = _zipmap_labels(a), _zipmap_labels(b)
    if zip_a is not None and zip_b is not None:
        return Verdict(zip_a == zip_b)
    if datatype is not None and datatype.upper().startswith(_LABEL_DATATYPES):
        return Verdict(a == b)
    rows_a = a if isinstance(a, list) and a and all(isinstance(r, list) for r in a) else None
    rows_b = b if isinstance(b, list) and b and all(isinstance(r, list) for r in b) else None
    flat_a, flat_b = _flat(a), _flat(b)
    if flat_a is None or flat_b is None or len(flat_a) != len(flat_b):
        return Verdict(a == b)
    if not flat_a:
        return Verdict(True)
    numeric = all(_is_number(x) for x in flat_a) and all(_is_number(x) for x in flat_b)
    if numeric and datatype is None and all(
            isinstance(x, int) for x in (*flat_a, *flat_b)):
        return Verdict(flat_a == flat_b)  # integers only: class labels
    if not numeric:
        if all(_is_label(x) for x in (*flat_a, *flat_b)):
            return Verdict(flat_a == flat_b)
        return Verdict(a == b)
    floats_a, floats_b = [_float(x) for x in flat_a], [_float(x) for x in flat_b]
    max_abs, max_rel = _diffs(floats_a, floats_b)
    if (rows_a is not None and rows_b is not None and len(rows_a) == len(rows_b)
            and all(len(ra) == len(rb) and len(ra) > 1
                    for ra, rb in zip(rows_a, rows_b, strict=True))
            and all(_is_number(x) for r in rows_a for x in r)):
        agreed = all(_argmax(ra) == _argmax(rb) for ra, rb in zip(rows_a, rows_b, strict=True))
        return Verdict(agreed, max_abs, max_rel)
    # An infinite production value is within any relative tolerance of anything: it
    # agrees only with itself.
    agreed = all(x == y or (abs(x - y) <= atol + rtol * abs(x) and math.isfinite(x))
                 for x, y in zip(floats_a, floats_b, strict=True))
    return Verdict(agreed, max_abs, max_rel)


_AGREED = Verdict(True)
_AGREED_EQUAL = Verdict(True, 0.0, 0.0)


def _same_output(a: Any, datatype: str | None, rtol: float, atol: float) -> Verdict:
    """``_compare_output(a, a, ...)`` in half the steps: the common case of a shadow
    that answers byte for byte as production does. Only whether the numeric branch
    is reached matters (its differences are then 0); values that are not finite
    (CSV ``inf``) take the general function, which handles them."""
    if _zipmap_labels(a) is not None:
        return _AGREED
    if datatype is not None and datatype.upper().startswith(_LABEL_DATATYPES):
        # The general verdict is ``a == b``: not always true of one value and itself
        # (a NaN where labels were declared, as no real model answers).
        return _AGREED if a == a else Verdict(False)
    flat = _flat(a)
    if not flat:
        return _AGREED
    ints = True
    for x in flat:
        kind = type(x)
        if kind is float:
            ints = False
        elif kind is not int:
            return _AGREED  # not all numbers: labels or other values, equal to themselves
    if ints and datatype is None:
        return _AGREED  # integers only: class labels
    try:
        if math.isfinite(sum(flat)):
            return _AGREED_EQUAL
    except OverflowError:
        pass  # an integer past float's range: the general function says what it makes of it
    return _compare_output(a, a, datatype, rtol, atol)


def compare(production: bytes, production_type: str | None, peer: bytes,
            peer_type: str | None, *, rtol: float = RTOL, atol: float = ATOL) -> Verdict:
    """Compare two 2xx answers to the same request (see the module's docstring)."""
    if production == peer:
        a = parse(production, production_type)
        if isinstance(a, _Unparsed):
            return Verdict(True)
        return _merge([_same_output(v, t, rtol, atol)
                       for v, t in _outputs(a).values()]) or Verdict(True)
    a = parse(production, production_type)
    b = parse(peer, peer_type)
    if isinstance(a, _Unparsed) or isinstance(b, _Unparsed):
        return Verdict(False)
    outputs_a, outputs_b = _outputs(a), _outputs(b)
    common = [n for n in outputs_a if n in outputs_b]
    if not common:
        return Verdict(False)
    verdicts = [_compare_output(outputs_a[n][0], outputs_b[n][0],
                                outputs_a[n][1] or outputs_b[n][1], rtol, atol)
                for n in common]
    merged = _merge(verdicts)
    assert merged is not None
    return merged


def compare_bounded(production: bytes, production_type: str | None, peer: bytes,
                    peer_type: str | None) -> Verdict | None:
    """``compare``, within ``MAX_COMPARE_BYTES`` and ``MAX_COMPARE_VALUES``: a larger pair
    is not parsed; it agrees when byte for byte equal, else None (not compared)."""
    if (len(production) + len(peer) > MAX_COMPARE_BYTES
            or cost(production, production_type, peer, peer_type) > MAX_COMPARE_VALUES):
        return _AGREED if production == peer else None
    return compare(production, production_type, peer, peer_type)


def _merge(verdicts: list[Verdict]) -> Verdict | None:
    if not verdicts:
        return None
    abs_values = [v.max_abs for v in verdicts if v.max_abs is not None]
    rel_values = [v.max_rel for v in verdicts if v.max_rel is not None]
    return Verdict(all(v.agreed for v in verdicts),
                   max(abs_values) if abs_values else None,
                   max(rel_values) if rel_values else None)
