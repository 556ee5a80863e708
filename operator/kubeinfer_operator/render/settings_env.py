"""A runtime settings class's ``KUBEINFER_*`` env, from given values only: PURE.

The operator renders a process's env through the runtime's own settings class
(``BatchSettings``, ``CompileSettings``, ...), so a name or a value the runtime
would refuse fails at render time, naming the field. Rendering never reads the
renderer's own environment: the operator's (or a laptop's) credentials and
settings must not leak into what it renders.
"""

from __future__ import annotations

import json
from typing import Any

from kubeinfer_runtime.contract import ENV_PREFIX
from kubeinfer_runtime.contract.env_settings import EnvSettings


def rendered_env(settings_cls: type[EnvSettings], values: dict[str, Any]) -> dict[str, str]:
    """``KUBEINFER_*`` env of exactly ``values`` (fields of ``settings_cls``), validated by the
    runtime's own model; a pydantic ValidationError names what the runtime would refuse."""
    # ``given``, not the constructor: the constructor would read this process's env.
    settings = settings_cls.given(values)
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json", include=set(values)).items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env
