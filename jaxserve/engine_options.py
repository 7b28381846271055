"""The engine options that `jaxserve serve` and `python -m jaxserve.bench` both take.

(flag, type, help) rows; each command adds its own few. Pure data: no JAX import, so the command
lines stay light to parse.
"""

from __future__ import annotations

EngineOption = tuple[str, type, str]

SHARED_ENGINE_OPTIONS: tuple[EngineOption, ...] = (
    ("--page-size", int, "tokens per KV-cache page"),
    ("--num-pages", int, "KV-cache pages (default: sized from --kv-memory-fraction)"),
    ("--max-num-seqs", int, "most sequences in one batch"),
    ("--max-num-batched-tokens", int, "most tokens in one step"),
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
