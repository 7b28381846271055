"""Paged attention for decode: one query token per sequence, K/V read through block tables.

Owns the decode attention dispatch, the device check for the Mosaic GPU kernels, and the pure-JAX
reference twin `paged_attention_reference`, which defines the function every backend must compute.
The Hopper kernel itself lives in `_mosaic_decode`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic_decode
from pallas_kernels.kv_quant import kv_scales


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """q: [B, q_heads, D]; k/v_pages: [kv_heads, num_pages, page_size, D]; block_tables: [B, P];
    seq_lens: [B] (the query is the token at position seq_len - 1, its K/V already in the cache).
    Rows with seq_len 0 return zeros. Returns [B, q_heads, D] in q's dtype.

    An 8-bit cache (`kv_quant`) stores K / k_scale and V / v_scale, one scale per KV head
    ([kv_heads], default 1); K and V are those values times their scales.
    """
    b, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    g = hq // hkv
    p = block_tables.shape[1]
    scales = kv_scales(k_pages, k_scale, v_scale)

    def gathered(pages, i):  # the table's pages only, in f32 (dequantized): [kv_heads, B, P, ...]
        x = pages[:, block_tables].astype(jnp.float32)
        return x if scales is None else x * scales[i][:, None, None, None, None]

    # [kv_heads, B, P, page_size, D] -> [B, kv_heads, P * page_size, D]
    k = gathered(k_pages, 0)
    v = gathered(v_pages, 1)
    k = k.reshape(hkv, b, p * page_size, d).swapaxes(0, 1)
    v = v.reshape(hkv, b, p * page_size, d).swapaxes(0, 1)
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32)
    scores = jnp.einsum("bhgd,bhkd->bhgk", qg, k) * scale
    valid = jnp.arange(p * page_size)[None, :] < seq_lens[:, None]  # [B, K]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(scores - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bhgk,bhkd->bhgd", e, v)
    out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.reshape(b, hq, d).astype(q.dtype)


def mosaic_available(device: jax.Device) -> bool:
    """Whether this device runs the Mosaic GPU (sm_90) kernels of this package.

    The kernels use wgmma and TMA, which exist on Hopper (compute capability 9.x) only: Blackwell
    replaced wgmma with tcgen05, so newer GPUs take the reference path.
    """
    if device.platform != "gpu":
        return False
    return str(getattr(device, "compute_capability", "")).split(".")[0] == "9"


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    backend: str = "reference",
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Decode attention through the chosen backend (see `paged_attention_reference`; `k_scale`
    / `v_scale` for an 8-bit cache).

    "mosaic" runs the Hopper kernel when it handles the shapes (bf16/fp16 queries, a cache of
    their dtype, int8 or fp8, head_dim 64/128, page size 8..128, at most 64 query heads per KV
    head) and the reference otherwise; "auto" picks "mosaic" on Hopper GPUs.
    """
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if backend == "auto":
        backend = "mosaic" if mosaic_available(jax.devices()[0]) else "reference"
    if backend == "mosaic":
        if not mosaic_available(jax.devices()[0]):
            raise ValueError("attention_backend: 'mosaic' needs an sm_90 (Hopper) GPU")
        hkv, _, page_size, d = k_pages.shape
        group = q.shape[1] // hkv
        if not _mosaic_decode.supported(q.dtype, k_pages.dtype, d, page_size, group, hkv):
            return _mosaic_decode.paged_decode(
                q, k_pages, v_pages, block_tables, seq_lens, scale=scale, **scales
            )
        backend = "reference"
    if backend == "reference":
        return paged_attention_reference(
            q, k_pages, v_pages, block_tables, seq_lens, scale=scale, **scales
        )
    raise ValueError(f"attention_backend: {backend!r} has no decode kernel on this platform")
