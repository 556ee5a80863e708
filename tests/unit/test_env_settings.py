"""``EnvSettings`` reads the env exactly as pydantic-settings did, without importing it.

The runtime's settings stopped deriving from pydantic-settings' ``BaseSettings``
(40-75 ms of imports on every process start, issue 18). Differential check: for
every runtime settings class, a twin built on pydantic-settings from the same
fields reads the same raw values from the same environments (names, aliases in
order, JSON of complex fields, NoDecode, unions that keep a non-JSON string), and
the constructed settings agree. One rule differs on purpose: only upper-case names
are read (pydantic-settings matches any case, the later spelling winning).
"""

from __future__ import annotations

from typing import Any

import pydantic_settings
import pytest
from pydantic import ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.sources import EnvSettingsSource

from kubeinfer_runtime.contract import (
    AsyncWorkerSettings,
    GatewaySettings,
    HttpSettings,
    ModelServerSettings,
)
from kubeinfer_runtime.contract.batch import BatchSettings
from kubeinfer_runtime.contract.compile import CompileSettings
from kubeinfer_runtime.contract.env_settings import (
    EnvSettings,
    EnvSettingsError,
    NoDecode,
    read_env,
)
from kubeinfer_runtime.server_env import read_server_env

CLASSES: list[type[EnvSettings]] = [HttpSettings, ModelServerSettings, GatewaySettings,
                                    AsyncWorkerSettings, BatchSettings, CompileSettings]


def twin(cls: type[EnvSettings]) -> type[BaseSettings]:
    """``cls``'s fields on pydantic-settings (our NoDecode swapped for theirs)."""
    fields: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        copied = FieldInfo.merge_field_infos(field)
        copied.metadata = [pydantic_settings.NoDecode if m is NoDecode else m
                           for m in field.metadata]
        fields[name] = (field.annotation, copied)
    model: type[BaseSettings] = create_model(  # type: ignore[call-overload]
        f"Twin{cls.__name__}", __base__=BaseSettings, **fields)
    model.model_config = SettingsConfigDict(env_prefix="KUBEINFER_", extra="ignore")
    return model


def theirs(cls: type[EnvSettings], env: dict[str, str]) -> dict[str, Any]:
    """What pydantic-settings' env source hands pydantic, keyed by field name, from the
    upper-case names (the only ones ``EnvSettings`` reads; pydantic-settings matches any
    case)."""
    model = twin(cls)
    source = EnvSettingsSource(model)
    source.env_vars = {k.lower(): v for k, v in env.items() if k == k.upper()}
    raw = source()
    by_alias = {a: n for n, f in cls.model_fields.items()
                for a in getattr(f.validation_alias, "choices", []) if isinstance(a, str)}
    return {by_alias.get(k, k): v for k, v in raw.items()}


def ours(cls: type[EnvSettings], env: dict[str, str]) -> dict[str, Any]:
    by_alias = {a: n for n, f in cls.model_fields.items()
                for a in getattr(f.validation_alias, "choices", []) if isinstance(a, str)}
    return {by_alias.get(k, k): v for k, v in read_env(cls, env).items()}


