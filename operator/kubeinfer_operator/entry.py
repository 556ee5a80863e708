"""The ``kubeinfer`` command: the CLI, but the device agent before the CLI is imported.

``kubeinfer edge agent`` runs on edge devices (a Raspberry Pi-class board, under a
service manager that restarts it): importing the CLI first (every kind's API models,
validators and renderers) cost ~0.5 s of CPU at each start, for a command that only
hands over to the runtime's agent. Its ``--help`` still goes through the CLI, which
documents the flags.
"""

from __future__ import annotations

import sys

from kubeinfer_operator.agent_exec import exec_agent


def main() -> None:
    args = sys.argv[1:]
    if args[:2] == ["edge", "agent"] and not {"--help", "-h"} & set(args[2:]):
        exec_agent(args[2:])
    from kubeinfer_operator.cli import main as cli_main

    cli_main()
