"""`jaxserve.bench`: every mode end to end on a tiny random model (CPU), and the arithmetic behind
the figures: shapes, byte/FLOP accounting, workloads, arrivals and serving metrics."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.bench import (
    kernel_profile,
    latency,
    parse_range,
    random_prompt,
    report,
    sample_workload,
    shapes,
)
from jaxserve.bench.__main__ import build_parser, main
from jaxserve.bench.latency import ModelCost
from jaxserve.bench.serve import (
    RequestResult,
    arrival_times,
    figures,
    parse_rates,
    parse_slo,
)
from models import abstract_model

# One engine shape for the in-process modes, so their compilations are shared: 3 usable pages of
# 16 tokens hold two 14-token sequences but not two 30-token ones (the throughput run preempts).
TINY = (
    "--random-weights tiny --max-num-seqs 2 --max-num-batched-tokens 16 --max-model-len 32 "
    "--num-pages 4"
).split()


def run_cli(tmp_path: Path, mode: str, *extra: str) -> dict:
    path = tmp_path / f"{mode}.json"
    assert main([mode, *TINY, *extra, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def check_summary(s: dict, n: int | None = None) -> None:
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["min"] <= s["mean"] <= s["max"]
    if n is not None:
        assert s["n"] == n


def check_metadata(d: dict, mode: str) -> None:
    assert d["mode"] == mode
    assert d["command_line"].startswith(f"python -m jaxserve.bench {mode} --random-weights tiny")
    assert d["config"]["random_weights"] == "tiny"
    assert d["environment"]["jax_version"]
    assert isinstance(d["environment"]["program_env"], dict)


def test_environment_names_the_variables_that_change_programs(monkeypatch) -> None:
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_pdl=false")
    env = report.environment(init_device=False)
    assert env["program_env"] == {"XLA_FLAGS": "--xla_gpu_enable_pdl=false"}
    monkeypatch.delenv("XLA_FLAGS")
    assert report.environment(init_device=False)["program_env"] == {}


# ---- shapes and accounting ----------------------------------------------------------------------
# Published parameter counts of the real checkpoints.
PARAMS = {
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-70b": 70_553_706_496,
    "smollm2-135m": 134_515_008,
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_shapes_have_published_parameter_counts(name):
    cfg = shapes.model_config(name)
    state = nnx.to_pure_dict(nnx.state(abstract_model(cfg, jnp.bfloat16)))
    assert sum(x.size for x in jax.tree.leaves(state)) == PARAMS[name]


def test_unknown_shape_names_the_known_ones():
    with pytest.raises(ValueError, match="llama-3-8b"):
        shapes.model_config("llama-9")


def test_decode_bytes_of_llama3_8b_skip_only_the_embedding_table():
    cfg = shapes.model_config("llama-3-8b")
    cost = ModelCost.from_state(nnx.state(abstract_model(cfg, jnp.bfloat16)), cfg, jnp.bfloat16)
    embedding = cfg.vocab_size * cfg.hidden_size
    assert cost.embedding_bytes == 2 * embedding
    assert cost.weight_bytes(1) == 2 * (PARAMS["llama-3-8b"] - embedding)  # ~15.0 GB
    # K and V of 32 layers x 8 KV heads x 128 dims, bf16.
    assert cost.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert cost.decode_bytes(4, 1000) == cost.weight_bytes(4) + 1000 * cost.kv_bytes_per_token
    # Dense: the weights read do not depend on the batch; 2 FLOPs per matmul weight per token.
    assert cost.weight_bytes(64) == cost.weight_bytes(1)
    assert cost.decode_flops(3, 0) == 3 * 2 * (PARAMS["llama-3-8b"] - embedding - 65 * 4096)


def test_tied_embedding_is_read_as_the_output_projection():
    cfg = shapes.model_config("llama-3.2-1b")
    cost = ModelCost.from_state(nnx.state(abstract_model(cfg, jnp.bfloat16)), cfg, jnp.bfloat16)
    assert cost.embedding_bytes == 0
    assert cost.head_bytes == 2 * cfg.vocab_size * cfg.hidden_size
    assert cost.weight_bytes(1) == 2 * PARAMS["llama-3.2-1b"]


def test_moe_bytes_grow_with_the_experts_a_batch_touches():
    cfg = shapes.model_config("mixtral-8x7b")
    cost = ModelCost.from_state(nnx.state(abstract_model(cfg, jnp.bfloat16)), cfg, jnp.bfloat16)
    # 32 layers x 8 experts x 3 matrices of 4096 x 14336.
    assert cost.expert_params == 32 * 8 * 3 * 4096 * 14336
    assert cost.experts_touched(1) == pytest.approx(2 / 8)
    assert cost.experts_touched(2) == pytest.approx(1 - (6 / 8) ** 2)
    assert cost.weight_bytes(1) < cost.weight_bytes(8) < cost.weight_bytes(1000)
    assert cost.weight_bytes(10**6) == pytest.approx(
        cost.dense_bytes + cost.head_bytes + cost.expert_bytes
    )
    # Per token only top-k of the experts compute.
    per_token = cost.dense_matmul_params + cost.expert_params * 2 / 8 + cost.head_params
    assert cost.decode_flops(1, 0) == pytest.approx(2 * per_token)


def test_prefill_flops_count_causal_attention_and_one_logits_row():
    cfg = shapes.model_config("tiny")
    cost = ModelCost.from_state(nnx.state(abstract_model(cfg, jnp.float32)), cfg, jnp.float32)
    s = 10
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (s * (s + 1) // 2)
    expected = 2 * cost.dense_matmul_params * s + 2 * cost.head_params + attention
    assert cost.prefill_flops(s) == expected


# ---- workloads, arrivals, serving metrics -------------------------------------------------------
def workload_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["throughput", *argv])


def test_uniform_ranges_stay_inside_their_bounds():
    args = workload_args("--input-len-range", "5:9", "--output-len", "3")
    w = sample_workload(args, 200, np.random.default_rng(0), 64)
    assert w.distribution == "uniform"
    assert set(w.input_lens) == set(range(5, 10))
    assert set(w.output_lens) == {3}


def test_fixed_lengths_longer_than_the_context_are_refused():
    args = workload_args("--input-len", "30", "--output-len", "10")
    with pytest.raises(ValueError, match="max_model_len"):
        sample_workload(args, 4, np.random.default_rng(0), 32)


def test_sharegpt_synthetic_is_long_tailed_and_clipped_to_the_context():
    args = workload_args("--dataset", "sharegpt-synthetic")
    w = sample_workload(args, 4000, np.random.default_rng(0), 100_000)
    assert 100 < np.median(w.input_lens) < 140
    assert 130 < np.median(w.output_lens) < 170
    assert np.mean(w.input_lens) > 1.3 * np.median(w.input_lens)  # long right tail
    clipped = sample_workload(args, 4000, np.random.default_rng(0), 256)
    totals = np.add(clipped.input_lens, clipped.output_lens)
    assert totals.max() <= 256
    assert min(clipped.input_lens) >= 4 and min(clipped.output_lens) >= 4


def test_random_prompts_are_seeded_and_span_the_vocabulary():
    a = random_prompt(np.random.default_rng(3), 64, 512)
    assert a == random_prompt(np.random.default_rng(3), 64, 512)
    assert all(0 <= t < 512 for t in a)
    assert len(set(a)) > 32


def test_parse_options():
    assert parse_range("3:7") == (3, 7)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_range("7:3")
    assert parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    assert parse_slo("ttft_ms=200,tpot_ms=50") == {"ttft_ms": 200.0, "tpot_ms": 50.0}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_slo("latency=3")


def test_engine_switches_reach_the_engine_and_a_child_server():
    from jaxserve.bench import build_engine, engine_argv

    switches = ["--no-prefix-caching", "--no-async-scheduling"]
    for given in ([], switches):
        args = build_parser().parse_args(["throughput", *TINY, *given])
        assert [a for a in engine_argv(args) if a.startswith("--no-")] == given
        cfg = build_engine(args).config
        assert (cfg.enable_prefix_caching, cfg.async_scheduling) == (not given, not given)


def test_poisson_and_gamma_arrivals():
    rng = np.random.default_rng(0)
    t = arrival_times(20_000, 4.0, 1.0, rng)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential
    bursty = np.diff(arrival_times(20_000, 4.0, 0.25, np.random.default_rng(0)))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.05)  # 1 / sqrt(shape)
    assert not arrival_times(5, math.inf, 1.0, rng).any()
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(5, 1.0, 0.0, rng)


def _result(ttft: float, gaps: list[float], input_len: int = 10) -> RequestResult:
    """A completed request with one token at `ttft`, then one per gap."""
    e2e = ttft + sum(gaps)
    return RequestResult(
        input_len=input_len,
        output_len=len(gaps) + 1,
        ok=True,
        output_tokens=len(gaps) + 1,
        ttft=ttft,
        e2e=e2e,
        itl=list(gaps),
        end=e2e,
    )


def test_serving_figures_on_synthetic_timestamps():
    results = [
        _result(0.100, [0.020, 0.030, 0.040]),  # TPOT 30 ms
        _result(0.300, [0.010, 0.010]),  # TPOT 10 ms
        _result(0.050, [0.100]),  # TPOT 100 ms
        RequestResult(input_len=10, output_len=4, error="UNAVAILABLE: draining"),
    ]
    f = figures(results, duration=2.0, slo={"ttft_ms": 200.0, "tpot_ms": 50.0})
    assert (f["completed"], f["failed"]) == (3, 1)
    assert f["errors"] == {"UNAVAILABLE: draining": 1}
    assert f["total_output_tokens"] == 4 + 3 + 2
    assert f["total_input_tokens"] == 30
    assert f["output_throughput_tok_s"] == pytest.approx(9 / 2.0)
    assert f["total_throughput_tok_s"] == pytest.approx(39 / 2.0)
    assert f["request_throughput_req_s"] == pytest.approx(1.5)
    assert f["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert f["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert f["tpot_ms"]["mean"] == pytest.approx((30 + 10 + 100) / 3)
    assert f["itl_ms"]["n"] == 6
    assert f["itl_ms"]["max"] == pytest.approx(100.0)
    assert f["e2e_latency_ms"]["max"] == pytest.approx(320.0)
    # Only the first request meets both bounds (the second is slow to start, the third to decode).
    assert f["good_requests"] == 1
    assert f["goodput_req_s"] == pytest.approx(0.5)
    assert f["slo_attainment"] == pytest.approx(0.25)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        check_summary(f[key])
    assert figures(results, 2.0, None)["goodput_req_s"] is None


# ---- the modes end to end -----------------------------------------------------------------------
@pytest.mark.parametrize("decode_steps", [1, 3])
def test_latency_mode(tmp_path, decode_steps):
    batch, inp, out, iters = 2, 8, 6, 2
    d = run_cli(
        tmp_path,
        "latency",
        *("--batch-size", str(batch), "--input-len", str(inp), "--output-len", str(out)),
        *("--num-iters", str(iters), "--warmup-iters", "1", "--decode-steps", str(decode_steps)),
    )
    check_metadata(d, "latency")
    assert d["environment"]["device"]["count"] >= 1
    assert d["model"]["hf_config"]["hidden_size"] == 64
    r, cost = d["results"], d["cost"]
    n_req = batch * iters
    for key, n in (("ttft_ms", n_req), ("tpot_ms", n_req), ("e2e_latency_ms", iters)):
        check_summary(r[key], n)
    # Both prompts fit one prefill step, so every later step decodes the whole batch.
    assert r["num_decode_steps"] == iters * (out - 1)
    # Runs of 3 then of the 2 iterations left; one call per iteration without runs.
    assert r["decode_calls"] == iters * (2 if decode_steps == 3 else out - 1)
    assert r["mean_decode_batch"] == batch
    assert r["mean_context_len"] == inp + out / 2
    assert r["tpot_ms"]["mean"] * (out - 1) == pytest.approx(r["decode_time_ms"]["mean"])
    assert r["e2e_latency_ms"]["max"] >= r["ttft_ms"]["max"]
    assert r["output_tokens"] == n_req * out
    e2e_s = r["e2e_latency_ms"]["mean"] * iters / 1e3
    assert r["output_throughput_tok_s"] == pytest.approx(r["output_tokens"] / e2e_s)
    # MBU: weights (no embedding table) + the KV cache at the mean context, per step time.
    step_bytes = cost["weight_bytes_read_per_decode_step_batch1"] + (
        cost["kv_bytes_per_token"] * batch * r["mean_context_len"]
    )
    assert r["decode_bytes_per_step"] == pytest.approx(step_bytes)
    assert (
        cost["dense_bytes"] + cost["head_bytes"] + cost["embedding_bytes_not_read"]
        == (d["model"]["param_bytes"])
    )
    bw = d["ceilings"]["memory_bandwidth"]["bytes_per_s"]
    assert r["mbu"] == pytest.approx(r["decode_bandwidth_bytes_s"] / bw)
    step_s = r["decode_step_ms"]["mean"] / 1e3
    assert r["decode_bandwidth_bytes_s"] == pytest.approx(step_bytes / step_s)
    assert 0 < r["decode_mfu"] and 0 < r["prefill_mfu"]
    assert r["preemptions"] == 0
    assert isinstance(d["compilations_while_timed"]["count"], int)


def test_kernel_profile_summary():
    launches = [("gemm", 0.004), ("norm", 0.001), ("gemm", 0.004), ("attn", 0.003), ("norm", 0.001)]
    p = kernel_profile.summarize(launches, tokens=2)
    assert p["output_tokens"] == 2
    assert p["kernel_us_per_token"] == pytest.approx(6.5)  # 13 us of kernels over 2 tokens
    assert p["kernel_s"] == pytest.approx(13e-6)
    assert p["launches_per_token"] == 2.5
    assert [k["name"] for k in p["kernels"]] == ["gemm", "attn", "norm"]
    gemm = p["kernels"][0]
    assert gemm["us_per_token"] == pytest.approx(4.0)
    assert gemm["launches_per_token"] == 1.0
    assert gemm["share"] == pytest.approx(8 / 13)
    assert sum(k["share"] for k in p["kernels"]) == pytest.approx(1.0)


class FakeCupti:
    """Stands in for jaxlib's CUPTI hooks: records what the profiled batch "launched"."""

    def __init__(self, launches):
        self.launches, self.calls = launches, []

    def _cupti_init(self):
        self.calls.append("init")

    def _cupti_get_timings(self, finalize):
        self.calls.append(("get", finalize))
        return self.launches


