"""`latency` mode: one fixed batch at a time through `LLMEngine`, timed step by step.

Owns the latency figures (TTFT, TPOT, end-to-end, output tok/s), the memory-bandwidth utilisation
(MBU) of decode and the model FLOP/s utilisation, the accounting behind them (`ModelCost`: which
bytes a decode step must read and which FLOPs a token costs), and the device ceilings they are
measured against (`measure_bandwidth`, `measure_matmul`), both measured in the same run.

MBU: a decode step must read every weight except the embedding table (only a few rows of it are
gathered; a tied table is read in full as the output projection), the routed experts a batch
touches (expected count under uniform routing), and the KV cache of every sequence up to its
current length. Bytes per step / step wall time / measured bandwidth (of device 0, times the
number of devices a tensor/expert-parallel model spans). Only steps where every
sequence of the batch is decoding count; the wall time includes the host's share of a step
(scheduling, sampling, the token transfer), as a user sees it.

FLOP/s utilisation: 2 FLOPs per matmul weight per token (top-k experts only) plus attention
(QK^T and PV over the attended positions), over the measured matmul rate. Decode counts the pure
decode steps; prefill counts the batch's prompts over the time until its last first token.

`--kernel-profile` (NVIDIA GPUs): one more batch after the timed ones, with CUPTI recording every
kernel the GPUs run (`jaxserve.bench.kernel_profile`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from jaxserve.bench import (
    add_common_args,
    build_engine,
    check_positive,
    kernel_profile,
    num_model_devices,
    random_prompt,
    report,
)

if TYPE_CHECKING:
    from jaxserve.config import ModelConfig


# Ceiling measurements: buffer sizes well above any cache (the H100's L2 is 50 MB), smaller on CPU
# where the point is only that the arithmetic runs.
BANDWIDTH_BYTES = {"gpu": 1 << 30, "cpu": 32 << 20}
MATMUL_N = {"gpu": 8192, "cpu": 256}
CEILING_REPEATS = 10
CEILING_CHAIN = 4


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "latency",
        help="TTFT / TPOT / MBU of one fixed batch",
        description="Submit a fixed batch (ignore_eos, max_tokens = output_len), time every step; "
        "report TTFT, TPOT, end-to-end latency, output tok/s, MBU and FLOP/s utilisation.",
    )
    add_common_args(p)
    g = p.add_argument_group("latency")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--num-iters", type=int, default=5, help="timed batches")
    g.add_argument("--warmup-iters", type=int, default=1, help="untimed batches first")
    kernel_profile.add_argument(g, "one batch")
    return p


# ---- device ceilings ----------------------------------------------------------------------------
def _median_seconds(fn: Callable[[], Any], repeats: int, chain: int) -> float:
    """Median wall time of one call of `fn`. Each sample queues `chain` calls back to back and
    blocks once at the end, so the host's dispatch and synchronisation cost is spread over the
    chain instead of inflating a sub-millisecond device time."""
    import jax

    jax.block_until_ready([fn(), fn()])  # compile, then one warm call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(chain)])
        times.append((time.perf_counter() - t) / chain)
    return statistics.median(times)


def measure_bandwidth(nbytes: int, repeats: int = CEILING_REPEATS) -> dict[str, Any]:
    """Device memory bandwidth: a jitted copy of a random `nbytes` buffer, (read + written) bytes
    over the median time."""
    import jax
    import jax.numpy as jnp

    n = max(nbytes // 4, 1)
    x = jax.random.uniform(jax.random.key(1), (n,), jnp.float32)
    copy = jax.jit(lambda a: jnp.copy(a))
    seconds = _median_seconds(lambda: copy(x), repeats, CEILING_CHAIN)
    moved = 2 * n * 4
    return {
        "bytes_per_s": moved / seconds,
        "buffer_bytes": n * 4,
        "median_seconds": seconds,
        "repeats": repeats,
        "method": f"jit(jnp.copy) of a random float32 buffer, {CEILING_CHAIN} per sample; "
        "bytes read + written / median time per copy",
    }


def measure_matmul(n: int, dtype: Any, repeats: int = CEILING_REPEATS) -> dict[str, Any]:
    """Dense matmul throughput: `[n, n] @ [n, n]` in `dtype`, 2·n³ FLOPs over the median time."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    seconds = _median_seconds(lambda: mm(a, b), repeats, CEILING_CHAIN)
    return {
        "flop_per_s": 2 * n**3 / seconds,
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "median_seconds": seconds,
        "repeats": repeats,
    }


