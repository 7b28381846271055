"""`throughput` mode: every request submitted at once to an in-process `LLMEngine`.

Owns the offline-throughput figures: output, total and request throughput over the wall time from
the first submission to the last token, preemptions, TTFT / TPOT / end-to-end latency of the
requests, and how full the batch and the KV cache were. Request lengths come from
`jaxserve.bench.sample_workload` (fixed, uniform ranges or ShareGPT-like synthetic).
`--kernel-profile` (NVIDIA GPUs) runs the workload once more, on new prompts of the same lengths,
with CUPTI recording every kernel (`jaxserve.bench.kernel_profile`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxserve.bench import (
    Workload,
    add_common_args,
    add_workload_args,
    build_engine,
    check_positive,
    kernel_profile,
    random_prompt,
    report,
    sample_workload,
    workload_model_len,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "throughput",
        help="offline throughput: all requests submitted at once",
        description="Submit --num-requests requests at once (ignore_eos, max_tokens = the drawn "
        "output length) and run the engine until all finish.",
    )
    add_common_args(p)
    add_workload_args(p)
    kernel_profile.add_argument(p.add_argument_group("profile"), "the whole workload once more")
    return p


@dataclass
class RunTrace:
    """Per-request times (seconds from the first submission) and per-step engine state."""

    first_token: list[float | None]
    last_token: list[float]
    output_tokens: list[int]
    elapsed: float = 0.0
    num_steps: int = 0
    preemptions: int = 0
    running: list[int] = field(default_factory=list)  # sequences running after each step
    kv_usage: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # wall time of each `step()`
    wait_s: list[float] = field(default_factory=list)  # of it, blocked on device results
    # Whether the step returned a multi-step run's tokens (some request got more than one).
    step_is_run: list[bool] = field(default_factory=list)


def run_all(
    llm: Any, prompts: list[list[int]], output_lens: list[int], temperature: float
) -> RunTrace:
    from jaxserve.sampling_params import SamplingParams

    n = len(prompts)
    trace = RunTrace([None] * n, [0.0] * n, [0] * n)
    stats = llm.stats()
    preempted_before = stats["num_preemptions"]
    waited = stats["device_wait_seconds_total"]
    detokenize = llm.tokenizer is not None
    t0 = time.perf_counter()
    for i, (prompt, out_len) in enumerate(zip(prompts, output_lens, strict=True)):
        params = SamplingParams(
            max_tokens=out_len, ignore_eos=True, temperature=temperature, detokenize=detokenize
        )
        llm.add_request(f"tp-{i}", prompt, params)
    with tqdm(total=n, desc="throughput", unit="req", disable=None) as bar:
        while llm.has_unfinished_requests():
            before = time.perf_counter()
            outputs = llm.step()
            after = time.perf_counter()
            now = after - t0
            trace.step_s.append(after - before)
            trace.num_steps += 1
            most = 0
            for out in outputs:
                i = int(out.request_id[3:])
                k = sum(len(c.token_ids) for c in out.outputs)
                most = max(most, k)
                if k:
                    trace.output_tokens[i] += k
                    if trace.first_token[i] is None:
                        trace.first_token[i] = now
                    trace.last_token[i] = now
                if out.finished:
                    bar.update(1)
            trace.step_is_run.append(most > 1)
            stats = llm.stats()
            trace.wait_s.append(stats["device_wait_seconds_total"] - waited)
            waited = stats["device_wait_seconds_total"]
            trace.running.append(stats["num_running"])
            trace.kv_usage.append(stats["kv_usage"])
    trace.elapsed = time.perf_counter() - t0
    trace.preemptions = llm.stats()["num_preemptions"] - preempted_before
    return trace


def figures(trace: RunTrace, workload: Workload, shared_prefix_len: int = 0) -> dict[str, Any]:
    n = len(workload)
    out_tokens = sum(trace.output_tokens)
    in_tokens = sum(workload.input_lens) + n * shared_prefix_len
    ttft = [f for f in trace.first_token if f is not None]
    tpot = [
        (last - first) / (k - 1)
        for first, last, k in zip(
            trace.first_token, trace.last_token, trace.output_tokens, strict=True
        )
        if first is not None and k > 1
    ]
    return {
        "num_requests": n,
        "elapsed_s": trace.elapsed,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "expected_output_tokens": sum(workload.output_lens),
        "requests_per_s": report.ratio(n, trace.elapsed),
        "output_throughput_tok_s": report.ratio(out_tokens, trace.elapsed),
        "total_throughput_tok_s": report.ratio(in_tokens + out_tokens, trace.elapsed),
        "preemptions": trace.preemptions,
        "ttft_ms": report.summarize(ttft, 1e3),
        "tpot_ms": report.summarize(tpot, 1e3),
        "e2e_latency_ms": report.summarize(trace.last_token, 1e3),
        "num_steps": trace.num_steps,
        "steps": step_figures(trace),
        "mean_running_seqs": float(np.mean(trace.running)) if trace.running else None,
        "peak_kv_usage": max(trace.kv_usage, default=None),
        "input_len": report.summarize(workload.input_lens),
        "output_len": report.summarize(workload.output_lens),
    }


def step_figures(trace: RunTrace) -> dict[str, Any]:
    """Engine steps split into those that returned multi-step decode runs and the single
    iterations (prompt chunks with one decode token for each running sequence): how many, the
    wall time spent in each kind's `step()` calls, and how much of it the host spent blocked on
    device results (`device_wait_s`; the rest is host work). A run's device time overlaps the
    host work of the step before it, so it is read back, and counted, where it ends: runs that
    wait next to nothing are bound by the host, not the device."""
    out = {}
    for kind, is_run in (("runs", True), ("single", False)):
        picked = [
            (t, w)
            for t, w, r in zip(trace.step_s, trace.wait_s, trace.step_is_run, strict=True)
            if r == is_run
        ]
        out[kind] = {
            "count": len(picked),
            "seconds": float(sum(t for t, _ in picked)),
            "device_wait_s": float(sum(w for _, w in picked)),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_positive(num_requests=args.num_requests)
    cupti = kernel_profile.cupti() if args.kernel_profile else None
    env = report.environment()
    t = time.perf_counter()
    llm = build_engine(args, min_model_len=workload_model_len(args))
    load_s = time.perf_counter() - t
    warmup_s = llm.warmup()
    rng = np.random.default_rng(args.seed)
    workload = sample_workload(args, args.num_requests, rng, llm.max_model_len)
    vocab = llm.model_config.vocab_size
    if args.shared_prefix_len < 0:
        raise ValueError(f"shared_prefix_len: must be >= 0, got {args.shared_prefix_len}")
    prefix = random_prompt(rng, args.shared_prefix_len, vocab)

    def prompts() -> list[list[int]]:  # new ones each run: the prefix cache keeps the last
        return [prefix + random_prompt(rng, n, vocab) for n in workload.input_lens]

    with report.CompileCounter() as compiles:
        trace = run_all(llm, prompts(), workload.output_lens, args.temperature)
    result = {
        **report.metadata(args, "throughput", env),
        "model": report.describe_model(llm, args),
        "engine": {**report.describe_engine(llm), "load_s": load_s, "warmup_s": warmup_s},
        "workload": {
            "distribution": workload.distribution,
            "params": workload.params,
            "num_requests": len(workload),
            "temperature": args.temperature,
            "shared_prefix_len": args.shared_prefix_len,
        },
        "results": {
            **figures(trace, workload, args.shared_prefix_len),
            **prefix_cache_figures(llm),
        },
        "compilations_while_timed": compiles.to_dict(),
    }
    if cupti is not None:
        result["kernel_profile"] = kernel_profile.profile(
            cupti, lambda: run_all(llm, prompts(), workload.output_lens, args.temperature)
        )
    print_summary(result)
    return result


def prefix_cache_figures(llm) -> dict[str, Any]:
    """Prefix-cache queries and hits (tokens) over the run, as the engine counts them."""
    stats = llm.stats()
    keys = ("prefix_cache_hit_rate", "prefix_cache_queries_total", "prefix_cache_hits_total")
    return {k: stats[k] for k in keys if k in stats}


def print_summary(result: dict[str, Any]) -> None:
    r, w = result["results"], result["workload"]
    dev = result["environment"]["device"]
    rows = [
        ("model", f"{result['model']['name']} ({result['model']['dtype']})"),
        ("device", f"{dev['device_kind']} x{dev['count']}"),
        ("workload", f"{w['num_requests']} requests, {w['distribution']}"),
        ("input / output tokens", f"{r['total_input_tokens']:,} / {r['total_output_tokens']:,}"),
        ("elapsed s", report.fmt(r["elapsed_s"])),
        ("requests/s", report.fmt(r["requests_per_s"])),
        ("output tok/s", report.fmt(r["output_throughput_tok_s"])),
        ("total tok/s", report.fmt(r["total_throughput_tok_s"])),
        ("TTFT ms", report.fmt_summary(r["ttft_ms"], ("mean", "p50", "p99"))),
        ("TPOT ms", report.fmt_summary(r["tpot_ms"], ("mean", "p50", "p99"))),
        ("preemptions", report.fmt(r["preemptions"])),
        (
            "steps: runs / single",
            " / ".join(
                f"{s['count']} in {s['seconds']:.2f} s ({s['device_wait_s']:.2f} waiting)"
                for s in (r["steps"]["runs"], r["steps"]["single"])
            ),
        ),
        ("mean running seqs", report.fmt(r["mean_running_seqs"])),
        ("peak KV usage", report.fmt(r["peak_kv_usage"], 3)),
        report.compile_row(result["compilations_while_timed"]),
    ]
    report.print_table("jaxserve bench throughput", rows)
    if result.get("kernel_profile"):
        kernel_profile.print_profile(result["kernel_profile"], "kernel profile (per output token)")
