"""Paged decode attention as a Mosaic GPU (Hopper, sm_90) Pallas kernel.

Owns the kernel behind `paged_attention(..., backend="mosaic")` and `paged_decode_write` (the
engine's decode step: the new tokens' K/V written into their pages and attended in one kernel),
and the split-K combine.

Design (flash-decoding on wgmma):
- One CTA per (KV split, KV head, sequence). Its 64-row wgmma M tile holds, per query token, an
  8-aligned run of query heads that covers the KV head's group (`segment_rows`), read straight
  from the step's [tokens, heads, D] array with TMA; the other rows' results are discarded, so no
  padding copy of q is made.
- Three warpgroups: one issues TMA copies (one per page, K and V of a step on their own
  barriers, `stages` steps deep), two compute. Compute warpgroup w takes the even / odd steps of
  the CTA's range, so each keeps its own online-softmax state and the two overlap each other's
  softmax with wgmma.
- `paged_decode_write`: q, k and v of the step's tokens come in one array (RoPE applied). The
  cached keys are read from the pages; the new tokens' K/V are read from that array into a small
  tile of their own and attended as one more step (causal among themselves), so nothing waits on
  the write. The TMA warpgroup of each sequence's first split writes them into their slots
  (`slot_mapping`; page 0 means "drop"), in place: the pages are aliased inputs and outputs.
- With one split the kernel merges its two warpgroups' results itself and writes the final rows;
  with more, each warpgroup writes a normalized partial result and its log-sum-exp, merged by a
  small XLA epilogue (`combine_splits`).
- An 8-bit cache (int8, fp8 e4m3 / e5m2, one scale per KV head for K and for V) streams at
  half the bytes; each compute warpgroup converts its step's K tile, then its V tile, into a
  16-bit copy in shared memory for the wgmma (whose B operand must be there, in the query's
  dtype), releasing the 8-bit slot at once. K's scale folds into the score scale, V's into the
  result's normalization. The write variant takes the new K/V quantized by XLA
  (`kv_quant.quantize_kv`) in an 8-bit array of their own, writes those and attends
  them as written.

`interpret=True` runs the kernel on the CPU in Pallas's Mosaic GPU interpreter, which simulates
the warpgroups, shared memory, TMA copies and barriers (the CPU tests use it). Two differences
there, both for the interpreter's sake: it takes a wgmma's A operand from shared memory only, so P
is staged in a shared-memory tile before the P·V matmul; and it wants every phase of a barrier
seen by the threads that wait on it, so the TMA warpgroup also waits for the last `stages` slot
releases. Everything else is the kernel as it runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.kv_quant import QUANTIZED_KV, kv_scales, quantize_kv

LOG2E = math.log2(math.e)
M_TILE = 64  # wgmma M: query rows per CTA
SMEM_BYTES = 227 * 1024
COMPUTE_WGS = 2
NUM_SMS_DEFAULT = 132  # H100 SXM; used when the device does not say


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static shape of one kernel instance."""

    block_tokens: int  # keys per pipeline step (a whole number of pages)
    stages: int  # steps in flight; even, so each compute warpgroup owns stages // 2 slots
    num_splits: int  # CTAs per (sequence, KV head)


