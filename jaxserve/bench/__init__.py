"""Benchmarks: `python -m jaxserve.bench {latency,throughput,serve}` (also `jaxserve bench ...`).

This package module owns what the modes share: the model-selection, engine, workload and output
options; building an `LLMEngine` from them (a converted / Hugging Face / GGUF model, the embedded
default model, or random weights of a named shape from `jaxserve.bench.shapes`); the request-length
distributions; and seeded random prompts. It imports no JAX: the console script imports it on every
start, and the `serve` mode must never initialise a device in the client process.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxserve.bench import shapes
from jaxserve.engine_options import (
    ENGINE_SWITCHES,
    SHARED_ENGINE_OPTIONS,
    EngineOption,
    add_engine_switches,
)

if TYPE_CHECKING:
    from jaxserve.llm_engine import LLMEngine

DTYPES = ("bfloat16", "float16", "float32")
ATTENTION_BACKENDS = ("auto", "reference", "xla", "mosaic")

# (flag, type, help) of the engine options; None (the default) keeps the engine's own default.
ENGINE_OPTIONS: tuple[EngineOption, ...] = (
    *SHARED_ENGINE_OPTIONS,
    ("--max-model-len", int, "context length, prompt + output (default: what the run needs)"),
)

# Engine defaults when a random-weight model is built here; `LLMEngine.from_pretrained` applies
# the same ones to a loaded model.
_DEFAULT_MAX_MODEL_LEN = 4096

# Lognormal length distributions of the synthetic ShareGPT-like workload: a median and a log-space
# sigma per side. They give means of about 200 prompt and 210 output tokens with long right tails,
# close to the commonly quoted ShareGPT statistics under Llama tokenizers.
SHAREGPT_SYNTHETIC = {
    "input_median": 120.0,
    "input_sigma": 1.0,
    "output_median": 150.0,
    "output_sigma": 0.8,
    "min_len": 4,
}


# ---- options ------------------------------------------------------------------------------------
def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        help="converted dir, Hugging Face dir or .gguf (default: the embedded SmolLM2-135M)",
    )
    src.add_argument(
        "--random-weights",
        metavar="SHAPE",
        default=None,
        choices=shapes.names(),
        help=f"random weights of a published shape, no tokenizer: {', '.join(shapes.names())}",
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weight and activation dtype (default: bfloat16 on accelerators, float32 on CPU)",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, prompts and arrivals")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    for flag, kind, text in ENGINE_OPTIONS:
        g.add_argument(flag, type=kind, default=None, help=text)
    g.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS)
    add_engine_switches(g)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure here")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature (default greedy: the engine warm-up compiles the greedy "
        "sampler for every batch size, other settings compile theirs during the run)",
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_engine_args(parser)
    add_sampling_args(parser)
    add_output_args(parser)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=1000)
    g.add_argument(
        "--dataset",
        default="random",
        choices=("random", "sharegpt-synthetic"),
        help="random: fixed lengths or uniform ranges; sharegpt-synthetic: lognormal lengths",
    )
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens (fixed)")
    g.add_argument("--output-len", type=int, default=128, help="output tokens (fixed)")
    g.add_argument("--input-len-range", type=parse_range, default=None, metavar="A:B")
    g.add_argument("--output-len-range", type=parse_range, default=None, metavar="A:B")
    g.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="the same N random tokens before every prompt (a shared system prompt): shows "
        "prefix caching; compare with --no-prefix-caching",
    )


def parse_range(text: str) -> tuple[int, int]:
    """'A:B' → (A, B), inclusive, 1 <= A <= B."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B with integers, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= A <= B, got {text!r}")
    return a, b


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")


# ---- workload -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Per-request prompt and output lengths, and how they were drawn."""

    input_lens: list[int]
    output_lens: list[int]
    distribution: str  # "fixed", "uniform" (either side a range) or "sharegpt-synthetic"
    params: dict[str, Any]

    def __len__(self) -> int:
        return len(self.input_lens)


def workload_model_len(args: argparse.Namespace) -> int:
    """The longest prompt + output the workload options ask for (0: no fixed requirement)."""
    if args.dataset == "sharegpt-synthetic":
        return 0
    i = args.input_len_range[1] if args.input_len_range else args.input_len
    o = args.output_len_range[1] if args.output_len_range else args.output_len
    return getattr(args, "shared_prefix_len", 0) + i + o


