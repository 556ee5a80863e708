"""Settings models read from ``KUBEINFER_*`` environment variables, without pydantic-settings.

Every runtime process builds its settings from the environment at start, and a
pod pays its process's start on every scale-from-zero and rollout (issue 18).
pydantic-settings costs 40-75 ms of imports on top of pydantic for one feature
we use: read the fields from ``os.environ``. ``EnvSettings`` is a plain pydantic
model that does the same for what our settings use, with the same rules as
pydantic-settings' env source (``tests/unit/test_env_settings.py`` checks them
against it):

* a field is read from ``<prefix><NAME>``, or from each name of its
  ``validation_alias`` (``AliasChoices``) in order; names match in upper case only
  (``KUBEINFER_PORT``, never ``kubeinfer_port``; pydantic-settings matched any case,
  the later spelling winning, so a spec's ``kubeinfer_redis_url`` replaced the
  ``KUBEINFER_REDIS_URL`` the operator rendered: env names are case-sensitive on
  Linux, and the operator's policy, ``api/env_policy``, compares them as written);
* values of complex fields (models, lists, dicts, sets, tuples) are JSON, except
  fields annotated ``NoDecode`` (their own validator splits the string); a union
  with a complex member keeps a string that is not JSON;
* everything else reaches pydantic as the string, so ``"true"``, ``"8080"`` and
  enum values validate exactly as they did;
* values given to the constructor win over the environment.

``given(values)`` reads no environment: the operator renders a process's env
through the same models without leaking its own. (``model_validate`` does read it:
pydantic routes it through a custom ``__init__``.)
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping, Sequence, Set
from contextvars import ContextVar
from dataclasses import is_dataclass
from types import UnionType
from typing import Annotated, Any, ClassVar, Self, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel, ConfigDict
from pydantic.fields import FieldInfo


class NoDecode:
    """Marker (``Annotated[list[int], NoDecode]``): the env value is not JSON; the field's
    own validator parses it (e.g. a comma-separated list)."""


class EnvSettingsError(ValueError):
    """An environment variable holds a value its field cannot take (not JSON, for one)."""


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is UnionType


def _complex_type(annotation: Any) -> bool:
    if isinstance(annotation, type):
        if issubclass(annotation, str | bytes):
            return False
        return issubclass(annotation, (BaseModel, Mapping, Sequence, Set, tuple, deque)) or (
            is_dataclass(annotation))
    return False


def _complexity(annotation: Any, metadata: Sequence[Any] = ()) -> tuple[bool, bool]:
    """(is complex, a JSON parse failure may keep the string), as pydantic-settings decides."""
    if any(m is NoDecode or isinstance(m, NoDecode) for m in metadata):
        return False, False
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        return _complexity(inner, [*metadata, *meta])
    if _is_union(origin):
        for arg in get_args(annotation):
            if arg is type(None):
                continue
            if _complexity(arg, metadata)[0]:
                return True, True
        return False, False
    return (_complex_type(annotation) or _complex_type(origin)
            or hasattr(origin, "__pydantic_core_schema__"), False)


def _env_names(name: str, field: FieldInfo, prefix: str) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [c for c in alias.choices if isinstance(c, str)]
    if isinstance(alias, str):
        return [alias]
    return [field.alias or prefix + name]


def read_env(cls: type[EnvSettings], environ: Mapping[str, str]) -> dict[str, Any]:
    """The values ``cls``'s fields take from ``environ``, keyed as pydantic validates them
    (by the alias that matched, else by field name)."""
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        for env_name in _env_names(name, field, cls.env_prefix):
            raw = environ.get(env_name.upper())
            if raw is None:
                continue
            is_complex, may_fail = _complexity(field.annotation, field.metadata)
            value: Any = raw
            if is_complex:
                try:
                    value = json.loads(raw)
                except ValueError:
                    if not may_fail:
                        raise EnvSettingsError(
                            f"{env_name.upper()} is not valid JSON (the field {name} takes a "
                            "JSON value)") from None
            key = env_name if isinstance(field.validation_alias, AliasChoices | str) else name
            out[key] = value
            break
    return out


#: False while ``EnvSettings.given`` validates: the constructor then reads no env.
_READ_ENV: ContextVar[bool] = ContextVar("kubeinfer_read_env", default=True)


class EnvSettings(BaseModel):
    """A model whose constructor fills the fields its arguments leave out from the env."""

    # hide_input_in_errors: a ValidationError's text would quote the values (for a model
    # validator every setting read: a Redis URL's password, S3 keys, tokens).
    model_config = ConfigDict(extra="ignore", populate_by_name=True, validate_default=True,
                              hide_input_in_errors=True)

    #: Prefix of the env var of a field without an alias.
    env_prefix: ClassVar[str] = "KUBEINFER_"

    def __init__(self, **data: Any) -> None:
        if not _READ_ENV.get():
            super().__init__(**data)
            return
        env = read_env(type(self), os.environ)
        names = {f: n for n, field in type(self).model_fields.items()
                 for f in _env_names(n, field, self.env_prefix)}
        # A constructor argument wins over the env, whether given by name or by alias.
        given = {names.get(k, k) for k in data} | set(data)
        env = {k: v for k, v in env.items() if names.get(k, k) not in given}
        super().__init__(**{**env, **data})

    @classmethod
    def from_env(cls, **values: Any) -> Self:
        """The settings a process starts with: the env, and ``values`` over it. (Typed
        apart from the constructor: fields without a default come from the env.)"""
        return cls(**values)

    @classmethod
    def given(cls, values: Mapping[str, Any]) -> Self:
        """Validate exactly ``values``, reading no environment variable."""
        token = _READ_ENV.set(False)
        try:
            return cls.model_validate(dict(values))
        finally:
            _READ_ENV.reset(token)
