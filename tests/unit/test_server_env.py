"""``server_env`` reads a model server's settings as ``ModelServerSettings`` does, or
leaves them to it.

The single-model server reads its environment without pydantic (issue 18: pydantic
and the contract's models were most of what a fresh server imports beyond a bare
app). The rule that makes that safe: whenever the light reader accepts an
environment, pydantic accepts it too, with the same values of the same types;
whatever it does not accept goes to pydantic. Checked over generated environments
(values at and past every bound, spellings pydantic takes and the light reader does
not, names in any case, aliases, a multi-model prefix, a pipeline), plus the
environments the operator and local mode render, which must take the light path.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubeinfer_runtime.contract import HttpSettings, ModelServerSettings, PipelineSpec
from kubeinfer_runtime.server_env import (
    _FIELDS,
    HttpEnv,
    ServerEnv,
    model_server_settings,
    read_http_env,
    read_server_env,
)

SERVER_FIELDS = [f.name for f in fields(ServerEnv)]
HTTP_FIELDS = [f.name for f in fields(HttpEnv)]


def test_the_fields_and_defaults_are_the_models() -> None:
    assert set(SERVER_FIELDS) == set(ModelServerSettings.model_fields)
    assert set(HTTP_FIELDS) == set(HttpSettings.model_fields)
    assert set(_FIELDS) == set(SERVER_FIELDS)
    theirs = ModelServerSettings.model_construct()
    ours = ServerEnv()
    for name in SERVER_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name


def _typed(settings: Any, names: list[str]) -> dict[str, tuple[type, Any]]:
    return {n: (type(getattr(settings, n)), getattr(settings, n)) for n in names}


def _pydantic(cls: type[HttpSettings], env: dict[str, str]) -> Any:
    with patch.dict(os.environ, env, clear=True):
        try:
            return cls()
        except ValidationError:
            return None


def _light(env: dict[str, str]) -> tuple[ServerEnv | None, HttpEnv | None]:
    with patch.dict(os.environ, env, clear=True):
        return read_server_env(os.environ), read_http_env(os.environ)


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                       blacklist_characters="\x00"), max_size=12)
_INTS = st.one_of(
    st.integers(-3, 70_000).map(str),
    st.integers(0, 10**20).map(str),
    st.sampled_from(["", " 1", "1 ", "+1", "01", "007", "1_000", "1.0", "1e3", "0x10",
                     "\u0661\u0662", "-0", "1024", "1023", "256", "255", "8", "7", "65535",
                     "65536"]),
    _TEXT)
_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(min_value=-10, max_value=10**9, places=3).map(str),
    st.sampled_from(["0", "0.0", "1.5", "10", ".5", "5.", "1e-3", "inf", "nan", " 2",
                     "-1", "0.000000001", "1_0.5", "00.5", "999999999.999999999"]),
    _TEXT)
_BOOLS = st.sampled_from(["true", "false", "1", "0", "True", "FALSE", "yes", "no", "on",
                          "off", "t", "f", "y", "n", "2", "", " true", "true "])
_STRS = st.one_of(_TEXT, st.sampled_from(["", "file:///m.onnx", "s3://b/k", "0.0.0.0"]))
_LITERALS = {
    "log_level": ["debug", "info", "warning", "error", "INFO", "Info", "trace", ""],
    "inference_mode": ["auto", "inline", "thread", "Auto", ""],
    "model_format": ["onnx", "compiled", "ONNX", "tvm", ""],
}
_PIPELINE = '{"steps": [{"name": "a", "model_uri": "file:///a.onnx"}]}'


def _values(name: str) -> st.SearchStrategy[str]:
    if name in _LITERALS:
        return st.one_of(st.sampled_from(_LITERALS[name]), _TEXT)
    if name == "pipeline":
        return st.sampled_from([_PIPELINE, "not json", "{}", ""])
    if name in ("inline_http", "admin_api"):
        return _BOOLS
    if name.endswith("_s"):
        return _FLOATS
    if ModelServerSettings.model_fields[name].annotation in (str, str | None):
        return _STRS
    # Around the model's own bounds, where a wrong bound in the light reader shows.
    edges = [int(getattr(m, a)) for m in ModelServerSettings.model_fields[name].metadata
             for a in ("ge", "gt", "le", "lt") if hasattr(m, a)]
    near = st.sampled_from(edges).flatmap(lambda e: st.integers(e - 2, e + 2).map(str))
    return st.one_of(near, _INTS) if edges else _INTS


def _spellings(name: str) -> st.SearchStrategy[str]:
    names = list(_FIELDS[name][1]) or ["KUBEINFER_" + name.upper()]
    return st.sampled_from(names).flatmap(
        lambda n: st.sampled_from([n, n.lower(), n[:4].lower() + n[4:]]))


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env: dict[str, str] = {}
    # Usually a model, as every single-model server has; sometimes none or several.
    if draw(st.integers(0, 9)) > 1:
        env["KUBEINFER_MODEL_URI"] = draw(st.sampled_from(["file:///m.onnx", "s3://b/m"]))
    # One field in focus (so each is drawn often, at its edges), a few others beside it.
    for name in [draw(st.sampled_from(SERVER_FIELDS)),
                 *draw(st.lists(st.sampled_from(SERVER_FIELDS), max_size=4))]:
        env[draw(_spellings(name))] = draw(_values(name))
    if draw(st.booleans()):
        env["UNRELATED"] = "x"
    return env


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(environments())
def test_whatever_the_light_reader_accepts_pydantic_reads_alike(env: dict[str, str]) -> None:
    light, light_http = _light(env)
    if light is not None:
        theirs = _pydantic(ModelServerSettings, env)
        assert theirs is not None, f"accepted what ModelServerSettings refuses: {env}"
        assert _typed(light, SERVER_FIELDS) == _typed(theirs, SERVER_FIELDS), env
        assert _typed(light.s3(), ["endpoint_url", "access_key", "secret_key", "region"]) \
            == _typed(theirs.s3(), ["endpoint_url", "access_key", "secret_key", "region"])
    if light_http is not None:
        theirs_http = _pydantic(HttpSettings, env)
        assert theirs_http is not None, f"accepted what HttpSettings refuses: {env}"
        assert _typed(light_http, HTTP_FIELDS) == _typed(theirs_http, HTTP_FIELDS), env


def _rendered(**values: Any) -> dict[str, str]:
    """The env the operator and local mode give a model server (``to_env``)."""
    return ModelServerSettings.given(values).to_env()


@pytest.mark.parametrize("env", [
    _rendered(model_uri="file:///srv/kubeinfer/models/iris.onnx"),
    _rendered(model_uri="s3://models/mlp.onnx", endpoint_name="e", variant_name="v",
              model_name="mlp", port=9001, host="127.0.0.1", metrics_port=9101,
              s3_endpoint_url="http://127.0.0.1:8333", s3_access_key="k", s3_secret_key="s",
              s3_region="us-east-1", inference_mode="inline", intra_op_threads=2,
              max_decoded_bytes=1 << 20, http_max_connections=64, inline_http=False,
              http_header_timeout_s=2.5, log_level="warning", model_format="compiled"),
    {"KUBEINFER_MODEL_URI": "file:///m.onnx", "AWS_ACCESS_KEY_ID": "a",
     "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "eu-west-1"},
])
def test_what_the_operator_renders_takes_the_light_path(env: dict[str, str]) -> None:
    light, _ = _light(env)
    assert light is not None, env
    theirs = _pydantic(ModelServerSettings, env)
    assert _typed(light, SERVER_FIELDS) == _typed(theirs, SERVER_FIELDS)
    with patch.dict(os.environ, env, clear=True):
        assert isinstance(model_server_settings(), ServerEnv)


def test_the_rest_is_pydantics_to_read_or_refuse() -> None:
    # A multi-model and a pipeline variant: the contract's settings, as before.
    with patch.dict(os.environ, {"KUBEINFER_MULTI_MODEL_PREFIX": "file:///models/"},
                    clear=True):
        got = model_server_settings()
        assert isinstance(got, ModelServerSettings)
        assert got.multi_model_prefix == "file:///models/"
    with patch.dict(os.environ, {"KUBEINFER_PIPELINE": _PIPELINE}, clear=True):
        got = model_server_settings()
        assert isinstance(got, ModelServerSettings)
        assert isinstance(got.pipeline, PipelineSpec)
    # A spelling only pydantic takes still works; a bad value gets pydantic's words.
    with patch.dict(os.environ, {"KUBEINFER_MODEL_URI": "file:///m", "KUBEINFER_ADMIN_API":
                                 "yes"}, clear=True):
        got = model_server_settings()
        assert isinstance(got, ModelServerSettings) and got.admin_api is True
    with patch.dict(os.environ, {"KUBEINFER_MODEL_URI": "file:///m",
                                 "KUBEINFER_WORKERS": "0"}, clear=True), \
            pytest.raises(ValidationError, match="workers"):
        model_server_settings()
    with patch.dict(os.environ, {}, clear=True), \
            pytest.raises(ValidationError, match="KUBEINFER_MODEL_URI"):
        model_server_settings()
