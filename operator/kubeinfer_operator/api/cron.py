"""Cron expressions of ``spec.variants[].autoscaling.scheduled[].cron``: PURE.

One parser for two users: the API model refuses a bad expression when the
Endpoint is validated, and the scaler (``reconcile.autoscale``) checks which
schedule is in force. It lives in ``api`` because the model is the lower
layer: the API validating with a decision module's parser made ``api`` import
``reconcile``, an arrow pointing up.
"""

from __future__ import annotations

from datetime import datetime

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))


def _parse_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"cron {name} step {step_text!r} must be a positive number")
            step = int(step_text)
        if part == "*":
            start, end = lo, hi
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise ValueError(f"cron {name} range {part!r} must look like 9-17")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
            if step != 1:
                end = hi
        else:
            raise ValueError(f"cron {name} {part!r} is not a number, range, list or *")
        if start < lo or end > hi or start > end:
            raise ValueError(f"cron {name} {part!r} is outside {lo}-{hi}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def parse_cron(expr: str) -> tuple[frozenset[int], ...]:
    """The five fields of a cron expression as sets; ValueError names the bad field."""
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(f"cron {expr!r} must have 5 fields (minute hour day-of-month month "
                         "day-of-week)")
    fields = tuple(_parse_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True))
    dow = fields[4]
    if 7 in dow:  # 0 and 7 both mean Sunday
        fields = (*fields[:4], dow | {0})
    return fields


def cron_matches(expr: str, when: datetime) -> bool:
    """Whether the minute ``when`` falls in matches ``expr`` (standard cron rules:
    when both day fields are restricted, either may match)."""
    minute, hour, dom, month, dow = parse_cron(expr)
    cron_dow = (when.weekday() + 1) % 7  # Python: Monday 0; cron: Sunday 0
    dom_any = expr.split()[2] == "*"
    dow_any = expr.split()[4] == "*"
    if dom_any or dow_any:
        day_ok = when.day in dom and cron_dow in dow
    else:
        day_ok = when.day in dom or cron_dow in dow
    return when.minute in minute and when.hour in hour and when.month in month and day_ok