def sample_workload(
    args: argparse.Namespace, num_requests: int, rng: np.random.Generator, max_model_len: int
) -> Workload:
    """Draw `num_requests` (prompt, output) lengths; synthetic ones are clipped to fit."""
    n = num_requests
    if args.dataset == "sharegpt-synthetic":
        p = SHAREGPT_SYNTHETIC
        lo = int(p["min_len"])
        if max_model_len < 2 * lo:
            raise ValueError(f"max_model_len: {max_model_len} is too short for sharegpt-synthetic")
        inp = rng.lognormal(math.log(p["input_median"]), p["input_sigma"], n)
        out = rng.lognormal(math.log(p["output_median"]), p["output_sigma"], n)
        # Clip the prompt first (leaving room for the shortest output), then the output to what
        # the context has left.
        inp = np.clip(np.rint(inp), lo, max_model_len - lo).astype(int)
        out = np.clip(np.rint(out), lo, max_model_len - inp).astype(int)
        return Workload(inp.tolist(), out.tolist(), "sharegpt-synthetic", dict(p))
    check_positive(input_len=args.input_len, output_len=args.output_len)

    def side(fixed: int, rng_range: tuple[int, int] | None) -> list[int]:
        if rng_range is None:
            return [fixed] * n
        return rng.integers(rng_range[0], rng_range[1], endpoint=True, size=n).tolist()

    inp_l = side(args.input_len, args.input_len_range)
    out_l = side(args.output_len, args.output_len_range)
    longest = max(i + o for i, o in zip(inp_l, out_l, strict=True)) if n else 0
    if longest > max_model_len:
        raise ValueError(
            f"max_model_len: a request needs {longest} tokens (prompt + output), the engine "
            f"allows {max_model_len}; raise --max-model-len or shorten the lengths"
        )
    ranged = args.input_len_range is not None or args.output_len_range is not None
    params = {
        "input_len": list(args.input_len_range) if args.input_len_range else args.input_len,
        "output_len": list(args.output_len_range) if args.output_len_range else args.output_len,
    }
    return Workload(inp_l, out_l, "uniform" if ranged else "fixed", params)


def random_prompt(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    """`length` token ids drawn uniformly from the vocabulary."""
    return rng.integers(0, vocab_size, size=length).tolist()


# ---- the engine ---------------------------------------------------------------------------------
def model_label(args: argparse.Namespace) -> str:
    if args.random_weights:
        return f"random:{args.random_weights}"
    return args.model or "default"


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def num_model_devices(args: argparse.Namespace) -> int:
    """How many devices the model is spread over (tensor x expert parallel)."""
    return (args.tensor_parallel_size or 1) * (args.expert_parallel_size or 1)


def build_engine(args: argparse.Namespace, *, min_model_len: int = 0) -> LLMEngine:
    """The engine the options describe. `min_model_len`: what the run needs when the user gave no
    --max-model-len (a random-weight model's default context grows to it)."""
    from jaxserve.llm_engine import LLMEngine

    options = {_dest(flag): getattr(args, _dest(flag)) for flag, _, _ in ENGINE_OPTIONS}
    options["attention_backend"] = args.attention_backend
    for _, dest, _ in ENGINE_SWITCHES:
        options[dest] = getattr(args, dest)
    given = {k: v for k, v in options.items() if v is not None}
    if not args.random_weights:
        llm = LLMEngine.from_pretrained(args.model, dtype=args.dtype, seed=args.seed, **given)
        if llm.max_model_len < min_model_len:
            raise ValueError(
                f"max_model_len: the run needs {min_model_len} tokens per request, the engine "
                f"allows {llm.max_model_len}"
            )
        return llm

    from jaxserve import compile_cache
    from jaxserve.checkpoint import random_model
    from jaxserve.engine import EngineConfig
    from jaxserve.llm_engine import resolve_dtype

    cfg = shapes.model_config(args.random_weights)
    if "max_model_len" not in given:
        want = max(min(_DEFAULT_MAX_MODEL_LEN, cfg.max_position_embeddings), min_model_len)
        given["max_model_len"] = want
    if given["max_model_len"] > cfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len: {given['max_model_len']} exceeds the {args.random_weights} shape's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    max_num_seqs = given.get("max_num_seqs", defaults["max_num_seqs"])
    batched = given.get("max_num_batched_tokens", defaults["max_num_batched_tokens"])
    # As `from_pretrained` does: a step must hold one decode token of every running sequence.
    given["max_num_batched_tokens"] = max(batched, max_num_seqs)
    dtype = resolve_dtype(args.dtype)
    tp = given.pop("tensor_parallel_size", 1)
    ep = given.pop("expert_parallel_size", 1)
    mesh, shardings = None, None
    if tp * ep > 1:
        import models
        from jaxserve import sharding

        # As `from_pretrained` does: each device initialises only its own shards.
        mesh = sharding.make_mesh(tp, ep)
        shardings = models.param_shardings(cfg, dtype, mesh)
    compile_cache.enable(compile_cache.default_directory())  # the weights' init compiles too
    model = random_model(cfg, dtype, seed=args.seed, shardings=shardings)
    return LLMEngine(
        model, None, EngineConfig(**given), model_name=model_label(args), seed=args.seed, mesh=mesh
    )


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The model and engine options of `args` as command-line arguments (for a child process)."""
    argv: list[str] = []
    if args.model:
        argv += ["--model", args.model]
    if args.random_weights:
        argv += ["--random-weights", args.random_weights]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    argv += ["--seed", str(args.seed)]
    for flag, _, _ in ENGINE_OPTIONS:
        value = getattr(args, _dest(flag))
        if value is not None:
            argv += [flag, str(value)]
    if args.attention_backend:
        argv += ["--attention-backend", args.attention_backend]
    argv += [flag for flag, dest, _ in ENGINE_SWITCHES if getattr(args, dest) is False]
    return argv
