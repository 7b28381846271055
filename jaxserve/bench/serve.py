"""`serve` mode: drive a gRPC server with timed arrivals through the streaming `AsyncClient`.

Owns the online-serving benchmark: request arrival times (Poisson, or gamma with a burstiness
factor), the dispatcher (optionally capped at --max-concurrency in flight), per-request stream
timings (TTFT, inter-token latencies, end-to-end), the figures over a run (TTFT / TPOT / ITL / E2E
mean and percentiles, request and token throughput, goodput under an SLO, failures), rate sweeps
with a latency-vs-throughput plot, and a server process of its own when no --target is given.

That server is this module run as a script (`python -m jaxserve.bench.serve --port N ...`): it
builds the engine from the same model and engine options as the other modes (random weights
included) and serves it with `serving.server.serve`. The client side never initialises a device
(no JAX backend), so the server keeps the accelerator and its memory to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxserve.bench import (
    add_engine_args,
    add_model_args,
    add_output_args,
    add_sampling_args,
    add_workload_args,
    build_engine,
    check_positive,
    engine_argv,
    random_prompt,
    report,
    sample_workload,
    workload_model_len,
)

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
SERVER_GRACE_S = 5.0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="online serving: timed arrivals against a gRPC server",
        description="Send requests to a jaxserve gRPC server (--target, or one started here with "
        "the model options) at Poisson/gamma arrival times and measure what clients see.",
    )
    add_model_args(p)
    add_engine_args(p)
    add_sampling_args(p)
    add_output_args(p)
    add_workload_args(p)
    g = p.add_argument_group("serving")
    g.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="a running server (model and engine options are then ignored); default: start one",
    )
    g.add_argument(
        "--request-rate",
        type=parse_rate,
        default=math.inf,
        help="mean requests per second; inf (default) sends all at once",
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier, > 1 steadier",
    )
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    g.add_argument("--warmup-requests", type=int, default=4, help="untimed requests first")
    g.add_argument(
        "--slo",
        type=parse_slo,
        default=None,
        metavar="ttft_ms=X,tpot_ms=Y",
        help=f"goodput counts requests meeting every bound given ({', '.join(SLO_KEYS)})",
    )
    g.add_argument(
        "--sweep",
        type=parse_rates,
        default=None,
        metavar="R1,R2,...",
        help="run each request rate in turn (overrides --request-rate)",
    )
    g.add_argument("--plot", default=None, metavar="PATH", help="latency-vs-throughput PNG")
    g.add_argument("--request-timeout", type=float, default=None, help="deadline per request (s)")
    g.add_argument(
        "--server-timeout",
        type=float,
        default=1800.0,
        help="seconds a started server may take to load and warm up",
    )
    return p


# ---- option parsing -----------------------------------------------------------------------------
def parse_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0, got {text!r}")
    return rate


def parse_rates(text: str) -> list[float]:
    return [parse_rate(t.strip()) for t in text.split(",") if t.strip()]


def parse_slo(text: str) -> dict[str, float]:
    """'ttft_ms=200,tpot_ms=50' → {'ttft_ms': 200.0, 'tpot_ms': 50.0}."""
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in SLO_KEYS:
            raise argparse.ArgumentTypeError(
                f"expected key=value with keys among {', '.join(SLO_KEYS)}, got {part!r}"
            )
        try:
            slo[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}: not a number: {value!r}") from None
    return slo


def rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


# ---- arrivals -----------------------------------------------------------------------------------
def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from the start) of `n` requests: the first at 0, then gamma-distributed gaps
    with mean 1/rate and shape `burstiness` (1: a Poisson process). An infinite rate sends all
    at 0."""
    if not burstiness > 0:
        raise ValueError(f"burstiness: must be > 0, got {burstiness}")
    if not rate > 0:
        raise ValueError(f"request_rate: must be > 0, got {rate}")
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


# ---- per-request results and the figures over a run ---------------------------------------------
@dataclass
class RequestResult:
    """What one client saw, in seconds; `start`/`end` are relative to the run's start."""

    input_len: int
    output_len: int  # requested
    ok: bool = False
    error: str | None = None
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between token-carrying responses
    start: float = 0.0
    end: float = 0.0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    """A completed request within every bound given; TPOT is vacuous for one-token outputs."""
    if not r.ok or r.ttft is None or r.e2e is None:
        return False
    tpot = r.tpot
    checks = {
        "ttft_ms": r.ttft * 1e3,
        "tpot_ms": 0.0 if tpot is None else tpot * 1e3,
        "e2e_ms": r.e2e * 1e3,
    }
    return all(checks[k] <= bound for k, bound in slo.items())


