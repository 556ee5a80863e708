"""Test servers die with the test run: a pytest killed mid-run (Ctrl-C twice, a CI
timeout, SIGKILL) must not leave Redis, SeaweedFS or runtime processes holding ports and
CPU for the next run (a killed run once left two gateways polling for hours).

``preexec_fn=die_with_parent`` asks Linux to SIGKILL the child when the process that
started it exits (``PR_SET_PDEATHSIG``); teardown still stops them cleanly first.
"""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: runs in the child, before exec."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def then_die_with_parent(first: Callable[[], None] | None) -> Callable[[], None]:
    """``first`` (another preexec step), then :func:`die_with_parent`."""
    def both() -> None:
        if first is not None:
            first()
        die_with_parent()
    return both
