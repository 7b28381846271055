"""Building blocks shared by the model families: parameters with logical axes, linear, RMSNorm, RoPE.

Every weight is declared once, through `param`, with its shape, dtype, initializer and logical axis
names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `experts`, `layers`…). Sharding, random init and
checkpoint loading are all derived from those declarations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import RopeConfig

Axes = tuple[str | None, ...]


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    axes: Axes,
    dtype: jnp.dtype,
    init: str = "normal",
) -> nnx.Param:
    """Declare one weight. `init` is 'normal' (std 0.02), 'ones' or 'zeros'; it is kept as metadata
    so random weights can be made per parameter on device (`init_value`)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        assert rngs is not None
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes, init=init)


def init_value(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, init: str) -> jax.Array:
    """The random value `param` gives a weight of this init kind (used under jit, per weight)."""
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, dtype)).astype(dtype)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in the weight dtype with f32 accumulation, result in x's dtype."""
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (transposed from PyTorch's [out, in])."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: Axes,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        bias: bool = False,
    ):
        self.kernel = param(rngs, (d_in, d_out), axes, dtype)
        self.bias = param(rngs, (d_out,), axes[1:], dtype, "zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.scale = param(None, (dim,), ("norm",), dtype, "ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in f32, cast back before scaling, as Hugging Face's LlamaRMSNorm does.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """Per-frequency inverse wavelengths [head_dim // 2], with linear or llama3 scaling applied."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.type == "linear":
        return inv / rope.factor
    if rope.type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * inv / rope.factor + smooth * inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin [T, 1, D] of each token's rotation angles (Hugging Face rotate-half layout).

    Computed once per step and shared by every layer: left inside the layers, XLA recomputes them
    in a kernel of their own per layer wherever it cannot fuse them into a consumer."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, None, :]  # [T, 1, D]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout). x: [T, heads, D], rope: `rope_tables`."""
    cos, sin = rope
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