def figures(
    results: Sequence[RequestResult], duration: float, slo: dict[str, float] | None
) -> dict[str, Any]:
    """The run's figures: throughputs over `duration` (first send to last completion)."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error for r in results if not r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    good = None if slo is None else sum(meets_slo(r, slo) for r in ok)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(errors.most_common(10)),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput_req_s": report.ratio(len(ok), duration),
        "output_throughput_tok_s": report.ratio(out_tokens, duration),
        "total_throughput_tok_s": report.ratio(in_tokens + out_tokens, duration),
        "ttft_ms": report.summarize((r.ttft for r in ok if r.ttft is not None), 1e3),
        "tpot_ms": report.summarize((t for r in ok if (t := r.tpot) is not None), 1e3),
        "itl_ms": report.summarize((x for r in ok for x in r.itl), 1e3),
        "e2e_latency_ms": report.summarize((r.e2e for r in ok if r.e2e is not None), 1e3),
        "good_requests": good,
        "goodput_req_s": None if good is None else report.ratio(good, duration),
        "slo_attainment": None if good is None or not results else good / len(results),
    }


# ---- the client side ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


async def send_request(
    client: Any,
    req: Request,
    request_id: str,
    temperature: float,
    timeout: float | None,
    t0: float,
) -> RequestResult:
    """Stream one request; record when each token-carrying response arrived."""
    import grpc

    res = RequestResult(input_len=len(req.prompt), output_len=req.output_len)
    start = time.perf_counter()
    res.start = start - t0
    last = start
    try:
        stream = client.generate(
            token_ids=req.prompt,
            request_id=request_id,
            timeout=timeout,
            max_tokens=req.output_len,
            ignore_eos=True,
            temperature=temperature,
        )
        async for response in stream:
            now = time.perf_counter()
            k = sum(len(c.token_ids) for c in response.choices)
            if not k:
                continue
            if res.ttft is None:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last = now
            res.output_tokens += k
        res.e2e = time.perf_counter() - start
        res.ok = res.output_tokens > 0
        if not res.ok:
            res.error = "the stream ended without tokens"
    except grpc.RpcError as e:
        res.error = f"{e.code().name}: {e.details()}"
    res.end = time.perf_counter() - t0
    return res


async def run_requests(
    client: Any,
    requests: Sequence[Request],
    arrivals: Sequence[float],
    *,
    tag: str,
    temperature: float,
    max_concurrency: int | None,
    timeout: float | None,
    progress: bool = True,
) -> tuple[list[RequestResult], float, int]:
    """Send each request at its arrival time (waiting for a slot under `max_concurrency`).
    Returns the results, the duration from the start to the last completion, and the peak number
    of requests in flight."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    in_flight = peak = 0
    bar = tqdm(total=len(requests), desc=tag, unit="req", disable=None if progress else True)

    async def one(i: int, req: Request) -> RequestResult:
        nonlocal in_flight, peak
        if sem is not None:
            await sem.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await send_request(client, req, f"{tag}-{i}", temperature, timeout, t0)
        finally:
            in_flight -= 1
            if sem is not None:
                sem.release()
            bar.update(1)

    t0 = time.perf_counter()
    tasks = []
    for i, (req, at) in enumerate(zip(requests, arrivals, strict=True)):
        delay = t0 + float(at) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, req)))
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - t0
    bar.close()
    return results, duration, peak


def _model_info_dict(info: Any) -> dict[str, Any]:
    """The scalar fields of a `ModelInfo` reply as Python values (int64s stay numbers)."""
    return {f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields}


