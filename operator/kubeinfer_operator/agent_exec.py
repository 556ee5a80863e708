"""The device agent's command line, as the runtime runs it.

``kubeinfer edge agent`` is the runtime's agent (``python -m kubeinfer_runtime edge
agent``): the CLI only hands its flags over, moving ``--bootstrap-token`` into the
environment so that other users cannot read the token in the process list. Both the
command's fast entry (``kubeinfer_operator.entry``) and its documented typer command
(``cli_edge``) hand over through here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

#: Where the agent takes its bootstrap token from (the runtime's agent reads it).
TOKEN_ENV = "KUBEINFER_EDGE_BOOTSTRAP_TOKEN"
_TOKEN_FLAG = "--bootstrap-token"


def agent_command_line(args: Sequence[str], environ: Mapping[str, str]
                       ) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the runtime's agent for ``kubeinfer edge agent ARGS``.

    Every flag but the token passes through as given: the runtime's parser checks
    them and names what is wrong. A token flag without a value is passed on too, for
    that parser to refuse.
    """
    argv = [sys.executable, "-m", "kubeinfer_runtime", "edge", "agent"]
    env = dict(environ)
    rest = list(args)
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == _TOKEN_FLAG and i + 1 < len(rest):
            env[TOKEN_ENV] = rest[i + 1]
            i += 2
            continue
        if arg.startswith(_TOKEN_FLAG + "="):
            env[TOKEN_ENV] = arg.split("=", 1)[1]
        else:
            argv.append(arg)
        i += 1
    return argv, env


def exec_agent(args: Sequence[str]) -> NoReturn:
    """Become the runtime's agent (this process's pid, so a service manager's too)."""
    argv, env = agent_command_line(args, os.environ)
    os.execvpe(argv[0], argv, env)
