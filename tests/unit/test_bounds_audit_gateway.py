"""The gateway's long-lived state stays bounded whatever model servers, pods and specs do.

Each test fails without its bound: error codes passed through from model servers
as metric labels, the shadow/mirror client's origins as pods come and go, and
capture buffers of an endpoint whose capture is turned off and on again while its
destination refuses writes.
"""

from __future__ import annotations

import random

from kubeinfer_runtime.contract import EndpointRoute, GatewaySettings, RouteTable, VariantRoute
from kubeinfer_runtime.contract.capture import CaptureRoute
from kubeinfer_runtime.contract.shadow import ShadowRoute
from kubeinfer_runtime.gateway import proxy, recorder
from kubeinfer_runtime.gateway.capture_writer import CaptureTaps
from kubeinfer_runtime.gateway.routing import compile_table
from kubeinfer_runtime.gateway.shadow import ShadowTaps
from kubeinfer_runtime.gateway.taps import Exchange
from kubeinfer_runtime.gateway.upstream import UpstreamResponse

# -- error codes from model servers -----------------------------------------------------------


def test_upstream_error_codes_are_labels_only_when_they_look_like_codes() -> None:
    seen: set[str] = set()
    assert recorder.upstream_code(b"ModelError:", 424, seen) == "ModelError"
    assert recorder.upstream_code(b"ValidationError", 400, seen) == "ValidationError"
    assert recorder.upstream_code(None, 503, seen) == "HTTP503"
    assert recorder.upstream_code(b":", 500, seen) == "HTTP500"
    assert recorder.upstream_code(b"bad input 'x' at row 7:", 400, seen) == "HTTP400"
    assert recorder.upstream_code(b"A" * 65, 500, seen) == "HTTP500"


def test_a_model_server_cannot_make_a_series_per_error() -> None:
    seen: set[str] = set()
    codes = {recorder.upstream_code(f"Error{i}:".encode(), 500, seen, limit=8)
             for i in range(10_000)}
    assert len(codes) == 9  # eight codes, then HTTP500 for every new one
    assert "HTTP500" in codes
    # A code already counted stays its own label.
    assert recorder.upstream_code(b"Error3:", 500, seen, limit=8) == "Error3"


def test_the_proxy_labels_upstream_errors_through_the_bound() -> None:
    answer = UpstreamResponse(500, [(b"x-amzn-errortype", b"req 8f2c: boom:")], b"")
    assert proxy._error_code(answer) == "HTTP500"


# -- the shadow/mirror client follows its model servers ----------------------------------------


def _shadow_table(revision: int, upstreams: list[str]) -> RouteTable:
    return RouteTable(revision=revision, endpoints={"iris": EndpointRoute(
        name="iris", variants=[VariantRoute(name="primary", weight=1, upstreams=["http://p:1"])],
        shadows=[ShadowRoute(name="cand", upstreams=upstreams)])})


async def test_the_shadow_client_lets_go_of_pods_no_peer_sends_to() -> None:
    taps = ShadowTaps()
    try:
        for n in range(50):  # a shadow whose pod is replaced 50 times (new address each)
            url = f"http://10.0.0.{n}:8080"
            table = _shadow_table(n + 1, [url])
            taps.apply(table, compile_table(table, None), {})
            taps.client._origin(url)  # what sending a copy there does
        assert set(taps.client._origins) == {"http://10.0.0.49:8080"}
        # No shadow left: nothing kept.
        table = RouteTable(revision=99, endpoints={"iris": EndpointRoute(
            name="iris", variants=[VariantRoute(name="primary", weight=1,
                                                upstreams=["http://p:1"])])})
        taps.apply(table, compile_table(table, None), {})
        assert taps.client._origins == {}
    finally:
        await taps.close()


# -- capture turned off and on while the destination refuses writes ----------------------------


class _RefusingStore:
    def write(self, *args: object, **kwargs: object) -> None:
        raise OSError("AccessDenied")


def _capture_table(capture: CaptureRoute | None) -> RouteTable:
    return RouteTable(endpoints={"iris": EndpointRoute(
        name="iris", variants=[VariantRoute(name="primary", weight=1)], capture=capture)})


async def test_an_endpoint_holds_one_capture_buffer_however_often_capture_is_toggled() -> None:
    limit = 64 << 10
    taps = CaptureTaps(GatewaySettings.given({"capture_buffer_bytes": limit}),
                       rng=random.Random(1), store=_RefusingStore())  # type: ignore[arg-type]
    route = CaptureRoute(destination="s3://bucket/capture", sampling_percentage=100)
    exchange = Exchange(endpoint="iris", variant="primary", request_body=b"x" * 1000,
                        status=200, response_body=b"[1]",
                        response_content_type="application/json", upstream_latency_s=0.001,
                        event_id="e", wall_time=0.0, forwarded=())
    first = None
    for _ in range(10):
        assert taps.apply(_capture_table(route))["iris"] == (taps.taps["iris"],)
        tap = taps.taps["iris"]
        first = first or tap
        assert tap is first and not tap.retired  # the retired one, back in service
        for _ in range(200):
            tap.observe(exchange)
        await taps._round()  # the upload fails: the records stay
        assert taps.apply(_capture_table(None)) == {}
    assert len(taps.retired) == 1
    assert sum(t.buffer.bytes for t in taps.all()) <= limit
