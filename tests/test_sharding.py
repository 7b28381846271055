"""Tensor and expert parallelism: the sharding rules, parity with one device, and multi-host.

The pytest process has one CPU device, so the multi-device checks run this module as a script in
a subprocess with eight simulated CPU devices (`XLA_FLAGS` must be set before JAX starts). The
multi-host check starts `jaxserve serve` twice, as the two processes of one group over loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import models
from jaxserve import sharding
from jaxserve.config import ModelConfig
from jaxserve.engine import EngineConfig
from jaxserve.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PROMPTS = [[1, 5, 9, 13, 200, 3, 7], [4, 4, 4, 8, 100, 31, 17, 92, 11, 250, 3]]
# (tensor_parallel_size, expert_parallel_size) runs compared with one device.
DENSE_RUNS = {"llama_gqa_llama3rope": [(2, 1), (4, 1), (8, 1)], "llama_mha_tied": [(2, 1), (4, 1)]}
MOE_RUNS = {"mixtral": [(1, 2), (1, 4), (2, 2), (2, 4)], "qwen2_moe": [(2, 1), (1, 4), (4, 2)]}


def config(name: str) -> ModelConfig:
    return ModelConfig.from_dir(FIXTURES / "hf" / name)


def specs(name: str, tp: int, ep: int = 1) -> dict:
    return models.param_specs(config(name), jnp.float32, {"expert": ep, "tensor": tp})


# --- the rules (no devices needed) ---------------------------------------------------------------


def test_tensor_rules_split_whole_heads_and_replicate_what_does_not_divide():
    # 4 query heads, 2 KV heads, vocab 256, MLP 128.
    s2 = specs("llama_gqa_llama3rope", 2)
    attn, mlp = s2["layers"][0]["self_attn"], s2["layers"][0]["mlp"]
    assert attn["q_proj"]["kernel"] == P(None, "tensor")
    assert attn["k_proj"]["kernel"] == attn["v_proj"]["kernel"] == P(None, "tensor")
    assert attn["o_proj"]["kernel"] == P("tensor", None)
    assert mlp["gate_up"] == P(None, None, "tensor")  # each device: its gate and up columns
    assert mlp["down_proj"]["kernel"] == P("tensor", None)
    assert s2["embed_tokens"] == P("tensor", None) and s2["lm_head"] == P(None, "tensor")
    assert s2["norm"]["scale"] == s2["layers"][1]["input_layernorm"]["scale"] == P(None)
    assert sharding.kv_spec(2, {"tensor": 2}) == P("tensor")
    # Fewer KV heads than devices: K/V projections and the cache stay whole on every device.
    s4 = specs("llama_gqa_llama3rope", 4)["layers"][0]["self_attn"]
    assert s4["q_proj"]["kernel"] == P(None, "tensor")
    assert s4["k_proj"]["kernel"] == P(None, None)
    assert sharding.kv_spec(2, {"tensor": 4}) == P()
    assert sharding.kv_shards(2, {"tensor": 4}) == 1 and sharding.kv_shards(4, {"tensor": 4}) == 4
    # 8 does not divide 4 heads (the 64 q columns would split mid-head): attention replicated.
    s8 = specs("llama_gqa_llama3rope", 8)
    assert s8["layers"][0]["self_attn"]["q_proj"]["kernel"] == P(None, None)
    assert s8["layers"][0]["mlp"]["down_proj"]["kernel"] == P("tensor", None)
    gqa = config("llama_gqa_llama3rope")
    assert sharding.replicated_dims(gqa, {"tensor": 8}) == ["heads (4)", "kv_heads (2)"]
    assert sharding.replicated_dims(gqa, {"tensor": 2}) == []
    # Tied embeddings: one matrix, vocab-parallel for both the lookup and the logits.
    assert specs("llama_mha_tied", 4)["embed_tokens"] == P("tensor", None)


def test_expert_rules_and_what_expert_parallelism_refuses():
    moe = specs("qwen2_moe", 2, 2)["layers"][0]["mlp"]
    assert moe["gate_proj"] == moe["up_proj"] == P("expert", None, "tensor")
    assert moe["down_proj"] == P("expert", "tensor", None)
    assert moe["router"]["kernel"] == P(None, None)
    assert moe["shared_expert"]["down_proj"]["kernel"] == P("tensor", None)
    assert moe["shared_expert"]["gate_up"] == P(None, None, "tensor")
    # 3 does not divide the MoE MLP (32): those columns stay whole.
    assert specs("qwen2_moe", 3)["layers"][0]["mlp"]["gate_proj"] == P(None, None, None)
    with pytest.raises(ValueError, match="^expert_parallel_size: 2, but LlamaForCausalLM"):
        sharding.validate(config("llama_gqa_llama3rope"), {"expert": 2, "tensor": 1})
    with pytest.raises(ValueError, match="^expert_parallel_size: 3 does not divide .* 4 experts"):
        sharding.validate(config("mixtral"), {"expert": 3, "tensor": 1})
    with pytest.raises(ValueError, match="^tensor_parallel_size x expert_parallel_size: 2 x 1"):
        sharding.make_mesh(2, 1)  # this process has one device
    with pytest.raises(ValueError, match="^expert_parallel_size: must be >= 1"):
        sharding.make_mesh(1, 0)


# --- eight simulated devices ---------------------------------------------------------------------


def run_script(*args: str, timeout: float = 300) -> str:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_sharding", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def with_tokenizer(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of a converted fixture model with a tokenizer, which `LLM(path)` loads."""
    out = tmp_path / model_dir.name
    shutil.copytree(model_dir, out)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tokenizers" / "spm_tiny" / f, out / f)
    return out


