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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpal", description="Dual-prompt CLIP active learning for Label Studio."
    )
    parser.add_argument("--log-level", default=None, help="override LOG_LEVEL (DEBUG, INFO, WARNING...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny-model", help="write a small random CLIP (offline) for tests and demos")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
