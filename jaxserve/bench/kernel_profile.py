"""`--kernel-profile` of the `latency` and `throughput` modes: one more run of the workload with
CUPTI recording every kernel the GPUs run.

Owns the CUPTI hooks (jaxlib's, the ones `jax.experimental.mosaic.gpu.profiler` uses), the
profile's figures — each kernel name's time and launches per output token (prefill included;
summed over the devices of a sharded model), the run's wall time against its summed kernel
time — and their table. What bounds a number can then be read off the run that produced it:
where kernel time falls short of wall time, the GPU waited on the host.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from jaxserve.bench import report

log = logging.getLogger(__name__)

ROWS_SHOWN = 20  # kernels in the printed table; the JSON has them all


class Traced(Protocol):
    output_tokens: list[int]


def add_argument(group: argparse._ArgumentGroup, what: str) -> None:
    group.add_argument(
        "--kernel-profile",
        action="store_true",
        help=f"then {what} under CUPTI: every GPU kernel's time per output token (NVIDIA GPUs)",
    )


def cupti() -> Any:
    """jaxlib's CUPTI hooks, on NVIDIA GPUs; a clear error elsewhere (call it before loading a
    model, so a wrong platform is refused at once)."""
    import jax

    if jax.devices()[0].platform != "gpu":
        raise ValueError(
            f"kernel_profile: needs an NVIDIA GPU (CUPTI), found {jax.devices()[0].platform}"
        )
    try:
        from jax._src.lib import mosaic_gpu
    except ImportError as e:
        raise ValueError(f"kernel_profile: jaxlib has no CUPTI hooks here ({e})") from e
    return mosaic_gpu._mosaic_gpu_ext


def profile(ext: Any, run: Callable[[], Traced]) -> dict[str, Any] | None:
    """`run()` with CUPTI (`cupti()`) recording every kernel launch: its `summarize` plus the
    run's wall time, or None (with a warning) when CUPTI recorded nothing."""
    ext._cupti_init()
    t = time.perf_counter()
    try:
        trace = run()
    finally:
        wall_s = time.perf_counter() - t
        timings = ext._cupti_get_timings(True)
    if not timings:
        log.warning("kernel_profile: CUPTI recorded no kernel launches; no profile reported")
        return None
    return {**summarize(timings, sum(trace.output_tokens)), "wall_s": wall_s}


def summarize(timings: list[tuple[str, float]], tokens: int) -> dict[str, Any]:
    """(kernel name, ms) launches → their total seconds, and per name microseconds and launches
    per output token and the share of all kernel time; largest first."""
    total: dict[str, float] = {}
    launches: dict[str, int] = {}
    for name, ms in timings:
        total[name] = total.get(name, 0.0) + ms
        launches[name] = launches.get(name, 0) + 1
    all_ms = sum(total.values())
    kernels = [
        {
            "name": name,
            "us_per_token": 1e3 * ms / tokens,
            "launches_per_token": launches[name] / tokens,
            "share": ms / all_ms if all_ms else 0.0,
        }
        for name, ms in sorted(total.items(), key=lambda kv: -kv[1])
    ]
    return {
        "output_tokens": tokens,
        "kernel_s": all_ms / 1e3,
        "kernel_us_per_token": 1e3 * all_ms / tokens,
        "launches_per_token": len(timings) / tokens,
        "kernels": kernels,
    }


def print_profile(prof: dict[str, Any], title: str) -> None:
    head = [
        ("all kernels", f"{prof['kernel_us_per_token']:.1f} us/token"),
        ("launches", f"{prof['launches_per_token']:.1f} per token"),
        ("kernel / wall s", f"{prof['kernel_s']:.3f} / {prof['wall_s']:.3f}"),
    ]
    top = [
        (
            k["name"][:48],
            f"{k['us_per_token']:8.1f} us/token  x{k['launches_per_token']:5.1f}"
            f"  {100 * k['share']:4.1f}%",
        )
        for k in prof["kernels"][:ROWS_SHOWN]
    ]
    report.print_table(title, head + top)