async def _bench(args: argparse.Namespace, target: str) -> dict[str, Any]:
    from serving.client import AsyncClient

    async with AsyncClient(target) as client:
        await client.wait_until_serving(args.server_timeout)
        # A server answers as soon as its largest step shapes are compiled; time it once the
        # rest (compiling in the background) are too.
        deadline = time.monotonic() + args.server_timeout
        while (await client.model_info()).compiles_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        info = _model_info_dict(await client.model_info())
        rng = np.random.default_rng(args.seed)
        workload = sample_workload(args, args.num_requests, rng, int(info["max_model_len"]))
        vocab = int(info["vocab_size"])
        requests = [
            Request(random_prompt(rng, n, vocab), o)
            for n, o in zip(workload.input_lens, workload.output_lens, strict=True)
        ]
        if args.warmup_requests:
            warm = [
                Request(random_prompt(rng, n, vocab), o)
                for n, o in zip(
                    workload.input_lens[: args.warmup_requests],
                    workload.output_lens[: args.warmup_requests],
                    strict=True,
                )
            ]
            results, _, _ = await run_requests(
                client,
                warm,
                [0.0] * len(warm),
                tag="warmup",
                temperature=args.temperature,
                max_concurrency=None,
                timeout=args.request_timeout,
                progress=False,
            )
            failed = [r.error for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"warm-up requests failed: {failed[0]}")
        runs = []
        for k, rate in enumerate(args.sweep or [args.request_rate]):
            # The same arrival draw for every rate of a sweep, only scaled, so rates compare.
            arrivals = arrival_times(
                len(requests), rate, args.burstiness, np.random.default_rng(args.seed + 1)
            )
            results, duration, peak = await run_requests(
                client,
                requests,
                arrivals,
                tag=f"rate{k}",
                temperature=args.temperature,
                max_concurrency=args.max_concurrency,
                timeout=args.request_timeout,
            )
            runs.append(
                {
                    "request_rate": rate_label(rate),
                    "burstiness": args.burstiness,
                    "max_concurrency": args.max_concurrency,
                    "peak_concurrency": peak,
                    "results": figures(results, duration, args.slo),
                }
            )
        return {
            "server_info": info,
            "workload": {
                "distribution": workload.distribution,
                "params": workload.params,
                "num_requests": len(workload),
                "warmup_requests": args.warmup_requests,
                "temperature": args.temperature,
                "input_len": report.summarize(workload.input_lens),
                "output_len": report.summarize(workload.output_lens),
            },
            "runs": runs,
        }


# ---- a server of our own ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m jaxserve.bench.serve` on 127.0.0.1 and a free port, logging to a file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        queue = max(256, args.num_requests + args.warmup_requests)
        self.argv = [
            sys.executable,
            "-m",
            "jaxserve.bench.serve",
            *engine_argv(args),
            "--port",
            str(self.port),
            "--max-queued-requests",
            str(queue),
            "--min-model-len",
            str(workload_model_len(args)),
        ]
        self._logdir = tempfile.TemporaryDirectory(prefix="jaxserve-bench-")
        self.log_path = Path(self._logdir.name) / "server.log"
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_until_serving(self, timeout: float) -> float:
        """Poll health until SERVING; fail early (with the log) if the process exits. Returns
        the seconds from launch to SERVING (start-up: load, KV cache, warm-up compilation)."""
        import grpc

        from serving.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.target, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the benchmark server exited with status {self.proc.returncode}:\n"
                        + self.log_tail()
                    )
                try:
                    if client.health() == "SERVING":
                        return time.monotonic() - self.started
                except grpc.RpcError:
                    pass  # not listening yet, or still warming up
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the benchmark server was not SERVING after {timeout:.0f} s:\n"
                        + self.log_tail()
                    )
                time.sleep(0.2)

    def wait_until_compiled(self, timeout: float) -> float:
        """Poll model info until no step shape is left compiling in the background. Returns the
        seconds from launch."""
        from serving.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.target, timeout=5.0) as client:
            while client.model_info().compiles_pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the benchmark server still compiling after {timeout:.0f} s"
                    )
                time.sleep(0.2)
        return time.monotonic() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful drain, then exit
            try:
                self.proc.wait(timeout=SERVER_GRACE_S + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._logdir.cleanup()


# ---- the mode -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    check_positive(
        num_requests=args.num_requests,
        max_concurrency=args.max_concurrency,
    )
    if args.warmup_requests < 0:
        raise ValueError(f"warmup_requests: must be >= 0, got {args.warmup_requests}")
    if not args.burstiness > 0:
        raise ValueError(f"burstiness: must be > 0, got {args.burstiness}")
    env = report.environment(init_device=False)
    server, startup_s, compiled_s = None, None, None
    if args.target is None:
        server = ServerProcess(args)
    try:
        if server is not None:
            startup_s = server.wait_until_serving(args.server_timeout)
            compiled_s = server.wait_until_compiled(args.server_timeout)
        body = asyncio.run(_bench(args, args.target or server.target))
    finally:
        if server is not None:
            server.stop()
    result = {
        **report.metadata(args, "serve", env),
        "server": {
            "target": args.target,
            "started_by_bench": server is not None,
            "argv": None if server is None else server.argv[1:],
            "startup_s": startup_s,  # launch to SERVING
            "all_compiled_s": compiled_s,  # launch to every step shape compiled
        },
        **body,
        "slo": args.slo,
        "plot": None,
    }
    if args.plot:
        result["plot"] = str(args.plot) if plot_sweep(result, args.plot) else None
    print_summary(result)
    return result


