"""Tests of the attention kernels: the pure-JAX reference twins on any platform, checked against a
dense per-sequence oracle, and the Mosaic GPU kernels against those twins on Hopper GPUs.

The caches are built the way the engine builds them: pages handed out in a shuffled order, page 0
left as the padding sink (filled with large garbage so any read of it shows), the tail of each
sequence's last page holding stale keys, and unused block-table entries pointing at page 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.bench import shapes
from models import llama
from pallas_kernels import (
    _mosaic_decode,
    _mosaic_prefill,
    flash_attention,
    kv_quant,
    paged_attention,
)
from pallas_kernels.attention import AttentionMetadata, write_kv

ON_HOPPER = jax.devices()[0].platform == "gpu" and paged_attention.mosaic_available(
    jax.devices()[0]
)


@pytest.fixture(autouse=True)
def _exact_reference_matmuls():
    """GPUs run float32 einsums as TF32 by default; the oracles and twins must not."""
    with jax.default_matmul_precision("highest"):
        yield


@dataclasses.dataclass
class PagedCase:
    """A filled paged cache and, per sequence, its keys/values as contiguous arrays."""

    k_pages: np.ndarray  # [kv_heads, num_pages, page_size, D]
    v_pages: np.ndarray
    block_tables: np.ndarray  # [S, P] int32
    seq_lens: np.ndarray  # [S] int32
    k_seq: list[np.ndarray]  # per sequence [seq_len, kv_heads, D]
    v_seq: list[np.ndarray]


def make_paged_case(
    rng: np.random.Generator,
    seq_lens: list[int],
    kv_heads: int,
    head_dim: int,
    page_size: int,
    extra_pages: int = 3,
) -> PagedCase:
    pages_needed = [-(-n // page_size) for n in seq_lens]
    p = max(max(pages_needed), 1) + 1  # one spare column so every row has an unused entry
    num_pages = 1 + sum(pages_needed) + extra_pages
    # Garbage everywhere a sequence does not own: page 0, spare pages, stale page tails.
    k_pages = rng.uniform(50.0, 100.0, (kv_heads, num_pages, page_size, head_dim))
    v_pages = rng.uniform(50.0, 100.0, (kv_heads, num_pages, page_size, head_dim))
    order = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(seq_lens), p), np.int32)
    k_seq, v_seq = [], []
    nxt = 0
    for i, n in enumerate(seq_lens):
        ids = order[nxt : nxt + pages_needed[i]]
        nxt += pages_needed[i]
        tables[i, : len(ids)] = ids
        k = rng.standard_normal((n, kv_heads, head_dim))
        v = rng.standard_normal((n, kv_heads, head_dim))
        for pos in range(n):
            k_pages[:, ids[pos // page_size], pos % page_size] = k[pos]
            v_pages[:, ids[pos // page_size], pos % page_size] = v[pos]
        k_seq.append(k.astype(np.float32))
        v_seq.append(v.astype(np.float32))
    return PagedCase(
        k_pages.astype(np.float32),
        v_pages.astype(np.float32),
        tables,
        np.asarray(seq_lens, np.int32),
        k_seq,
        v_seq,
    )


def dense_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_offset: int, scale: float
) -> np.ndarray:
    """float32 causal attention of q [n, Hq, D] at positions q_offset.. over k/v [L, Hkv, D]."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    kh = np.repeat(k, hq // hkv, axis=1)  # query head h uses kv head h // group
    vh = np.repeat(v, hq // hkv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, kh) * scale
    allowed = np.arange(k.shape[0])[None, :] <= (q_offset + np.arange(n))[:, None]
    scores = np.where(allowed[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, vh).astype(np.float32)


def dense_oracle(q: np.ndarray, lens, query_tokens: int, seq_kv, scale: float) -> np.ndarray:
    """Each sequence's `query_tokens` rows of q [B * query_tokens, Hq, D] (its last positions)
    attended by `dense_attention` over `seq_kv(b)` = its keys and values [n, Hkv, D]; the rows of
    empty sequences stay zero."""
    out = np.zeros_like(q)
    for b, n in enumerate(lens):
        if n > 0:
            rows = slice(b * query_tokens, (b + 1) * query_tokens)
            ks, vs = seq_kv(b)
            out[rows] = dense_attention(q[rows], ks, vs, n - query_tokens, scale)
    return out


def rounded(a, dtype: jnp.dtype) -> np.ndarray:
    """`a` rounded to `dtype`, as float32 (what a kernel fed `dtype` sees)."""
    return np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))


def case_kv(case: PagedCase, dtype: jnp.dtype):
    """`dense_oracle`'s `seq_kv` for a case's own keys and values, rounded to `dtype`."""
    return lambda b: (rounded(case.k_seq[b], dtype), rounded(case.v_seq[b], dtype))


def decode_oracle(q: np.ndarray, case: PagedCase, scale: float) -> np.ndarray:
    return dense_oracle(q, case.seq_lens, 1, lambda b: (case.k_seq[b], case.v_seq[b]), scale)


