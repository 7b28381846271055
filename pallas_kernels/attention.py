"""The attention interface the models call: paged KV writes, and decode / prefill attention.

Owns `AttentionMetadata` (what the engine tells a step about the sequences in it), the paged K/V
write, and the choice of backend. Every backend computes the same function as the pure-JAX
reference twins in `paged_attention.py` (decode) and `flash_attention.py` (prefill); those twins are
the CPU path and the fallback.

KV cache layout, per layer: `k_pages`, `v_pages` of shape [kv_heads, num_pages, page_size, head_dim].
Slot `s` of the flat token space is page `s // page_size`, offset `s % page_size`. Page 0 is never
allocated to a sequence: padding tokens write there.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxserve.sharding import TENSOR, kv_spec
from pallas_kernels import _mosaic_decode, flash_attention, paged_attention
from pallas_kernels.kv_quant import kv_scales, quantize_kv

BACKENDS = ("auto", "reference", "xla", "mosaic")


@jax.tree_util.register_dataclass
@dataclass
class AttentionMetadata:
    """Per-step sequence layout. T = tokens in the step, S = sequence rows, P = pages per row.

    Decode steps have one token per row (T == S, `cu_q_lens == arange(S + 1)`). Prefill steps pack
    the chunks of up to S sequences back to back; tokens past `cu_q_lens[-1]` are padding. Rows with
    no tokens (and decode padding rows) have `seq_lens == 0` and produce zeros.
    """

    slot_mapping: jax.Array  # [T] int32: where each token's K/V is written
    block_tables: jax.Array  # [S, P] int32: page ids of each sequence
    seq_lens: jax.Array  # [S] int32: context length after this step (cached + new tokens)
    cu_q_lens: jax.Array  # [S + 1] int32: offsets of each sequence's tokens in the step
    is_decode: bool = dataclasses.field(metadata=dict(static=True), default=False)
    backend: str = dataclasses.field(metadata=dict(static=True), default="reference")


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V ([T, kv_heads, head_dim]) into their slots; in place when donated. An
    8-bit cache stores them quantized with its per-KV-head scales (default 1;
    `kv_quant.quantize_kv`).

    Padding tokens (and a multi-step run's rows past their end) have slots in the reserved page
    0, which nothing reads: their writes are dropped. Every other slot is written by one token
    only, so the scatter is declared unique: XLA's GPU scatter then stores each element plainly
    instead of through an atomic compare-and-swap loop (2-byte elements have no atomic store)."""
    num_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    page, off = slot_mapping // page_size, slot_mapping % page_size
    page = jnp.where(page == 0, num_pages, page)  # out of bounds: dropped

    scales = kv_scales(k_pages, k_scale, v_scale)

    def put(pages, x, i):
        if scales is not None:
            x = quantize_kv(x, scales[i], pages.dtype)
        x = x.swapaxes(0, 1).astype(pages.dtype)
        return pages.at[:, page, off].set(x, mode="drop", unique_indices=True)

    return put(k_pages, k, 0), put(v_pages, v, 1)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv: tuple[jax.Array, jax.Array],
    positions: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Write this step's K/V into the cache and attend: q [T, q_heads, head_dim], k / v [T,
    kv_heads, head_dim] (RoPE applied) → ([T, q_heads, head_dim], the updated (k_pages, v_pages)).

    Under a mesh with a `tensor` axis (see `jaxserve.sharding`) each device attends with its own
    KV heads and their query heads, in a `shard_map`: XLA cannot split a kernel's custom call by
    head itself and would gather every head's K/V onto every device. When the KV heads are too
    few to split, the cache is replicated and every device attends with all heads.
    """
    hkv = kv[0].shape[0]
    if not _fused_decode(q, kv[0], meta):
        k_pages, v_pages = write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        out = _by_kv_head(
            functools.partial(_attention, scale=scale),
            (q, k_pages, v_pages, positions, meta),
            ("heads", "pages", "pages", "all", "all"),
            "heads",
            hkv,
        )
        return out, (k_pages, v_pages)

    def fused(q, k, v, k_pages, v_pages, meta):
        return _mosaic_decode.paged_decode_write(
            q,
            k,
            v,
            k_pages,
            v_pages,
            meta.slot_mapping,
            meta.block_tables,
            meta.seq_lens,
            scale=scale,
        )

    out, k_pages, v_pages = _by_kv_head(
        fused,
        (q, k, v, *kv, meta),
        ("heads", "heads", "heads", "pages", "pages", "all"),
        ("heads", "pages", "pages"),
        hkv,
    )
    return out, (k_pages, v_pages)


def _fused_decode(q: jax.Array, k_pages: jax.Array, meta: AttentionMetadata) -> bool:
    """Whether the decode step writes and attends in one Mosaic kernel."""
    if not (meta.is_decode and meta.backend == "mosaic"):
        return False
    hkv, _, page_size, d = k_pages.shape
    return not _mosaic_decode.supported(
        q.dtype, k_pages.dtype, d, page_size, q.shape[1] // hkv, hkv, write=True
    )


def _by_kv_head(fn, args: tuple, in_parts: tuple[str, ...], out_parts, kv_heads: int):
    """`fn(*args)`, run by each device on its own KV heads under a mesh with a `tensor` axis
    (as is otherwise). Parts name how each argument and result is laid out: "heads" ([T, heads,
    ...], split by head), "pages" (a K or V cache, split by KV head), "all" (replicated);
    `out_parts` is one name for a single result."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(TENSOR, 1) == 1:
        return fn(*args)
    kv = kv_spec(kv_heads, mesh.shape)
    spec = {"heads": PartitionSpec(None, *kv), "pages": kv, "all": PartitionSpec()}
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(spec[p] for p in in_parts),
        out_specs=spec[out_parts]
        if isinstance(out_parts, str)
        else tuple(spec[p] for p in out_parts),
        # No collectives inside; the loops of the reference paths mix per-device and replicated
        # values in ways the varying-axes checker rejects.
        check_vma=False,
    )(*args)


