"""Start the real BentoML server on a bundle.

    python -m serving --bundle runs/kuairand/bundle --port 3000 [--config configs/kuairand.yaml]
    python -m serving --bundle models:/feedstack@production --host 0.0.0.0 --port 3000

The bundle, config and admin token reach the ``bentoml serve`` workers through environment variables
(FEEDSTACK_BUNDLE, FEEDSTACK_SERVING_CONFIG, FEEDSTACK_ADMIN_TOKEN). The bundle is verified here first, so
a bad one fails fast with its reason instead of a server that never becomes ready.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from serving.config import (
    DEFAULT_BUNDLE, DEFAULT_STATE_DIR, ENV_ADMIN_TOKEN, ENV_BUNDLE, ENV_BUNDLE_ROOT, ENV_CONFIG, ENV_OVERRIDES,
    ENV_STATE_DIR, ServeSettings, load_settings,
)

LOCAL_REGISTRY = Path("runs") / "mlflow.db"  # where `make main` / `python -m training fit` register


def port_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on (e.g. already in use), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot resolve host {host}: {e}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e} (is another server running there?)"
    return None


def tracking_env(env: dict[str, str], bundle: str, tracking_uri: str | None) -> None:
    """A models:/ bundle with no tracking URI anywhere: use the local registry training wrote, if any."""
    if not bundle.startswith("models:/") or tracking_uri or env.get("MLFLOW_TRACKING_URI"):
        return
    repo = Path(__file__).resolve().parents[1]
    for db in (Path.cwd() / LOCAL_REGISTRY, repo / LOCAL_REGISTRY):
        if db.is_file():
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db.resolve()}"
            return


def build_command(host: str, port: int) -> list[str]:
    exe = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    base = [exe] if exe else [sys.executable, "-m", "bentoml"]
    return [*base, "serve", "serving.service:Feedstack", "--host", host, "--port", str(port)]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serving", description="serve a feedstack bundle over HTTP (BentoML)")
    ap.add_argument("--bundle", default=os.environ.get(ENV_BUNDLE, DEFAULT_BUNDLE),
                    help="bundle directory or models:/<name>@<alias> (default: %(default)s)")
    ap.add_argument("--config", default=None, help="YAML with serving: / policy: sections (default: the bundle's recipe)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a serving: / policy: value, e.g. --set serving.candidates=300 (repeatable)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=None, help="BentoML worker processes (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="request threads per worker (default 1)")
    ap.add_argument("--admin-token", default=None, help=f"admin token (prefer the {ENV_ADMIN_TOKEN} variable)")
    ap.add_argument("--no-check", action="store_true", help="skip the checksum verification before starting")
    ap.add_argument("--state-dir", default=os.environ.get(ENV_STATE_DIR, str(DEFAULT_STATE_DIR)),
                    help="admin state (blocklist) shared by the workers and kept across restarts (default: %(default)s)")
    ap.add_argument("--bundle-root", default=os.environ.get(ENV_BUNDLE_ROOT),
                    help="directory /admin/reload may load bundles from (default: the bundle's parent directory)")
    return ap


def state_dir_error(state: Path) -> str | None:
    """Why the workers could not keep admin state in ``state`` (created if missing), or None."""
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"state dir {state} is not writable: {e.strerror or e} (set --state-dir or {ENV_STATE_DIR})"
    return None


def preflight(args: argparse.Namespace) -> tuple[ServeSettings | None, str | None]:
    """Everything that can fail before any worker starts, as (settings, None) or (None, one-line error)."""
    if args.config and not Path(args.config).is_file():
        return None, f"config file not found: {args.config}"
    from features.config import ConfigError

    try:  # fail here, with the key named, rather than in every worker
        settings = load_settings(args.config, None, args.overrides)
    except ConfigError as e:
        return None, str(e)
    error = port_error(args.host, args.port) or state_dir_error(Path(args.state_dir).resolve())
    if error is None and not args.no_check and not args.bundle.startswith("models:/"):
        from features.bundle import BundleError, verify_bundle

        try:
            verify_bundle(args.bundle)
        except BundleError as e:
            error = str(e)
    return (None, error) if error else (settings, None)


def server_env(args: argparse.Namespace, settings: ServeSettings, repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The server runs from the repository root: paths are made absolute against the caller's directory.
    env[ENV_BUNDLE] = args.bundle if args.bundle.startswith("models:/") else str(Path(args.bundle).resolve())
    env[ENV_STATE_DIR] = str(Path(args.state_dir).resolve())
    if args.bundle_root:
        env[ENV_BUNDLE_ROOT] = str(Path(args.bundle_root).resolve())
    tracking_env(env, args.bundle, settings.serving.tracking_uri)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if args.config:
        env[ENV_CONFIG] = str(Path(args.config).resolve())
    if args.overrides:
        env[ENV_OVERRIDES] = json.dumps(args.overrides)
    if args.admin_token:
        env[ENV_ADMIN_TOKEN] = args.admin_token
    if args.workers:
        env["FEEDSTACK_WORKERS"] = str(args.workers)
    if args.threads:
        env["FEEDSTACK_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    return env


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings, error = preflight(args)
    if settings is None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(build_command(args.host, args.port), env=server_env(args, settings, repo), cwd=str(repo))

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
