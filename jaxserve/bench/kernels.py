"""`python -m jaxserve.bench kernels`: the attention kernels against their XLA / cuDNN peers.

Owns the kernel sweep: paged decode (Mosaic GPU kernel vs the jitted pure-JAX reference, an XLA
gather + einsum) and causal prefill (Mosaic GPU kernel over a paged cache vs cuDNN over contiguous
K/V), each checked against its peer before it is timed. Kernel time is CUPTI time of every kernel
an op launches (`jax.experimental.mosaic.gpu.profiler.measure`), median of several runs; inputs
smaller than ~256 MB are rotated through disjoint copies so the 50 MB L2 does not serve them.
Figures are also given as a fraction of ceilings measured in the same run (HBM copy bandwidth,
bf16 matmul rate). Touches nothing outside the kernels it times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _mosaic_decode, _mosaic_prefill, paged_attention

ROTATE_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    batch: int
    ctx: int  # every sequence's length, or the longest when ragged
    page: int = 16
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ragged: bool = False  # lengths uniform in [ctx / 8, ctx]
    kv_dtype: str = ""  # an 8-bit cache (int8, float8_e4m3fn), with scales; else the query's


@dataclasses.dataclass(frozen=True)
class PrefillCase:
    batch: int
    chunk: int  # new tokens per sequence
    prefix: int = 0  # cached tokens per sequence before the chunk
    page: int = 16
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128


QUICK_DECODE = [DecodeCase(32, 4096)]
QUICK_PREFILL = [PrefillCase(4, 4096)]
DECODE_SWEEP = [
    DecodeCase(1, 1024),
    DecodeCase(1, 32768),
    DecodeCase(8, 16384, page=64),
    DecodeCase(32, 4096),
    DecodeCase(32, 4096, page=64),
    DecodeCase(32, 4096, page=128),
    DecodeCase(32, 4096, head_dim=64),
    DecodeCase(64, 8192),
    DecodeCase(128, 1024),
    DecodeCase(256, 128),
    DecodeCase(256, 1024),
    DecodeCase(256, 4096),
    DecodeCase(32, 8192, ragged=True),
    DecodeCase(128, 2048, ragged=True),
    DecodeCase(8, 32768, ragged=True),
    DecodeCase(32, 4096, kv_dtype="int8"),
    DecodeCase(32, 4096, kv_dtype="float8_e4m3fn"),
]
PREFILL_SWEEP = [
    PrefillCase(16, 1024),
    PrefillCase(4, 4096),
    PrefillCase(4, 4096, page=64),
    PrefillCase(4, 4096, head_dim=64),
    PrefillCase(1, 16384),
    PrefillCase(8, 512, prefix=4096),
    PrefillCase(4, 2048, prefix=2048),
]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("kernels", help="attention kernels vs XLA / cuDNN (Hopper GPU)")
    p.add_argument("--kind", choices=("decode", "prefill", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="only the headline shapes")
    p.add_argument("--iters", type=int, default=7, help="timed runs per shape (median)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    return p


def _timed(fn: Callable[..., Any], args: tuple, iters: int) -> tuple[Any, float, dict[str, float]]:
    """(outputs, median ms of all kernels of one call of fn, median ms per kernel name)."""
    from jax.experimental.mosaic.gpu import profiler

    out, runs = profiler.measure(jax.jit(fn), aggregate=False, iterations=iters)(*args)
    totals = (
        [sum(ms for _, ms in run) for run in runs] if iters > 1 else [sum(ms for _, ms in runs)]
    )
    per_kernel: dict[str, list[float]] = {}
    for run in runs if iters > 1 else [runs]:
        for name, ms in run:
            per_kernel.setdefault(name, []).append(ms)
    return out, statistics.median(totals), {k: statistics.median(v) for k, v in per_kernel.items()}


def measure_ceilings(iters: int) -> dict[str, float]:
    """HBM bandwidth (a 2 GiB elementwise pass, bytes read + written) and bf16 matmul rate."""
    x = jax.random.normal(jax.random.key(0), (2**30,), jnp.bfloat16)
    _, ms, _ = _timed(lambda a: a * 1.5 + 0.25, (x,), iters)
    copy_tbs = 2 * x.nbytes / (ms * 1e-3) / 1e12
    del x
    n = 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    _, ms, _ = _timed(lambda a, b: a @ b, (a, b), iters)
    return {"hbm_tb_s": copy_tbs, "matmul_bf16_tflop_s": 2 * n**3 / (ms * 1e-3) / 1e12}


def _rel_err(x: jax.Array, ref: jax.Array) -> float:
    x32, r32 = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    if not np.all(np.isfinite(x32)):
        return math.inf
    return float(np.linalg.norm(x32 - r32) / max(np.linalg.norm(r32), 1e-30))


def _decode_inputs(c: DecodeCase, dtype: jnp.dtype, key: jax.Array) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    if c.ragged:
        lens = rng.integers(max(1, c.ctx // 8), c.ctx + 1, c.batch)
    else:
        lens = np.full(c.batch, c.ctx)
    pages = -(-lens // c.page)
    touched = int(pages.sum()) * c.page
    kv_dtype = jnp.dtype(c.kv_dtype or dtype)
    kv_bytes = touched * c.kv_heads * c.head_dim * 2 * kv_dtype.itemsize
    rotations = max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes)))
    p = int(pages.max())
    num_pages = 1 + rotations * int(pages.sum())
    order = 1 + rng.permutation(num_pages - 1)
    tables = np.zeros((rotations, c.batch, p), np.int32)
    nxt = 0
    for r in range(rotations):
        for b in range(c.batch):
            tables[r, b, : pages[b]] = order[nxt : nxt + pages[b]]
            nxt += pages[b]
    kq, kk, kv = jax.random.split(key, 3)
    shape = (c.kv_heads, num_pages, c.page, c.head_dim)
    # An 8-bit cache holds value / scale: int8 spreads N(0, 1) over +-64, fp8 keeps it.
    unit = 16.0 if kv_dtype == jnp.int8 else 1.0
    scales = jnp.full((c.kv_heads,), 1.0 / unit, jnp.float32)

    def cache(k: jax.Array) -> jax.Array:
        x = jax.random.normal(k, shape, jnp.float32) * unit
        return (jnp.round(x) if kv_dtype == jnp.int8 else x).astype(kv_dtype)

    return {
        "q": jax.random.normal(kq, (c.batch, c.q_heads, c.head_dim), dtype),
        "k": cache(kk),
        "v": cache(kv),
        "tables": [jnp.asarray(t) for t in tables],
        "lens": jnp.asarray(lens, jnp.int32),
        "kv_bytes": kv_bytes,
        "scales": dict(k_scale=scales, v_scale=scales) if kv_dtype.itemsize == 1 else {},
    }


def bench_decode(c: DecodeCase, dtype: jnp.dtype, iters: int, ceil: dict[str, float]) -> dict:
    x = _decode_inputs(c, dtype, jax.random.key(c.batch * 7919 + c.ctx))
    scale = c.head_dim**-0.5
    rot = len(x["tables"])

    def many(attn: Callable[..., jax.Array]) -> Callable[..., tuple]:
        # One call per rotation of the block tables: each reads its own copy of the pages.
        return lambda q, k, v, lens, *tables: tuple(attn(q, k, v, t, lens) for t in tables)

    sc = x["scales"]
    mosaic = many(
        lambda q, k, v, t, n: _mosaic_decode.paged_decode(q, k, v, t, n, scale=scale, **sc)
    )
    reference = many(
        lambda q, k, v, t, n: paged_attention.paged_attention_reference(
            q, k, v, t, n, scale=scale, **sc
        )
    )
    args = (x["q"], x["k"], x["v"], x["lens"], *x["tables"])
    out, ms, per_kernel = _timed(mosaic, args, iters)
    row: dict[str, Any] = {
        "kind": "decode",
        **dataclasses.asdict(c),
        "dtype": jnp.dtype(dtype).name,
        "kv_bytes": x["kv_bytes"],
        "rotations": rot,
        "mosaic_us": 1e3 * ms / rot,
        "mosaic_kernels_us": {k: 1e3 * v / rot for k, v in per_kernel.items()},
        "splits": _mosaic_decode.choose_config(
            c.batch,
            c.kv_heads,
            x["tables"][0].shape[1],
            c.page,
            c.head_dim,
            _mosaic_decode.num_sms(),
            write=False,
            kv_itemsize=jnp.dtype(x["k"].dtype).itemsize,
        ).num_splits,
    }
    row["mosaic_tb_s"] = x["kv_bytes"] / (row["mosaic_us"] * 1e-6) / 1e12
    row["mosaic_frac_hbm"] = row["mosaic_tb_s"] / ceil["hbm_tb_s"]
    # The reference materializes the gathered cache in float32: skip it where that cannot fit.
    gathered = c.batch * x["tables"][0].shape[1] * c.page * c.kv_heads * c.head_dim * 4 * 2
    if gathered <= 8 * 2**30:
        ref, ref_ms, _ = _timed(reference, args, iters)
        row["reference_us"] = 1e3 * ref_ms / rot
        row["reference_tb_s"] = x["kv_bytes"] / (row["reference_us"] * 1e-6) / 1e12
        row["rel_err"] = max(_rel_err(o, r) for o, r in zip(out, ref, strict=True))
    return row


def prefill_inputs(c: PrefillCase, dtype: jnp.dtype, key: jax.Array) -> dict[str, Any]:
    """Random fresh or chunked prompts of a case: packed queries, a paged cache in random page
    order with its block tables, lengths and cu_q_lens, and the contiguous K/V cuDNN takes."""
    total = c.prefix + c.chunk
    per_seq = -(-total // c.page)
    num_pages = 1 + c.batch * per_seq
    kq, kk, kv, kp = jax.random.split(key, 4)
    k = jax.random.normal(kk, (c.batch, per_seq * c.page, c.kv_heads, c.head_dim), dtype)
    v = jax.random.normal(kv, (c.batch, per_seq * c.page, c.kv_heads, c.head_dim), dtype)
    order = 1 + jax.random.permutation(kp, num_pages - 1)

    def paged(x: jax.Array) -> jax.Array:
        blocks = x.reshape(c.batch * per_seq, c.page, c.kv_heads, c.head_dim).transpose(2, 0, 1, 3)
        empty = jnp.zeros((c.kv_heads, num_pages, c.page, c.head_dim), dtype)
        return empty.at[:, order].set(blocks)

    return {
        "q": jax.random.normal(kq, (c.batch * c.chunk, c.q_heads, c.head_dim), dtype),
        "k": k[:, :total],
        "v": v[:, :total],
        "k_pages": paged(k),
        "v_pages": paged(v),
        "tables": order.reshape(c.batch, per_seq).astype(jnp.int32),
        "lens": jnp.full((c.batch,), total, jnp.int32),
        "cu": jnp.arange(c.batch + 1, dtype=jnp.int32) * c.chunk,
    }


def paged_prefill_args(x: dict[str, Any]) -> tuple[jax.Array, ...]:
    """The kernel's positional arguments (q, K/V pages, tables, lengths, cu_q_lens) from
    `prefill_inputs`."""
    return tuple(x[k] for k in ("q", "k_pages", "v_pages", "tables", "lens", "cu"))


def bench_prefill(c: PrefillCase, dtype: jnp.dtype, iters: int, ceil: dict[str, float]) -> dict:
    x = prefill_inputs(c, dtype, jax.random.key(c.batch * 31 + c.chunk))
    scale = c.head_dim**-0.5
    flops = 4 * c.batch * c.q_heads * c.head_dim * (c.chunk * c.prefix + c.chunk**2 / 2)

    def mosaic(q, kp, vp, t, n, cu):
        return _mosaic_prefill.paged_prefill(q, kp, vp, t, n, cu, scale=scale)

    args = paged_prefill_args(x)
    out, ms, per_kernel = _timed(mosaic, args, iters)
    kernels_us = {k: 1e3 * v for k, v in per_kernel.items()}
    row: dict[str, Any] = {
        "kind": "prefill",
        **dataclasses.asdict(c),
        "dtype": jnp.dtype(dtype).name,
        "flops": flops,
        "mosaic_us": 1e3 * ms,
        "mosaic_kernels_us": kernels_us,
        "mosaic_tflop_s": flops / (ms * 1e-3) / 1e12,
    }
    # The Pallas kernel alone, without the small XLA ops building its work list (which the
    # engine builds once per step for every layer: XLA merges the identical ops).
    kernel_us = pallas_kernel_us(kernels_us)
    if kernel_us is not None:
        row["kernel_us"] = kernel_us
        row["kernel_tflop_s"] = flops / (kernel_us * 1e-6) / 1e12
    row["mosaic_frac_matmul"] = row["mosaic_tflop_s"] / ceil["matmul_bf16_tflop_s"]
    # cuDNN's causal mask is top-left aligned, so it is a peer only for fresh prompts.
    if c.prefix == 0:
        q4 = x["q"].reshape(c.batch, c.chunk, c.q_heads, c.head_dim)

        def cudnn(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, implementation="cudnn"
            )

        ref, ref_ms, _ = _timed(cudnn, (q4, x["k"], x["v"]), iters)
        row["cudnn_us"] = 1e3 * ref_ms
        row["cudnn_tflop_s"] = flops / (ref_ms * 1e-3) / 1e12
        row["rel_err"] = _rel_err(out, ref.reshape(out.shape))
    return row


def pallas_kernel_us(kernels_us: dict[str, float]) -> float | None:
    """Time of the Pallas Mosaic GPU kernel among a call's kernels (by the kernel names the
    profiler reports), or None when no name says so."""
    mosaic = [us for name, us in kernels_us.items() if "mosaic_gpu" in name]
    return sum(mosaic) if mosaic else None


def _fmt(row: dict) -> str:
    if row["kind"] == "decode":
        shape = f"B{row['batch']} ctx{row['ctx']}{'r' if row['ragged'] else ''} p{row['page']}"
        shape += f" d{row['head_dim']}" + (f" {row['kv_dtype']}" if row["kv_dtype"] else "")
        ours = f"{row['mosaic_us']:9.1f} us {row['mosaic_tb_s']:5.2f} TB/s"
        ours += f" ({100 * row['mosaic_frac_hbm']:3.0f}% HBM) splits {row['splits']}"
        peer = (
            f"XLA {row['reference_tb_s']:5.2f} TB/s  err {row['rel_err']:.1e}"
            if "reference_us" in row
            else "XLA n/a"
        )
    else:
        shape = f"B{row['batch']} S{row['chunk']}+{row['prefix']} p{row['page']} d{row['head_dim']}"
        ours = f"{row['mosaic_us']:9.1f} us {row['mosaic_tflop_s']:5.0f} TFLOP/s"
        ours += f" ({100 * row['mosaic_frac_matmul']:3.0f}% mm"
        ours += f", kernel {row['kernel_tflop_s']:3.0f})" if "kernel_us" in row else ")"
        peer = (
            f"cuDNN {row['cudnn_tflop_s']:5.0f} TFLOP/s  err {row['rel_err']:.1e}"
            if "cudnn_us" in row
            else "cuDNN n/a"
        )
    return f"{row['kind']:7s} {shape:28s} {ours}  |  {peer}"


def run(args: argparse.Namespace) -> dict:
    dev = jax.devices()[0]
    if not paged_attention.mosaic_available(dev):
        raise SystemExit(f"kernels benchmark needs a Hopper (sm_90) GPU, found {dev.device_kind}")
    dtype = jnp.dtype(args.dtype)
    ceil = measure_ceilings(args.iters)
    print(
        f"{dev.device_kind}: measured HBM {ceil['hbm_tb_s']:.2f} TB/s, "
        f"bf16 matmul {ceil['matmul_bf16_tflop_s']:.0f} TFLOP/s",
        flush=True,
    )
    rows = []
    if args.kind in ("decode", "all"):
        for c in QUICK_DECODE if args.quick else DECODE_SWEEP:
            rows.append(bench_decode(c, dtype, args.iters, ceil))
            print(_fmt(rows[-1]), flush=True)
    if args.kind in ("prefill", "all"):
        for c in QUICK_PREFILL if args.quick else PREFILL_SWEEP:
            rows.append(bench_prefill(c, dtype, args.iters, ceil))
            print(_fmt(rows[-1]), flush=True)
    result = {
        "device": dev.device_kind,
        "num_sms": _mosaic_decode.num_sms(),
        "jax_version": jax.__version__,
        "command": " ".join(["python", "-m", "jaxserve.bench", *sys.argv[1:]]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timing": f"CUPTI kernel time, median of {args.iters} runs",
        "ceilings": ceil,
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result
