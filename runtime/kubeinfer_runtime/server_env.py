"""A single-model server's settings, read from the environment without pydantic.

Every pod pays its model server's start at each scale-from-zero and rollout (issue
18), and importing pydantic and building the contract's models was the largest part
of that start the bare ASGI app does not have: ~60 ms on a quiet machine, ~230 ms on
a slow one. So the model server reads its settings here first:

* :func:`read_server_env` takes the environment as ``ModelServerSettings`` would
  (``contract.env_settings``' rules: ``KUBEINFER_<FIELD>`` or each alias in order,
  names matched in upper case only) but accepts
  only a plain subset of values: ints written as digits, decimal floats, ``true``,
  ``false`` (and ``True``, ``False``, ``1``, ``0``), the exact members of literals
  and enums, and one model (``KUBEINFER_MODEL_URI``; no multi-model prefix, no
  pipeline). Anything else, valid or not, gives None.
* :func:`model_server_settings` then validates with ``ModelServerSettings`` itself,
  so whatever the subset does not take (a multi-model or pipeline variant, ``yes``
  for a bool, a bad value and its worded error) is decided by pydantic as before.

``tests/unit/test_server_env.py`` holds the two readers equal: over generated
environments, whenever this one accepts, pydantic accepts with the same values; and
the fields here are the model's fields, with its defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol

from kubeinfer_runtime.wire import ENV_PREFIX, REALTIME_MAX_PAYLOAD_BYTES, ModelFormat

if TYPE_CHECKING:
    from kubeinfer_runtime.contract import PipelineSpec


class S3Config(Protocol):
    """What reaching an object store takes (``contract.S3Settings`` or :class:`S3Env`)."""

    @property
    def endpoint_url(self) -> str | None: ...
    @property
    def access_key(self) -> str | None: ...
    @property
    def secret_key(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...


class HttpConfig(Protocol):
    """The HTTP bounds ``http_limits`` enforces (``contract.HttpSettings`` or :class:`HttpEnv`)."""

    @property
    def inline_http(self) -> bool: ...
    @property
    def http_max_header_bytes(self) -> int: ...
    @property
    def http_max_header_line_bytes(self) -> int: ...
    @property
    def http_max_headers(self) -> int: ...
    @property
    def http_header_timeout_s(self) -> float: ...
    @property
    def http_body_timeout_s(self) -> float: ...
    @property
    def http_body_min_rate_bytes_s(self) -> float: ...
    @property
    def http_keepalive_timeout_s(self) -> float: ...
    @property
    def http_max_connections(self) -> int | None: ...
    @property
    def http_max_body_bytes_held(self) -> int | None: ...
    @property
    def http_send_timeout_s(self) -> float: ...


class ServerConfig(Protocol):
    """What the model server reads of its settings: ``contract.ModelServerSettings`` (and
    its subclasses, which the async worker and the batch worker pass) or :class:`ServerEnv`."""

    @property
    def host(self) -> str: ...
    @property
    def workers(self) -> int: ...
    @property
    def log_level(self) -> Literal["debug", "info", "warning", "error"]: ...
    @property
    def metrics_port(self) -> int | None: ...
    @property
    def model_uri(self) -> str: ...
    @property
    def multi_model_prefix(self) -> str | None: ...
    @property
    def pipeline(self) -> PipelineSpec | None: ...
    @property
    def model_format(self) -> ModelFormat: ...
    @property
    def model_name(self) -> str: ...
    @property
    def model_cache_dir(self) -> str: ...
    @property
    def max_model_bytes(self) -> int: ...
    @property
    def exit_on_load_failure(self) -> bool: ...
    @property
    def termination_message_path(self) -> str: ...
    @property
    def endpoint_name(self) -> str: ...
    @property
    def variant_name(self) -> str: ...
    @property
    def max_payload_bytes(self) -> int: ...
    @property
    def max_decoded_bytes(self) -> int | None: ...
    @property
    def inference_threads(self) -> int: ...
    @property
    def intra_op_threads(self) -> int: ...
    @property
    def model_base_dir(self) -> str: ...
    @property
    def inference_mode(self) -> Literal["auto", "inline", "thread"]: ...
    def s3(self) -> S3Config: ...


@dataclass(frozen=True, slots=True)
class S3Env:
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class HttpEnv:
    """``contract.HttpSettings``' fields, with its defaults (the test holds them equal)."""

    inline_http: bool = True
    http_max_header_bytes: int = 64 * 1024
    http_max_header_line_bytes: int = 16 * 1024
    http_max_headers: int = 100
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 10.0
    http_body_min_rate_bytes_s: float = 1024.0
    http_keepalive_timeout_s: float = 5.0
    http_max_connections: int | None = None
    http_max_body_bytes_held: int | None = None
    http_send_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class ServerEnv(HttpEnv):
    """``contract.ModelServerSettings``' fields, with its defaults, for one model."""

    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_port: int | None = None
    s3_endpoint_url: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str | None = None
    model_uri: str = ""
    multi_model_prefix: str | None = None
    cache_bytes: int = 1 << 30
    disk_cache_bytes: int = 4 << 30
    pipeline: PipelineSpec | None = None
    model_format: ModelFormat = ModelFormat.ONNX
    model_name: str = "model"
    model_cache_dir: str = "/tmp/kubeinfer/models"
    max_model_bytes: int = 10 << 30
    exit_on_load_failure: bool = False
    termination_message_path: str = "/dev/termination-log"
    endpoint_name: str = ""
    variant_name: str = ""
    max_payload_bytes: int = REALTIME_MAX_PAYLOAD_BYTES
    max_decoded_bytes: int | None = None
    admin_api: bool = False
    inference_threads: int = 1
    intra_op_threads: int = 1
    model_base_dir: str = "/srv/kubeinfer"
    inference_mode: Literal["auto", "inline", "thread"] = "auto"

    def s3(self) -> S3Env:
        return S3Env(endpoint_url=self.s3_endpoint_url, access_key=self.s3_access_key,
                     secret_key=self.s3_secret_key, region=self.s3_region)