def segment_rows(group: int, kv_heads: int) -> int:
    """Query-tile rows per token: the 8-aligned run of heads that holds any KV head's group
    (TMA copies whole 8-row tiles of the swizzled layout, so a run starts at a multiple of 8)."""
    return max(-(-((h * group) % 8 + group) // 8) * 8 for h in range(kv_heads))


def supported(
    q_dtype: jnp.dtype,
    kv_dtype: jnp.dtype,
    head_dim: int,
    page_size: int,
    group: int,
    kv_heads: int,
    query_tokens: int = 1,
    write: bool = False,
) -> str:
    """Empty string when the kernel handles these shapes, else the reason it does not.
    `write`: the variant that also writes the new tokens' K/V (`paged_decode_write`; it takes
    the same shapes and dtypes)."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"query dtype {q_dtype} (needs bf16 or fp16)"
    if jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        if jnp.dtype(kv_dtype) not in QUANTIZED_KV:
            return f"K/V dtype {kv_dtype} (needs the query's {q_dtype}, int8 or fp8)"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (needs 64 or 128)"
    if page_size not in (8, 16, 32, 64, 128):
        return f"page_size {page_size} (needs 8, 16, 32, 64 or 128)"
    rows = query_tokens * segment_rows(group, kv_heads)
    # The new tokens start anywhere in an 8-aligned run of a step's 64 keys.
    if rows > M_TILE or 7 + query_tokens > 64:
        return f"{query_tokens} query tokens of {group} heads per KV head ({rows} rows of {M_TILE})"
    return ""


def _fixed_smem(
    head_dim: int, splits: int, query_tokens: int, write: bool, convert_rows: int = 0
) -> int:
    q_tile = M_TILE * head_dim * 2
    # An 8-bit cache: each compute warpgroup's 16-bit copy of its step's K, then V.
    converted = COMPUTE_WGS * convert_rows * head_dim * 2
    if splits == 1:  # warpgroup 1's accumulator, m and l, and the 16-bit result
        out = M_TILE * head_dim * 4 + 2 * M_TILE * 4 + M_TILE * head_dim * 2
    else:  # both warpgroups' normalized partials and log-sum-exps
        out = COMPUTE_WGS * M_TILE * (head_dim + 1) * 4
    rows = 2 * query_tokens * head_dim * 2 if write else 0  # the new K/V rows to write
    # + barriers, alignment and the 2 KB Pallas keeps for cross-warp reductions
    return q_tile + converted + out + rows + 4096


def choose_config(
    batch: int,
    kv_heads: int,
    max_pages: int,
    page_size: int,
    head_dim: int,
    num_sms: int,
    query_tokens: int = 1,
    write: bool = True,
    kv_itemsize: int = 2,
) -> DecodeConfig:
    """Block, pipeline depth and split count for a problem; pure function of static shapes.
    `kv_itemsize` 1: an 8-bit cache."""
    block = max(64, page_size)
    stage_bytes = 2 * block * head_dim * kv_itemsize  # K and V tiles of one step
    max_blocks = max(1, -(-max_pages * page_size // block))
    # Enough CTAs to fill the SMs with little wave quantization, but at least ~4 steps per
    # compute warpgroup so the pipeline runs full. One split merges its result in the kernel;
    # more are merged by a small XLA kernel (`combine_splits`). A split count must beat the
    # best so far by 2 % of its efficiency (relative: while a few CTAs fill a few SMs, each
    # doubling is a large gain in a small number).
    ctas = batch * kv_heads
    best, best_eff = 1, 0.0
    for s in range(1, max(1, max_blocks // 8) + 1):
        n = ctas * s
        eff = n / (-(-n // num_sms) * num_sms)
        if n < num_sms:
            eff *= n / num_sms
        if eff > best_eff * 1.02:
            best, best_eff = s, eff
        if best_eff > 0.9 and n >= num_sms:
            break
    fixed = _fixed_smem(head_dim, best, query_tokens, write, block if kv_itemsize == 1 else 0)
    stages = min(6, (SMEM_BYTES - fixed) // stage_bytes) // 2 * 2
    if stages < 2:
        raise ValueError(f"head_dim {head_dim} with page_size {page_size} does not fit in SMEM")
    return DecodeConfig(block_tokens=block, stages=stages, num_splits=best)


def _decode_call(
    x: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    batch: int,
    q_heads: int,
    query_tokens: int,
    write: bool,
    cfg: DecodeConfig,
    scales: jax.Array | None = None,
    new_kv: jax.Array | None = None,
    interpret: bool = False,
):
    """The kernel. `x` [T', H, D]: the step's query heads first; with `write`, then the new K
    heads and the new V heads, and T' a multiple of 8 of at least one step's keys. `k_pages` and
    `v_pages` are refs written in place with `write`, arrays otherwise. An 8-bit cache comes
    with `scales` [2, Hkv] f32 (K's and V's scale of each KV head), and with `write` the new
    K and V heads stored (quantized) in `new_kv` [T', 2 * Hkv, D] instead of in `x`.

    Returns the output [B * query_tokens, q_heads, D] with one split, else partial outputs [B,
    Hkv, 2*splits, query_tokens*group, D] f32 and their log2-sum-exp [B, Hkv, 2*splits, 64]."""
    hkv, _, page_size, d = k_pages.shape
    dtype = x.dtype
    tq = query_tokens
    group = q_heads // hkv
    seg = segment_rows(group, hkv)
    block, stages, splits = cfg.block_tokens, cfg.stages, cfg.num_splits
    merge = splits == 1
    kv_dtype = jnp.dtype(k_pages.dtype)
    quant = kv_dtype.itemsize == 1
    if quant != (scales is not None) or (quant and write) != (new_kv is not None):
        raise ValueError("scales (and new_kv to write): for an 8-bit cache only")
    lse_rows = group % 4 == 0  # see `_out_type`
    pages_per_step = block // page_size
    # The new K/V rows, one per query token, each copied to its page on its own: a bulk copy's
    # shared-memory side starts on 128 bytes, so a row of fewer (8-bit at head_dim 64) is
    # padded to them.
    row_width = max(d, 128 // kv_dtype.itemsize)

    def new_row(ref, i):
        return ref.at[pl.ds(i, 1), pl.ds(0, d)]

    max_pages = block_tables.shape[1]
    qk_scale = scale * LOG2E  # scores kept in the log2 domain so exp2 is a single FMA + MUFU

    def tiles(cols: int, itemsize: int = 2):
        swizzle = plgpu.find_swizzle(cols * itemsize * 8)
        return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

    def kernel(x_ref, k_ref, v_ref, slot_ref, bt_ref, len_ref, *outs, **s):
        if quant:
            sc_ref, *outs = outs
        # Where the new tokens' K and V heads are: in x after the query heads, or quantized
        # in an array of their own.
        new_ref, new_k, new_v = x_ref, q_heads, q_heads + hkv
        if quant and write:
            new_ref, *outs = outs
            new_k, new_v = 0, hkv
        split = lax.axis_index("split")
        kvh = lax.axis_index("head")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        seq_len = len_ref[b]
        # With `write` the query tokens' own keys are in the new-token tile, not read from pages.
        cached = jnp.maximum(seq_len - tq, 0) if write else seq_len
        n_blocks = lax.div(cached + (block - 1), block)
        per_split = lax.div(n_blocks + (splits - 1), splits)
        start = jnp.minimum(split * per_split, n_blocks)
        n_steps = jnp.minimum(start + per_split, n_blocks) - start  # of cached keys
        # With `write` the first split takes the new tokens as one more step: their K/V are
        # copied from x into the step's slot.
        n_total = n_steps + ((split == 0) & (seq_len > 0)).astype(jnp.int32) if write else n_steps
        head0 = lax.div(kvh * group, 8) * 8  # written so Mosaic sees the alignment
        off = kvh * group - head0  # the group's first row within each token's run
        tok0 = b * tq
        # The new-token step's first row of x: 8-aligned, and the step's keys inside x.
        new0 = lax.div(jnp.minimum(tok0, x.shape[0] - block), 8) * 8

        def v_scale():
            # An 8-bit cache's V scale applies to the whole (normalized) result.
            return sc_ref[1, kvh] if quant else 1.0

        def _finish_merged(acc, m_i, l_i):
            (out_ref,) = outs

            @pl.when(wg == 1)
            def _():
                s["acc1"][...] = acc
                s["ml1"][0] = m_i
                s["ml1"][1] = l_i
                plgpu.barrier_arrive(s["merge_bar"])

            @pl.when(wg == 0)
            def _():
                plgpu.barrier_wait(s["merge_bar"])
                row = plgpu.Layout.WGMMA.reduce(1)
                acc1 = plgpu.load(s["acc1"], layout=plgpu.Layout.WGMMA)
                m1 = plgpu.load(s["ml1"].at[0], layout=row)
                l1 = plgpu.load(s["ml1"].at[1], layout=row)
                m = jnp.maximum(m_i, m1)
                a0, a1 = jnp.exp2(m_i - m), jnp.exp2(m1 - m)
                l_sum = l_i * a0 + l1 * a1
                inv = _reciprocal(l_sum) * v_scale()
                bc = functools.partial(
                    lax.broadcast_in_dim, shape=acc.shape, broadcast_dimensions=[0]
                )
                o = acc * bc(a0 * inv) + acc1 * bc(a1 * inv)
                s["out"][...] = o.astype(dtype)
                plgpu.commit_smem()
                for i in range(tq):
                    plgpu.copy_smem_to_gmem(
                        s["out"].at[pl.ds(i * seg + off, group)],
                        out_ref.at[tok0 + i, pl.ds(kvh * group, group)],
                    )
                plgpu.wait_smem_to_gmem(0)

        def _finish_partial(acc, m_i, l_i):
            o_ref, lse_ref = outs
            nonzero = l_i > 0.0
            inv = _reciprocal(l_i) * v_scale()
            s["o"][wg] = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            s["lse"][wg] = jnp.where(
                nonzero, m_i + jnp.log2(jnp.where(nonzero, l_i, 1.0)), -jnp.inf
            )
            plgpu.commit_smem()
            part = COMPUTE_WGS * split + wg
            for i in range(tq):
                plgpu.copy_smem_to_gmem(
                    s["o"].at[wg, pl.ds(i * seg + off, group)],
                    o_ref.at[b, kvh, part, pl.ds(i * group, group)],
                )
            if lse_rows:  # the group's rows only (16-byte pieces)
                for i in range(tq):
                    plgpu.copy_smem_to_gmem(
                        s["lse"].at[wg, pl.ds(i * seg + off, group)],
                        lse_ref.at[b, kvh, part, pl.ds(i * group, group)],
                    )
            else:
                plgpu.copy_smem_to_gmem(s["lse"].at[wg], lse_ref.at[b, kvh, part])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            my_steps = lax.div(jnp.maximum(n_total - wg, 0) + 1, 2)
            q_smem = s["q"]

            def iota(cols: int, dim: int):
                return plgpu.broadcasted_iota(
                    jnp.int32, (M_TILE, cols), dim, layout=plgpu.Layout.WGMMA
                )

            col = iota(block, 1)
            token = lax.div(iota(block, 0), seg)  # row r is query token r // seg
            # An 8-bit cache's K scale folds into the score scale.
            qs = qk_scale * sc_ref[0, kvh] if quant else qk_scale

            def upcast(tile):
                # The step's 8-bit K or V tile → this warpgroup's 16-bit copy, which the wgmma
                # reads (its B operand comes from shared memory, in the query's dtype).
                dst = s["kc"].at[wg]
                x8 = plgpu.load(tile, layout=plgpu.Layout.WGMMA_8BIT)
                # No hardware conversion from fp8 to bf16: through f32.
                dst[...] = (x8 if kv_dtype == jnp.int8 else x8.astype(jnp.float32)).astype(dtype)
                plgpu.commit_smem()  # all threads' stores, visible to the wgmma
                return dst

            if write:
                limit = cached - 1  # every query token sees all cached keys
                # The new-token step: column c is row new0 + c of x, the sequence's tokens are
                # columns first_new.., and each query token sees the new tokens up to itself.
                first_new = tok0 - new0
                new_last = first_new + jnp.minimum(token, tq - 1)
            else:
                limit = seq_len - tq + (token if tq > 1 else 0)

            def attend(carry, k_tile, v_tile, valid, p_buf, k_ready, k_done, v_ready, v_done):
                acc, m_i, l_i = carry
                k_ready()
                if quant:  # the 8-bit slot is free once copied
                    k_tile = upcast(k_tile)
                    k_done()

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
                    return acc_ref[...]

                s_ = pl.run_scoped(qk, plgpu.ACC((M_TILE, k_tile.shape[0]), jnp.float32))
                if not quant:
                    k_done()
                s_ = jnp.where(valid, s_, -jnp.inf)
                # Scale the row max, not the tile: exp2(s * c - m) is then one FMA per score.
                m_new = jnp.maximum(m_i, s_.max(axis=1) * qs)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s_ * qs - lax.broadcast_in_dim(m_new, s_.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                v_ready()
                if quant:  # K's copy is read: the same buffer takes V's
                    v_tile = upcast(v_tile)
                    v_done()

                def pv(acc_ref):
                    if interpret:  # the interpreter's wgmma reads A from shared memory only
                        p_buf[...] = p.astype(dtype)
                        plgpu.commit_smem()
                        plgpu.wgmma(acc_ref, p_buf, v_tile)
                    else:
                        plgpu.wgmma(acc_ref, p.astype(dtype), v_tile)
                    return acc_ref[...]

                # A fresh accumulator, folded in with one FMA per element: the same work as
                # rescaling in place, without making the wgmma wait for the rescale.
                o = pl.run_scoped(pv, plgpu.ACC((M_TILE, d), jnp.float32))
                if not quant:
                    v_done()
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o
                return acc, m_new, l_i

            def step(j, carry):
                li = wg + 2 * j  # step index within the CTA's range
                slot = lax.rem(li, stages)
                if write:  # (arithmetic, not a select: the step kind is a scalar)
                    new = (li >= n_steps).astype(jnp.int32)
                    hi = (1 - new) * (limit - (start + li) * block) + new * new_last
                    valid = (col >= new * first_new) & (col <= hi)
                else:
                    valid = col + (start + li) * block <= limit
                return attend(
                    carry,
                    s["k"].at[slot],
                    s["v"].at[slot],
                    valid,
                    s["p"].at[wg] if interpret else None,
                    lambda: plgpu.barrier_wait(s["k_bar"].at[slot]),
                    lambda: plgpu.barrier_arrive(s["k_free"].at[slot]),
                    lambda: plgpu.barrier_wait(s["v_bar"].at[slot]),
                    lambda: plgpu.barrier_arrive(s["v_free"].at[slot]),
                )

            plgpu.barrier_wait(s["q_bar"])
            # m starts finite so a step whose keys are all masked leaves alpha == 1, p == 0.
            m0 = plgpu.layout_cast(
                jnp.full((M_TILE,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
            )
            l0 = plgpu.layout_cast(jnp.zeros((M_TILE,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc0 = plgpu.layout_cast(jnp.zeros((M_TILE, d), jnp.float32), plgpu.Layout.WGMMA)
            acc, m_i, l_i = lax.fori_loop(0, my_steps, step, (acc0, m0, l0))
            if merge:
                _finish_merged(acc, m_i, l_i)
            else:
                _finish_partial(acc, m_i, l_i)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            for i in range(tq):
                plgpu.copy_gmem_to_smem(
                    x_ref.at[tok0 + i, pl.ds(head0, seg)],
                    s["q"].at[pl.ds(i * seg, seg)],
                    s["q_bar"],
                )
            k_head, v_head = k_ref.at[kvh], v_ref.at[kvh]
            first_split = split == 0
            if write:

                @pl.when(first_split)
                def _():
                    for src, dst in ((new_k, "k_row"), (new_v, "v_row")):
                        if row_width == d:
                            plgpu.copy_gmem_to_smem(
                                new_ref.at[pl.ds(tok0, tq), src + kvh], s[dst], s["row_bar"]
                            )
                            continue
                        for i in range(tq):  # each into its own 128 bytes
                            plgpu.copy_gmem_to_smem(
                                new_ref.at[pl.ds(tok0 + i, 1), src + kvh],
                                new_row(s[dst], i),
                                s["row_bar"],
                            )

            def copies(li, slot, name, head, src_head):
                # A step's K or V: one copy per page, or per page-sized piece of the new tokens'
                # rows of x (the barrier counts `pages_per_step` arrivals either way).
                bar = s[name + "_bar"].at[slot]

                def from_pages():
                    first_page = (start + li) * pages_per_step
                    for j in range(pages_per_step):
                        page = bt_ref[b, jnp.minimum(first_page + j, max_pages - 1)]
                        dst = s[name].at[slot, pl.ds(j * page_size, page_size)]
                        plgpu.copy_gmem_to_smem(head.at[page], dst, bar)

                def from_x():
                    for j in range(pages_per_step):
                        rows = pl.ds(new0 + j * page_size, page_size)
                        dst = s[name].at[slot, pl.ds(j * page_size, page_size)]
                        plgpu.copy_gmem_to_smem(new_ref.at[rows, src_head + kvh], dst, bar)

                if write:
                    pl.when(li < n_steps)(from_pages)
                    pl.when(li >= n_steps)(from_x)
                else:
                    from_pages()

            def issue(li):
                slot = lax.rem(li, stages)

                @pl.when(li >= stages)
                def _():
                    plgpu.barrier_wait(s["k_free"].at[slot])

                copies(li, slot, "k", k_head, new_k)

                @pl.when(li >= stages)
                def _():
                    plgpu.barrier_wait(s["v_free"].at[slot])

                copies(li, slot, "v", v_head, new_v)

            # The first `stages` steps need no free slot: issue them before the writes.
            filled = jnp.minimum(n_total, stages)
            pl.loop(0, filled)(issue)
            if write:

                @pl.when(first_split)
                def _():
                    plgpu.barrier_wait(s["row_bar"])
                    for i in range(tq):
                        slot_id = slot_ref[tok0 + i]
                        page = lax.div(slot_id, page_size)
                        row = pl.ds(lax.rem(slot_id, page_size), 1)

                        @pl.when(page > 0)  # page 0: padding, dropped
                        def _(i=i, page=page, row=row):
                            for src, dst in (("k_row", k_head), ("v_row", v_head)):
                                plgpu.copy_smem_to_gmem(new_row(s[src], i), dst.at[page, row])

            pl.loop(filled, n_total)(issue)
            if interpret:
                # The interpreter checks that a thread waiting on a barrier sees every phase
                # of it; on the GPU nothing needs the last `stages` releases, so they go unseen.
                @pl.loop(jnp.maximum(n_total - stages, 0), n_total)
                def _drain(li):
                    plgpu.barrier_wait(s["k_free"].at[lax.rem(li, stages)])
                    plgpu.barrier_wait(s["v_free"].at[lax.rem(li, stages)])

            if write:
                plgpu.wait_smem_to_gmem(0)

    kv_tile = plgpu.SMEM((stages, block, d), kv_dtype, transforms=tiles(d, kv_dtype.itemsize))
    scratch = dict(
        q=plgpu.SMEM((M_TILE, d), dtype, transforms=tiles(d)),
        k=kv_tile,
        v=kv_tile,
        q_bar=plgpu.Barrier(num_arrivals=tq),
        k_bar=plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),
        v_bar=plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),
        k_free=plgpu.Barrier(num_barriers=stages),
        v_free=plgpu.Barrier(num_barriers=stages),
    )
    if quant:
        scratch["kc"] = plgpu.SMEM((COMPUTE_WGS, block, d), dtype, transforms=tiles(d))
    if interpret:
        scratch["p"] = plgpu.SMEM((COMPUTE_WGS, M_TILE, block), dtype, transforms=tiles(block))
    if write:
        scratch.update(
            k_row=plgpu.SMEM((tq, row_width), kv_dtype),
            v_row=plgpu.SMEM((tq, row_width), kv_dtype),
            row_bar=plgpu.Barrier(num_arrivals=2 if row_width == d else 2 * tq),
        )
    if merge:
        scratch.update(
            acc1=plgpu.SMEM((M_TILE, d), jnp.float32),
            ml1=plgpu.SMEM((2, M_TILE), jnp.float32),
            out=plgpu.SMEM((M_TILE, d), dtype),
            merge_bar=plgpu.Barrier(),
        )
    else:
        scratch.update(
            o=plgpu.SMEM((COMPUTE_WGS, M_TILE, d), jnp.float32),
            lse=plgpu.SMEM((COMPUTE_WGS, M_TILE), jnp.float32),
        )
    out_type = _out_type(batch, hkv, q_heads, d, dtype, tq, splits)

    def entry(*refs):
        pl.run_scoped(lambda **s: kernel(*refs, **s), collective_axes="wg", **scratch)

    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(splits, hkv, batch),
        grid_names=("split", "head", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(
        x,
        k_pages,
        v_pages,
        slots,
        block_tables,
        seq_lens,
        *([scales] if quant else []),
        *([new_kv] if quant and write else []),
    )


def _reciprocal(l_sum: jax.Array) -> jax.Array:
    """1 / l where l > 0, else 0 (a row that saw no key comes out as zeros)."""
    nonzero = l_sum > 0.0
    return jnp.where(nonzero, 1.0 / jnp.where(nonzero, l_sum, 1.0), 0.0)


def _out_type(batch, hkv, q_heads, d, dtype, query_tokens, splits):
    """The kernel's outputs: the result rows with one split, else the normalized partials and
    their log-sum-exps. Bulk copies move 16-byte pieces: with 4k heads per group the log-sum-exps
    of just the group's rows are written, else all 64 rows of the tile (the wrapper picks them)."""
    if splits == 1:
        return jax.ShapeDtypeStruct((batch * query_tokens, q_heads, d), dtype)
    parts, rows = COMPUTE_WGS * splits, query_tokens * (q_heads // hkv)
    lse_rows = rows if (q_heads // hkv) % 4 == 0 else M_TILE
    return (
        jax.ShapeDtypeStruct((batch, hkv, parts, rows, d), jnp.float32),
        jax.ShapeDtypeStruct((batch, hkv, parts, lse_rows), jnp.float32),
    )


def combine_splits(o_part: jax.Array, lse_part: jax.Array) -> jax.Array:
    """Merge normalized partials [..., parts, rows, D] with their log2-sum-exp [..., parts, rows]."""
    top = jnp.max(lse_part, axis=-2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp2(lse_part - top)  # empty splits have lse -inf: weight 0
    den = jnp.sum(w, axis=-2)
    num = jnp.sum(w[..., None] * o_part, axis=-3)
    return num / jnp.where(den > 0.0, den, 1.0)[..., None]


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or NUM_SMS_DEFAULT)


def _run(
    x,
    k_pages,
    v_pages,
    slots,
    block_tables,
    seq_lens,
    *,
    scale,
    q_heads,
    query_tokens,
    write,
    num_splits,
    interpret,
    scales=None,
    new_kv=None,
):
    """Shared wrapper: config, head padding, the kernel, and the XLA merge of several splits."""
    hkv, _, page_size, d = k_pages.shape
    batch = (slots.shape[0] if write else x.shape[0]) // query_tokens
    group = q_heads // hkv
    seg = segment_rows(group, hkv)
    cfg = choose_config(
        batch,
        hkv,
        block_tables.shape[1],
        page_size,
        d,
        num_sms(),
        query_tokens,
        write,
        jnp.dtype(k_pages.dtype).itemsize,
    )
    if num_splits is not None:
        cfg = dataclasses.replace(cfg, num_splits=num_splits)
    # Every KV head's run of `seg` query heads must lie inside the array, and TMA's tiled copies
    # want the heads a multiple of 8 (a copy in rare shapes).
    need = max(max((h * group) // 8 * 8 + seg for h in range(hkv)), -(-x.shape[1] // 8) * 8)
    if need > x.shape[1]:
        x = jnp.pad(x, ((0, 0), (0, need - x.shape[1]), (0, 0)))
    call = functools.partial(
        _decode_call,
        scale=scale,
        batch=batch,
        q_heads=q_heads,
        query_tokens=query_tokens,
        write=write,
        cfg=cfg,
        scales=scales,
        new_kv=new_kv,
        interpret=interpret,
    )
    tables, lens = block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32)
    if write:

        def body(refs):
            k_ref, v_ref, out_refs = refs
            outs = call(x, k_ref, v_ref, slots, tables, lens)
            for ref, value in zip(jax.tree.leaves(out_refs), jax.tree.leaves(outs), strict=True):
                ref[...] = value

        # The outputs ride along as refs too (dead zeros XLA drops): run_state returns refs only.
        out_type = _out_type(batch, hkv, q_heads, d, x.dtype, query_tokens, cfg.num_splits)
        holder = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out_type)
        k_pages, v_pages, out = pl.run_state(body)((k_pages, v_pages, holder))
    else:
        out = call(x, k_pages, v_pages, slots, tables, lens)
    if cfg.num_splits > 1:
        o_part, lse_part = out
        if lse_part.shape[-1] != query_tokens * group:
            lse_part = _group_rows(lse_part, seg, group, query_tokens)
        out = combine_splits(o_part, lse_part)  # [B, Hkv, T*G, D]
        out = out.reshape(batch, hkv, query_tokens, group, d).swapaxes(1, 2)
        out = out.reshape(batch * query_tokens, q_heads, d).astype(x.dtype)
    return out, k_pages, v_pages


def _group_rows(lse_part: jax.Array, seg: int, group: int, query_tokens: int) -> jax.Array:
    """[B, Hkv, parts, 64] log-sum-exps of whole tiles → each KV head's group rows [B, Hkv,
    parts, T*G], by static slices (a gather would keep XLA from fusing the merge)."""
    return jnp.stack(
        [
            jnp.concatenate(
                [
                    lse_part[:, h, :, i * seg + (h * group) % 8 :][:, :, :group]
                    for i in range(query_tokens)
                ],
                axis=-1,
            )
            for h in range(lse_part.shape[1])
        ],
        axis=1,
    )


@functools.partial(jax.jit, static_argnames=("scale", "query_tokens", "num_splits", "interpret"))
def paged_decode(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    query_tokens: int = 1,
    num_splits: int | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """q: [B * query_tokens, q_heads, D] (the last `query_tokens` positions of each sequence, in
    order); returns the same shape. `seq_lens` count the query tokens, already in the cache.
    `interpret`: run in Pallas's Mosaic GPU interpreter on the CPU (see the module docstring).

    An 8-bit cache (int8, fp8 e4m3 / e5m2; `kv_quant`) holds K / k_scale and V / v_scale,
    one f32 scale per KV head ([kv_heads]; default 1): the kernel streams the 8-bit pages,
    converts each step's tile in shared memory, and applies the scales to the scores and the
    result."""
    scales = kv_scales(k_pages, k_scale, v_scale)
    no_slots = jnp.zeros((q.shape[0],), jnp.int32)
    out, _, _ = _run(
        q,
        k_pages,
        v_pages,
        no_slots,
        block_tables,
        seq_lens,
        scale=scale,
        q_heads=q.shape[1],
        query_tokens=query_tokens,
        write=False,
        num_splits=num_splits,
        interpret=interpret,
        scales=scales,
    )
    return out


@functools.partial(jax.jit, static_argnames=("scale", "query_tokens", "num_splits", "interpret"))
def paged_decode_write(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slot_mapping: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    query_tokens: int = 1,
    num_splits: int | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write the step's new K/V into their slots and attend, in one kernel.

    q: [B * query_tokens, q_heads, D], k / v: [B * query_tokens, kv_heads, D] (RoPE applied),
    the last `query_tokens` positions of each sequence in order; `seq_lens` count them. Slots in
    page 0 are not written. Returns (out like q, k_pages, v_pages); the pages are updated in
    place when the caller donates them.

    An 8-bit cache (see `paged_decode`) gets the new K/V quantized with its scales
    (`kv_quant.quantize_kv`), and the new tokens are attended as written."""
    t = q.shape[0]
    scales = kv_scales(k_pages, k_scale, v_scale)
    rows = max(-(-t // 8) * 8, 64, k_pages.shape[2])  # one step's keys: max(64, page_size)

    def tiled(a: jax.Array) -> jax.Array:  # whole 8-row tiles, at least one new-token tile
        return a if rows == t else jnp.pad(a, ((0, rows - t), (0, 0), (0, 0)))

    new_kv = None
    if scales is None:
        # One array for the kernel's copies (XLA builds it in the fusion that makes q, k, v).
        x = tiled(jnp.concatenate([q, k.astype(q.dtype), v.astype(q.dtype)], axis=1))
    else:
        x = tiled(q)
        kv_dtype = k_pages.dtype
        new_kv = tiled(
            jnp.concatenate(
                [quantize_kv(k, scales[0], kv_dtype), quantize_kv(v, scales[1], kv_dtype)], axis=1
            )
        )
    return _run(
        x,
        k_pages,
        v_pages,
        slot_mapping.astype(jnp.int32)[:t],
        block_tables,
        seq_lens,
        scale=scale,
        q_heads=q.shape[1],
        query_tokens=query_tokens,
        write=True,
        num_splits=num_splits,
        interpret=interpret,
        scales=scales,
        new_kv=new_kv,
    )
