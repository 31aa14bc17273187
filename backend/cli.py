"""The ``dpal`` command. Subcommands import their heavy modules lazily so ``dpal --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return register


@_command("tiny-model")
def _tiny_model(args: argparse.Namespace) -> int:
    from dpal_core.tiny import build_tiny_clip

    path, seconds = build_tiny_clip(args.dir, seed=args.seed)
    print(f"wrote a tiny random CLIP to {path} in {seconds:.2f}s (for tests and demos; it knows nothing)")
    return 0


def _settings():
    from backend.settings import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"dpal: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@_command("serve")
def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backend.app import create_app

    settings = _settings()
    queue = "RQ on REDIS_URL" if settings.redis_url else "embedded in-process queue (no REDIS_URL)"
    logging.getLogger("dpal").info(
        "DPAL backend on http://%s:%d (model %s, training: %s). In Label Studio: Project -> Settings -> "
        "Model -> Connect Model, URL http://<this host>:%d",
        args.host,
        args.port,
        settings.model,
        queue,
        args.port,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level.lower())
    return 0


@_command("worker")
def _worker(args: argparse.Namespace) -> int:
    from backend.worker import run_worker

    return run_worker(_settings(), burst=args.burst)


@_command("status")
def _status(args: argparse.Namespace) -> int:
    from backend.status import format_status

    print(format_status(args.project, _settings()))
    return 0


@_command("bench")
def _bench(args: argparse.Namespace) -> int:
    from dpal_core.bench.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpal", description="Dual-prompt CLIP active learning for Label Studio."
    )
    parser.add_argument("--log-level", default=None, help="override LOG_LEVEL (DEBUG, INFO, WARNING...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny-model", help="write a small random CLIP (offline) for tests and demos")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("serve", help="start the Label Studio ML backend (settings from the environment)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9090, help="port (default 9090, like other ML backends)")

    p = sub.add_parser("worker", help="run an RQ worker for retraining jobs (needs REDIS_URL)")
    p.add_argument("--burst", action="store_true", help="drain the queue, then exit")

    p = sub.add_parser("status", help="current model version, its metrics and any running job")
    p.add_argument("project", help="Label Studio project id")

    from dpal_core.bench.cli import add_arguments as add_bench_arguments  # argparse only: cheap

    p = sub.add_parser("bench", help="active-learning benchmark of the selection strategies (offline)")
    add_bench_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    # LOG_LEVEL is validated with the other settings; here it only sets up logging early.
    logging.basicConfig(
        level=(args.log_level or os.environ.get("LOG_LEVEL") or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: one line per Label Studio page or image would drown ours.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