def measure_ceilings(dtype_option: str | None) -> dict[str, Any]:
    """Bandwidth and matmul ceilings of device 0; run before the model and KV cache take memory."""
    import jax

    from jaxserve.llm_engine import resolve_dtype

    kind = "cpu" if jax.devices()[0].platform == "cpu" else "gpu"
    return {
        "memory_bandwidth": measure_bandwidth(BANDWIDTH_BYTES[kind]),
        "matmul": measure_matmul(MATMUL_N[kind], resolve_dtype(dtype_option)),
    }


# ---- accounting ---------------------------------------------------------------------------------
def _key(k: Any) -> str:
    return str(getattr(k, "key", k))


@dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of the model's steps, from its actual parameters.

    `dense_bytes`: weights every step reads, except the output projection and routed experts.
    `head_bytes`: the output projection (`lm_head`, or the tied embedding table).
    `expert_bytes`: all routed experts. `embedding_bytes`: an untied embedding table (not read by
    a decode step beyond the gathered rows, so never counted). `*_params`: matmul parameters.
    """

    dense_bytes: int
    head_bytes: int
    expert_bytes: int
    embedding_bytes: int
    dense_matmul_params: int
    head_params: int
    expert_params: int
    num_experts: int
    experts_per_token: int
    kv_bytes_per_token: int
    attention_flops_per_context_token: int  # per query token: QK^T and PV, all layers

    @classmethod
    def of(cls, llm: Any) -> ModelCost:
        """The cost of an `LLMEngine`'s model as loaded (its dtypes, its KV-cache dtype)."""
        return cls.from_state(llm.engine.state, llm.model_config, llm.engine.kv_dtype)

    @classmethod
    def from_state(cls, state: Any, m: ModelConfig, kv_dtype: Any) -> ModelCost:
        """From the model's NNX state (arrays, or `jax.ShapeDtypeStruct`s of an abstract model)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from models.moe import EXPERT_WEIGHTS

        sizes = {"dense": 0, "head": 0, "expert": 0, "embedding": 0}
        params = {"dense": 0, "head": 0, "expert": 0}
        for path, x in jax.tree.leaves_with_path(nnx.to_pure_dict(state)):
            top = _key(path[0])
            if top == "embed_tokens":
                kind = "head" if m.tie_word_embeddings else "embedding"
            elif top == "lm_head":
                kind = "head"
            elif x.ndim == 3 and _key(path[-1]) in EXPERT_WEIGHTS:  # stacked [E, in, out]
                kind = "expert"
            else:
                kind = "dense"
            sizes[kind] += x.size * x.dtype.itemsize
            if kind != "embedding" and x.ndim >= 2:
                params[kind] += x.size
        kv_item = jnp.dtype(kv_dtype).itemsize
        return cls(
            dense_bytes=sizes["dense"],
            head_bytes=sizes["head"],
            expert_bytes=sizes["expert"],
            embedding_bytes=sizes["embedding"],
            dense_matmul_params=params["dense"],
            head_params=params["head"],
            expert_params=params["expert"],
            num_experts=m.num_experts,
            experts_per_token=m.num_experts_per_tok,
            kv_bytes_per_token=2 * m.num_layers * m.num_kv_heads * m.head_dim * kv_item,
            attention_flops_per_context_token=4 * m.num_layers * m.num_heads * m.head_dim,
        )

    def experts_touched(self, tokens: int) -> float:
        """Expected fraction of routed experts that `tokens` tokens use, under uniform routing."""
        if not self.num_experts:
            return 0.0
        return 1.0 - (1.0 - self.experts_per_token / self.num_experts) ** tokens

    def weight_bytes(self, batch: int) -> float:
        """Weight bytes one decode step of `batch` sequences must read."""
        return self.dense_bytes + self.head_bytes + self.expert_bytes * self.experts_touched(batch)

    def decode_bytes(self, batch: int, context_tokens: int) -> float:
        """+ the KV cache: `context_tokens` = the sequences' attended lengths, summed."""
        return self.weight_bytes(batch) + self.kv_bytes_per_token * context_tokens

    def _token_matmul_params(self) -> float:
        active = self.expert_params * self.experts_per_token / max(self.num_experts, 1)
        return self.dense_matmul_params + active

    def decode_flops(self, batch: int, context_tokens: int) -> float:
        mm = 2 * (self._token_matmul_params() + self.head_params) * batch
        return mm + self.attention_flops_per_context_token * context_tokens

    def prefill_flops(self, prompt_len: int) -> float:
        """One prompt: every position through the layers (causal attention), logits of the last."""
        mm = 2 * self._token_matmul_params() * prompt_len + 2 * self.head_params
        attended = prompt_len * (prompt_len + 1) // 2
        return mm + self.attention_flops_per_context_token * attended

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight_bytes_read_per_decode_step_batch1": self.weight_bytes(1),
            "dense_bytes": self.dense_bytes,
            "head_bytes": self.head_bytes,
            "expert_bytes": self.expert_bytes,
            "embedding_bytes_not_read": self.embedding_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "matmul_params_per_token": self._token_matmul_params() + self.head_params,
        }


