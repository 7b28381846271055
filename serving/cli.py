"""The `serve`, `generate` and `chat` subcommands of the `jaxserve` command line.

`add_subcommands(subparsers)` registers them; each sets `func`, which takes the parsed arguments
and returns the process exit status. `serve` builds the engine with
`jaxserve.llm_engine.LLMEngine.from_cli_args(engine_args)`, where `engine_args` is a namespace of
`model` and the engine options below (None where not given: the engine's default applies), then
runs the gRPC server until signalled; with `--coordinator-address` it is one process of a
multi-host group, where process 0 serves and the others run its steps (`jaxserve.multihost`).
`generate` and `chat` stream from a running server to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import grpc

from jaxserve.engine_options import (
    ENGINE_SWITCHES,
    SHARED_ENGINE_OPTIONS,
    EngineOption,
    add_engine_switches,
)
from serving.client import Client
from serving.engine_loop import Engine

DEFAULT_TARGET = "127.0.0.1:50051"

# (flag, type, help) of the options handed to the engine factory as `engine_args`.
ENGINE_OPTIONS: tuple[EngineOption, ...] = (
    *SHARED_ENGINE_OPTIONS,
    ("--max-model-len", int, "context length (prompt + generated)"),
    ("--dtype", str, "weight and activation dtype, e.g. bfloat16"),
    ("--seed", int, "engine random seed"),
    (
        "--attention-backend",
        str,
        "auto (Mosaic GPU decode on Hopper, XLA prefill), reference, xla or mosaic",
    ),
)

EngineFactory = Callable[[argparse.Namespace], Engine]


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the gRPC server")
    serve.add_argument("model", nargs="?", default=None, help="model path or name")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 disables it"
    )
    serve.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="requests waiting for a batch slot before new ones get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGTERM/SIGINT",
    )
    serve.add_argument(
        "--no-background-compile",
        dest="background_compile",
        action="store_false",
        help="compile every step shape before SERVING (default: serve once the largest shapes "
        "are compiled and compile the others while serving)",
    )
    engine = serve.add_argument_group("engine")
    for flag, kind, text in ENGINE_OPTIONS:
        engine.add_argument(flag, type=kind, default=None, help=text)
    add_engine_switches(engine)
    hosts = serve.add_argument_group(
        "multi-host", "one model over the devices of several processes (docs/multi_host.md)"
    )
    hosts.add_argument(
        "--coordinator-address", default=None, help="host:port of process 0's coordinator"
    )
    hosts.add_argument("--num-processes", type=int, default=1, help="processes in the group")
    hosts.add_argument(
        "--process-id", type=int, default=0, help="this process (0 serves, the others follow)"
    )
    serve.set_defaults(func=run_serve)

    generate = subparsers.add_parser("generate", help="stream a completion from a server")
    generate.add_argument("prompt")
    _add_client_options(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="interactive multi-turn chat with a server")
    chat.add_argument("--system", default=None, help="system message")
    _add_client_options(chat)
    chat.set_defaults(func=run_chat)


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server host:port")
    parser.add_argument("--timeout", type=float, default=None, help="deadline per request (s)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--min-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--presence-penalty", type=float, default=None)
    parser.add_argument("--frequency-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def engine_args(args: argparse.Namespace) -> argparse.Namespace:
    """Only the engine's options, so the factory cannot come to depend on server flags."""
    names = [flag[2:].replace("-", "_") for flag, _, _ in ENGINE_OPTIONS]
    names += [dest for _, dest, _ in ENGINE_SWITCHES]
    return argparse.Namespace(model=args.model, **{name: getattr(args, name) for name in names})


def _default_engine_factory(options: argparse.Namespace) -> Engine:
    from jaxserve.llm_engine import LLMEngine

    return LLMEngine.from_cli_args(options)


def run_serve(args: argparse.Namespace, engine_factory: EngineFactory | None = None) -> int:
    from serving.server import serve

    logging.basicConfig(
        force=True, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    factory = engine_factory if engine_factory is not None else _default_engine_factory
    if args.coordinator_address is not None:
        from jaxserve import multihost

        # Before the engine exists: the process group decides which devices there are.
        multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    engine = factory(engine_args(args))

    def run() -> int:
        return serve(
            engine,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port or None,
            max_queued_requests=args.max_queued_requests,
            grace_period=args.grace_period,
            background_compile=args.background_compile,
        )

    if args.coordinator_address is not None:
        return multihost.run(engine, run)
    return run()


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
    )
    return {name: getattr(args, name) for name in names}


def _stream(client: Client, out: TextIO, timeout: float | None, **request: Any) -> str:
    """Writes sample 0's text as it arrives; returns all of it."""
    parts = []
    for response in client.generate(timeout=timeout, **request):
        for choice in response.choices:
            if choice.index == 0 and choice.text:
                out.write(choice.text)
                out.flush()
                parts.append(choice.text)
    out.write("\n")
    out.flush()
    return "".join(parts)


def _report(error: grpc.RpcError) -> int:
    print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1


def run_generate(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        try:
            _stream(client, sys.stdout, args.timeout, prompt=args.prompt, **_sampling(args))
        except grpc.RpcError as e:
            return _report(e)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """Reads one user turn per line until end of input; the whole history goes with each turn."""
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    with Client(args.target) as client:
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            text = line.rstrip("\n")
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            try:
                reply = _stream(
                    client, sys.stdout, args.timeout, messages=history, **_sampling(args)
                )
            except grpc.RpcError as e:
                history.pop()
                _report(e)
                continue
            history.append({"role": "assistant", "content": reply})
