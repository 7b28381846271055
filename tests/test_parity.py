"""Converted checkpoints compute what transformers computes.

Every Hugging Face fixture variant is converted to float32, loaded, and run over the fixture's
inputs; its logits must match transformers' stored logits. The float32 conversion must hold the
safetensors' values bit for bit, sharded and single-file checkpoints must convert identically, and
the embedded SmolLM2 GGUF must reproduce transformers' first-step logits for the same file.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxserve.checkpoint import load_model
from jaxserve.convert import convert
from jaxserve.default_model import default_model_path
from models import weight_map
from tests.utils import full_forward

FIXTURES = Path(__file__).parent / "fixtures"
HF = FIXTURES / "hf"
VARIANTS = [
    "llama_gqa_llama3rope",
    "llama_mha_tied",
    "llama_mqa_linear",
    "mistral",
    "qwen2_bias_tied",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "llama_sharded",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {v: convert(HF / v, root / v, dtype="float32", progress=False) for v in VARIANTS}


def _params(path: Path) -> dict[str, np.ndarray]:
    model, _ = load_model(path)
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree.leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant: str, converted: dict[str, Path]) -> None:
    model, _ = load_model(converted[variant])
    ref = np.load(HF / variant / "reference.npz")
    cases = [("input_ids", "logits")]
    if "long_input_ids" in ref:
        cases.append(("long_input_ids", "long_logits"))
    for ids_key, logits_key in cases:
        got = full_forward(model, [list(map(int, row)) for row in ref[ids_key]])
        for row, (g, want) in enumerate(zip(got, ref[logits_key], strict=True)):
            err = np.abs(g - want).max()
            assert err <= TOL * max(1.0, np.abs(want).max()), (variant, ids_key, row, err)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "llama_sharded"])
def test_float32_conversion_is_bit_exact(variant: str, converted: dict[str, Path]) -> None:
    model, cfg = load_model(converted[variant])
    state = nnx.to_pure_dict(nnx.state(model))
    source = load_file(HF / variant / "model.safetensors")
    for name, m in weight_map(cfg).items():
        value = np.asarray(m.param(state))[m.part]
        want = source[name].T if m.transpose else source[name]
        assert value.dtype == np.float32 and np.array_equal(value, want), name


def test_sharded_equals_single_file(converted: dict[str, Path]) -> None:
    sharded = _params(converted["llama_sharded"])
    single = _params(converted["llama_gqa_llama3rope"])
    assert sharded.keys() == single.keys()
    for k in single:
        assert np.array_equal(sharded[k], single[k]), k


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model, converted once per test session into a private cache."""
    return default_model_path(cache=tmp_path_factory.mktemp("jaxserve-cache"))


def test_smollm2_gguf_matches_transformers(smollm2: Path) -> None:
    ref = np.load(FIXTURES / "smollm2" / "first_logits.npz")
    model, cfg = load_model(smollm2, dtype="float32")
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings
    logits = full_forward(model, [list(map(int, ref["prompt_token_ids"]))])[0][-1]
    assert np.abs(logits - ref["logits"]).max() < 1e-3
    assert int(logits.argmax()) == int(ref["logits"].argmax())
    assert (smollm2 / "tokenizer.json").is_file()  # written from the GGUF's vocabulary
