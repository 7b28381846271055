"""The engine options that `jaxserve serve` and `python -m jaxserve.bench` both take.

(flag, type, help) rows and the on-by-default features' `--no-...` switches; each command adds its
own few. No JAX import, so the command lines stay light to parse.
"""

from __future__ import annotations

import argparse

EngineOption = tuple[str, type, str]

SHARED_ENGINE_OPTIONS: tuple[EngineOption, ...] = (
    ("--page-size", int, "tokens per KV-cache page"),
    ("--num-pages", int, "KV-cache pages (default: sized from --kv-memory-fraction)"),
    ("--max-num-seqs", int, "most sequences in one batch"),
    ("--max-num-batched-tokens", int, "most tokens in one step"),
    ("--max-prefill-seqs", int, "most sequences with prompt tokens in one step (default: 32)"),
    ("--kv-memory-fraction", float, "fraction of free device memory for the KV cache"),
    (
        "--decode-steps",
        int,
        "decode iterations per device call while every sequence decodes (1: off; default: 8 "
        "with a kernel attention backend, 1 on CPU)",
    ),
    ("--tensor-parallel-size", int, "devices that split each layer's heads, MLP and vocabulary"),
    ("--expert-parallel-size", int, "devices that split MoE experts (times the tensor size)"),
)

# (flag, EngineConfig field it turns off, help): features on by default.
ENGINE_SWITCHES: tuple[tuple[str, str, str], ...] = (
    (
        "--no-prefix-caching",
        "enable_prefix_caching",
        "recompute every prompt instead of reusing cached K/V of shared prefixes",
    ),
    (
        "--no-async-scheduling",
        "async_scheduling",
        "read each multi-step run back before planning the next (default: plan and dispatch "
        "the next run while one computes)",
    ),
)


def add_engine_switches(group: argparse._ArgumentGroup) -> None:
    """The `ENGINE_SWITCHES`; each leaves its field None unless given (then False)."""
    for flag, dest, text in ENGINE_SWITCHES:
        group.add_argument(
            flag, dest=dest, action="store_const", const=False, default=None, help=text
        )
