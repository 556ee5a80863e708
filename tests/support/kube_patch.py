"""Pure helpers of the Kubernetes emulator: patches, selectors, CRD schema handling.

What a real API server does to an object between the request and etcd, in the
subset our tests rely on: JSON merge patch (RFC 7386), JSON patch (RFC 6902,
including ``test``), label/field selectors, and for custom resources the
structural-schema treatment (defaults applied, unknown fields pruned, list-map
keys unique, ``nullable``).
"""

from __future__ import annotations

import copy
import re
from typing import Any


class PatchError(Exception):
    """A JSON patch that cannot be applied (the API server answers 422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strip_directives(patch: Any) -> Any:
    """Drop strategic-merge-patch directives (``$patch``, ``$setElementOrder/...``)."""
    if isinstance(patch, dict):
        return {k: strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [strip_directives(v) for v in patch]
    return patch


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise PatchError(f"path segment {part!r} does not exist")
    return node, parts[-1]


def _get(doc: Any, path: str) -> Any:
    node = doc
    for part in _pointer(path):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise PatchError(f"path {path!r} does not exist") from exc
    return node


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent, last = _parent(doc, parts)
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            parent.insert(int(last), value)
    else:
        parent[last] = value
    return doc


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    parent, last = _parent(doc, parts)
    try:
        if isinstance(parent, list):
            del parent[int(last)]
        else:
            del parent[last]
    except (KeyError, IndexError, ValueError) as exc:
        raise PatchError(f"path {path!r} does not exist") from exc
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 on a copy of ``doc``; a failed ``test`` raises PatchError."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        try:
            if kind == "test":
                if _get(doc, path) != op.get("value"):
                    raise PatchError(f"test failed at {path!r}")
            elif kind == "add":
                doc = _add(doc, path, copy.deepcopy(op.get("value")))
            elif kind == "remove":
                doc = _remove(doc, path)
            elif kind == "replace":
                _get(doc, path)
                doc = _add(_remove(doc, path), path, copy.deepcopy(op.get("value")))
            elif kind in ("move", "copy"):
                value = copy.deepcopy(_get(doc, op["from"]))
                if kind == "move":
                    doc = _remove(doc, op["from"])
                doc = _add(doc, path, value)
            else:
                raise PatchError(f"unknown JSON patch op {kind!r}")
        except (IndexError, ValueError, TypeError, KeyError) as exc:
            raise PatchError(f"cannot apply {op!r}: {exc}") from exc
    return doc


# -- selectors ---------------------------------------------------------------------------

_TERM = re.compile(r"\s*([^,()]+?(?:\s+(?:in|notin)\s*\([^)]*\))?)\s*(?:,|$)")


def _label_term(term: str, labels: dict[str, str]) -> bool:
    m = re.fullmatch(r"(\S+)\s+(in|notin)\s*\(([^)]*)\)", term)
    if m:
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
        return (labels.get(key) in values) if op == "in" else (labels.get(key) not in values)
    for op in ("!=", "==", "="):
        if op in term:
            key, value = (s.strip() for s in term.split(op, 1))
            return labels.get(key) != value if op == "!=" else labels.get(key) == value
    if term.startswith("!"):
        return term[1:].strip() not in labels
    return term in labels


def matches_labels(selector: str | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    return all(_label_term(t, labels) for t in _TERM.findall(selector) if t.strip())


def matches_fields(selector: str | None, obj: dict[str, Any]) -> bool:
    """``metadata.name=x,metadata.namespace=y`` (the fields kubectl and kopf use)."""
    if not selector:
        return True
    for term in selector.split(","):
        negate = "!=" in term
        key, value = (s.strip() for s in re.split(r"!=|==|=", term, maxsplit=1))
        node: Any = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (str(node) == value) == negate:
            return False
    return True


# -- structural schemas (custom resources) ----------------------------------------------

def draft4_schema(schema: Any) -> Any:
    """OpenAPI ``nullable: true`` as JSON Schema Draft 4 (``type: [t, "null"]``)."""
    if isinstance(schema, list):
        return [draft4_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: draft4_schema(v) for k, v in schema.items()}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def prune_and_default(value: Any, schema: dict[str, Any], top: bool = True) -> Any:
    """What the API server does to a custom resource before validation.

    Unknown fields are dropped (pruning), missing fields with a ``default``
    are filled. ``metadata``, ``apiVersion`` and ``kind`` are the server's own.
    """
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        props: dict[str, Any] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if top and key in ("metadata", "apiVersion", "kind"):
                out[key] = item
            elif key in props:
                out[key] = prune_and_default(item, props[key], top=False)
            elif isinstance(extra, dict):
                out[key] = prune_and_default(item, extra, top=False)
            elif not props and extra is None:
                out[key] = item  # a free-form object
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = prune_and_default(copy.deepcopy(sub["default"]), sub, top=False)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune_and_default(v, schema["items"], top=False) for v in value]
    return value


def list_map_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Duplicate keys in ``x-kubernetes-list-type: map`` lists (the server refuses them)."""
    errors: list[str] = []
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                errors += list_map_errors(value[key], sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        item_schema = schema.get("items") or {}
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen: set[tuple[Any, ...]] = set()
            for i, item in enumerate(value):
                k = tuple((item or {}).get(x) for x in keys)
                if k in seen:
                    duplicate = dict(zip(keys, k, strict=True))
                    errors.append(f"{path}[{i}]: Duplicate value: {duplicate}")
                seen.add(k)
        for i, item in enumerate(value):
            errors += list_map_errors(item, item_schema, f"{path}[{i}]")
    return errors
