"""What the model definitions compile to, where numbers alone would not show it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from models.moe import DenseMLP


def test_gate_up_gemm_writes_the_activation_dtype() -> None:
    """The MLP's gate/up product comes out of its GEMM in bf16, not as f32 converted after: on
    GPUs cuBLAS leaves that convert to a kernel of its own, a pass over 3x the product's size
    (~7 % of a Llama-3-8B offline run, docs/perf/engine_h100.md item 21)."""
    mlp = nnx.eval_shape(lambda: DenseMLP(64, 96, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(mlp)
    x = jax.ShapeDtypeStruct((4, 64), jnp.bfloat16)
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).trace(state, x).lower().as_text()
    products = re.findall(r"stablehlo\.dot_general.*-> tensor<4x2x96x(\w+)>", text)
    assert products == ["bf16"], products
