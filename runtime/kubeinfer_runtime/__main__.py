"""``python -m kubeinfer_runtime serve --role ROLE``: the image's entry point.

Roles: model-server, gateway, async-worker and fleet-server (edge fleets:
``kubeinfer_runtime.edge.server``).

``python -m kubeinfer_runtime batch plan|work|finalize`` runs one step of a
Batch Transform job (``kubeinfer_runtime.batch``) and exits with its code.

``python -m kubeinfer_runtime compile [MODEL --target T --out DIR ...]`` compiles
a model (``kubeinfer_runtime.compile``; settings from env, flags win).

``python -m kubeinfer_runtime recommend --request FILE`` load-tests candidate
settings and recommends one (``kubeinfer_runtime.recommend``).

``python -m kubeinfer_runtime edge package|keygen|agent ...`` builds signed edge
packages, makes signing keys and runs the device agent (``kubeinfer_runtime.edge``).

Settings come from ``KUBEINFER_*`` env vars (see ``contract``; a single-model
server reads them through ``server_env``, which imports no pydantic). They are
validated here first so a misconfigured pod fails at once with a readable
message, then uvicorn runs the role's app factory (an import string with
``factory=True``, so ``workers > 1`` works: each worker calls the factory and
reads the same env).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from kubeinfer_runtime.server_env import ServerConfig, model_server_settings
from kubeinfer_runtime.wire import ENV_PREFIX, GRACEFUL_SHUTDOWN_S, Role


def model_server_app() -> Any:
    """uvicorn factory of the model-server role."""
    from kubeinfer_runtime.server.app import create_app

    return create_app(model_server_settings())  # from the environment


def gateway_app() -> Any:
    """uvicorn factory of the gateway role."""
    from kubeinfer_runtime.contract import GatewaySettings
    from kubeinfer_runtime.gateway.app import create_app

    return create_app(GatewaySettings())


def async_worker_app() -> Any:
    """uvicorn factory of the async-worker role (queue consumer with /ping, /metrics)."""
    from kubeinfer_runtime.contract import AsyncWorkerSettings
    from kubeinfer_runtime.queue.app import create_app

    return create_app(AsyncWorkerSettings.from_env())


def fleet_server_app() -> Any:
    """uvicorn factory of the fleet-server role (edge device API + rollout controller)."""
    from kubeinfer_runtime.edge.server import create_app

    return create_app()  # settings from the environment


def _gateway_settings() -> Any:
    from kubeinfer_runtime.contract import GatewaySettings

    return GatewaySettings()


def _async_worker_settings() -> Any:
    from kubeinfer_runtime.contract import AsyncWorkerSettings

    return AsyncWorkerSettings.from_env()


def _fleet_server_settings() -> Any:
    from kubeinfer_runtime.contract.edge import FleetServerSettings

    return FleetServerSettings.from_env()


#: Role -> (app factory, its settings read from the environment). Each role imports
#: only its own: a model server's start (each pod's scale-from-zero) imports no
#: pydantic at all (``server_env``), the others no other role's contract models.
_FACTORIES: dict[Role, tuple[str, Callable[[], Any]]] = {
    Role.MODEL_SERVER: ("kubeinfer_runtime.__main__:model_server_app", model_server_settings),
    Role.GATEWAY: ("kubeinfer_runtime.__main__:gateway_app", _gateway_settings),
    Role.ASYNC_WORKER: ("kubeinfer_runtime.__main__:async_worker_app", _async_worker_settings),
    Role.FLEET_SERVER: ("kubeinfer_runtime.__main__:fleet_server_app", _fleet_server_settings),
}


def _preload(settings: ServerConfig) -> None:
    """Start loading a single model now, while uvicorn is imported (``server.preload``).

    One worker only: with several, each worker process loads its own in its app factory.
    """
    if (settings.workers == 1 and settings.multi_model_prefix is None
            and settings.pipeline is None):
        from kubeinfer_runtime.server import preload

        preload.start(settings)


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The env var behind a settings error (aliased fields already carry their name)."""
    name = "_".join(str(p) for p in loc).upper()
    return name if name.startswith(ENV_PREFIX) or name.startswith("AWS_") else ENV_PREFIX + name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubeinfer-runtime",
                                description="kubeinfer data plane (settings from KUBEINFER_* env)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve one runtime role over HTTP")
    serve.add_argument("--role", required=True, choices=[r.value for r in Role])
    batch = sub.add_parser("batch", help="run one step of a Batch Transform job")
    batch.add_argument("step", choices=["plan", "work", "finalize"])
    # Listed for --help only: main() hands ``compile ...`` to its own parser before this
    # one runs, so a server start never imports the compiler's settings.
    sub.add_parser("compile", add_help=False,
                   help="compile an ONNX model for a target (SageMaker Neo); "
                        "compile --help for its flags")
    sub.add_parser("recommend", add_help=False,
                   help="load-test candidate settings and recommend one (Inference "
                        "Recommender); recommend --help for its flags")
    sub.add_parser("edge", add_help=False,
                   help="edge fleets: package, keygen, agent (Edge Manager); edge --help")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compile"]:
        from kubeinfer_runtime.compile.main import main as compile_main

        return compile_main(argv[1:])
    if argv[:1] == ["recommend"]:
        from kubeinfer_runtime.recommend.main import main as recommend_main

        return recommend_main(argv[1:])
    if argv[:1] == ["edge"]:
        from kubeinfer_runtime.edge.main import main as edge_main

        return edge_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "batch":
        from kubeinfer_runtime.batch.main import run

        return run(args.step)
    role = Role(args.role)
    target, read_settings = _FACTORIES[role]
    try:
        settings = read_settings()
    except Exception as e:
        from pydantic import ValidationError

        if not isinstance(e, ValidationError):
            raise
        problems = "; ".join(f"{_env_name(err['loc'])}: {err['msg']}" for err in e.errors())
        print(f"Invalid {args.role} settings ({problems}): set the environment variables",
              file=sys.stderr)
        return 2
    if role is Role.MODEL_SERVER:
        _preload(settings)
    # Imported here, not above: a batch step (a short-lived process, one per Job pod)
    # would pay for uvicorn and httptools at every start without using them.
    import uvicorn

    from kubeinfer_runtime import accept
    from kubeinfer_runtime.inline_http import InlineHttpProtocol

    # uvicorn's run, with a listener that accepts every pending connection at once
    # (``accept``: uvloop's own drained its backlog at ~50 connections a second under load).
    accept.run(uvicorn.Config(
        target,
        factory=True,
        host=settings.host,
        port=settings.port,
        # The fleet server has no workers setting: one process, scaled with replicas.
        workers=getattr(settings, "workers", 1),
        loop="uvloop",
        # httptools with connection limits, plus inline answers for clean inference
        # requests unless KUBEINFER_INLINE_HTTP=false (http_limits, inline_http).
        http=InlineHttpProtocol,
        # No role serves websockets: "auto" would import a websocket library at every start.
        ws="none",
        access_log=False,
        log_level=settings.log_level,
        # In-flight requests get this long after SIGTERM; the operator renders each pod's
        # terminationGracePeriodSeconds above it (render.k8s_workloads.termination_grace_s).
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