ENVS: list[dict[str, str]] = [
    {},
    {"KUBEINFER_PORT": "9000", "kubeinfer_log_level": "debug", "KUBEINFER_WORKERS": "2",
     "KUBEINFER_INLINE_HTTP": "false", "UNRELATED": "x"},
    {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-1",
     "AWS_ACCESS_KEY_ID": "AKIA", "KUBEINFER_S3_ACCESS_KEY": "ours-wins",
     "AWS_ENDPOINT_URL": "http://s3:8333"},
    {"KUBEINFER_PIPELINE": '{"steps": [{"name": "a", "model_uri": "file:///m.onnx"}]}',
     "KUBEINFER_MODEL_URI": "file:///m.onnx", "KUBEINFER_METRICS_PORT": "9090"},
    {"KUBEINFER_PIPELINE": "not json"},
    {"KUBEINFER_BATCH_SIZES": "1,8,64", "KUBEINFER_SPLIT_TYPE": "Line",
     "KUBEINFER_BATCH_ACROSS_OBJECTS": "0", "KUBEINFER_HTTP_MAX_CONNECTIONS": "10"},
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("env", ENVS, ids=range(len(ENVS)))
def test_reads_what_pydantic_settings_reads(cls: type[EnvSettings],
                                            env: dict[str, str]) -> None:
    assert ours(cls, env) == theirs(cls, env)


def test_another_spelling_of_a_setting_is_not_read() -> None:
    """A spec's ``kubeinfer_outbound_allow`` (after the operator's upper-case one, as a pod's
    env lists them) used to replace the operator's allow-list."""
    env = {"KUBEINFER_OUTBOUND_ALLOW": "10.0.0.0/8", "KUBEINFER_REDIS_URL": "redis://ours",
           "kubeinfer_outbound_allow": "169.254.0.0/16", "kubeinfer_redis_url": "redis://x",
           "Kubeinfer_Endpoint_Name": "theirs", "aws_access_key_id": "theirs"}
    read = read_env(AsyncWorkerSettings, env)
    assert read["outbound_allow"] == "10.0.0.0/8"
    assert read["redis_url"] == "redis://ours"
    assert "endpoint_name" not in read
    assert "s3_access_key" not in read and "KUBEINFER_S3_ACCESS_KEY" not in read
    assert read_env(ModelServerSettings, {"kubeinfer_port": "1"}) == {}
    # The model server's own reader (server_env) reads as EnvSettings does.
    light = read_server_env({"KUBEINFER_MODEL_URI": "file:///m.onnx", "kubeinfer_port": "1",
                             "kubeinfer_model_uri": "file:///theirs.onnx"})
    assert light is not None and (light.port, light.model_uri) == (8080, "file:///m.onnx")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_read_from_its_env_var(cls: type[EnvSettings]) -> None:
    env = {f"KUBEINFER_{name.upper()}": "1" for name in cls.model_fields
           if not cls.model_fields[name].validation_alias}
    mine = ours(cls, {k: v for k, v in env.items()})
    assert set(mine) == {k.removeprefix("KUBEINFER_").lower() for k in env}


def test_constructor_arguments_win_and_env_fills_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEINFER_PORT", "9000")
    monkeypatch.setenv("KUBEINFER_MODEL_NAME", "from-env")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("KUBEINFER_MODEL_URI", "file:///m.onnx")
    settings = ModelServerSettings(port=7000, s3_region="ap-south-1")
    assert (settings.port, settings.model_name, settings.s3_region) == (
        7000, "from-env", "ap-south-1")
    assert ModelServerSettings().s3_region == "eu-west-1"
    # ``given`` reads no env: what the operator renders with.
    assert ModelServerSettings.given({"model_uri": "file:///m.onnx"}).port == 8080
    assert ModelServerSettings.given({"model_uri": "file:///m.onnx"}).s3_region is None


def test_bad_values_fail_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEINFER_MODEL_URI", "file:///m.onnx")
    monkeypatch.setenv("KUBEINFER_PORT", "eighty")
    with pytest.raises(ValidationError, match="port"):
        ModelServerSettings()
    monkeypatch.delenv("KUBEINFER_PORT")
    monkeypatch.setenv("KUBEINFER_TUNE_TARGETS", "x")  # unknown: ignored
    monkeypatch.delenv("KUBEINFER_MODEL_URI")
    monkeypatch.setenv("KUBEINFER_PIPELINE", "{not json")
    with pytest.raises(ValidationError, match="pipeline"):
        ModelServerSettings()


def test_a_complex_field_that_is_not_a_union_must_be_json() -> None:
    class Listy(EnvSettings):
        names: list[str] = []

    assert read_env(Listy, {"KUBEINFER_NAMES": '["a"]'}) == {"names": ["a"]}
    with pytest.raises(EnvSettingsError, match="KUBEINFER_NAMES is not valid JSON"):
        read_env(Listy, {"KUBEINFER_NAMES": "a,b"})


def test_the_runtime_does_not_import_pydantic_settings() -> None:
    import subprocess
    import sys

    code = ("import sys, kubeinfer_runtime.contract, kubeinfer_runtime.contract.batch; "
            "import kubeinfer_runtime.contract.compile; "
            "print('pydantic_settings' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
