"""The 8-bit KV cache format the attention paths share: which dtypes, the scales, quantizing.

An 8-bit cache (int8, fp8 e4m3 / e5m2) stores K / k_scale and V / v_scale, with one f32 scale per
KV head for K and one for V (default 1). The reference twin reads it back as those values times
their scales; `write_kv` and the decode kernel's write variant store new K/V with `quantize_kv`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUANTIZED_KV = tuple(jnp.dtype(t) for t in (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2))


def kv_scales(k_pages: jax.Array, k_scale, v_scale) -> jax.Array | None:
    """[2, kv_heads] f32: K's and V's scales of an 8-bit cache (defaults 1); None for a 16-bit
    cache, which takes none."""
    hkv = k_pages.shape[0]
    if jnp.dtype(k_pages.dtype).itemsize != 1:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale: only for an 8-bit cache, not {k_pages.dtype}")
        return None
    ones = jnp.ones((hkv,), jnp.float32)
    return jnp.stack(
        [
            ones if s is None else jnp.broadcast_to(s, (hkv,)).astype(jnp.float32)
            for s in (k_scale, v_scale)
        ]
    )


def quantize_kv(x: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """K or V [T, kv_heads, D] as an 8-bit cache stores it: x / scale (one scale per KV head),
    rounded and clipped to ±127 for int8, clipped to the largest finite value for fp8 (which has
    no infinity; a larger value would become NaN)."""
    dtype = jnp.dtype(dtype)
    y = x.astype(jnp.float32) / jnp.broadcast_to(scale, (x.shape[1],)).astype(jnp.float32)[:, None]
    if dtype == jnp.int8:
        return jnp.clip(jnp.round(y), -127, 127).astype(dtype)
    top = float(jnp.finfo(dtype).max)
    return jnp.clip(y, -top, top).astype(dtype)
