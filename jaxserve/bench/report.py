"""What every benchmark result carries and how it is shown: summary statistics, run metadata
(device, versions, configuration, command line), the terminal table and the JSON file.

`environment(init_device=False)` reads versions only, so the `serve` mode's client process never
initialises (and never grabs memory on) the accelerator the server it started is using.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jaxserve
from jaxserve import program_env

SUMMARY_KEYS = ("mean", "p50", "p90", "p99", "min", "max")


def summarize(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """mean / p50 / p90 / p99 / min / max of `values` × `scale` (None for no values), and n."""
    x = np.asarray(list(values), np.float64) * scale
    if x.size == 0:
        return {**dict.fromkeys(SUMMARY_KEYS), "n": 0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {
        "mean": float(x.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


def ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(init_device: bool = True) -> dict[str, Any]:
    """Software versions, the set environment variables that change compiled programs (XLA
    flags), and (when `init_device`) the devices JAX sees in this process."""
    env: dict[str, Any] = {
        "jaxserve_version": jaxserve.__version__,
        "jax_version": _version("jax"),
        "jaxlib_version": _version("jaxlib"),
        "flax_version": _version("flax"),
        "python_version": platform.python_version(),
        "utc_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "program_env": program_env.values(),
    }
    if init_device:
        import jax

        devices = jax.devices()
        env["device"] = {
            "platform": devices[0].platform,
            "device_kind": devices[0].device_kind,
            "count": len(devices),
        }
    return env


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (the `jaxserve` console script's argv otherwise)."""
    argv = getattr(args, "argv", None)
    if argv is not None:
        return shlex.join(["python", "-m", "jaxserve.bench", *argv])
    return shlex.join(["jaxserve", *sys.argv[1:]])


def cli_config(args: argparse.Namespace) -> dict[str, Any]:
    """Every parsed option, JSON-ready (callables and the raw argv left out)."""
    out: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        if key in ("func", "argv") or callable(value):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def metadata(args: argparse.Namespace, mode: str, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": mode,
        "command_line": command_line(args),
        "config": cli_config(args),
        "environment": env,
    }


class CompileCounter:
    """Counts XLA compilations while entered: a timed region that compiles measures the compiler
    too, so every mode reports this next to its figures."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self) -> CompileCounter:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "seconds": self.seconds}


def compile_row(compiles: dict[str, Any]) -> tuple[str, str]:
    """The table row for `CompileCounter.to_dict()`; flags compilations inside the timed region."""
    if not compiles["count"]:
        return ("compilations while timed", "0")
    return (
        "compilations while timed",
        f"{compiles['count']} ({compiles['seconds']:.2f} s): WARNING, the figures include "
        "compile time (the engine warm-up missed these shapes)",
    )


def describe_model(llm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Name, shape (as a Hugging Face config), dtypes and parameter count of an `LLMEngine`'s model."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree.leaves(llm.engine.state)
    return {
        "name": llm.model_name,
        "source": "random-weights" if args.random_weights else "checkpoint",
        "shape": args.random_weights,
        "hf_config": llm.model_config.to_hf_dict(),
        "dtype": jnp.dtype(llm.engine.dtype).name,
        "kv_dtype": jnp.dtype(llm.engine.kv_dtype).name,
        "num_params": int(sum(x.size for x in leaves)),
        "param_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
    }


def describe_engine(llm: Any) -> dict[str, Any]:
    """The engine configuration as resolved (pages sized from memory, backend picked), and the
    XLA options its executables are compiled with."""
    from jaxserve import compile_cache  # imports JAX, as the engine already has

    eng = llm.engine
    cfg = eng.cfg
    mesh = eng.mesh
    return {
        "mesh": None if mesh is None else dict(mesh.shape),
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "async_scheduling": cfg.async_scheduling,
        "page_size": cfg.page_size,
        "num_pages": cfg.num_pages,
        "kv_capacity_tokens": eng.capacity_tokens,
        "kv_bytes": eng.kv_bytes,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_prefill_seqs": cfg.max_prefill_seqs,
        "max_model_len": cfg.max_model_len,
        "attention_backend": eng.backend,
        "prefill_attention_backend": eng.prefill_backend,
        "decode_steps": cfg.decode_steps,
        "decode_buckets": list(cfg.decode_buckets),
        "prefill_buckets": list(cfg.prefill_buckets),
        "page_buckets": list(cfg.page_buckets),
        "compiler_options": compile_cache.compiler_options(),
    }


def _clean(value: Any) -> Any:
    """NaN and infinities become None (strict JSON has neither); numpy scalars become Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    p = Path(path)
    if p.parent != Path():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(result), indent=2, allow_nan=False) + "\n")
    return p


def fmt(value: float | int | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def fmt_summary(s: dict[str, Any], keys: Sequence[str] = ("mean", "p50", "p90", "p99")) -> str:
    return "  ".join(f"{k} {fmt(s.get(k))}" for k in keys)


def print_table(title: str, rows: Sequence[tuple[str, str]], file=None) -> None:
    """A two-column table: labels left, values right after a gap."""
    out = file or sys.stdout
    width = max((len(label) for label, _ in rows), default=0)
    rule = "=" * max(len(title), width + 24)
    print(rule, file=out)
    print(title, file=out)
    print("-" * len(rule), file=out)
    for label, value in rows:
        print(f"{label:<{width}}  {value}", file=out)
    print(rule, file=out, flush=True)
