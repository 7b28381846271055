"""The engine with the Mosaic GPU attention kernels against the reference path (GPU only)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve.checkpoint import random_model
from jaxserve.config import ModelConfig
from jaxserve.engine import EngineConfig
from jaxserve.llm import LLM
from jaxserve.llm_engine import LLMEngine
from jaxserve.sampling import RowSpec
from jaxserve.sampling_params import SamplingParams
from pallas_kernels.paged_attention import mosaic_available
from tests.utils import full_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.devices()[0].platform != "gpu" or not mosaic_available(jax.devices()[0]),
        reason="needs a Hopper GPU",
    ),
]


def gqa_model(head_dim: int = 128):
    cfg = ModelConfig.from_hf_dict(
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=1024,
            hidden_size=1024,
            intermediate_size=2048,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=head_dim,
            max_position_embeddings=1024,
        )
    )
    return random_model(cfg, "bfloat16", seed=0)


@pytest.mark.parametrize(
    ("backend", "decode_steps", "head_dim"),
    [("auto", 1, 128), ("mosaic", 1, 128), ("auto", 4, 128), ("mosaic", 1, 64)],
)
def test_kernel_engine_logprobs_match_reference_forward(backend, decode_steps, head_dim):
    """Every token of the kernel engine (single decode steps, or runs of 4 compiled ahead)
    against a dense reference forward over the whole text; head dim 64 runs the prefill
    kernel's three-warpgroup ring."""
    model = gqa_model(head_dim)
    cfg = EngineConfig(
        page_size=16,
        num_pages=256,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        max_model_len=512,
        attention_backend=backend,
        decode_steps=decode_steps,
    )
    llm = LLM.from_engine(LLMEngine(model, None, cfg))
    if decode_steps > 1:  # compile the runs this batch samples with (greedy, logprobs) first
        llm.engine.engine.decode_run_ready(4, 512, [RowSpec(0.0, want_logprobs=True)])
        llm.engine.engine.finish_compiles()
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 1024, n)] for n in (5, 37, 130, 200)]
    params = SamplingParams(
        temperature=0.0, max_tokens=24, logprobs=0, ignore_eos=True, detokenize=False
    )
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert (llm.engine.stats()["decode_runs_total"] > 0) == (decode_steps > 1)
    full = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs, strict=True)]
    for prompt, out, logits in zip(prompts, outs, full_forward(model, full, 16), strict=True):
        lsm = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
        comp = out.outputs[0]
        for j, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
            ref = lsm[len(prompt) + j - 1]
            assert abs(lp[tok] - ref[tok]) < 0.15
            # The engine's greedy pick is (within bf16 noise) the reference's best token.
            assert ref[tok] >= ref.max() - 0.15


def test_restart_loads_every_executable_and_generates_the_same(tmp_path):
    """A second engine of the same model and configuration (a restart) loads all its compiled
    calls from the executable store, compiles none, and generates the same tokens."""
    cfg = EngineConfig(
        page_size=16,
        num_pages=128,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        max_model_len=256,
        decode_steps=4,
        compilation_cache_dir=str(tmp_path),
    )
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, 1024, n)] for n in (3, 40, 150)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False)
    outs, stores = [], []
    for _ in range(2):
        engine = LLMEngine(gqa_model(), None, cfg)
        engine.warmup()
        outs.append(
            [
                o.outputs[0].token_ids
                for o in LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
            ]
        )
        stores.append(engine.engine._store)
    assert stores[0].compiled > 0 and stores[0].loaded == 0
    assert stores[1].compiled == 0 and stores[1].loaded == stores[0].compiled
    assert outs[0] == outs[1]
