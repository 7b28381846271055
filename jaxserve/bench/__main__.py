"""Command line of the benchmarks: `python -m jaxserve.bench MODE ...` and `jaxserve bench MODE ...`.

Owns the registration of the modes (`latency`, `throughput`, `serve`, and `kernels` when
`jaxserve.bench.kernels` is present) as subcommands, and running one: the mode's `run(args)`
returns its result dict, which is written to --json when given. Every mode module exposes
`add_parser(subparsers)` and `run(args) -> dict`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from jaxserve.bench import report

MODES = ("latency", "throughput", "serve")
OPTIONAL_MODES = ("kernels",)


DESCRIPTION = (
    "Benchmarks of jaxserve on this machine: latency (one fixed batch: TTFT, TPOT, MBU), "
    "throughput (all requests at once), serve (timed arrivals against a gRPC server)."
)

log = logging.getLogger(__name__)


def _modules() -> list[ModuleType]:
    modules = [importlib.import_module(f"jaxserve.bench.{m}") for m in MODES]
    for m in OPTIONAL_MODES:
        if importlib.util.find_spec(f"jaxserve.bench.{m}") is None:
            continue
        # A broken optional mode must not take the whole command line down with it.
        try:
            modules.append(importlib.import_module(f"jaxserve.bench.{m}"))
        except ImportError as e:
            log.warning("bench mode %r is unavailable: %s", m, e)
    return modules


def _runner(run: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[..., int]:
    def func(args: argparse.Namespace) -> int:
        result = run(args)
        path = getattr(args, "json", None)
        if path:
            print(f"wrote {report.write_json(path, result)}")
        return 0

    return func


def add_modes(parser: argparse.ArgumentParser) -> None:
    """One subcommand per mode on `parser`, each with `func(args) -> exit status`."""
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for module in _modules():
        module.add_parser(modes)
        name = module.__name__.rsplit(".", 1)[1]
        modes.choices[name].set_defaults(func=_runner(module.run))


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` (with the modes under it) on the `jaxserve` console script."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks: latency, throughput, serve", description=DESCRIPTION
    )
    add_modes(bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxserve.bench", description=DESCRIPTION)
    parser.add_argument("--log-level", default="WARNING")
    add_modes(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for the reproducible command line in the results
    logging.basicConfig(
        force=True,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxserve.bench {args.mode}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