def test_kernel_profile_wraps_one_batch():
    trace = latency.BatchTrace(first_token=[], last_token=[], output_tokens=[3, 1])
    ext = FakeCupti([("gemm", 0.004), ("norm", 0.004)])
    p = kernel_profile.profile(ext, lambda: trace)
    assert ext.calls == ["init", ("get", True)]
    assert p["output_tokens"] == 4 and p["kernel_us_per_token"] == pytest.approx(2.0)
    assert p["wall_s"] >= 0.0
    # Nothing recorded: no profile rather than one of zeros.
    assert kernel_profile.profile(FakeCupti([]), lambda: trace) is None


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the refusal off GPUs")
@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_kernel_profile_needs_a_gpu(tmp_path, capsys, mode):
    path = tmp_path / f"{mode}.json"
    assert main([mode, *TINY, "--kernel-profile", "--json", str(path)]) == 2
    assert "kernel_profile: needs an NVIDIA GPU" in capsys.readouterr().err
    assert not path.exists()


def test_throughput_mode(tmp_path):
    d = run_cli(
        tmp_path,
        "throughput",
        *("--num-requests", "6", "--input-len-range", "6:14", "--output-len-range", "8:16"),
    )
    check_metadata(d, "throughput")
    r = d["results"]
    assert d["workload"]["distribution"] == "uniform"
    assert r["num_requests"] == 6
    # ignore_eos: every request runs to its drawn length.
    assert r["total_output_tokens"] == r["expected_output_tokens"]
    assert 6 * 8 <= r["total_output_tokens"] <= 6 * 16
    assert r["output_throughput_tok_s"] == pytest.approx(r["total_output_tokens"] / r["elapsed_s"])
    total = r["total_input_tokens"] + r["total_output_tokens"]
    assert r["total_throughput_tok_s"] == pytest.approx(total / r["elapsed_s"])
    assert r["requests_per_s"] == pytest.approx(6 / r["elapsed_s"])
    # Two sequences of up to 30 tokens need 4 pages; the cache has 3.
    assert r["preemptions"] > 0
    assert r["peak_kv_usage"] <= 1.0
    for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
        check_summary(r[key], 6)
    assert r["e2e_latency_ms"]["max"] <= r["elapsed_s"] * 1e3
    steps = r["steps"]
    assert steps["runs"]["count"] + steps["single"]["count"] == r["num_steps"]
    assert 0 < steps["runs"]["seconds"] + steps["single"]["seconds"] <= r["elapsed_s"]
    for kind in ("runs", "single"):
        assert 0 <= steps[kind]["device_wait_s"] <= steps[kind]["seconds"]