def quantize_cache(
    case: PagedCase, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The case's K/V pages in an 8-bit `dtype` (int8 or fp8), with one scale per KV head from
    the sequences' values (stale garbage saturates): (k_q, v_q, k_scale, v_scale)."""
    top = jnp.iinfo(dtype).max if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
    out = []
    for pages, seqs in ((case.k_pages, case.k_seq), (case.v_pages, case.v_seq)):
        peak = np.max([np.abs(x).max(axis=(0, 2)) for x in seqs if len(x)], axis=0)
        scale = (peak / top).astype(np.float32)
        x = np.clip(pages / scale[:, None, None, None], -top, top)
        out.append(jnp.asarray(np.rint(x) if dtype == jnp.int8 else x, jnp.float32).astype(dtype))
        out.append(jnp.asarray(scale))
    k_q, k_scale, v_q, v_scale = out
    return k_q, v_q, k_scale, v_scale


def prefill_inputs(
    rng: np.random.Generator,
    q_lens: list[int],
    cached: list[int],
    hq: int,
    hkv: int,
    d: int,
    page_size: int,
    pad_tokens: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, PagedCase]:
    """Packed chunk queries (plus padding tokens), their positions, cu_q_lens, and the cache."""
    case = make_paged_case(
        rng, [c + n for c, n in zip(cached, q_lens, strict=True)], hkv, d, page_size
    )
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(cu[-1]) + pad_tokens
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    positions = np.zeros(t, np.int32)
    for s, (c, n) in enumerate(zip(cached, q_lens, strict=True)):
        positions[cu[s] : cu[s + 1]] = np.arange(c, c + n)
    return q, positions, cu, case


def prefill_oracle(
    q: np.ndarray, cu: np.ndarray, cached: list[int], case: PagedCase, scale: float
) -> np.ndarray:
    out = np.zeros_like(q)
    for s, c in enumerate(cached):
        lo, hi = cu[s], cu[s + 1]
        if hi > lo:
            out[lo:hi] = dense_attention(q[lo:hi], case.k_seq[s], case.v_seq[s], c, scale)
    return out


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x = np.asarray(x, np.float32)
    assert np.all(np.isfinite(x)), "non-finite output"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


# --- reference twins (every platform) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "page_size", "seq_lens"),
    [
        (1, 8, [1, 5, 8, 17]),
        (4, 16, [33, 1, 16, 70]),
        (8, 8, [9, 24, 2]),
        (4, 8, [0, 13, 0, 40]),  # padding rows (seq_len 0) return zeros
    ],
)
def test_paged_reference_matches_dense(group: int, page_size: int, seq_lens: list[int]) -> None:
    rng = np.random.default_rng(hash((group, page_size, tuple(seq_lens))) % 2**32)
    hkv, d = 2, 32
    case = make_paged_case(rng, seq_lens, hkv, d, page_size)
    q = rng.standard_normal((len(seq_lens), hkv * group, d)).astype(np.float32)
    scale = d**-0.5
    out = paged_attention.paged_attention_reference(
        jnp.asarray(q),
        jnp.asarray(case.k_pages),
        jnp.asarray(case.v_pages),
        jnp.asarray(case.block_tables),
        jnp.asarray(case.seq_lens),
        scale=scale,
    )
    ref = decode_oracle(q, case, scale)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert np.all(np.asarray(out)[b] == 0.0)


@pytest.mark.parametrize(
    ("group", "page_size", "q_lens", "cached"),
    [
        (1, 8, [5, 12], [0, 0]),  # fresh prompts, lengths not multiples of the page
        (4, 16, [7, 1, 20], [9, 16, 3]),  # chunks whose prefix ends mid-page, a 1-token chunk
        (8, 8, [3, 0, 11], [21, 4, 0]),  # an empty row between two sequences
    ],
)
def test_prefill_reference_matches_dense(
    group: int, page_size: int, q_lens: list[int], cached: list[int]
) -> None:
    rng = np.random.default_rng(hash((group, page_size, tuple(q_lens))) % 2**32)
    hkv, d, pad = 2, 32, 5
    q, positions, cu, case = prefill_inputs(
        rng, q_lens, cached, hkv * group, hkv, d, page_size, pad_tokens=pad
    )
    scale = d**-0.5
    out = flash_attention.prefill_attention_reference(
        jnp.asarray(q),
        jnp.asarray(case.k_pages),
        jnp.asarray(case.v_pages),
        jnp.asarray(positions),
        jnp.asarray(case.block_tables),
        jnp.asarray(case.seq_lens),
        jnp.asarray(cu),
        scale=scale,
    )
    out = np.asarray(out)
    np.testing.assert_allclose(
        out, prefill_oracle(q, cu, cached, case, scale), atol=2e-5, rtol=2e-5
    )
    assert np.all(out[cu[-1] :] == 0.0), "padding tokens must produce zeros"


@pytest.mark.parametrize(
    ("group", "page_size", "q_lens", "cached", "pages_per_block"),
    [
        (1, 8, [5, 12], [0, 0], 2),
        (4, 16, [7, 1, 20], [9, 16, 3], 1),  # prefixes ending mid-page, a 1-token chunk
        (8, 8, [3, 0, 11], [21, 4, 0], 3),  # an empty row; blocks past the table's end
        (2, 4, [30, 9], [45, 0], 8),
    ],
)
def test_prefill_xla_path_matches_reference(
    group: int, page_size: int, q_lens: list[int], cached: list[int], pages_per_block: int
) -> None:
    rng = np.random.default_rng(hash((group, page_size, tuple(q_lens), 7)) % 2**32)
    hkv, d = 2, 32
    q, positions, cu, case = prefill_inputs(
        rng, q_lens, cached, hkv * group, hkv, d, page_size, pad_tokens=3
    )
    args = [
        jnp.asarray(x)
        for x in (q, case.k_pages, case.v_pages, positions, case.block_tables, case.seq_lens, cu)
    ]
    scale = d**-0.5
    ref = np.asarray(flash_attention.prefill_attention_reference(*args, scale=scale))
    out = np.asarray(
        flash_attention.prefill_attention_xla(*args, scale=scale, pages_per_block=pages_per_block)
    )
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    assert np.all(out[cu[-1] :] == 0.0)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_paged_reference_reads_an_8bit_cache_through_its_scales(dtype: jnp.dtype) -> None:
    """An 8-bit cache holds K / k_scale and V / v_scale per KV head: the reference attends to
    exactly the dequantized values."""
    rng = np.random.default_rng(7)
    lens, hkv, group, d, page = [5, 0, 40, 17], 2, 4, 32, 8
    case = make_paged_case(rng, lens, hkv, d, page)
    k_q, v_q, k_scale, v_scale = quantize_cache(case, dtype)
    q = rng.standard_normal((len(lens), hkv * group, d)).astype(np.float32)
    tables, seq_lens = jnp.asarray(case.block_tables), jnp.asarray(case.seq_lens)
    out = paged_attention.paged_attention_reference(
        jnp.asarray(q), k_q, v_q, tables, seq_lens, scale=0.2, k_scale=k_scale, v_scale=v_scale
    )
    k_deq = np.asarray(k_q.astype(jnp.float32)) * np.asarray(k_scale)[:, None, None, None]
    v_deq = np.asarray(v_q.astype(jnp.float32)) * np.asarray(v_scale)[:, None, None, None]
    deq = dataclasses.replace(
        case,
        k_seq=[
            k_deq[:, case.block_tables[b]].reshape(hkv, -1, d)[:, :n].swapaxes(0, 1)
            for b, n in enumerate(lens)
        ],
        v_seq=[
            v_deq[:, case.block_tables[b]].reshape(hkv, -1, d)[:, :n].swapaxes(0, 1)
            for b, n in enumerate(lens)
        ],
    )
    np.testing.assert_allclose(np.asarray(out), decode_oracle(q, deq, 0.2), atol=2e-5, rtol=2e-5)
    # Close to the unquantized cache (a loose bound: 8 bits of K and V).
    assert rel_err(np.asarray(out), decode_oracle(q, case, 0.2)) < 0.15
    with pytest.raises(ValueError, match="k_scale"):
        paged_attention.paged_attention_reference(
            jnp.asarray(q),
            jnp.asarray(case.k_pages),
            jnp.asarray(case.v_pages),
            tables,
            seq_lens,
            scale=0.2,
            k_scale=k_scale,
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8])
def test_paged_reference_touches_only_the_pages_in_the_tables(dtype: jnp.dtype) -> None:
    """The reference is the decode path off Hopper: it gathers the tables' pages before any
    conversion or scaling, never an op over the whole cache (which is most of the GPU's
    memory)."""
    hkv, pages, page, d = 2, 4096, 16, 64
    k_pages = jax.ShapeDtypeStruct((hkv, pages, page, d), dtype)
    q = jax.ShapeDtypeStruct((2, hkv * 4, d), jnp.bfloat16)
    tables = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    lens = jax.ShapeDtypeStruct((2,), jnp.int32)
    scales = {"k_scale": 0.5, "v_scale": 2.0} if dtype == jnp.int8 else {}
    ref = functools.partial(paged_attention.paged_attention_reference, scale=0.1, **scales)
    jaxpr = jax.make_jaxpr(ref)(q, k_pages, k_pages, tables, lens)
    whole = [
        e.primitive.name
        for e in jaxpr.eqns
        if any(getattr(v.aval, "shape", None) == k_pages.shape for v in e.outvars)
    ]
    assert whole == []


