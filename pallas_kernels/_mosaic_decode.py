"""Paged decode attention as a Mosaic GPU (Hopper, sm_90) Pallas kernel.

Owns the kernel behind `paged_attention(..., backend="mosaic")` and the split-K combine.

Design (flash-decoding on wgmma):
- One CTA per (KV split, KV head, sequence). Its 64-row wgmma M tile holds the query rows of the
  KV head's group (`query_tokens * group` real rows); the remaining rows are whatever follows in
  the flattened query (or zeros past its end) and their results are discarded, so no padding copy
  of q is made.
- Three warpgroups: one issues TMA copies (one per page, K and V of a step on their own
  barriers, `stages` steps deep), two compute. Compute warpgroup w takes the even / odd steps of
  the CTA's range, so each keeps its own online-softmax state and the two overlap each other's
  softmax with wgmma; each writes its own normalized partial result and log-sum-exp.
- The splits (2 per CTA) are merged by a small XLA epilogue (`combine_splits`).

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


def supported(
    q_dtype: jnp.dtype, kv_dtype: jnp.dtype, head_dim: int, page_size: int, rows: int
) -> str:
    """Empty string when the kernel handles these shapes, else the reason it does not."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"query dtype {q_dtype} (needs bf16 or fp16)"
    if jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        return f"K/V dtype {kv_dtype} differs from the query's {q_dtype}"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (needs 64 or 128)"
    if page_size not in (8, 16, 32, 64, 128):
        return f"page_size {page_size} (needs 8, 16, 32, 64 or 128)"
    if rows > M_TILE:
        return f"{rows} query rows per KV head (at most {M_TILE})"
    return ""