def parity_args(converted, runs: dict[str, list[tuple[int, int]]]) -> list[str]:
    return [
        f"parity:{converted(name)}=" + ",".join(f"{tp}x{ep}" for tp, ep in r)
        for name, r in runs.items()
    ]


def test_dense_tensor_parallel_equals_one_device(converted, tmp_path):
    llm_dir = with_tokenizer(converted("llama_gqa_llama3rope"), tmp_path)
    out = run_script(*parity_args(converted, DENSE_RUNS), f"llm:{llm_dir}")
    assert out.count("parity ok") == sum(len(r) for r in DENSE_RUNS.values())
    assert "llm ok" in out


def test_moe_expert_and_tensor_parallel_equal_one_device(converted):
    out = run_script(*parity_args(converted, MOE_RUNS), f"unbalanced:{converted('mixtral')}")
    assert out.count("parity ok") == sum(len(r) for r in MOE_RUNS.values())
    assert "unbalanced ok" in out


# --- two processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_serve_one_model(converted, tmp_path):
    """`jaxserve serve` as processes 0 and 1 of a group, tensor-parallel over one CPU device each:
    process 0 serves, process 1 runs its steps; answers equal one device's; both exit cleanly."""
    from jaxserve.llm import LLM
    from serving.client import Client

    model = with_tokenizer(converted("llama_gqa_llama3rope"), tmp_path)
    engine_options = dict(
        page_size=4,
        num_pages=32,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        max_model_len=16,
        attention_backend="reference",
    )
    params = SamplingParams(detokenize=False, ignore_eos=True, temperature=0.0, max_tokens=4)
    expected = [
        o.outputs[0].token_ids
        for o in LLM(str(model), **engine_options).generate(PROMPTS, params, use_tqdm=False)
    ]

    port, coordinator = _free_port(), _free_port()
    argv = [sys.executable, "-m", "jaxserve.cli", "serve", str(model), "--metrics-port", "0"]
    argv += ["--tensor-parallel-size", "2", "--coordinator-address", f"127.0.0.1:{coordinator}"]
    argv += ["--num-processes", "2", "--grace-period", "5"]
    for name, value in engine_options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    outs = [log.open("w") for log in logs]
    procs = [
        subprocess.Popen(
            [*argv, "--port", str(port if i == 0 else _free_port()), "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        for i, out in enumerate(outs)
    ]
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(120)
            info = client.model_info()
            assert info.mesh.startswith("2 devices on 2 processes (expert=1 x tensor=2)")
            got = [
                list(
                    client.complete(token_ids=p, max_tokens=4, temperature=0.0, ignore_eos=True)
                    .choices[0]
                    .token_ids
                )
                for p in PROMPTS
            ]
        assert got == expected
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0], [log.read_text()[-4000:] for log in logs]
    finally:
        for p, out in zip(procs, outs, strict=True):
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()


# --- the subprocess side -------------------------------------------------------------------------


def _engine_config() -> EngineConfig:
    return EngineConfig(
        page_size=4,
        num_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_prefill_seqs=4,
        max_model_len=32,
        attention_backend="reference",
        decode_buckets=(4,),
        prefill_buckets=(32,),
        page_buckets=(8,),
    )


def _generate(model_dir: str, tp: int, ep: int):
    """Greedy outputs with logprobs and prompt logprobs, and the engine that made them."""
    from jaxserve.checkpoint import load_model
    from jaxserve.llm import LLM
    from jaxserve.llm_engine import LLMEngine

    cfg = ModelConfig.from_dir(model_dir)
    mesh = shardings = None
    if tp * ep > 1:
        mesh = sharding.make_mesh(tp, ep)
        shardings = models.param_shardings(cfg, jnp.float32, mesh)
    model, _ = load_model(model_dir, jnp.float32, shardings=shardings)
    engine = LLMEngine(model, None, _engine_config(), mesh=mesh)
    params = SamplingParams(
        detokenize=False,
        ignore_eos=True,
        temperature=0.0,
        max_tokens=6,
        logprobs=5,
        prompt_logprobs=5,
    )
    return LLM.from_engine(engine).generate(PROMPTS, params, use_tqdm=False), engine


def _assert_close_maps(a: list[dict | None], b: list[dict | None]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is y
            continue
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], atol=1e-4, rtol=0)


