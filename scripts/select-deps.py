#!/usr/bin/env python3
"""Print the requirement lines of pyproject.toml's [project] dependencies named on the
command line, or of one extra with ``--extra NAME``: each image's share (Dockerfile)."""

import re
import sys
import tomllib


def main(argv: list[str]) -> int:
    with open("pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)["project"]
    if argv[:1] == ["--extra"]:
        print("\n".join(project["optional-dependencies"][argv[1]]))
        return 0
    deps = {re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower().replace("_", "-"): d
            for d in project["dependencies"]}
    unknown = sorted(set(argv) - set(deps))
    if unknown:
        print(f"select-deps: not in pyproject.toml [project] dependencies: {unknown}",
              file=sys.stderr)
        return 1
    print("\n".join(deps[name] for name in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