def test_references_agree_on_a_one_token_chunk() -> None:
    """A one-token prefill chunk is a decode step: both twins must give the same answer."""
    rng = np.random.default_rng(7)
    hkv, g, d, page = 2, 4, 32, 8
    q_lens, cached = [1, 1, 1], [12, 0, 30]
    q, positions, cu, case = prefill_inputs(rng, q_lens, cached, hkv * g, hkv, d, page, 0)
    args = (jnp.asarray(case.k_pages), jnp.asarray(case.v_pages))
    bt, sl = jnp.asarray(case.block_tables), jnp.asarray(case.seq_lens)
    dec = paged_attention.paged_attention_reference(jnp.asarray(q), *args, bt, sl, scale=0.2)
    pre = flash_attention.prefill_attention_reference(
        jnp.asarray(q), *args, jnp.asarray(positions), bt, sl, jnp.asarray(cu), scale=0.2
    )
    np.testing.assert_allclose(np.asarray(dec), np.asarray(pre), atol=2e-5, rtol=2e-5)


# --- pieces of the Mosaic GPU path that run anywhere ---------------------------------------------


def test_write_kv_fills_each_slot_once_and_drops_page_zero() -> None:
    """New K/V land in their slots in bf16, padding tokens (slots in the reserved page 0) write
    nothing, and every other slot keeps its contents."""

    rng = np.random.default_rng(4)
    heads, pages, page_size, dim = 2, 5, 4, 8
    k_pages = jnp.asarray(rng.normal(size=(heads, pages, page_size, dim)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.normal(size=(heads, pages, page_size, dim)), jnp.bfloat16)
    slots = np.array([9, 0, 19, 4, 1, 0], np.int32)  # 0 and 1: padding, in page 0
    k = rng.normal(size=(len(slots), heads, dim)).astype(np.float32)
    v = rng.normal(size=(len(slots), heads, dim)).astype(np.float32)
    k_out, v_out = jax.jit(write_kv)(k_pages, v_pages, k, v, slots)
    for out, before, new in ((k_out, k_pages, k), (v_out, v_pages, v)):
        want = np.array(before.astype(jnp.float32))
        for t, slot in enumerate(slots):
            if slot >= page_size:
                want[:, slot // page_size, slot % page_size] = new[t].astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.array(out.astype(jnp.float32)), want)


def test_mosaic_unavailable_off_hopper() -> None:
    assert not paged_attention.mosaic_available(jax.devices("cpu")[0])


def test_combine_splits_equals_one_softmax() -> None:
    """Normalized partials merged by their log2-sum-exp equal attention over all keys at once."""
    rng = np.random.default_rng(3)
    rows, keys, d, parts = 3, 40, 8, 4
    logits = rng.standard_normal((rows, keys)) * 3
    v = rng.standard_normal((keys, d))
    bounds = [0, 7, 7, 30, 40]  # the second split is empty
    o_part = np.zeros((parts, rows, d), np.float32)
    lse = np.full((parts, rows), -np.inf, np.float32)
    for i in range(parts):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            e = np.exp2(logits[:, lo:hi] * np.log2(np.e))
            o_part[i] = e @ v[lo:hi] / e.sum(1, keepdims=True)
            lse[i] = np.log2(e.sum(1))
    out = _mosaic_decode.combine_splits(jnp.asarray(o_part), jnp.asarray(lse))
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(
        np.asarray(out), p @ v / p.sum(1, keepdims=True), rtol=1e-5, atol=1e-5
    )
    empty = _mosaic_decode.combine_splits(
        jnp.asarray(o_part), jnp.full_like(jnp.asarray(lse), -jnp.inf)
    )
    assert np.all(np.asarray(empty) == 0.0)


@pytest.mark.parametrize("tile_rows", [128, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_work_list_covers_every_token_once(seed: int, tile_rows: int) -> None:
    """Each token row (padding included) is the valid row of exactly one work item, at the right
    position, and tiles start 8-aligned."""
    rng = np.random.default_rng(seed)
    q_lens = rng.integers(0, 300, rng.integers(1, 6))
    cached = rng.integers(0, 500, len(q_lens))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(cu[-1]) + int(rng.integers(0, 20))
    t = max(t, tile_rows)
    seq_lens = jnp.asarray(cached + q_lens, jnp.int32)
    work = np.asarray(_mosaic_prefill.build_work_list(jnp.asarray(cu), seq_lens, t, tile_rows))
    covered = np.zeros(t, int)
    for seq_row, tile_row, lo, hi, q_off, ctx in work:
        assert tile_row % 8 == 0
        rows = np.arange(max(lo, tile_row), min(hi, tile_row + tile_rows))
        covered[rows] += 1
        if len(rows) and seq_row < len(q_lens) and lo < cu[-1]:
            assert ctx == cached[seq_row] + q_lens[seq_row]
            assert q_off == cached[seq_row] and lo == cu[seq_row]
        elif len(rows):  # padding tokens: no keys
            assert ctx == 0 and lo == cu[-1]
    assert np.all(covered == 1)


@pytest.mark.parametrize("head_dim", [64, 128])  # ring of 3 warpgroups / ping-pong of 2
@pytest.mark.parametrize(
    ("q_lens", "cached", "num_tokens"),
    [
        ([136, 105, 228, 133, 70, 172, 442, 309], [0] * 8, 2048),  # a long padding tail
        ([1], [0], 320),
        ([300, 1, 77], [0, 40, 9], 1000),
        ([64, 257], [3000, 129], 336),
    ],
)
def test_prefill_kv_steps_agree_across_warpgroups(
    q_lens: list[int], cached: list[int], num_tokens: int, head_dim: int
) -> None:
    """Per work item, each compute warpgroup's K/V step count lies in [0, steps loaded]: the memory
    warpgroup loads exactly the steps the compute warpgroups consume or release, or the kernel
    hangs on a barrier. Padding rows (negative positions) once gave a warpgroup -1 steps."""
    cfg = _mosaic_prefill.choose_config(head_dim)
    bk = cfg.block_kv
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_lens = jnp.asarray(np.add(cached, q_lens), jnp.int32)
    work = _mosaic_prefill.build_work_list(jnp.asarray(cu), seq_lens, num_tokens, cfg.tile_rows)
    _, tile_row, lo, hi, q_off, ctx = (work[:, i] for i in range(6))
    ends = [
        _mosaic_prefill.warpgroup_kv_end(tile_row, lo, hi, q_off, ctx, w)
        for w in range(cfg.warpgroups)
    ]
    n_kv = np.asarray(_mosaic_prefill.kv_steps(np.maximum.reduce(ends), bk))
    for end in ends:
        n_mine = np.asarray(_mosaic_prefill.kv_steps(end, bk))
        assert np.all(n_mine >= 0) and np.all(n_mine <= n_kv)
    assert np.all(n_kv <= -(-np.asarray(ctx) // bk))


def test_decode_kernel_takes_8bit_caches() -> None:
    bf16 = jnp.bfloat16
    for dtype in (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2):
        assert _mosaic_decode.supported(bf16, dtype, 128, 16, 4, 8) == ""
        assert _mosaic_decode.supported(bf16, dtype, 128, 16, 4, 8, write=True) == ""
    assert "int8 or fp8" in _mosaic_decode.supported(bf16, jnp.float32, 128, 16, 4, 8)
    # Half-size stages: more of them fit next to the warpgroups' 16-bit copies.
    wide = _mosaic_decode.choose_config(32, 8, 256, 16, 128, num_sms=132)
    narrow = _mosaic_decode.choose_config(32, 8, 256, 16, 128, num_sms=132, kv_itemsize=1)
    assert narrow.stages >= wide.stages and narrow.stages % 2 == 0


def test_decode_config_fills_the_gpu() -> None:
    for batch, kv_heads, max_pages, page, d in [(1, 8, 2048, 16, 128), (32, 8, 256, 16, 128)]:
        cfg = _mosaic_decode.choose_config(batch, kv_heads, max_pages, page, d, num_sms=132)
        assert batch * kv_heads * cfg.num_splits >= 0.9 * 132
        assert cfg.stages >= 2 and cfg.stages % 2 == 0
        assert cfg.block_tokens % page == 0


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("max_pages", [16, 64, 256, 2048])
def test_decode_config_splits_a_few_ctas_as_far_as_the_keys_allow(batch, kv_heads, max_pages):
    """While the (sequence, KV head) CTAs fill few SMs, the keys are split until the SMs are
    full or a split would get under 8 steps of 64 keys (at batch 1 and 1,024 keys of 8 KV
    heads: 2 splits, not 1)."""
    cfg = _mosaic_decode.choose_config(batch, kv_heads, max_pages, 16, 128, num_sms=132)
    max_blocks = max_pages * 16 // 64
    assert cfg.num_splits >= min(max(1, max_blocks // 8), 132 // (batch * kv_heads))
    assert cfg.num_splits <= max(1, max_blocks // 8)


@pytest.mark.slow
def test_mosaic_kernels_lower_for_cuda() -> None:
    """Both kernels get through Mosaic GPU's layout inference and lowering (no GPU needed)."""
    bf16 = jnp.bfloat16
    kv = jax.ShapeDtypeStruct((8, 64, 16, 128), bf16)
    tables = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    lens = jax.ShapeDtypeStruct((4,), jnp.int32)
    q = jax.ShapeDtypeStruct((4, 32, 128), bf16)
    decode = jax.jit(lambda *a: _mosaic_decode.paged_decode(*a, scale=0.1))
    decode.trace(q, kv, kv, tables, lens).lower(lowering_platforms=("cuda",))
    new = jax.ShapeDtypeStruct((4, 8, 128), bf16)
    slots = jax.ShapeDtypeStruct((4,), jnp.int32)
    write = jax.jit(lambda *a: _mosaic_decode.paged_decode_write(*a, scale=0.1))
    for dtype in (jnp.int8, jnp.float8_e4m3fn):  # an 8-bit cache, converted in the kernel
        kv8 = jax.ShapeDtypeStruct(kv.shape, dtype)
        decode.trace(q, kv8, kv8, tables, lens).lower(lowering_platforms=("cuda",))
        args = (q, new, new, kv8, kv8, slots, tables, lens)
        write.trace(*args).lower(lowering_platforms=("cuda",))
    q = jax.ShapeDtypeStruct((197, 32, 128), bf16)  # not a multiple of 8: padded
    cu = jax.ShapeDtypeStruct((5,), jnp.int32)
    prefill = jax.jit(lambda *a: _mosaic_prefill.paged_prefill(*a, scale=0.1))
    prefill.trace(q, kv, kv, tables, lens, cu).lower(lowering_platforms=("cuda",))


# --- the Mosaic GPU decode kernel in Pallas's Mosaic GPU interpreter (every platform) ------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lens", "group", "head_dim", "page", "dtype", "splits", "query_tokens"),
    [
        # An empty row, mid-page ends, 10 pipeline steps through 4 slots in one CTA.
        ([1, 17, 600, 0, 64], 4, 64, 16, jnp.bfloat16, None, 1),
        ([700, 33], 8, 128, 64, jnp.float16, 2, 1),  # splits; slots reused within a split
        ([129, 7], 1, 64, 8, jnp.bfloat16, 2, 1),  # one query row per KV head, page 8
        ([2, 90], 4, 64, 16, jnp.bfloat16, None, 2),  # two query tokens (speculative verify)
    ],
)
def test_mosaic_decode_interpreted_matches_reference(
    lens: list[int],
    group: int,
    head_dim: int,
    page: int,
    dtype: jnp.dtype,
    splits: int | None,
    query_tokens: int,
) -> None:
    """The kernel's pipeline, barriers, page copies, masking and split merge, run on the CPU by
    the interpreter (with the two interpreter-only differences `_mosaic_decode` describes)."""
    rng = np.random.default_rng(sum(lens) + page)
    hkv, scale = 2, 0.3
    case = make_paged_case(rng, lens, hkv, head_dim, page)
    k, v, tables, seq_lens = _device_cache(case, dtype)
    q = rng.standard_normal((len(lens) * query_tokens, hkv * group, head_dim))
    q = jnp.asarray(q, dtype)
    out = _mosaic_decode.paged_decode(
        q,
        k,
        v,
        tables,
        seq_lens,
        scale=scale,
        query_tokens=query_tokens,
        num_splits=splits,
        interpret=True,
    )
    out = np.asarray(out.astype(jnp.float32))
    ref = dense_oracle(rounded(q, dtype), lens, query_tokens, case_kv(case, dtype), scale)
    for b, n in enumerate(lens):
        if n == 0:
            rows = slice(b * query_tokens, (b + 1) * query_tokens)
            assert np.all(out[rows] == 0.0), "an empty sequence must produce zeros"
    assert rel_err(out, ref) <= 1e-2


def check_8bit_decode(rng, lens, group, head_dim, page, q_dtype, kv_dtype, run) -> None:
    """`run(q, k, v, tables, seq_lens, k_scale, v_scale)` on an 8-bit cache against the
    reference twin on the same cache; empty rows give zeros."""
    hkv = 2
    case = make_paged_case(rng, lens, hkv, head_dim, page)
    k, v, k_scale, v_scale = quantize_cache(case, kv_dtype)
    tables, seq_lens = jnp.asarray(case.block_tables), jnp.asarray(case.seq_lens)
    q = jnp.asarray(rng.standard_normal((len(lens), hkv * group, head_dim)), q_dtype)
    out = np.asarray(run(q, k, v, tables, seq_lens, k_scale, v_scale).astype(jnp.float32))
    ref = paged_attention.paged_attention_reference(
        q, k, v, tables, seq_lens, scale=head_dim**-0.5, k_scale=k_scale, v_scale=v_scale
    )
    assert rel_err(out, np.asarray(ref.astype(jnp.float32))) <= 1e-2
    for b, n in enumerate(lens):
        if n == 0:
            assert np.all(out[b] == 0.0)


EIGHT_BIT_ARGS = ("lens", "group", "head_dim", "page", "q_dtype", "kv_dtype", "splits")
EIGHT_BIT_CASES = [
    # An empty row, mid-page ends, several steps per warpgroup: int8 under bf16 queries.
    ([1, 17, 300, 0, 64], 4, 64, 16, jnp.bfloat16, jnp.int8, None),
    ([400, 33], 8, 128, 64, jnp.float16, jnp.float8_e4m3fn, 2),  # splits, fp16 queries
    ([129, 7], 1, 64, 8, jnp.bfloat16, jnp.float8_e5m2, None),  # one row per KV head, page 8
]


@pytest.mark.slow
@pytest.mark.parametrize(EIGHT_BIT_ARGS, EIGHT_BIT_CASES)
def test_mosaic_decode_8bit_cache_interpreted(
    lens, group, head_dim, page, q_dtype, kv_dtype, splits
) -> None:
    """The kernel on an int8 / fp8 cache in the interpreter: 8-bit pages streamed, each
    step's tile converted by its warpgroup, K's scale in the scores, V's on the result."""

    def run(q, k, v, tables, seq_lens, k_scale, v_scale):
        return _mosaic_decode.paged_decode(
            q,
            k,
            v,
            tables,
            seq_lens,
            scale=head_dim**-0.5,
            num_splits=splits,
            k_scale=k_scale,
            v_scale=v_scale,
            interpret=True,
        )

    check_8bit_decode(
        np.random.default_rng(sum(lens)), lens, group, head_dim, page, q_dtype, kv_dtype, run
    )


def decode_write_case(
    rng: np.random.Generator,
    lens: list[int],
    hkv: int,
    group: int,
    head_dim: int,
    page: int,
    query_tokens: int,
    dtype: jnp.dtype,
) -> tuple[tuple, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of `paged_decode_write` whose new tokens are the last `query_tokens` positions of
    each sequence, with their slots in the cache overwritten by garbage first; and the expected
    output, K pages and V pages (the cache as `make_paged_case` filled it). Rows of empty
    sequences are padding: slots in page 0, which must not be written."""
    case = make_paged_case(rng, lens, hkv, head_dim, page)
    t = len(lens) * query_tokens
    k_new, v_new = np.zeros((2, t, hkv, head_dim), np.float32)
    slots = np.zeros((t,), np.int32)
    k_pages, v_pages = case.k_pages.copy(), case.v_pages.copy()
    for b, n in enumerate(lens):
        for i in range(query_tokens if n else 0):
            pos = n - query_tokens + i
            page_id = case.block_tables[b, pos // page]
            row = b * query_tokens + i
            k_new[row], v_new[row] = case.k_seq[b][pos], case.v_seq[b][pos]
            slots[row] = page_id * page + pos % page
            k_pages[:, page_id, pos % page] = -77.0
            v_pages[:, page_id, pos % page] = 77.0
    q = rng.standard_normal((t, hkv * group, head_dim))
    args = (
        jnp.asarray(q, dtype),
        jnp.asarray(k_new, dtype),
        jnp.asarray(v_new, dtype),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        jnp.asarray(slots),
        jnp.asarray(case.block_tables),
        jnp.asarray(case.seq_lens),
    )
    ref = dense_oracle(rounded(q, dtype), lens, query_tokens, case_kv(case, dtype), 0.3)
    return args, ref, rounded(case.k_pages, dtype), rounded(case.v_pages, dtype)


def quantize_pages(pages: jax.Array, scale: np.ndarray, dtype: jnp.dtype) -> jax.Array:
    """[kv_heads, pages, page, D] through `quantize_kv` (which takes the heads on axis 1)."""
    h, n, page, d = pages.shape
    by_page = jnp.moveaxis(pages, 0, 1).reshape(n, h, page * d)
    q = kv_quant.quantize_kv(by_page, jnp.asarray(scale), dtype)
    return jnp.moveaxis(q.reshape(n, h, page, d), 1, 0)


def check_8bit_decode_write(
    rng, lens, group, head_dim, page, q_dtype, kv_dtype, run, query_tokens=1
) -> None:
    """`run(*paged_decode_write args, k_scale, v_scale)` on an 8-bit cache: the new K/V land
    in their slots quantized exactly as the XLA scatter (`write_kv`) stores them, nothing else
    changes, and the output is the reference twin's over that cache (several query tokens: a
    dense oracle's over its dequantized keys and values)."""
    tq = query_tokens
    q, k_new, v_new, k16, v16, slots, tables, seq_lens = decode_write_case(
        rng, lens, 2, group, head_dim, page, tq, q_dtype
    )[0]
    # Per-head scales: N(0, 1) values over about +-4 sigma for int8, as they are for fp8.
    unit = np.array([4.0, 5.0]) / 127 if kv_dtype == jnp.int8 else np.array([0.5, 1.0])
    k_scale, v_scale = jnp.asarray(unit, jnp.float32), jnp.asarray(unit[::-1], jnp.float32)
    k8, v8 = quantize_pages(k16, unit, kv_dtype), quantize_pages(v16, unit[::-1], kv_dtype)
    k_want, v_want = write_kv(k8, v8, k_new, v_new, slots, k_scale, v_scale)
    out, k_got, v_got = run(q, k_new, v_new, k8, v8, slots, tables, seq_lens, k_scale, v_scale)
    f32 = lambda a: np.asarray(a.astype(jnp.float32))  # noqa: E731
    np.testing.assert_array_equal(f32(k_got), f32(k_want))
    np.testing.assert_array_equal(f32(v_got), f32(v_want))
    assert not np.array_equal(f32(k_want), f32(k8))  # the new slots did change
    if tq == 1:
        ref = f32(
            paged_attention.paged_attention_reference(
                q, k_want, v_want, tables, seq_lens, scale=0.3, k_scale=k_scale, v_scale=v_scale
            )
        )
    else:

        def seq_kv(b):  # sequence b's keys and values, dequantized from the pages
            pos = np.arange(lens[b])
            pages = np.asarray(tables)[b, pos // page]
            ks = (f32(k_want)[:, pages, pos % page] * unit[:, None, None]).swapaxes(0, 1)
            vs = (f32(v_want)[:, pages, pos % page] * unit[::-1, None, None]).swapaxes(0, 1)
            return ks, vs

        ref = dense_oracle(f32(q), lens, tq, seq_kv, 0.3)
    assert rel_err(f32(out), ref) <= 1e-2
    for b, n in enumerate(lens):
        if n == 0:
            assert np.all(f32(out)[b * tq : (b + 1) * tq] == 0.0)


def check_decode_write(lens, outs, ref, k_want, v_want, query_tokens) -> None:
    out, k_pages, v_pages = (np.asarray(a.astype(jnp.float32)) for a in outs)
    assert rel_err(out, ref) <= 1e-2
    for b, n in enumerate(lens):
        if n == 0:
            assert np.all(out[b * query_tokens : (b + 1) * query_tokens] == 0.0)
    # Every new slot written, nothing else touched (page 0 included).
    np.testing.assert_array_equal(k_pages, k_want)
    np.testing.assert_array_equal(v_pages, v_want)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lens", "group", "head_dim", "page", "dtype", "splits", "query_tokens"),
    [
        # A one-token sequence, an empty (padding) row, mid-page ends, 4 steps in one CTA.
        ([1, 17, 200, 0, 64], 4, 64, 16, jnp.bfloat16, None, 1),
        ([300, 33], 8, 128, 64, jnp.float16, 2, 1),  # splits: the XLA merge
        ([129, 7, 3], 1, 64, 8, jnp.bfloat16, 2, 1),  # one query row per KV head, page 8
        ([2, 90, 17], 4, 64, 16, jnp.bfloat16, None, 2),  # two new tokens, across pages in one row
    ],
)
def test_mosaic_decode_write_interpreted(
    lens: list[int],
    group: int,
    head_dim: int,
    page: int,
    dtype: jnp.dtype,
    splits: int | None,
    query_tokens: int,
) -> None:
    """The engine's decode kernel (write the new K/V, attend to cache + new tokens) in the
    interpreter: output against the dense oracle, the cache against the expected one."""
    rng = np.random.default_rng(sum(lens) + page)
    args, ref, k_want, v_want = decode_write_case(
        rng, lens, 2, group, head_dim, page, query_tokens, dtype
    )
    outs = _mosaic_decode.paged_decode_write(
        *args, scale=0.3, query_tokens=query_tokens, num_splits=splits, interpret=True
    )
    check_decode_write(lens, outs, ref, k_want, v_want, query_tokens)


EIGHT_BIT_WRITE_CASES = [
    ([1, 17, 200, 0, 64], 4, 64, 16, jnp.bfloat16, jnp.int8, None),  # an empty (padding) row
    ([300, 33], 8, 128, 64, jnp.float16, jnp.float8_e4m3fn, 2),  # splits: the XLA merge
]


@pytest.mark.slow
@pytest.mark.parametrize(EIGHT_BIT_ARGS, EIGHT_BIT_WRITE_CASES)
def test_mosaic_decode_write_8bit_cache_interpreted(
    lens, group, head_dim, page, q_dtype, kv_dtype, splits
) -> None:
    """The engine's decode kernel on an int8 / fp8 cache in the interpreter: the new K/V
    quantized into their slots, attended as written."""

    def run(*args):
        *args, k_scale, v_scale = args
        return _mosaic_decode.paged_decode_write(
            *args, scale=0.3, num_splits=splits, k_scale=k_scale, v_scale=v_scale, interpret=True
        )

    check_8bit_decode_write(
        np.random.default_rng(sum(lens)), lens, group, head_dim, page, q_dtype, kv_dtype, run
    )


def check_8bit_three_tokens_head_dim_64(lens, kv_dtype, interpret: bool) -> None:
    """`check_8bit_decode_write` with three query tokens per sequence at head_dim 64, where an
    8-bit row is 64 bytes (each new row is staged in 128 bytes of its own)."""

    def run(*args):
        *args, k_scale, v_scale = args
        return _mosaic_decode.paged_decode_write(
            *args, scale=0.3, query_tokens=3, k_scale=k_scale, v_scale=v_scale, interpret=interpret
        )

    rng = np.random.default_rng(5)
    check_8bit_decode_write(rng, lens, 4, 64, 16, jnp.bfloat16, kv_dtype, run, 3)


@pytest.mark.slow
def test_mosaic_decode_write_8bit_several_tokens_interpreted() -> None:
    """Three query tokens per sequence on an int8 cache at head_dim 64, in the interpreter."""
    check_8bit_three_tokens_head_dim_64([3, 90, 70, 0], jnp.int8, interpret=True)


# --- Mosaic GPU kernels against the reference twins (Hopper only) -------------------------------


HOPPER_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 (Hopper) GPU"),
]


def hopper(test: Callable[..., None]) -> Callable[..., None]:
    for mark in HOPPER_ONLY:
        test = mark(test)
    return test


def _device_cache(
    case: PagedCase, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    return (
        jnp.asarray(case.k_pages, dtype),
        jnp.asarray(case.v_pages, dtype),
        jnp.asarray(case.block_tables),
        jnp.asarray(case.seq_lens),
    )


@hopper
@pytest.mark.parametrize(
    ("lens", "group", "head_dim", "page", "dtype"),
    [
        ([1, 17, 300, 0, 64, 1000], 4, 128, 16, jnp.bfloat16),
        ([5000, 33], 8, 128, 64, jnp.float16),
        ([129, 2048, 7], 1, 64, 128, jnp.bfloat16),
        ([100, 3, 250, 64], 4, 64, 8, jnp.bfloat16),
    ],
)
@pytest.mark.parametrize("splits", [None, 5])
def test_mosaic_decode_matches_reference(
    lens: list[int], group: int, head_dim: int, page: int, dtype: jnp.dtype, splits: int | None
) -> None:
    rng = np.random.default_rng(len(lens) * 1000 + page)
    hkv = 2
    k, v, tables, seq_lens = _device_cache(make_paged_case(rng, lens, hkv, head_dim, page), dtype)
    scale = head_dim**-0.5

    def run(q: jax.Array) -> np.ndarray:
        if splits is None:  # through the public dispatch
            out = paged_attention.paged_attention(
                q, k, v, tables, seq_lens, scale=scale, backend="mosaic"
            )
        else:
            out = _mosaic_decode.paged_decode(
                q, k, v, tables, seq_lens, scale=scale, num_splits=splits
            )
        return np.asarray(out.astype(jnp.float32))

    # A first call on other queries leaves wrong values in any buffer the second may reuse.
    run(jnp.asarray(rng.standard_normal((len(lens), hkv * group, head_dim)), dtype))
    q = jnp.asarray(rng.standard_normal((len(lens), hkv * group, head_dim)), dtype)
    out = run(q)
    ref = paged_attention.paged_attention_reference(q, k, v, tables, seq_lens, scale=scale)
    assert rel_err(out, np.asarray(ref.astype(jnp.float32))) <= 1e-2
    for b, n in enumerate(lens):
        if n == 0:
            assert np.all(out[b] == 0.0)


@hopper
@pytest.mark.parametrize(
    EIGHT_BIT_ARGS,
    [
        *EIGHT_BIT_CASES,
        ([1, 17, 300, 0, 64, 1000], 4, 128, 16, jnp.bfloat16, jnp.float8_e4m3fn, None),
        ([5000, 33], 8, 128, 64, jnp.bfloat16, jnp.int8, 5),
    ],
)
def test_mosaic_decode_8bit_cache_matches_reference(
    lens, group, head_dim, page, q_dtype, kv_dtype, splits
) -> None:
    def run(q, k, v, tables, seq_lens, k_scale, v_scale):
        scales = dict(k_scale=k_scale, v_scale=v_scale)
        if splits is None:  # through the public dispatch
            return paged_attention.paged_attention(
                q, k, v, tables, seq_lens, scale=head_dim**-0.5, backend="mosaic", **scales
            )
        return _mosaic_decode.paged_decode(
            q, k, v, tables, seq_lens, scale=head_dim**-0.5, num_splits=splits, **scales
        )

    check_8bit_decode(
        np.random.default_rng(len(lens) + page), lens, group, head_dim, page, q_dtype, kv_dtype, run
    )


@hopper
@pytest.mark.parametrize(
    EIGHT_BIT_ARGS,
    [
        *EIGHT_BIT_WRITE_CASES,
        ([1, 17, 300, 0, 64, 1000], 4, 128, 16, jnp.bfloat16, jnp.float8_e4m3fn, None),
        ([129, 2048, 7], 1, 64, 128, jnp.bfloat16, jnp.int8, 3),
    ],
)
def test_mosaic_decode_write_8bit_cache_matches_reference(
    lens, group, head_dim, page, q_dtype, kv_dtype, splits
) -> None:
    def run(*args):
        *args, k_scale, v_scale = args
        return _mosaic_decode.paged_decode_write(
            *args, scale=0.3, num_splits=splits, k_scale=k_scale, v_scale=v_scale
        )

    check_8bit_decode_write(
        np.random.default_rng(len(lens)), lens, group, head_dim, page, q_dtype, kv_dtype, run
    )


@hopper
@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_mosaic_decode_write_8bit_head_dim_64_several_tokens(kv_dtype) -> None:
    """An 8-bit row at head_dim 64 is 64 bytes: each new row, copied to its page on its own,
    must still start on 128 bytes of shared memory (the interpreter does not check it)."""
    check_8bit_three_tokens_head_dim_64([3, 90, 700, 17], kv_dtype, interpret=False)


@hopper
def test_mosaic_decode_several_query_tokens() -> None:
    """Two query tokens per sequence (speculative verification): each sees keys up to itself."""
    rng = np.random.default_rng(11)
    lens, hkv, g, d, page, qt = [2, 90, 700], 2, 4, 128, 16, 2
    case = make_paged_case(rng, lens, hkv, d, page)
    k, v, tables, seq_lens = _device_cache(case, jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((len(lens) * qt, hkv * g, d)), jnp.bfloat16)
    out = _mosaic_decode.paged_decode(q, k, v, tables, seq_lens, scale=0.1, query_tokens=qt)
    ref = dense_oracle(rounded(q, jnp.bfloat16), lens, qt, case_kv(case, jnp.bfloat16), 0.1)
    assert rel_err(np.asarray(out.astype(jnp.float32)), ref) <= 1e-2


@hopper
@pytest.mark.parametrize(
    ("lens", "group", "head_dim", "page", "splits", "query_tokens"),
    [
        ([1, 17, 300, 0, 64, 1000], 4, 128, 16, None, 1),
        ([1, 17, 300, 0, 64, 1000], 4, 128, 16, 5, 1),
        ([5000, 33, 2], 8, 128, 64, None, 1),
        ([129, 2048, 7], 1, 64, 128, 3, 1),
        ([2, 90, 700, 17], 4, 64, 16, None, 2),
        ([3, 90, 700, 17], 4, 128, 16, 4, 3),
    ],
)
def test_mosaic_decode_write_matches_reference(
    lens: list[int],
    group: int,
    head_dim: int,
    page: int,
    splits: int | None,
    query_tokens: int,
) -> None:
    rng = np.random.default_rng(len(lens) * 100 + page + query_tokens)
    args, ref, k_want, v_want = decode_write_case(
        rng, lens, 2, group, head_dim, page, query_tokens, jnp.bfloat16
    )
    run = functools.partial(
        _mosaic_decode.paged_decode_write,
        scale=0.3,
        query_tokens=query_tokens,
        num_splits=splits,
    )
    # A first call on other queries leaves wrong values in any buffer the second may reuse.
    run(jnp.asarray(rng.standard_normal(args[0].shape), jnp.bfloat16), *args[1:])
    check_decode_write(lens, run(*args), ref, k_want, v_want, query_tokens)


def _on_hopper(*case) -> object:
    return pytest.param(*case, True, marks=HOPPER_ONLY)


@pytest.mark.parametrize(
    ("q_lens", "cached", "group", "head_dim", "page", "pad", "dtype", "gpu"),
    [
        # In Pallas's Mosaic GPU interpreter, on every platform (unwritten memory is NaN there).
        ([300, 1, 77], [0, 40, 9], 4, 128, 16, 11, jnp.bfloat16, False),  # prefixes end mid-page
        ([130, 0, 64], [250, 0, 0], 1, 64, 32, 0, jnp.float16, False),  # an empty row, group 1
        ([5], [0], 8, 64, 8, 2, jnp.bfloat16, False),  # fewer tokens than one tile, page 8
        # On the GPU, through the attention interface.
        _on_hopper([300, 1, 77], [0, 40, 9], 4, 128, 16, 11, jnp.bfloat16),
        _on_hopper([1000, 0, 130], [500, 0, 0], 8, 128, 64, 0, jnp.float16),  # an empty row
        _on_hopper([64, 257], [3000, 129], 1, 64, 16, 3, jnp.bfloat16),
        _on_hopper([5], [0], 4, 128, 8, 2, jnp.bfloat16),  # fewer tokens than one tile
        _on_hopper([640, 129, 385, 1], [0, 0, 2000, 7], 4, 128, 16, 5, jnp.bfloat16),  # odd tiles
        _on_hopper([640, 129, 385, 1], [0, 0, 2000, 7], 4, 64, 16, 5, jnp.bfloat16),  # ring
    ],
)
def test_mosaic_prefill_matches_reference(
    q_lens: list[int],
    cached: list[int],
    group: int,
    head_dim: int,
    page: int,
    pad: int,
    dtype: jnp.dtype,
    gpu: bool,
) -> None:
    """The prefill kernel's work list, ping-pong, page copies, causal masking and row-exact stores
    against the reference twin on fresh random inputs (2 KV heads); padding tokens give zeros."""
    rng = np.random.default_rng(sum(q_lens) + page)
    hkv = 2
    q, positions, cu, case = prefill_inputs(
        rng, q_lens, cached, hkv * group, hkv, head_dim, page, pad
    )
    k, v, tables, seq_lens = _device_cache(case, dtype)
    pos, cu = jnp.asarray(positions), jnp.asarray(cu)
    scale = head_dim**-0.5

    def run(q: jax.Array) -> jax.Array:
        if not gpu:
            return _mosaic_prefill.paged_prefill(
                q, k, v, tables, seq_lens, cu, scale=scale, interpret=True
            )
        return flash_attention.prefill_attention(
            q, k, v, pos, tables, seq_lens, cu, scale=scale, backend="mosaic"
        )

    if gpu:
        run(jnp.asarray(rng.standard_normal(q.shape), dtype))  # leaves wrong values behind
    q = jnp.asarray(q, dtype)
    out = np.asarray(run(q).astype(jnp.float32))
    ref = flash_attention.prefill_attention_reference(
        q, k, v, pos, tables, seq_lens, cu, scale=scale
    )
    assert rel_err(out, np.asarray(ref.astype(jnp.float32))) <= 1e-2
    assert np.all(out[int(cu[-1]) :] == 0.0), "padding tokens must produce zeros"


def lowered_model_step(shape: str, is_decode: bool) -> jax.stages.Lowered:
    """A one-layer model of `shape`'s step (decode: 8 rows of one token; prefill: 96 tokens of
    4 rows) with the Mosaic backend, lowered for CUDA."""
    cfg = dataclasses.replace(shapes.model_config(shape), num_layers=1)
    model = nnx.eval_shape(lambda: llama.CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    page = 16
    pages = jax.ShapeDtypeStruct((cfg.num_kv_heads, 64, page, cfg.head_dim), jnp.bfloat16)

    def i32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    def step(state, tokens, positions, cache, slots, tables, lens, cu):
        meta = AttentionMetadata(slots, tables, lens, cu, is_decode=is_decode, backend="mosaic")
        return nnx.merge(graphdef, state)(tokens, positions, cache, meta)

    rows, tokens = (8, 8) if is_decode else (4, 96)
    args = (state, i32(tokens), i32(tokens), [(pages, pages)], i32(tokens))
    args += (i32(rows, 16), i32(rows), i32(rows + 1))
    return jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen3-30b-a3b"])
def test_model_steps_lower_for_cuda_with_the_mosaic_kernels(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model's decode step (the write kernel) and prefill step (the prefill kernel), as the
    engine calls them with the Mosaic backend, get through lowering for CUDA (no GPU needed):
    the model's side of the kernels' interface (q/k/v layout, RoPE, GQA, the cache) in CI."""
    monkeypatch.setattr(paged_attention, "mosaic_available", lambda device: True)
    for is_decode in (True, False):
        text = lowered_model_step(shape, is_decode).as_text()
        assert "mosaic_gpu" in text
