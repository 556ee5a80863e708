"""What a scaler answers a gateway's scale request (``contract.ScaleRequest``).

A scale request is answered 202 when the scaler starts (or already runs) a
replica. When the variant's last start failed (its model failed to load, its
model server exited or ran out of memory) and the scaler waits before trying
again, it answers 503 with a :class:`StartFailed` body instead: the gateway's
activator then answers the requests it holds for that variant at once with 503
naming the variant (and ``Retry-After``), rather than holding them until
``coldStartTimeout`` for a replica that is not coming.

``what`` reaches the endpoint's callers, so it says what kind of failure it
was and nothing more: the model server's own words (model URIs, paths, load
errors) stay in the scaler's events and logs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kubeinfer_runtime.wire import LOAD_FAILED_EXIT_CODE as LOAD_FAILED_EXIT_CODE

#: The HTTP status of a :class:`StartFailed` answer.
START_FAILED_STATUS = 503


class StartFailed(BaseModel):
    """Body of a scaler's 503 to a scale request for a variant whose last start failed."""

    model_config = ConfigDict(extra="ignore")

    #: For people reading the answer (curl, logs).
    message: str = Field(default="", max_length=1024)
    #: The kind of failure, safe to tell the endpoint's callers: e.g. "its model failed to
    #: load". Never the model server's own message.
    start_failed: str = Field(min_length=1, max_length=200)
    #: Seconds until the scaler tries to start the variant again.
    retry_after_s: float = Field(ge=0, le=3600)
