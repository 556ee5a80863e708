"""``kubeinfer-runtime edge package|keygen|agent``: the edge commands' flags and I/O.

``__main__`` hands ``edge ...`` here before its own parser runs, so ``serve``
never imports this (nor ``cryptography``). ``package`` fetches the model
(a path, ``file://`` or ``s3://``), optionally compiles it in-process for a
CPU target (``kubeinfer_runtime.compile``), builds and signs the package
(``edge.package``), publishes it at ``<out>/<version>/<target>.tar.gz`` and
prints the report JSON (also written to ``KUBEINFER_REPORT_FILE`` when set).
Exit codes: 0, 2 (bad flags or input), 1 (failed; may pass on a retry).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse

from kubeinfer_runtime.contract import S3Settings
from kubeinfer_runtime.edge.errors import EdgeError

REPORT_FILE_ENV = "KUBEINFER_REPORT_FILE"
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

log = logging.getLogger("kubeinfer.edge")


def _uri(value: str) -> str:
    return value if value.startswith(("file://", "s3://")) else \
        Path(value).expanduser().resolve().as_uri()


def _s3_from_env() -> S3Settings:
    env = os.environ.get

    return S3Settings(
        endpoint_url=env("KUBEINFER_S3_ENDPOINT_URL") or env("AWS_ENDPOINT_URL_S3")
        or env("AWS_ENDPOINT_URL"),
        access_key=env("KUBEINFER_S3_ACCESS_KEY") or env("AWS_ACCESS_KEY_ID"),
        secret_key=env("KUBEINFER_S3_SECRET_KEY") or env("AWS_SECRET_ACCESS_KEY"),
        region=env("KUBEINFER_S3_REGION") or env("AWS_REGION") or env("AWS_DEFAULT_REGION"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubeinfer-runtime edge",
                                description="Edge fleets: packages, keys and the device agent")
    sub = p.add_subparsers(dest="command", required=True)

    pkg = sub.add_parser("package", help="build and sign one device target's package")
    pkg.add_argument("--fleet", required=True)
    pkg.add_argument("--version", required=True)
    pkg.add_argument("--target", required=True, help="the device target's name (e.g. rpi4)")
    pkg.add_argument("--model", required=True,
                     help="an .onnx model or a compiled artifact (folder or .tar.gz): a path, "
                          "file:// or s3:// URI")
    pkg.add_argument("--compile-target", metavar="CPU",
                     help="compile the ONNX model for this CPU target first (aarch64, "
                          "x86-64, native, ...: kubeinfer-runtime compile --help)")
    pkg.add_argument("--compile-arg", action="append", default=[], metavar="FLAG",
                     help="extra flag for the compiler (e.g. --compile-arg=--tune=30)")
    pkg.add_argument("--out", required=True,
                     help="prefix: writes <out>/<version>/<target>.tar.gz (path, file://, s3://)")
    pkg.add_argument("--signing-key-file",
                     help="base64 ed25519 private key (default: KUBEINFER_EDGE_SIGNING_KEY)")

    keygen = sub.add_parser("keygen", help="create a package signing key pair")
    keygen.add_argument("--out", required=True, type=Path,
                        help="folder for signing.key (0600) and signing.pub")

    agent = sub.add_parser("agent", help="run the device agent")
    agent.add_argument("--server", required=True, help="the fleet server's URL")
    agent.add_argument("--bootstrap-token",
                       default=os.environ.get("KUBEINFER_EDGE_BOOTSTRAP_TOKEN"),
                       help="registration token (default: KUBEINFER_EDGE_BOOTSTRAP_TOKEN); "
                            "needed only until the device has registered")
    agent.add_argument("--device-id", required=True)
    agent.add_argument("--target", required=True)
    agent.add_argument("--state-dir", required=True, type=Path)
    agent.add_argument("--labels", default="", help="k=v,k2=v2")
    agent.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT of the local API")
    agent.add_argument("--public-key", help="package public key, base64 or @file: pinned, "
                                            "wins over the server's")
    agent.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    return p


# -- package ------------------------------------------------------------------------------------


def _compile(model_uri: str, cpu: str, extra: list[str], work: Path) -> Path:
    """The artifact folder of ``model_uri`` compiled for ``cpu``, with the compile command's
    own flags and settings (so env such as KUBEINFER_TUNING_CACHE_DIR applies too)."""
    from pydantic import ValidationError as SettingsError

    from kubeinfer_runtime.compile import main as compile_main
    from kubeinfer_runtime.compile.errors import CompileError
    from kubeinfer_runtime.compile.pipeline import compile_model
    from kubeinfer_runtime.contract.compile import ARTIFACT_DIR, CompileSettings

    p = argparse.ArgumentParser(prog="edge package --compile-arg")
    compile_main.add_arguments(p)
    out = work / "compiled"
    args = p.parse_args([model_uri, "--target", cpu, "--out", str(out), *extra])
    try:
        settings = CompileSettings(**compile_main.overrides(args))
    except SettingsError as e:
        raise EdgeError(f"Invalid compile settings ({e.error_count()} problem(s)): "
                        f"{e.errors()[0]['msg']}") from None
    os.environ["TVM_NUM_THREADS"] = str(settings.threads)
    try:
        report = compile_model(settings)
    except CompileError as e:
        raise EdgeError(f"Compilation for {cpu} failed: {e.message}") from None
    print(f"Compiled for {cpu}: {report.chosen} ({report.reason})", file=sys.stderr)
    return out / ARTIFACT_DIR


def _model_path(uri: str, work: Path) -> Path:
    from kubeinfer_runtime.compile.bundle import is_tarball, unpack
    from kubeinfer_runtime.errors import RuntimeServiceError
    from kubeinfer_runtime.storage.fetch import fetch_model

    try:
        fetched = fetch_model(uri, base_dir="/", cache_dir=str(work / "download"),
                              s3=_s3_from_env())
    except RuntimeServiceError as e:
        raise EdgeError(f"Model {uri} cannot be read ({e.message}): fix --model") from None
    if fetched.path.is_file() and is_tarball(fetched.path):
        unpack(fetched.path, work / "unpacked")
        return work / "unpacked"
    return fetched.path


def _publish(local: Path, uri: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        dest = Path(parsed.netloc + parsed.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        shutil.copyfile(local, staged)
        staged.replace(dest)  # readers never see half a package
        return
    if parsed.scheme == "s3" and parsed.netloc:
        from kubeinfer_runtime.storage.fetch import s3_client

        try:
            s3_client(_s3_from_env()).fput_object(parsed.netloc, parsed.path.lstrip("/"),
                                                  str(local))
        except Exception as e:  # minio raises S3Error, urllib3 errors, OSError
            raise EdgeError(f"Cannot upload the package to {uri} ({type(e).__name__}): check "
                            "KUBEINFER_S3_* and the bucket") from None
        return
    raise EdgeError(f"Output {uri!r} must be a path, file:///abs/dir or s3://bucket/prefix")


def package(args: argparse.Namespace) -> int:
    from kubeinfer_runtime.edge import package as pkg
    from kubeinfer_runtime.edge import signing

    work = Path(tempfile.mkdtemp(prefix="kubeinfer-edge-package-"))
    try:
        key = signing.load_signing_key(args.signing_key_file)
        model_uri = _uri(args.model)
        model = (_compile(model_uri, args.compile_target, args.compile_arg, work)
                 if args.compile_target else _model_path(model_uri, work))
        report = pkg.build(model, fleet=args.fleet, version=args.version, target=args.target,
                           dest=work / "package.tar.gz", signing_key=key)
        dest_uri = f"{_uri(args.out).rstrip('/')}/{args.version}/{args.target}.tar.gz"
        _publish(work / "package.tar.gz", dest_uri)
        report = report.model_copy(update={"uri": dest_uri})
    except EdgeError as e:
        print(f"Packaging failed: {e.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"Packaging failed: {e.strerror} ({e.filename})", file=sys.stderr)
        return EXIT_FAILED
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report.model_dump_json(indent=2)
    print(text)
    if path := os.environ.get(REPORT_FILE_ENV):
        Path(path).write_text(text)
    return 0


def keygen(args: argparse.Namespace) -> int:
    from kubeinfer_runtime.edge import signing

    try:
        priv, pub = signing.write_key_pair(args.out, signing.generate())
    except FileExistsError:
        print(f"{args.out}/signing.key exists: keygen never overwrites a key; choose another "
              "--out", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"Wrote {priv} (private, 0600) and {pub} (public: the fleet's publicKey)")
    return 0


def agent(args: argparse.Namespace) -> int:
    from kubeinfer_runtime.edge.agent import AgentConfig, run_agent

    try:
        config = AgentConfig.from_args(args)
    except EdgeError as e:
        print(f"Invalid agent flags: {e.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run_agent(config)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "package":
        return package(args)
    if args.command == "keygen":
        return keygen(args)
    return agent(args)


if __name__ == "__main__":
    sys.exit(main())
