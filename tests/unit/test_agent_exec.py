"""``kubeinfer edge agent`` hands its flags to the runtime's agent, the token by env only.

The command's entry (``kubeinfer_operator.entry``) does it before the CLI is imported
(an edge device pays the CLI's imports at every agent start otherwise); ``--help``
still shows the CLI's documented flags.
"""

from __future__ import annotations

import subprocess
import sys

from kubeinfer_operator.agent_exec import TOKEN_ENV, agent_command_line

AGENT = [sys.executable, "-m", "kubeinfer_runtime", "edge", "agent"]


def test_the_token_moves_to_the_environment_and_the_rest_passes_as_given() -> None:
    args = ["--server", "http://fleet:8080", "--bootstrap-token", "tok-1", "--labels",
            "ring=early", "--device-id", "d1"]
    argv, env = agent_command_line(args, {"PATH": "/bin"})
    assert argv == [*AGENT, "--server", "http://fleet:8080", "--labels", "ring=early",
                    "--device-id", "d1"]
    assert env == {"PATH": "/bin", TOKEN_ENV: "tok-1"}
    argv, env = agent_command_line(["--bootstrap-token=tok=2", "--target", "x"], {})
    assert argv == [*AGENT, "--target", "x"] and env == {TOKEN_ENV: "tok=2"}


def test_without_a_token_flag_the_environment_is_kept() -> None:
    argv, env = agent_command_line(["--server", "u"], {TOKEN_ENV: "from-env"})
    assert argv == [*AGENT, "--server", "u"] and env == {TOKEN_ENV: "from-env"}


def test_a_token_flag_without_a_value_is_left_for_the_agent_to_refuse() -> None:
    argv, env = agent_command_line(["--server", "u", "--bootstrap-token"], {})
    assert argv == [*AGENT, "--server", "u", "--bootstrap-token"] and TOKEN_ENV not in env


def _kubeinfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubeinfer_operator", *args],
                          capture_output=True, text=True, timeout=60)


def test_help_is_the_clis_and_a_missing_flag_is_named_by_the_agent() -> None:
    shown = _kubeinfer("edge", "agent", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "--bootstrap-token" in shown.stdout and "--state-dir" in shown.stdout
    refused = _kubeinfer("edge", "agent", "--server", "http://127.0.0.1:1",
                         "--bootstrap-token", "never-echoed-token")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--device-id" in refused.stderr and "--state-dir" in refused.stderr
    assert "never-echoed-token" not in refused.stdout + refused.stderr
    # Other commands still reach the CLI.
    version = _kubeinfer("--help")
    assert version.returncode == 0 and "edge" in version.stdout
