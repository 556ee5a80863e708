"""Reading a manifest file (-f) and its YAML documents, refusing what would hang or crash.

A FIFO or device would block the read forever, a file of tens of megabytes takes
minutes to parse, non-UTF-8 bytes and very deep nesting raise past the YAML error:
each becomes a SpecError saying what is wrong and what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from kubeinfer_operator.errors import SpecError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def read_manifest(path: Path, what: str = "-f path") -> str:
    """The text of the manifest at ``path``; SpecError when it cannot be a manifest."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise SpecError(f"Cannot read {path}: it is {kind}; check the {what} "
                            "(give a YAML file)")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise SpecError(f"Cannot read {path}: it is {info.st_size} bytes, over the "
                            f"{MAX_MANIFEST_BYTES // (1024 * 1024)} MiB a manifest may be; "
                            f"check the {what}, and keep data out of the manifest")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"Cannot read {path}: {exc.strerror or exc}; check the {what}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SpecError(f"Cannot read {path}: it is over the "
                        f"{MAX_MANIFEST_BYTES // (1024 * 1024)} MiB a manifest may be; "
                        f"check the {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x}); "
                        "save it as UTF-8 YAML") from exc


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (as kubectl does), where
    PyYAML silently keeps the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: construct_mapping says so below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_documents(text: str, source: str) -> list[Any]:
    """The non-empty YAML documents of ``text``; SpecError when it does not parse."""
    try:
        return [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(f"{source} is not valid YAML: {exc}; fix the syntax") from exc
    except RecursionError as exc:
        raise SpecError(f"{source} nests too deeply to parse; flatten the YAML "
                        "(a manifest needs only a few levels)") from exc
