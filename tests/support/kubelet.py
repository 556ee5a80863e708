"""What the kubelet does to a container's env values, command and arguments.

The operator escapes every ``$`` of a literal value in kubeinfer's containers (``$$``:
``render.k8s_workloads.escape_expansion``), so ``$(NAME)`` in a spec never expands to another
variable, a Secret's included. Tests that read a rendered value as the process will see
it expand it here, with Kubernetes' rules (third_party/forked/golang/expansion).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def expand(value: str, defined: Mapping[str, str] | None = None) -> str:
    """``$$`` is ``$``; ``$(NAME)`` is NAME's value where ``defined`` has it, else stays;
    any other ``$`` stays."""
    defined = defined or {}
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            if value[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            end = value.find(")", i + 2)
            if value[i + 1] == "(" and end != -1 and value[i + 2:end] in defined:
                out.append(defined[value[i + 2:end]])
                i = end + 1
                continue
        out.append(value[i])
        i += 1
    return "".join(out)


def env_seen(container: Mapping[str, Any],
             defined: Mapping[str, str] | None = None) -> dict[str, str]:
    """The literal env values of ``container`` as its process sees them."""
    return {e["name"]: expand(e["value"], defined) for e in container["env"] if "value" in e}
