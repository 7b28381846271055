"""The `jaxserve` console script: one subcommand per job.

`convert` (weights → a jaxserve model directory), `run` (offline generation on this machine),
`serve` / `generate` / `chat` (the gRPC server and its clients), and `bench`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="generate offline on this machine (no server); the default model when none is given",
    )
    p.add_argument(
        "prompt", nargs="*", help="prompts (chat messages from the user); default: a demo"
    )
    p.add_argument(
        "--model", default=None, help="converted dir, HF dir or .gguf (default: SmolLM2)"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="no chat template: complete the text as is")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from jaxserve import SamplingParams
    from jaxserve.llm import LLM

    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea."]
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(8, len(prompts)))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.raw:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        print(f">>> {prompt}\n{out.outputs[0].text}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxserve import __version__
    from jaxserve.bench.__main__ import add_subcommand as add_bench
    from jaxserve.convert import add_subcommand as add_convert
    from serving.cli import add_subcommands as add_serving

    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jaxserve {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert(sub)
    _add_run(sub)
    add_serving(sub)
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        force=True,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"jaxserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
