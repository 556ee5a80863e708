"""Kubernetes resource quantities (``500m``, ``1Gi``, ``2e3``) as exact numbers: PURE.

The CRD's pattern lets some strings through that the API server would refuse
on the rendered Deployment (``1kM``), and it cannot compare a limit with a
request. Parsing here lets the operator refuse such specs with a clear
InvalidSpec message instead of a half-applied Endpoint.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}

_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])|(?P<exp>[eE][+-]?[0-9]+))?$"
)


def parse_quantity(text: str) -> Decimal | None:
    """The value of a quantity string, or None when it is not a valid quantity."""
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        return None
    try:
        number = Decimal(m.group("num"))
        if m.group("exp"):
            return number * (Decimal(10) ** int(m.group("exp")[1:]))
        return number * _SUFFIXES[m.group("suffix") or ""]
    except (InvalidOperation, ValueError):
        return None
