"""The copy-paste examples printed by `kubeinfer up`."""

from __future__ import annotations

import json

from kubeinfer_operator.local.usage import PLACEHOLDER, sample_body, usage_text


def test_sample_body_from_v2_metadata_of_a_tabular_model() -> None:
    meta = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]}
    assert json.loads(sample_body(meta) or "") == {"instances": [[1.0, 1.0, 1.0, 1.0]]}


def test_no_sample_for_models_it_cannot_guess() -> None:
    assert sample_body(None) is None
    assert sample_body({"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 4]},
                                   {"name": "b", "datatype": "FP32", "shape": [-1, 4]}]}) is None
    assert sample_body({"inputs": [{"name": "img", "datatype": "FP32",
                                    "shape": [-1, 3, 224, 224]}]}) is None
    assert sample_body({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [-1, 1]}]}) is None


def test_usage_names_endpoint_url_and_body() -> None:
    text = usage_text("iris", "http://127.0.0.1:1234", '{"instances": [[1]]}')
    assert "kubeinfer invoke iris --body '{\"instances\": [[1]]}'" in text
    assert "http://127.0.0.1:1234/endpoints/iris/invocations" in text
    assert 'endpoint_url="http://127.0.0.1:1234"' in text
    assert PLACEHOLDER in usage_text("iris", "http://h:1", None)


def test_async_usage_shows_input_location_calls() -> None:
    from kubeinfer_operator.local.usage import async_usage_text

    text = async_usage_text("iris-async", "http://127.0.0.1:9")
    assert "http://127.0.0.1:9/endpoints/iris-async/async-invocations" in text
    assert "X-Amzn-SageMaker-InputLocation" in text
    assert 'invoke_endpoint_async(EndpointName="iris-async"' in text
