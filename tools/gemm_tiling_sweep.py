"""Triton GEMM tilings for decode-shaped weight matmuls, timed where they run: in a chain of layers.

The measurement behind "Triton GEMM tilings at 8 rows" in docs/perf/engine_h100.md. XLA's
autotuner times each GEMM fusion alone; at a decode step's few rows a weight matmul streams its
weight once, and what it costs depends on its neighbours (its split-K partials are summed by the
kernel after it). So this times a 32-layer chain shaped like a decode step — RMSNorm, `x @ W_l`
with each layer its own weight (32 weights, far more than L2 holds), a reduction of the product
back into x — once as XLA compiles it and once per forced tiling (`xla_gpu_override_gemm_autotuner`,
one compilation each), and reports each variant's wall time per layer, median of 7 timed
batches of 10 chains, with the tiling's effective read bandwidth (weight bytes / time).

    python tools/gemm_tiling_sweep.py --shape 4096x6144 --json out.json [--rows 8] [--budget-s 100]

A GPU only. Tilings are tried in random order until `--budget-s` runs out; the JSON is rewritten
after each one, so an interrupted sweep keeps what it measured. Compare variants of one run only
(the chain's norm and reduction are in every figure).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import compile_cache

LAYERS = 32
SMEM_LIMIT = 200 * 1024  # bytes of shared memory a tiling's pipeline may take


def chain(x, weights):
    for w in weights:
        xf = x.astype(jnp.float32)
        h = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(x.dtype)
        y = jnp.matmul(h, w, preferred_element_type=jnp.float32).astype(x.dtype)
        x = x + jnp.mean(y.astype(jnp.float32), -1, keepdims=True).astype(x.dtype)
    return x


def time_chain(x, weights, options: dict) -> tuple[float, float, np.ndarray]:
    """Microseconds per layer (median and fastest batch) of the chain compiled with `options`,
    and its output."""
    compiled = jax.jit(chain).lower(x, weights).compile(options)
    out = compiled(x, weights)
    out.block_until_ready()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(10):
            out = compiled(x, weights)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / 10 / LAYERS * 1e6)
    return float(np.median(times)), float(min(times)), np.asarray(out, np.float32)


def tilings(k: int, n: int):
    """Triton tilings (16 rows per tile) whose pipeline fits shared memory and whose grid gives
    every SM of an H100 work (66 to 1,100 tiles)."""
    for bn, bk, sk, st, nw in itertools.product(
        (32, 64, 128, 256), (64, 128, 256, 512), (1, 2, 4, 8), (3, 4, 6), (4, 8)
    ):
        if st * (16 * bk + bk * bn) * 2 > SMEM_LIMIT or k % (bk * sk) or n % bn:
            continue
        if 66 <= (n // bn) * sk <= 1100:
            yield (
                f"block_m:16,block_n:{bn},block_k:{bk},split_k:{sk},"
                f"num_stages:{st},num_warps:{nw},num_ctas:1"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", required=True, help="KxN of the weight, e.g. 4096x6144")
    ap.add_argument("--rows", type=int, default=8, help="rows of x (the decode bucket)")
    ap.add_argument("--budget-s", type=float, default=100.0, help="time for forced tilings")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    keys = jax.random.split(jax.random.key(0), LAYERS)
    weights = [(0.02 * jax.random.normal(key, (k, n))).astype(jnp.bfloat16) for key in keys]
    x = jax.random.normal(jax.random.key(1), (args.rows, k)).astype(jnp.bfloat16)
    base = compile_cache.GPU_COMPILER_OPTIONS  # compiled as the engine compiles its steps
    report = {
        "command_line": " ".join(["python", *sys.argv]),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "shape": [k, n],
        "rows": args.rows,
        "weight_bytes": k * n * 2,
        "variants": [],
    }

    def record(name: str, options: dict, ref: np.ndarray | None) -> np.ndarray:
        us, fastest, out = time_chain(x, weights, {**base, **options})
        row = {"tiling": name, "us_per_layer": us, "min_us_per_layer": fastest}
        row["tb_s"] = k * n * 2 / us / 1e6
        if ref is not None:
            row["max_abs_diff"] = float(np.abs(out - ref).max())
        report["variants"].append(row)
        print(f"{name:90s} {us:7.2f} us/layer {row['tb_s']:.3f} TB/s", flush=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        return out

    ref = record("xla-autotuned", {}, None)
    record("cublas", {"xla_gpu_enable_triton_gemm": False}, ref)
    candidates = list(tilings(k, n))
    start = time.time()
    for i in np.random.default_rng(0).permutation(len(candidates)):
        if time.time() - start > args.budget_s:
            break
        record(candidates[i], {"xla_gpu_override_gemm_autotuner": candidates[i]}, ref)
    best = sorted(report["variants"], key=lambda r: r["us_per_layer"])[:5]
    print("fastest:", *(f"{r['tiling']} {r['us_per_layer']:.2f}" for r in best), sep="\n  ")


if __name__ == "__main__":
    main()