def _assert_layout(engine, cfg: ModelConfig, tp: int, ep: int) -> None:
    """Each device holds its share of the weights and of the KV cache, nothing more."""
    import jax
    from flax import nnx

    state = nnx.to_pure_dict(engine.engine.state)

    def shard_shape(x) -> tuple[int, ...]:
        shapes = {s.data.shape for s in x.addressable_shards}
        assert len(x.addressable_shards) == tp * ep and len(shapes) == 1, shapes
        return shapes.pop()

    d, v, kv_heads = cfg.hidden_size, cfg.vocab_size, cfg.num_kv_heads
    whole_heads = cfg.num_heads % tp == 0
    assert shard_shape(state["embed_tokens"]) == (v // tp, d)
    attn = state["layers"][0]["self_attn"]
    assert shard_shape(attn["q_proj"]["kernel"]) == (d, cfg.q_size // (tp if whole_heads else 1))
    kv_split = tp if kv_heads % tp == 0 else 1
    assert shard_shape(attn["k_proj"]["kernel"]) == (d, cfg.kv_size // kv_split)
    k_pages = engine.engine.kv[0][0]
    assert shard_shape(k_pages) == (kv_heads // kv_split, *k_pages.shape[1:])
    mlp = state["layers"][0]["mlp"]
    if cfg.is_moe:
        e, f = cfg.num_experts, cfg.moe_intermediate_size
        assert shard_shape(mlp["gate_proj"]) == (e // ep, d, f // tp)
        assert shard_shape(mlp["down_proj"]) == (e // ep, f // tp, d)
    else:
        assert shard_shape(mlp["gate_up"]) == (d, 2, cfg.intermediate_size // tp)
        assert shard_shape(mlp["down_proj"]["kernel"]) == (cfg.intermediate_size // tp, d)
    # In all: the replicated arrays whole, every other one split N ways (≈ 1/N of the model).
    leaves = jax.tree.leaves(state)
    replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
    split = sum(x.nbytes for x in leaves) - replicated
    per_device = sharding.device_bytes(state)
    if ep == 1 and kv_split == tp:
        assert per_device == replicated + split // tp
    else:  # some arrays are split over one mesh axis only
        assert replicated + split // (tp * ep) <= per_device < replicated + split // 2 + 1
    info = engine.model_info()["mesh"]
    assert info.startswith(f"{tp * ep} devices (expert={ep} x tensor={tp}); per device: weights")


def _parity(item: str) -> None:
    model_dir, runs = item.split("=")
    cfg = ModelConfig.from_dir(model_dir)
    base, _ = _generate(model_dir, 1, 1)
    for run in runs.split(","):
        tp, ep = (int(n) for n in run.split("x"))
        outs, engine = _generate(model_dir, tp, ep)
        for o, b in zip(outs, base, strict=True):
            assert o.outputs[0].token_ids == b.outputs[0].token_ids, (run, o, b)
            _assert_close_maps(o.outputs[0].logprobs, b.outputs[0].logprobs)
            _assert_close_maps(o.prompt_logprobs, b.prompt_logprobs)
        _assert_layout(engine, cfg, tp, ep)
        print(f"parity ok {Path(model_dir).name} tp={tp} ep={ep}", flush=True)


def _llm(model_dir: str) -> None:
    """`LLM(..., tensor_parallel_size=2)` end to end, from the model directory, decoding in
    multi-step runs each planned while the plan before it computes, the first one chained onto
    the prefill (the run's device-side input tokens sharded like everything else): the tokens
    of single steps on one device."""
    from jaxserve.llm import LLM

    options = dict(max_model_len=32, page_size=4, num_pages=64)
    llm = LLM(model_dir, tensor_parallel_size=2, decode_steps=4, **options)
    assert llm.engine.engine.mesh.shape == {"expert": 1, "tensor": 2}
    params = SamplingParams(detokenize=False, ignore_eos=True, temperature=0.0, max_tokens=12)
    llm.generate(PROMPTS, params, use_tqdm=False)  # starts compiling what the batch needs
    llm.engine.engine.finish_compiles()
    runs = llm.engine.decode_runs_total
    sched = llm.engine.scheduler
    plan_next, ahead = sched.schedule_next_run, []
    sched.schedule_next_run = lambda *a: ahead.append(plan_next(*a)) or ahead[-1]
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    # 12 tokens: the prefill's, then runs of 4 (chained onto the prefill), 4 and 3, each
    # planned while the plan before it computes.
    assert llm.engine.decode_runs_total - runs == 3 and sum(p is not None for p in ahead) == 3
    one = LLM(model_dir, **options).generate(PROMPTS, params, use_tqdm=False)
    assert got == [o.outputs[0].token_ids for o in one]
    print("llm ok", flush=True)


def _unbalanced(model_dir: str) -> None:
    """Every token routed to experts 0 and 1: the devices holding other experts get no tokens,
    and the first gets all of them; the output still equals one device's."""
    import jax
    from flax import nnx

    from jaxserve.checkpoint import load_model

    cfg = ModelConfig.from_dir(model_dir)
    model, _ = load_model(model_dir, jnp.float32)
    moe = model.layers[0].mlp
    router = np.full(moe.router.kernel.shape, -1.0, np.float32)
    router[:, 0], router[:, 1] = 1.0, 0.5
    moe.router.kernel[...] = jnp.asarray(router)
    x = jnp.abs(jax.random.normal(jax.random.key(0), (13, cfg.hidden_size), jnp.float32))
    _, experts = jax.lax.top_k(x @ router, cfg.num_experts_per_tok)
    assert set(np.unique(experts).tolist()) == {0, 1}
    graphdef, state = nnx.split(moe)
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    expected = run(state, x)
    for tp, ep in ((1, 2), (1, 4), (2, 4)):
        mesh = sharding.make_mesh(tp, ep)
        placed = jax.tree.map(lambda a: a, state)
        layout = models.param_shardings(cfg, jnp.float32, mesh)["layers"][0]["mlp"]
        nnx.replace_by_pure_dict(placed, jax.device_put(nnx.to_pure_dict(state), layout))
        with jax.set_mesh(mesh):
            assert "shard_map" in str(jax.make_jaxpr(run)(placed, x))
            got = run(placed, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)
    print("unbalanced ok", flush=True)


if __name__ == "__main__":
    # Each argument is CHECK:ARGUMENT.
    for arg in sys.argv[1:]:
        check, value = arg.split(":", 1)
        {"parity": _parity, "llm": _llm, "unbalanced": _unbalanced}[check](value)
