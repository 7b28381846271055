"""Shared fixtures: tiny Hugging Face fixture models converted once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# The Mosaic GPU interpreter runs each warpgroup of a kernel as its own CPU computation, blocked in
# callbacks while it waits on a barrier; with fewer XLA CPU worker threads than warpgroups + 1
# (the default is the core count: 2 on CI) a warpgroup may never start and the kernel deadlocks.
# Read when the CPU client is created, so it must be set before the first JAX computation.
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

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
