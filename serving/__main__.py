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
import subprocess
import sys
from pathlib import Path

from serving.config import (
    DEFAULT_BUNDLE, ENV_ADMIN_TOKEN, ENV_BUNDLE, ENV_CONFIG, ENV_OVERRIDES, ENV_STATE_DIR, load_settings,
)


def build_command(host: str, port: int) -> list[str]:
    exe = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    base = [exe] if exe else [sys.executable, "-m", "bentoml"]
    return [*base, "serve", "serving.service:Feedstack", "--host", host, "--port", str(port)]


def main(argv: list[str] | None = None) -> int:
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
    args = ap.parse_args(argv)

    if args.config and not Path(args.config).is_file():
        print(f"error: config file not found: {args.config}", file=sys.stderr)
        return 2
    from features.config import ConfigError

    try:  # fail here, with the key named, rather than in every worker
        load_settings(args.config, None, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_check and not args.bundle.startswith("models:/"):
        from features.bundle import BundleError, verify_bundle

        try:
            verify_bundle(args.bundle)
        except BundleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    env = dict(os.environ)
    env[ENV_BUNDLE] = args.bundle
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if args.config:
        env[ENV_CONFIG] = str(Path(args.config).resolve())
    if args.overrides:
        env[ENV_OVERRIDES] = json.dumps(args.overrides)
    if args.admin_token:
        env[ENV_ADMIN_TOKEN] = args.admin_token
    if args.workers:
        env["FEEDSTACK_WORKERS"] = str(args.workers)
    if ENV_STATE_DIR not in env:  # shared by the workers: an admin block must reach all of them
        import tempfile

        env[ENV_STATE_DIR] = tempfile.mkdtemp(prefix="feedstack-state-")
    if args.threads:
        env["FEEDSTACK_THREADS"] = str(args.threads)
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(build_command(args.host, args.port), env=env, cwd=str(repo))

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