def test_throughput_kernel_profile_reruns_the_workload(tmp_path, monkeypatch):
    """The profile is of a second run of the same lengths, under the (here: fake) CUPTI hooks."""
    ext = FakeCupti([("gemm", 0.004), ("attn", 0.002)])
    monkeypatch.setattr(kernel_profile, "cupti", lambda: ext)
    lens = ("--input-len", "6", "--output-len", "5")
    d = run_cli(tmp_path, "throughput", "--num-requests", "3", *lens, "--kernel-profile")
    assert ext.calls == ["init", ("get", True)]
    p = d["kernel_profile"]
    assert p["output_tokens"] == d["results"]["total_output_tokens"]
    assert p["kernel_s"] == pytest.approx(6e-6) and p["wall_s"] > 0.0
    assert [k["name"] for k in p["kernels"]] == ["gemm", "attn"]


def test_serve_mode_against_its_own_server(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    d = run_cli(
        tmp_path,
        "serve",
        *("--num-requests", "6", "--input-len", "8", "--output-len", "5"),
        *("--sweep", "40,inf", "--warmup-requests", "2", "--slo", "ttft_ms=1000,tpot_ms=100"),
        *("--plot", str(plot)),
    )
    check_metadata(d, "serve")
    assert d["server"]["started_by_bench"] and d["server"]["startup_s"] > 0
    assert d["server"]["all_compiled_s"] >= d["server"]["startup_s"]
    assert d["server_info"]["vocab_size"] == 512
    assert [run["request_rate"] for run in d["runs"]] == [40.0, "inf"]
    for run in d["runs"]:
        r = run["results"]
        assert (r["completed"], r["failed"]) == (6, 0)
        assert r["total_output_tokens"] == 6 * 5
        assert r["output_throughput_tok_s"] == pytest.approx(30 / r["duration_s"])
        assert 0 <= r["goodput_req_s"] <= r["request_throughput_req_s"]
        assert r["slo_attainment"] == pytest.approx(r["good_requests"] / 6)
        for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
            check_summary(r[key], 6)
        check_summary(r["itl_ms"])
        assert r["e2e_latency_ms"]["min"] >= r["ttft_ms"]["min"]
        assert 1 <= run["peak_concurrency"] <= 6
    # The PNG is drawn where matplotlib is installed; otherwise the run says so and goes on.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert d["plot"] is None and "matplotlib is not installed" in capsys.readouterr().err
    else:
        assert d["plot"] == str(plot) and plot.stat().st_size > 0


@pytest.mark.parametrize("caching", [True, False])
def test_throughput_shared_prefix_hits_the_prefix_cache(tmp_path, caching):
    flags = () if caching else ("--no-prefix-caching",)
    d = run_cli(
        tmp_path,
        "throughput",
        *("--num-requests", "6", "--input-len", "4", "--output-len", "3"),
        *("--shared-prefix-len", "16", "--num-pages", "64", "--max-num-seqs", "2"),
        *("--max-prefill-seqs", "1", *flags),
    )
    r = d["results"]
    assert d["engine"]["max_prefill_seqs"] == 1
    assert d["engine"]["compiler_options"] == {}  # GPU-only options
    assert d["workload"]["shared_prefix_len"] == 16
    assert r["total_input_tokens"] == 6 * (16 + 4)
    if caching:
        # Requests admitted after the first step reuse the prefix's full pages.
        assert r["prefix_cache_hits_total"] > 0
        assert r["prefix_cache_hit_rate"] == pytest.approx(
            r["prefix_cache_hits_total"] / r["prefix_cache_queries_total"]
        )
    else:
        assert r.get("prefix_cache_hits_total", 0) == 0


def test_kernels_prefill_row_separates_the_pallas_kernel():
    """The prefill rows give the Pallas kernel's own time next to the whole call's (which adds
    the small XLA ops building the kernel's work list)."""
    from jaxserve.bench import kernels

    per_call = {"sort_3_1": 4.7, "loop_gather_fusion": 2.3, "entry_mosaic_gpu_kernel": 966.3}
    assert kernels.pallas_kernel_us(per_call) == pytest.approx(966.3)
    assert kernels.pallas_kernel_us({"sort_3_1": 4.7}) is None


def test_kernels_decode_inputs_of_an_8bit_cache():
    """The kernels sweep's 8-bit decode rows: pages in that dtype with scales, bytes counted at
    one per element, values whose dequantization is the bf16 case's kind of data."""
    from jaxserve.bench import kernels

    key = jax.random.key(0)
    wide = kernels._decode_inputs(kernels.DecodeCase(2, 64), jnp.bfloat16, key)
    for dtype in ("int8", "float8_e4m3fn"):
        x = kernels._decode_inputs(kernels.DecodeCase(2, 64, kv_dtype=dtype), jnp.bfloat16, key)
        assert x["k"].dtype == jnp.dtype(dtype) and x["v"].shape == wide["v"].shape
        assert x["kv_bytes"] * 2 == wide["kv_bytes"]
        values = x["k"].astype(jnp.float32) * x["scales"]["k_scale"][0]
        assert 0.8 < float(jnp.std(values)) < 1.2
    assert wide["scales"] == {}


def _tool(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefill_timeline_summary_of_a_trace():
    """`tools/prefill_timeline.py` reads a Mosaic GPU profiler trace: per warpgroup (3 traces per
    CTA) the median cycles of each named region, and the step period between softmax starts."""
    timeline = _tool("prefill_timeline")

    def region(tid, name, start, cycles):  # trace times are cycles / 1000
        return [
            {"tid": tid, "name": f"jit/{name}", "ph": "B", "ts": start / 1e3},
            {"tid": tid, "name": f"jit/{name}", "ph": "E", "ts": (start + cycles) / 1e3},
        ]

    events = []
    for cta in range(2):
        for wg in range(2):
            tid = 1 + 3 * cta + wg
            for step in range(3):
                t = 4000 * step + 100 * wg
                events += region(tid, "qk", t, 700) + region(tid, "softmax", t + 700, 1500)
                events += region(tid, "pv", t + 2200, 600 + 100 * wg)
    s = timeline.summarize(events, head_dim=128)
    assert s["median_cycles"]["wg0"] == pytest.approx({"pv": 600, "qk": 700, "softmax": 1500})
    assert s["median_cycles"]["wg1"]["pv"] == pytest.approx(700)
    assert s["step_period_cycles"] == pytest.approx(4000)
    assert s["tensor_core_cycles_per_step"] == 2048  # 2 warpgroups x 2 matmuls of 64x128x128
    assert s["tensor_core_busy"] == pytest.approx(2048 / 4000)
    # The ring at head dim 64: three compute warpgroups, then the TMA warpgroup, per CTA.
    ring = []
    for wg in range(4):
        for step in range(3):
            ring += region(1 + wg, "softmax", 3000 * step, 1400) + region(
                1 + wg, "turn", 3000 * step + 1400, 900
            )
    r = timeline.summarize(ring, head_dim=64, warpgroups=3)
    assert sorted(r["median_cycles"]) == ["wg0", "wg1", "wg2", "wg3"]
    assert r["median_cycles"]["wg2"] == pytest.approx({"softmax": 1400, "turn": 900})
    assert r["tensor_core_cycles_per_step"] == 1536  # 3 warpgroups x 2 matmuls of 64x128x64
    assert r["step_period_cycles"] == pytest.approx(3000)


def test_prefill_timeline_waits_for_a_complete_trace(tmp_path):
    """The trace comes from a host callback: the tool reads it only once it parses, and gives up
    with a clear error when none comes."""
    import threading

    timeline = _tool("prefill_timeline")
    trace = tmp_path / "trace.json"
    trace.write_text('{"traceEvents": [{"tid": 1')  # half written

    def finish():
        trace.write_text(json.dumps({"traceEvents": [{"tid": 1, "ph": "B"}]}))

    timer = threading.Timer(0.3, finish)
    timer.start()
    assert timeline._read_trace(str(tmp_path), timeout_s=10) == [{"tid": 1, "ph": "B"}]
    timer.join()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="no complete profiler trace"):
        timeline._read_trace(str(empty), timeout_s=0.2)


# A made-up nvdisasm listing: set-up, then a loop whose body issues a wgmma, arrives on a barrier
# before its exp2s, and branches back; an inner loop without wgmmas; the exit.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR19], R5 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24, gsb0 ;
        /*0040*/                   SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR15], RZ ;
        /*0048*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0050*/                   FFMA R17, R25, 0.5, -R5 ;
        /*0060*/                   MUFU.EX2 R18, R18 ;
        /*0070*/                   MUFU.EX2 R21, R21 ;
        /*0080*/              @!P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0090*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00a0*/               @P0 BRA `(.L_x_2) ;
        /*00b0*/                   EXIT ;
"""


def test_prefill_sass_finds_the_step_loop_and_its_order():
    """`tools/prefill_sass.py` reads a disassembly: innermost loops that issue wgmmas, their
    opcode counts, and their barrier, matmul and exp2 instructions in issue order."""
    sass = _tool("prefill_sass")
    (loop,) = sass.summarize(SASS)
    assert loop["start"] == 1 and loop["instructions"] == 9
    assert loop["counts"]["MUFU.EX2"] == 2 and loop["counts"]["HGMMA.64x128x16.F32.BF16"] == 2
    assert loop["order"] == (
        "SYNCS.PHASECHK.TRANS64.TRYWAIT [UR19] | HGMMA.64x128x16.F32.BF16 x2 | "
        "SYNCS.ARRIVE.TRANS64.A1T0 [UR15] | WARPGROUP.DEPBAR.LE 0x1 | MUFU.EX2 x2"
    )


def test_prefill_sass_keeps_ptxas_wgmma_notes():
    """What `ptxas -v` says of a wgmma kernel that the tool prints first: its C75xx notes,
    registers and spills, not the rest."""
    sass = _tool("prefill_sass")
    out = """ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'entry_mosaic_gpu_kernel' for 'sm_90a'
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem"""
    assert sass.ptxas_notes(out) == [
        "ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are",
        "8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads",
        "ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem",
    ]