def _attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    positions: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
) -> jax.Array:
    if meta.is_decode:
        return paged_attention.paged_attention(
            q, k_pages, v_pages, meta.block_tables, meta.seq_lens, scale=scale, backend=meta.backend
        )
    return flash_attention.prefill_attention(
        q,
        k_pages,
        v_pages,
        positions,
        meta.block_tables,
        meta.seq_lens,
        meta.cu_q_lens,
        scale=scale,
        backend=meta.backend,
    )


def resolve_backend(backend: str) -> tuple[str, str]:
    """The (decode, prefill) backends for a configured name.

    'auto': the Mosaic GPU kernels for both on Hopper GPUs; elsewhere the reference decode and
    the XLA prefill path (`flash_attention.prefill_attention_xla`), which follows the real
    context length with one compiled table width. 'xla': reference decode, XLA prefill.
    'reference' / 'mosaic': that backend for both."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        dev = jax.devices()[0]
        hopper = dev.platform == "gpu" and paged_attention.mosaic_available(dev)
        return ("mosaic", "mosaic") if hopper else ("reference", "xla")
    if backend == "xla":
        return "reference", "xla"
    return backend, backend


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float) -> jax.Array:
    """Plain causal attention over one contiguous sequence ([S, heads, D]); test oracle only."""
    s, hq, d = q.shape
    g = hq // k.shape[1]
    qg = q.reshape(s, k.shape[1], g, d).astype(jnp.float32)
    scores = jnp.einsum("qhgd,khd->hgqk", qg, k.astype(jnp.float32)) * scale
    causal = jnp.tril(jnp.ones((s, s), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("hgqk,khd->qhgd", p, v.astype(jnp.float32))
    return out.reshape(s, hq, d).astype(q.dtype)
