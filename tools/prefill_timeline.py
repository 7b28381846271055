"""Where the prefill kernel's time goes, per step, from Pallas's Mosaic GPU profiler (Hopper GPU).

Runs `_mosaic_prefill.paged_prefill(..., profile_dir=)` once on a fresh-prompt shape and reads the
trace it writes: per warpgroup (the compute warpgroups, then the TMA warpgroup), the median SM
clock cycles of each named region of a step, and the steady-state step period (cycles between a
warpgroup's consecutive softmax starts) against the tensor-core cycles all compute warpgroups'
matmuls need at the peak rate. Regions, head dim 128 (ping-pong): `qk` (wait for K, Q·K and the
hand-over), `softmax`, `pv` (wait for V and the other warpgroup, P·V); head dim 64 (ring):
`softmax`, `turn` (wait for V, K and the turn, P·V and the next Q·K). Traces keep the first
`PROFILE_EVENTS` events of each warpgroup.

    PYTHONPATH=. python tools/prefill_timeline.py --batch 2 --seq 4096 --json timeline.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

# Dense bf16 / fp16 wgmma rate of one H100 SM (989 TFLOP/s over 132 SMs at 1.83 GHz).
FLOP_PER_CYCLE = 4096


def summarize(
    events: list[dict], head_dim: int, block_kv: int = 128, rows: int = 64, warpgroups: int = 2
) -> dict:
    """Per-warpgroup median cycles of each region and the step period, from the trace's events
    (Chrome trace "B"/"E" events; within one warpgroup's trace the times are SM cycles / 1000);
    `warpgroups`: compute warpgroups per CTA (each CTA has one more, the TMA warpgroup)."""
    by_trace: dict[int, list[dict]] = collections.defaultdict(list)
    for e in events:
        by_trace[e["tid"]].append(e)
    cycles: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    period: list[float] = []
    for tid, trace in by_trace.items():
        wg = f"wg{(tid - 1) % (warpgroups + 1)}"
        open_regions: list[tuple[str, float]] = []
        softmax_starts = []
        for e in trace:
            name, t = e["name"].split("/")[-1], e["ts"] * 1e3
            if e["ph"] == "B":
                open_regions.append((name, t))
                if name == "softmax":
                    softmax_starts.append(t)
            else:
                start_name, start = open_regions.pop()
                cycles[wg][start_name].append(t - start)
        period += [b - a for a, b in zip(softmax_starts, softmax_starts[1:], strict=False)]
    tensor = warpgroups * 2 * 2 * rows * block_kv * head_dim / FLOP_PER_CYCLE
    step = statistics.median(period) if period else float("nan")
    return {
        "median_cycles": {
            wg: {name: statistics.median(v) for name, v in sorted(regions.items())}
            for wg, regions in sorted(cycles.items())
        },
        "step_period_cycles": step,
        "tensor_core_cycles_per_step": tensor,
        "tensor_core_busy": tensor / step if period else float("nan"),
    }


def _read_trace(trace_dir: str, timeout_s: float) -> list[dict]:
    """The events of the one trace file in `trace_dir`, once it exists and parses."""
    deadline = time.monotonic() + timeout_s
    while True:
        written = glob.glob(os.path.join(trace_dir, "*"))
        if written:
            (trace,) = written
            try:
                with open(trace) as f:
                    return json.load(f)["traceEvents"]
            except json.JSONDecodeError:
                pass  # still being written
        if time.monotonic() > deadline:
            raise RuntimeError(f"no complete profiler trace in {trace_dir}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096, help="prompt tokens per sequence")
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--json", metavar="PATH", help="write the summary to this JSON file")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxserve.bench.kernels import PrefillCase, paged_prefill_args, prefill_inputs
    from pallas_kernels import _mosaic_prefill

    d = args.head_dim
    cfg = _mosaic_prefill.choose_config(d)
    case = PrefillCase(
        args.batch,
        args.seq,
        page=args.page,
        q_heads=args.q_heads,
        kv_heads=args.kv_heads,
        head_dim=d,
    )
    x = prefill_inputs(case, jnp.bfloat16, jax.random.key(0))
    inputs = paged_prefill_args(x)
    with tempfile.TemporaryDirectory() as trace_dir:
        run = jax.jit(
            lambda *a: _mosaic_prefill.paged_prefill(*a, scale=d**-0.5, profile_dir=trace_dir)
        )
        run(*inputs).block_until_ready()  # compiles; traces too
        jax.effects_barrier()
        for old in glob.glob(os.path.join(trace_dir, "*")):
            os.remove(old)
        run(*inputs).block_until_ready()
        jax.effects_barrier()
        # The trace is written by a host callback: wait until it is complete (up to a minute).
        events = _read_trace(trace_dir, timeout_s=60)
    dev = jax.devices()[0]
    result = {
        "device": dev.device_kind,
        "jax_version": jax.__version__,
        "command": "python tools/prefill_timeline.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": {k: v for k, v in vars(args).items() if k != "json"},
        **summarize(events, d, cfg.block_kv, warpgroups=cfg.warpgroups),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
