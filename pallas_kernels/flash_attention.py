"""Causal attention for prefill chunks packed back to back, attending to each sequence's paged prefix.

Owns the prefill attention dispatch and the pure-JAX reference twin `prefill_attention_reference`,
which defines the function every backend must compute. The Hopper kernel itself lives in
`_mosaic_prefill`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic_prefill, paged_attention


def prefill_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    positions: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """q: [T, q_heads, D], tokens of sequence s at rows [cu_q_lens[s], cu_q_lens[s+1]);
    positions: [T] absolute position of each token; k/v_pages: [kv_heads, num_pages, page_size, D]
    already holding every token of the step; block_tables: [S, P]; seq_lens: [S] (context length
    after this chunk). Token t of sequence s attends to that sequence's keys at positions
    <= positions[t]. Padding tokens (t >= cu_q_lens[S]) return zeros. Returns [T, q_heads, D].

    Loops over sequence rows, skipping empty ones, so its cost is that of the real sequences.
    """
    t, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    g = hq // hkv
    kv_len = block_tables.shape[1] * page_size
    qg = q.reshape(t, hkv, g, d).astype(jnp.float32)
    key_pos = jnp.arange(kv_len)

    def row_attention(s: jax.Array, in_row: jax.Array) -> jax.Array:
        k = k_pages[:, block_tables[s]].reshape(hkv, kv_len, d).astype(jnp.float32)
        v = v_pages[:, block_tables[s]].reshape(hkv, kv_len, d).astype(jnp.float32)
        mask = (
            in_row[:, None]
            & (key_pos[None, :] <= positions[:, None])
            & (key_pos[None, :] < seq_lens[s])
        )  # [T, K]
        scores = jnp.einsum("thgd,hkd->thgk", qg, k) * scale
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        m = jnp.max(scores, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.exp(scores - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        return jnp.einsum("thgk,hkd->thgd", e, v) / jnp.where(denom > 0, denom, 1.0)

    return _over_rows(q, hkv, cu_q_lens, row_attention)


def _over_rows(q: jax.Array, hkv: int, cu_q_lens: jax.Array, row_attention) -> jax.Array:
    """Sum `row_attention(s, in_row)` ([T, hkv, g, D], read only at the row's tokens) over the
    sequence rows that have tokens; padding tokens stay zero. Returns [T, q_heads, D]."""
    t, hq, d = q.shape
    tok = jnp.arange(t)

    def one_row(s: jax.Array, out: jax.Array) -> jax.Array:
        in_row = (tok >= cu_q_lens[s]) & (tok < cu_q_lens[s + 1])  # [T]

        def compute(out: jax.Array) -> jax.Array:
            return out + jnp.where(in_row[:, None, None, None], row_attention(s, in_row), 0.0)

        return jax.lax.cond(cu_q_lens[s + 1] > cu_q_lens[s], compute, lambda o: o, out)

    init = jnp.zeros((t, hkv, hq // hkv, d), jnp.float32)
    out = jax.lax.fori_loop(0, cu_q_lens.shape[0] - 1, one_row, init)
    return out.reshape(t, hq, d).astype(q.dtype)


def prefill_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    positions: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
    pages_per_block: int = 8,
) -> jax.Array:
    """The same function as `prefill_attention_reference`, for GPUs without the Mosaic kernel.

    Walks each sequence's pages in blocks with an online softmax, up to the pages the sequence
    actually has (a dynamic trip count), so its cost and memory follow the real context and not
    the width of the block table: one compiled width serves every context length.
    """
    t, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    g = hq // hkv
    p = block_tables.shape[1]
    kb = min(pages_per_block, p)
    block_len = kb * page_size
    # Pad the table so the last block's slice stays in bounds; padded entries are masked below.
    tables = jnp.pad(block_tables, ((0, 0), (0, -p % kb)))
    qg = q.reshape(t, hkv, g, d).astype(jnp.float32) * scale

    def row_attention(s: jax.Array, in_row: jax.Array) -> jax.Array:
        def block(i: jax.Array, carry):
            m, denom, acc = carry  # [T, hkv, g], [T, hkv, g], [T, hkv, g, D]
            pages = jax.lax.dynamic_slice_in_dim(tables[s], i * kb, kb)
            k = k_pages[:, pages].reshape(hkv, block_len, d).astype(jnp.float32)
            v = v_pages[:, pages].reshape(hkv, block_len, d).astype(jnp.float32)
            key_pos = i * block_len + jnp.arange(block_len)
            mask = (
                in_row[:, None]
                & (key_pos[None, :] <= positions[:, None])
                & (key_pos[None, :] < seq_lens[s])
            )[:, None, None, :]
            scores = jnp.where(mask, jnp.einsum("thgd,hkd->thgk", qg, k), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            e = jnp.exp(scores - m_safe[..., None])
            alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            denom = alpha * denom + jnp.sum(e, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum("thgk,hkd->thgd", e, v)
            return m_new, denom, acc

        n_blocks = (seq_lens[s] + block_len - 1) // block_len
        init = (
            jnp.full((t, hkv, g), -jnp.inf, jnp.float32),
            jnp.zeros((t, hkv, g), jnp.float32),
            jnp.zeros((t, hkv, g, d), jnp.float32),
        )
        _, denom, acc = jax.lax.fori_loop(0, n_blocks, block, init)
        return acc / jnp.where(denom > 0, denom, 1.0)[..., None]

    return _over_rows(q, hkv, cu_q_lens, row_attention)


def prefill_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    positions: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
    backend: str = "reference",
) -> jax.Array:
    """Prefill attention through the chosen backend (see `prefill_attention_reference`).

    "mosaic" runs the Hopper kernel when it handles the shapes (bf16/fp16, head_dim 64/128, page
    size 8..128) and the reference otherwise; "auto" picks "mosaic" on Hopper GPUs. The kernel
    derives each token's position from its sequence's chunk (consecutive positions ending at
    seq_len - 1, as the engine schedules chunked prefill) instead of reading `positions`.
    """
    dev = jax.devices()[0]
    if backend == "auto":
        backend = "mosaic" if paged_attention.mosaic_available(dev) else "reference"
    if backend == "mosaic":
        if not paged_attention.mosaic_available(dev):
            raise ValueError("attention_backend: 'mosaic' needs an sm_90 (Hopper) GPU")
        page_size, d = k_pages.shape[2], k_pages.shape[3]
        if not _mosaic_prefill.supported(q.dtype, k_pages.dtype, d, page_size):
            return _mosaic_prefill.paged_prefill(
                q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, scale=scale
            )
        backend = "reference"
    if backend == "reference":
        return prefill_attention_reference(
            q, k_pages, v_pages, positions, block_tables, seq_lens, cu_q_lens, scale=scale
        )
    if backend == "xla":
        return prefill_attention_xla(
            q, k_pages, v_pages, positions, block_tables, seq_lens, cu_q_lens, scale=scale
        )
    raise ValueError(f"attention_backend: {backend!r} has no prefill kernel on this platform")