# ---- one batch ----------------------------------------------------------------------------------
@dataclass
class DecodeStep:
    """An engine step in which every unfinished sequence of the batch decoded: one token each,
    or `iterations` of them in a multi-step run (`--decode-steps`)."""

    seconds: float
    batch: int
    context_tokens: int  # attended positions at its first iteration, summed over the batch
    iterations: int = 1

    def contexts(self) -> list[int]:
        """The summed attended positions of each iteration (one more per sequence each time)."""
        return [self.context_tokens + j * self.batch for j in range(self.iterations)]


@dataclass
class BatchTrace:
    """Per-request times (seconds from submission) and the pure decode steps of one batch."""

    first_token: list[float]
    last_token: list[float]
    output_tokens: list[int]
    decode_steps: list[DecodeStep] = field(default_factory=list)
    num_steps: int = 0
    preemptions: int = 0

    @property
    def e2e(self) -> float:
        return max(self.last_token)


def run_batch(llm: Any, prompts: list[list[int]], params: Any, tag: str) -> BatchTrace:
    """Submit `prompts` together and step the engine until all finish."""
    n = len(prompts)
    first: list[float | None] = [None] * n
    last = [0.0] * n
    count = [0] * n
    done = [False] * n
    index = {f"{tag}-{i}": i for i in range(n)}
    preempted_before = llm.stats()["num_preemptions"]
    trace = BatchTrace([], [], [])
    t0 = time.perf_counter()
    for rid, i in index.items():
        llm.add_request(rid, prompts[i], params)
    while llm.has_unfinished_requests():
        running = [i for i in range(n) if not done[i]]
        # Pure decode: every sequence has its first token and none was preempted (a preempted
        # one recomputes its prompt later, which would hide a prefill inside a "decode" step).
        pure = all(f is not None for f in first)
        context = sum(len(prompts[i]) + count[i] for i in running)
        start = time.perf_counter()
        outputs = llm.step()
        now = time.perf_counter()
        seconds, end = now - start, now - t0
        trace.num_steps += 1
        iterations = 0
        for out in outputs:
            i = index[out.request_id]
            k = sum(len(c.token_ids) for c in out.outputs)
            iterations = max(iterations, k)
            if k:
                count[i] += k
                if first[i] is None:
                    first[i] = end
                last[i] = end
            done[i] = done[i] or out.finished
        trace.preemptions = llm.stats()["num_preemptions"] - preempted_before
        if pure and running and trace.preemptions == 0 and iterations:
            trace.decode_steps.append(DecodeStep(seconds, len(running), context, iterations))
    if any(f is None for f in first):
        raise RuntimeError(f"{tag}: a request finished without producing a token")
    trace.first_token = [float(f) for f in first if f is not None]
    trace.last_token = last
    trace.output_tokens = count
    return trace