class _NotPlain(Exception):
    """A value outside the plain subset: pydantic decides it."""


_INT = re.compile(r"0|[1-9][0-9]{0,17}")
_FLOAT = re.compile(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,9})?")
_BOOLS = {"true": True, "false": False, "True": True, "False": False, "1": True, "0": False}


def _int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not _INT.fullmatch(text):
            raise _NotPlain
        value = int(text)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _NotPlain
        return value
    return parse


def _positive_float(text: str) -> float:
    if not _FLOAT.fullmatch(text):
        raise _NotPlain
    value = float(text)
    if value <= 0:
        raise _NotPlain
    return value


def _non_negative_float(text: str) -> float:
    if not _FLOAT.fullmatch(text):
        raise _NotPlain
    value = float(text)
    if value < 0:
        raise _NotPlain
    return value


def _bool(text: str) -> bool:
    try:
        return _BOOLS[text]
    except KeyError:
        raise _NotPlain from None


def _one_of(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise _NotPlain
        return text
    return parse


def _str(text: str) -> str:
    return text


def _model_format(text: str) -> ModelFormat:
    try:
        return ModelFormat(text)
    except ValueError:
        raise _NotPlain from None


def _never(text: str) -> Any:
    raise _NotPlain


#: Field -> (how its text is taken, the env names it is read from, in order; empty:
#: ``KUBEINFER_<FIELD>``). The same bounds as the model's ``Field(...)``s.
_FIELDS: dict[str, tuple[Callable[[str], Any], tuple[str, ...]]] = {
    "inline_http": (_bool, ()),
    "http_max_header_bytes": (_int(1024), ()),
    "http_max_header_line_bytes": (_int(256), ()),
    "http_max_headers": (_int(8), ()),
    "http_header_timeout_s": (_positive_float, ()),
    "http_body_timeout_s": (_positive_float, ()),
    "http_body_min_rate_bytes_s": (_non_negative_float, ()),
    "http_keepalive_timeout_s": (_positive_float, ()),
    "http_max_connections": (_int(1), ()),
    "http_max_body_bytes_held": (_int(1), ()),
    "http_send_timeout_s": (_positive_float, ()),
    "host": (_str, ()),
    "port": (_int(), ()),
    "workers": (_int(1), ()),
    "log_level": (_one_of("debug", "info", "warning", "error"), ()),
    "metrics_port": (_int(1, 65535), ()),
    "s3_endpoint_url": (_str, ("KUBEINFER_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                       "AWS_ENDPOINT_URL")),
    "s3_access_key": (_str, ("KUBEINFER_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")),
    "s3_secret_key": (_str, ("KUBEINFER_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")),
    "s3_region": (_str, ("KUBEINFER_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")),
    "model_uri": (_str, ()),
    # A multi-model or pipeline variant is pydantic's to read (its own code imports it).
    "multi_model_prefix": (_never, ()),
    "cache_bytes": (_int(1), ()),
    "disk_cache_bytes": (_int(1), ()),
    "pipeline": (_never, ()),
    "model_format": (_model_format, ()),
    "model_name": (_str, ()),
    "model_cache_dir": (_str, ()),
    "max_model_bytes": (_int(1), ()),
    "exit_on_load_failure": (_bool, ()),
    "termination_message_path": (_str, ()),
    "endpoint_name": (_str, ()),
    "variant_name": (_str, ()),
    "max_payload_bytes": (_int(), ()),
    "max_decoded_bytes": (_int(1), ()),
    "admin_api": (_bool, ()),
    "inference_threads": (_int(1), ()),
    "intra_op_threads": (_int(1), ()),
    "model_base_dir": (_str, ()),
    "inference_mode": (_one_of("auto", "inline", "thread"), ()),
}


def _read(names: list[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    # As EnvSettings reads: upper-case names only.
    values: dict[str, Any] = {}
    try:
        for name in names:
            parse, aliases = _FIELDS[name]
            for env_name in aliases or (ENV_PREFIX + name,):
                raw = environ.get(env_name.upper())
                if raw is not None:
                    values[name] = parse(raw)
                    break
    except _NotPlain:
        return None
    return values


_HTTP_FIELDS = [f.name for f in fields(HttpEnv)]
_SERVER_FIELDS = [f.name for f in fields(ServerEnv)]


def read_http_env(environ: Mapping[str, str]) -> HttpEnv | None:
    """Any role's HTTP bounds, or None where pydantic must decide."""
    values = _read(_HTTP_FIELDS, environ)
    return None if values is None else HttpEnv(**values)


def read_server_env(environ: Mapping[str, str]) -> ServerEnv | None:
    """A single-model server's settings, or None where pydantic must decide."""
    values = _read(_SERVER_FIELDS, environ)
    if values is None or not values.get("model_uri"):
        return None  # no model (pydantic words the error)
    return ServerEnv(**values)


def model_server_settings() -> ServerConfig:
    """The model server's settings from the environment: :func:`read_server_env`, else
    ``ModelServerSettings`` (raises its ``ValidationError`` on a bad environment)."""
    light = read_server_env(os.environ)
    if light is not None:
        return light
    from kubeinfer_runtime.contract import ModelServerSettings

    return ModelServerSettings()


def http_settings() -> HttpConfig:
    """This process's HTTP bounds from the environment (any role)."""
    light = read_http_env(os.environ)
    if light is not None:
        return light
    from kubeinfer_runtime.contract import HttpSettings

    return HttpSettings()