def plot_sweep(result: dict[str, Any], path: str) -> bool:
    """Latency (p50 / p99 of TTFT, TPOT, E2E) against output throughput, one point per rate.
    False, with a message, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot: matplotlib is not installed (pip install matplotlib); "
            "the figures are all in the table and --json",
            file=sys.stderr,
        )
        return False
    runs = result["runs"]
    x = [r["results"]["output_throughput_tok_s"] or 0.0 for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(
        axes, ("ttft_ms", "tpot_ms", "e2e_latency_ms"), ("TTFT", "TPOT", "end-to-end"), strict=True
    ):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [r["results"][key][stat] for r in runs], style, label=stat)
        for xi, r in zip(x, runs, strict=True):
            rate = r["request_rate"]
            label = f"{rate}/s" if isinstance(rate, str) else f"{rate:g}/s"
            ax.annotate(label, (xi, r["results"][key]["p50"] or 0.0), fontsize=8)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    info = result["server_info"]
    fig.suptitle(f"{info.get('model_name')} on {info.get('device')}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_summary(result: dict[str, Any]) -> None:
    info = result["server_info"]
    w = result["workload"]
    for run_ in result["runs"]:
        r = run_["results"]
        rows = [
            ("model", f"{info.get('model_name')} ({info.get('dtype')}) on {info.get('device')}"),
            ("server start-up s", report.fmt(result["server"]["startup_s"])),
            ("all shapes compiled s", report.fmt(result["server"]["all_compiled_s"])),
            ("workload", f"{w['num_requests']} requests, {w['distribution']}"),
            (
                "request rate / burstiness",
                f"{run_['request_rate']} / {run_['burstiness']}"
                + (
                    f", max concurrency {run_['max_concurrency']}"
                    if run_["max_concurrency"]
                    else ""
                ),
            ),
            ("completed / failed", f"{r['completed']} / {r['failed']}"),
            ("duration s", report.fmt(r["duration_s"])),
            ("requests/s", report.fmt(r["request_throughput_req_s"])),
            ("output tok/s", report.fmt(r["output_throughput_tok_s"])),
            ("total tok/s", report.fmt(r["total_throughput_tok_s"])),
            ("TTFT ms", report.fmt_summary(r["ttft_ms"])),
            ("TPOT ms", report.fmt_summary(r["tpot_ms"])),
            ("ITL ms", report.fmt_summary(r["itl_ms"])),
            ("E2E ms", report.fmt_summary(r["e2e_latency_ms"])),
            ("peak concurrency", report.fmt(run_["peak_concurrency"])),
        ]
        if r["goodput_req_s"] is not None:
            rows.append(("goodput req/s", report.fmt(r["goodput_req_s"])))
            rows.append(("SLO attainment", report.fmt(r["slo_attainment"], 3)))
        for err, count in r["errors"].items():
            rows.append((f"error x{count}", err))
        report.print_table("jaxserve bench serve", rows)


# ---- the server process -------------------------------------------------------------------------
def server_main(argv: list[str] | None = None) -> int:
    """Serve the model the options describe until SIGTERM/SIGINT; the benchmark's own server."""
    p = argparse.ArgumentParser(
        prog="python -m jaxserve.bench.serve", description=server_main.__doc__
    )
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-queued-requests", type=int, default=256)
    p.add_argument("--min-model-len", type=int, default=0, help="context the workload needs")
    args = p.parse_args(argv)
    logging.basicConfig(
        force=True, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    from serving.server import serve

    llm = build_engine(args, min_model_len=args.min_model_len)
    return serve(
        llm,
        host=args.host,
        port=args.port,
        metrics_port=None,
        max_queued_requests=args.max_queued_requests,
        grace_period=SERVER_GRACE_S,
    )


if __name__ == "__main__":
    sys.exit(server_main())