# ---- figures ------------------------------------------------------------------------------------
def figures(
    traces: list[BatchTrace],
    cost: ModelCost,
    input_len: int,
    ceilings: dict[str, Any],
    num_devices: int = 1,
) -> dict[str, Any]:
    """Everything the latency mode reports, from the timed batches. A model spread over
    `num_devices` devices is held against that many times the ceilings of one."""
    ttft = [f for t in traces for f in t.first_token]
    decode_time = [
        last - first
        for t in traces
        for first, last in zip(t.first_token, t.last_token, strict=True)
    ]
    tpot = [
        (last - first) / (n - 1)
        for t in traces
        for first, last, n in zip(t.first_token, t.last_token, t.output_tokens, strict=True)
        if n > 1
    ]
    # Per decode iteration: a multi-step run's time is shared evenly by its iterations.
    steps = [s for t in traces for s in t.decode_steps]
    iteration_s = [s.seconds / s.iterations for s in steps for _ in range(s.iterations)]
    contexts = [(s.batch, c) for s in steps for c in s.contexts()]
    step_seconds = sum(s.seconds for s in steps)
    step_bytes = sum(cost.decode_bytes(b, c) for b, c in contexts)
    step_flops = sum(cost.decode_flops(b, c) for b, c in contexts)
    batch_prefill = [max(t.first_token) for t in traces]
    prefill_flops = sum(len(t.first_token) * cost.prefill_flops(input_len) for t in traces)
    tokens = sum(sum(t.output_tokens) for t in traces)
    e2e_total = sum(t.e2e for t in traces)
    bandwidth = ceilings["memory_bandwidth"]["bytes_per_s"] * num_devices
    peak_flops = ceilings["matmul"]["flop_per_s"] * num_devices
    achieved_bw = report.ratio(step_bytes, step_seconds)
    decode_flop_s = report.ratio(step_flops, step_seconds)
    prefill_flop_s = report.ratio(prefill_flops, sum(batch_prefill))
    decode_tokens = sum(b for b, _ in contexts)
    return {
        "ttft_ms": report.summarize(ttft, 1e3),
        "batch_prefill_ms": report.summarize(batch_prefill, 1e3),
        "tpot_ms": report.summarize(tpot, 1e3),
        "decode_time_ms": report.summarize(decode_time, 1e3),
        "e2e_latency_ms": report.summarize([t.e2e for t in traces], 1e3),
        "decode_step_ms": report.summarize(iteration_s, 1e3),
        "num_decode_steps": len(iteration_s),
        "decode_calls": len(steps),
        "decode_steps_per_batch": len(iteration_s) / len(traces),
        "steps_per_batch": sum(t.num_steps for t in traces) / len(traces),
        "output_tokens": tokens,
        "output_throughput_tok_s": report.ratio(tokens, e2e_total),
        "decode_throughput_tok_s": report.ratio(decode_tokens, step_seconds),
        "mean_decode_batch": report.ratio(decode_tokens, len(contexts)),
        "mean_context_len": report.ratio(sum(c for _, c in contexts), decode_tokens),
        "decode_bytes_per_step": report.ratio(step_bytes, len(contexts)),
        "decode_bandwidth_bytes_s": achieved_bw,
        "mbu": None if achieved_bw is None else achieved_bw / bandwidth,
        "decode_flop_s": decode_flop_s,
        "decode_mfu": None if decode_flop_s is None else decode_flop_s / peak_flops,
        "prefill_flop_s": prefill_flop_s,
        "prefill_mfu": None if prefill_flop_s is None else prefill_flop_s / peak_flops,
        "preemptions": sum(t.preemptions for t in traces),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from jaxserve.sampling_params import SamplingParams

    check_positive(batch_size=args.batch_size, input_len=args.input_len, num_iters=args.num_iters)
    if args.output_len < 2:
        raise ValueError(f"output_len: TPOT needs at least 2 output tokens, got {args.output_len}")
    if args.warmup_iters < 0:
        raise ValueError(f"warmup_iters: must be >= 0, got {args.warmup_iters}")
    cupti = kernel_profile.cupti() if args.kernel_profile else None
    env = report.environment()
    ceilings = measure_ceilings(args.dtype)
    t = time.perf_counter()
    llm = build_engine(args, min_model_len=args.input_len + args.output_len)
    load_s = time.perf_counter() - t
    if args.batch_size > llm.config.max_num_seqs:
        raise ValueError(
            f"batch_size: {args.batch_size} exceeds max_num_seqs ({llm.config.max_num_seqs})"
        )
    warmup_s = llm.warmup()
    cost = ModelCost.of(llm)
    params = SamplingParams(
        max_tokens=args.output_len,
        ignore_eos=True,
        temperature=args.temperature,
        detokenize=llm.tokenizer is not None,
    )
    rng = np.random.default_rng(args.seed)
    vocab = llm.model_config.vocab_size

    def batch(tag: str) -> BatchTrace:
        prompts = [random_prompt(rng, args.input_len, vocab) for _ in range(args.batch_size)]
        return run_batch(llm, prompts, params, tag)

    for it in range(args.warmup_iters):
        batch(f"warmup{it}")
    llm.engine.finish_compiles()  # multi-step variants the warm-up batches asked for
    with report.CompileCounter() as compiles:
        traces = [
            batch(f"it{it}")
            for it in tqdm(range(args.num_iters), desc="latency", unit="batch", disable=None)
        ]
    result = {
        **report.metadata(args, "latency", env),
        "model": report.describe_model(llm, args),
        "engine": {**report.describe_engine(llm), "load_s": load_s, "warmup_s": warmup_s},
        "cost": cost.to_dict(),
        "ceilings": ceilings,
        "workload": {
            "batch_size": args.batch_size,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_iters": args.num_iters,
            "warmup_iters": args.warmup_iters,
            "temperature": args.temperature,
        },
        "results": figures(traces, cost, args.input_len, ceilings, num_model_devices(args)),
        "compilations_while_timed": compiles.to_dict(),
    }
    if cupti is not None:
        result["kernel_profile"] = kernel_profile.profile(cupti, lambda: batch("profile"))
    print_summary(result)
    return result


def print_summary(result: dict[str, Any]) -> None:
    r, w, c = result["results"], result["workload"], result["ceilings"]
    dev = result["environment"]["device"]
    bw = c["memory_bandwidth"]["bytes_per_s"]
    rows = [
        ("model", f"{result['model']['name']} ({result['model']['dtype']})"),
        ("device", f"{dev['device_kind']} x{dev['count']}"),
        ("batch / input / output", f"{w['batch_size']} / {w['input_len']} / {w['output_len']}"),
        ("TTFT ms", report.fmt_summary(r["ttft_ms"])),
        ("TPOT ms", report.fmt_summary(r["tpot_ms"])),
        ("decode step ms", report.fmt_summary(r["decode_step_ms"])),
        ("end-to-end ms", report.fmt_summary(r["e2e_latency_ms"])),
        ("output tok/s", report.fmt(r["output_throughput_tok_s"])),
        ("decode tok/s", report.fmt(r["decode_throughput_tok_s"])),
        ("measured bandwidth GB/s", report.fmt(bw / 1e9)),
        (
            "decode bandwidth GB/s",
            report.fmt(
                None
                if r["decode_bandwidth_bytes_s"] is None
                else r["decode_bandwidth_bytes_s"] / 1e9
            ),
        ),
        ("MBU", report.fmt(r["mbu"], 3)),
        ("measured matmul TFLOP/s", report.fmt(c["matmul"]["flop_per_s"] / 1e12)),
        ("prefill MFU", report.fmt(r["prefill_mfu"], 3)),
        ("decode MFU", report.fmt(r["decode_mfu"], 4)),
        ("preemptions", report.fmt(r["preemptions"])),
        report.compile_row(result["compilations_while_timed"]),
    ]
    report.print_table("jaxserve bench latency", rows)
    if result.get("kernel_profile"):
        kernel_profile.print_profile(
            result["kernel_profile"], "kernel profile (per output token, prefill included)"
        )