def choose_config(
    batch: int, kv_heads: int, max_pages: int, page_size: int, head_dim: int, num_sms: int
) -> DecodeConfig:
    """Block, pipeline depth and split count for a problem; pure function of static shapes."""
    block = max(64, page_size)
    stage_bytes = 2 * block * head_dim * 2  # K and V tiles of one step, 16-bit
    fixed = M_TILE * head_dim * 2 + COMPUTE_WGS * M_TILE * (head_dim + 1) * 4 + 1024
    stages = min(6, (SMEM_BYTES - fixed) // stage_bytes) // 2 * 2
    if stages < 2:
        raise ValueError(f"head_dim {head_dim} with page_size {page_size} does not fit in SMEM")
    max_blocks = max(1, -(-max_pages * page_size // block))
    # Enough CTAs to fill the SMs with little wave quantization, but at least ~4 steps per
    # compute warpgroup so the pipeline runs full.
    ctas = batch * kv_heads
    best, best_eff = 1, 0.0
    for s in range(1, max(1, max_blocks // 8) + 1):
        n = ctas * s
        eff = n / (-(-n // num_sms) * num_sms)
        if n < num_sms:
            eff *= n / num_sms
        if eff > best_eff + 0.02:
            best, best_eff = s, eff
        if best_eff > 0.9 and n >= num_sms:
            break
    return DecodeConfig(block_tokens=block, stages=stages, num_splits=best)


def _decode_call(
    q_rows: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    *,
    scale: float,
    batch: int,
    rows: int,
    query_tokens: int,
    group: int,
    cfg: DecodeConfig,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Partial outputs [B, Hkv, 2*splits, rows, D] f32 and their log2-sum-exp [B, Hkv, 2*splits,
    64]. `q_rows` holds `rows` (a multiple of 8) rows per (sequence, KV head), real ones first."""
    hkv, _, page_size, d = k_pages.shape
    dtype = q_rows.dtype
    block, stages, splits = cfg.block_tokens, cfg.stages, cfg.num_splits
    pages_per_step = block // page_size
    max_pages = block_tables.shape[1]
    qk_scale = scale * LOG2E  # scores kept in the log2 domain so exp2 is a single FMA + MUFU
    swizzle = plgpu.find_swizzle(d * 2 * 8)
    tiles = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

    def kernel(q_ref, k_ref, v_ref, bt_ref, len_ref, o_ref, lse_ref, scratch):
        q_smem, k_smem, v_smem, o_smem, lse_smem, p_smem, bars = scratch
        q_bar, k_bar, v_bar, k_free, v_free = bars
        split = lax.axis_index("split")
        kvh = lax.axis_index("head")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        seq_len = len_ref[b]
        n_blocks = lax.div(seq_len + (block - 1), block)
        per_split = lax.div(n_blocks + (splits - 1), splits)
        start = jnp.minimum(split * per_split, n_blocks)
        n_steps = jnp.minimum(start + per_split, n_blocks) - start

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            my_steps = lax.div(jnp.maximum(n_steps - wg, 0) + 1, 2)
            plgpu.barrier_wait(q_bar)
            col = plgpu.broadcasted_iota(jnp.int32, (M_TILE, block), 1, layout=plgpu.Layout.WGMMA)
            if query_tokens == 1:
                limit = seq_len - 1
            else:  # row r is token r // group of the step's query_tokens
                row = plgpu.broadcasted_iota(
                    jnp.int32, (M_TILE, block), 0, layout=plgpu.Layout.WGMMA
                )
                limit = seq_len - query_tokens + lax.div(row, group)

            def step(j, carry):
                acc, m_i, l_i = carry
                li = wg + 2 * j  # step index within the CTA's range
                slot = lax.rem(li, stages)
                plgpu.barrier_wait(k_bar.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((M_TILE, block), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                s = jnp.where(col + (start + li) * block <= limit, s, -jnp.inf)
                # Scale the row max, not the tile: exp2(s * c - m) is then one FMA per score.
                m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                plgpu.barrier_wait(v_bar.at[slot])

                def pv(acc_ref):
                    if interpret:  # the interpreter's wgmma reads A from shared memory only
                        p_smem[wg] = p.astype(dtype)
                        plgpu.commit_smem()
                        plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
                    else:
                        plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
                    return acc_ref[...]

                # A fresh accumulator, folded in with one FMA per element: the same work as
                # rescaling in place, without making the wgmma wait for the rescale.
                o = pl.run_scoped(pv, plgpu.ACC((M_TILE, d), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o
                return acc, m_new, l_i

            # m starts finite so a step whose keys are all masked leaves alpha == 1, p == 0.
            m0 = plgpu.layout_cast(
                jnp.full((M_TILE,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
            )
            l0 = plgpu.layout_cast(jnp.zeros((M_TILE,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc0 = plgpu.layout_cast(jnp.zeros((M_TILE, d), jnp.float32), plgpu.Layout.WGMMA)
            acc, m_i, l_i = lax.fori_loop(0, my_steps, step, (acc0, m0, l0))
            nonzero = l_i > 0.0
            inv = jnp.where(nonzero, 1.0 / jnp.where(nonzero, l_i, 1.0), 0.0)
            o_smem[wg] = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            lse_smem[wg] = jnp.where(
                nonzero, m_i + jnp.log2(jnp.where(nonzero, l_i, 1.0)), -jnp.inf
            )
            plgpu.commit_smem()
            part = COMPUTE_WGS * split + wg
            plgpu.copy_smem_to_gmem(o_smem.at[wg, pl.ds(0, rows)], o_ref.at[b, kvh, part])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, kvh, part])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            row0 = (b * hkv + kvh) * rows
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, M_TILE)], q_smem, q_bar)
            k_head, v_head = k_ref.at[kvh], v_ref.at[kvh]

            @pl.loop(0, n_steps)
            def _issue(li):
                slot = lax.rem(li, stages)
                first_page = (start + li) * pages_per_step
                pages = [
                    bt_ref[b, jnp.minimum(first_page + j, max_pages - 1)]
                    for j in range(pages_per_step)
                ]

                @pl.when(li >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                for j, page in enumerate(pages):
                    dst = k_smem.at[slot, pl.ds(j * page_size, page_size)]
                    plgpu.copy_gmem_to_smem(k_head.at[page], dst, k_bar.at[slot])

                @pl.when(li >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                for j, page in enumerate(pages):
                    dst = v_smem.at[slot, pl.ds(j * page_size, page_size)]
                    plgpu.copy_gmem_to_smem(v_head.at[page], dst, v_bar.at[slot])

            if interpret:
                # The interpreter checks that a thread waiting on a barrier sees every phase
                # of it; on the GPU nothing needs the last `stages` releases, so they go unseen.
                @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
                def _drain(li):
                    plgpu.barrier_wait(k_free.at[lax.rem(li, stages)])
                    plgpu.barrier_wait(v_free.at[lax.rem(li, stages)])

    def entry(q_ref, k_ref, v_ref, bt_ref, len_ref, o_ref, lse_ref):
        kv_tile = plgpu.SMEM((stages, block, d), dtype, transforms=tiles)
        pl.run_scoped(
            lambda *scratch: kernel(q_ref, k_ref, v_ref, bt_ref, len_ref, o_ref, lse_ref, scratch),
            plgpu.SMEM((M_TILE, d), dtype, transforms=tiles),
            kv_tile,
            kv_tile,
            plgpu.SMEM((COMPUTE_WGS, M_TILE, d), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, M_TILE), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, M_TILE, block), dtype, transforms=tiles) if interpret else (),
            (
                plgpu.Barrier(),
                plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),
                plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
            ),
            collective_axes="wg",
        )

    parts = COMPUTE_WGS * splits
    return plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((batch, hkv, parts, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, hkv, parts, M_TILE), jnp.float32),
        ),
        grid=(splits, hkv, batch),
        grid_names=("split", "head", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(q_rows, k_pages, v_pages, block_tables, seq_lens)


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
    interpret: bool = False,
) -> jax.Array:
    """q: [B * query_tokens, q_heads, D] (the last `query_tokens` positions of each sequence, in
    order); returns the same shape. `seq_lens` count the query tokens, already in the cache.
    `interpret`: run in Pallas's Mosaic GPU interpreter on the CPU (see the module docstring)."""
    bq, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    batch, group = bq // query_tokens, hq // hkv
    rows = query_tokens * group
    cfg = choose_config(batch, hkv, block_tables.shape[1], page_size, d, num_sms())
    if num_splits is not None:
        cfg = dataclasses.replace(cfg, num_splits=num_splits)
    # [B, T, Hkv, G, D] -> [B, Hkv, T*G, D]: a KV head's query rows become contiguous (a free
    # reshape when T == 1). TMA wants the tile's first row 8-aligned, so groups of rows that are
    # not a multiple of 8 get padded (a copy of a few hundred KB at most).
    q_rows = q.reshape(batch, query_tokens, hkv, group, d).swapaxes(1, 2)
    q_rows = q_rows.reshape(batch, hkv, rows, d)
    rows_p = -(-rows // 8) * 8
    if rows_p != rows:
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    q_rows = q_rows.reshape(-1, d)
    if q_rows.shape[0] < M_TILE:  # the 64-row TMA box must fit inside the array
        q_rows = jnp.pad(q_rows, ((0, M_TILE - q_rows.shape[0]), (0, 0)))
    o_part, lse_part = _decode_call(
        q_rows,
        k_pages,
        v_pages,
        block_tables.astype(jnp.int32),
        seq_lens.astype(jnp.int32),
        scale=scale,
        batch=batch,
        rows=rows_p,
        query_tokens=query_tokens,
        group=group,
        cfg=cfg,
        interpret=interpret,
    )
    out = combine_splits(o_part[..., :rows, :], lse_part[..., :rows])  # [B, Hkv, T*G, D]
    out = out.reshape(batch, hkv, query_tokens, group, d).swapaxes(1, 2)
    return out.reshape(bq, hq, d).astype(q.dtype)
