"""Shared fixtures: tiny Hugging Face fixture models converted once per test session."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

# Float32 parity checks need true f32 matmuls; GPUs default to TF32 for them.
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(name) -> path of `tests/fixtures/hf/<name>` converted to float32 (cached)."""
    from jaxserve.convert import convert

    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("converted")

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = convert(FIXTURES / "hf" / name, root / name, "float32", progress=False)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_model(converted):
    """tiny_model(name) -> float32 CausalLM of a fixture architecture."""
    from jaxserve.checkpoint import load_model

    cache = {}

    def get(name: str = "llama_gqa_llama3rope"):
        if name not in cache:
            cache[name] = load_model(converted(name), dtype=jnp.float32)[0]
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded default model, converted on first use into the user cache."""
    from jaxserve.default_model import default_model_path

    return default_model_path()
