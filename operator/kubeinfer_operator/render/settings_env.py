"""A runtime settings class's ``KUBEINFER_*`` env, from given values only: PURE.

The operator renders a process's env through the runtime's own settings class
(``BatchSettings``, ``CompileSettings``, ...), so a name or a value the runtime
would refuse fails at render time, naming the field. Rendering never reads the
renderer's own environment: the operator's (or a laptop's) credentials and
settings must not leak into what it renders.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from kubeinfer_runtime.contract import ENV_PREFIX


@functools.cache
def _given_only(settings_cls: type[BaseSettings]) -> type[BaseSettings]:
    """``settings_cls`` reading its init arguments and nothing else."""

    class Rendered(settings_cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
                cls, settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings,)

    Rendered.__name__ = settings_cls.__name__
    return Rendered


def rendered_env(settings_cls: type[BaseSettings], values: dict[str, Any]) -> dict[str, str]:
    """``KUBEINFER_*`` env of exactly ``values`` (fields of ``settings_cls``), validated by the
    runtime's own model; a pydantic ValidationError names what the runtime would refuse."""
    settings = _given_only(settings_cls)(**values)
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json", include=set(values)).items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env
