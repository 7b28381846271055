"""Causal prefill attention over a paged KV cache as a Mosaic GPU (Hopper, sm_90) Pallas kernel.

Owns the kernel behind `prefill_attention(..., backend="mosaic")` and the work list it runs on.

Design (FlashAttention-3 style, paged):
- The packed query tokens are cut, per sequence, into tiles of 64 rows per compute warpgroup
  (128 or 192): the work list, built by a few small XLA ops, has one item per tile (padding
  tokens form one more sequence with no keys, so they come out as zeros); items are ordered
  longest-first so the causal tail is short.
- One CTA per (query head, work item). Compute warpgroups take 64 rows each; one more streams
  K/V pages with TMA (one copy per page, `stages` steps of 128 keys in flight) for all of them,
  reading page numbers from the sequence's block-table row, copied into shared memory once.
  Head dim 128: two compute warpgroups alternate their matmuls and softmax (ping-pong on a
  shared barrier, two hand-overs per step). Head dim 64: three, in a ring (one turn per step,
  in which a warpgroup issues P_j·V_j and Q·K_{j+1} together, so its softmax runs under the
  other two's matmuls); at head dim 128 three do not fit the registers (measured slower with
  64-key steps, see docs/perf/kernels.md).
- TMA reads the query tile from an 8-aligned row (Mosaic's tiled copies need it), so up to 7 rows
  of the previous sequence ride along; rows outside the sequence are masked out and never
  written. Results are written with a ladder of power-of-two TMA stores covering exactly the
  sequence's rows, so neighbouring sequences are never touched.
- Keys of token t are positions 0..position(t) of its sequence, where each sequence's chunk holds
  the consecutive positions ending at seq_len - 1 (how the engine lays out chunked prefill).

`interpret=True` runs the kernel on the CPU in Pallas's Mosaic GPU interpreter (the CPU tests use
it). Two differences there, both for the interpreter's sake: it takes a wgmma's A operand from
shared memory only, so P is staged in a shared-memory tile before the P·V matmul; and it wants
every phase of a barrier seen by the threads that wait on it, so the TMA warpgroup also waits for
the last `stages` slot releases (and warpgroup 0 waits for the ring's last turn). Everything else
is the kernel as it runs on the GPU.
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
WG_ROWS = 64  # query rows per compute warpgroup (wgmma M)
SMEM_BYTES = 227 * 1024
TABLE_CHUNK = 256  # block-table entries per TMA copy (a TMA box dimension is at most 256)
PROFILE_EVENTS = 256  # profiler events kept per warpgroup with `profile_dir` (the rest dropped)


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_kv: int  # keys per pipeline step
    stages: int
    warpgroups: int  # compute warpgroups: 2 = ping-pong, 3 = ring

    @property
    def tile_rows(self) -> int:
        """Query rows per work item (CTA)."""
        return WG_ROWS * self.warpgroups


def supported(q_dtype: jnp.dtype, kv_dtype: jnp.dtype, head_dim: int, page_size: int) -> str:
    """Empty string when the kernel handles these shapes, else the reason it does not."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"query dtype {q_dtype} (needs bf16 or fp16)"
    if jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        return f"K/V dtype {kv_dtype} differs from the query's {q_dtype}"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (needs 64 or 128)"
    if page_size not in (8, 16, 32, 64, 128):
        return f"page_size {page_size} (needs 8, 16, 32, 64 or 128)"
    return ""


def choose_config(head_dim: int, table_width: int = 0) -> PrefillConfig:
    block_kv = 128
    # Three warpgroups keep their accumulator, scores and P in 160 registers only at head dim 64
    # (+8 % there, 349 -> 376 TFLOP/s at B4 S4096 on the H100).
    warpgroups = 3 if head_dim <= 64 else 2
    # q tiles + output staging + one block-table row
    fixed = 2 * warpgroups * WG_ROWS * head_dim * 2 + 4 * table_width + 1024
    stage_bytes = 2 * block_kv * head_dim * 2
    stages = min(4 if warpgroups == 2 else 3, (SMEM_BYTES - fixed) // stage_bytes)
    return PrefillConfig(block_kv=block_kv, stages=stages, warpgroups=warpgroups)


def build_work_list(
    cu_q_lens: jax.Array, seq_lens: jax.Array, num_tokens: int, tile_rows: int
) -> jax.Array:
    """[items, 6] int32, per work item of `tile_rows` query rows: sequence row, first tile row
    (8-aligned), chunk start, chunk end, position of the chunk's first token, context length.
    Items past the real ones have chunk start == chunk end == 0 and do nothing."""
    s = seq_lens.shape[0]
    cu = cu_q_lens.astype(jnp.int32)
    # Padding tokens [cu[S], T) are one more sequence with an empty context.
    starts = jnp.concatenate([cu[:-1], cu[-1:]])
    ends = jnp.concatenate([cu[1:], jnp.full((1,), num_tokens, jnp.int32)])
    ctx = jnp.concatenate([seq_lens.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    rows = jnp.concatenate([jnp.arange(s, dtype=jnp.int32), jnp.zeros((1,), jnp.int32)])
    aligned = starts // 8 * 8
    tiles = jnp.where(ends > starts, (ends - aligned + tile_rows - 1) // tile_rows, 0)
    max_items = -(-(num_tokens + 8 * (s + 1)) // tile_rows) + s + 1
    first = jnp.cumsum(tiles) - tiles
    item = jnp.arange(max_items, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(first + tiles, item, side="right"), 0, s).astype(jnp.int32)
    valid = item < jnp.sum(tiles)
    tile = item - first[seq]
    tile_row = aligned[seq] + tile * tile_rows
    q_off = ctx[seq] - (ends[seq] - starts[seq])
    table = jnp.stack(
        [
            rows[seq],
            tile_row,
            jnp.where(valid, starts[seq], 0),
            jnp.where(valid, ends[seq], 0),
            q_off,
            jnp.where(valid, ctx[seq], 0),
        ],
        axis=1,
    )
    # Longest first: an item's work grows with the last key it needs.
    work = jnp.where(valid, q_off + jnp.minimum(tile_row + tile_rows, ends[seq]) - starts[seq], -1)
    return table[jnp.argsort(-work, stable=True)]


def warpgroup_rows(tile_row, lo, hi, q_off, w):
    """Valid row range [a, b) of warpgroup w's 64 rows in a work item, and the position of its
    row 0 (negative for padding rows: their "sequence" has no keys)."""
    r0 = tile_row + w * WG_ROWS
    a = jnp.clip(lo - r0, 0, WG_ROWS)
    b = jnp.clip(hi - r0, 0, WG_ROWS)
    return a, b, q_off + r0 - lo


def warpgroup_kv_end(tile_row, lo, hi, q_off, ctx, w):
    """Number of keys (positions 0..end-1) warpgroup w's valid rows attend to; never negative:
    the step counts divide by truncation, and a count of -1 for one warpgroup would make it
    wait on a K/V step that is never loaded (a hang)."""
    a, b, pos0 = warpgroup_rows(tile_row, lo, hi, q_off, w)
    return jnp.where(b > a, jnp.clip(pos0 + b, 0, ctx), 0)


def kv_steps(kv_end, block_kv: int):
    """Pipeline steps of `block_kv` keys covering `kv_end` keys."""
    return lax.div(kv_end + (block_kv - 1), block_kv)


def _prefill_call(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    work: jax.Array,
    *,
    scale: float,
    cfg: PrefillConfig,
    interpret: bool = False,
    profile_dir: str | None = None,
) -> jax.Array:
    t, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    group = hq // hkv
    dtype = q.dtype
    bk, stages, wgs = cfg.block_kv, cfg.stages, cfg.warpgroups
    pages_per_step = bk // page_size
    max_pages = block_tables.shape[1]
    items = work.shape[0]
    qk_scale = scale * LOG2E
    swizzle = plgpu.find_swizzle(d * 2 * 8)
    tiles = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

    def kernel(q_ref, k_ref, v_ref, bt_ref, work_ref, out_ref, scratch):
        q_smem, k_smem, v_smem, o_smem, bt_smem, bars, *interpreted = scratch
        p_smem = interpreted[0] if interpret else None  # P for the interpreter's wgmma
        # `order`: the ping-pong's one barrier (both warpgroups arrive), or the ring's turns.
        q_bar, k_bar, v_bar, k_free, v_free, order, bt_bar = bars
        h = lax.axis_index("head")
        it = lax.axis_index("item")
        wg = lax.axis_index("wg")
        seq_row = work_ref[it, 0]
        tile_row = work_ref[it, 1]
        lo, hi = work_ref[it, 2], work_ref[it, 3]
        q_off, ctx = work_ref[it, 4], work_ref[it, 5]

        def rows_of(w):
            return warpgroup_rows(tile_row, lo, hi, q_off, w)

        def kv_end(w):
            return warpgroup_kv_end(tile_row, lo, hi, q_off, ctx, w)

        n_kv = kv_steps(functools.reduce(jnp.maximum, [kv_end(w) for w in range(wgs)]), bk)

        @pl.when(wg < wgs)
        def _compute():
            # A CTA launches with the register file split evenly (168 per thread with 3
            # warpgroups, 128 with 4) and `setmaxnreg` only moves registers within that pool:
            # 2 x 232 + 40 = 3 x 168, 3 x 160 + 32 = 4 x 128 (the TMA warpgroup's share last).
            plgpu.set_max_registers(232 if wgs == 2 else 160, action="increase")
            a, b, pos0 = rows_of(wg)
            n_mine = kv_steps(kv_end(wg), bk)
            # Steps whose keys all precede the first valid row's position need no mask.
            n_full = jnp.clip(lax.div(jnp.maximum(pos0 + a + 1, 0), bk), 0, n_mine)
            r0 = lax.div(tile_row, 8) * 8 + wg * WG_ROWS  # written so Mosaic sees the alignment
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(r0, WG_ROWS), h], q_smem.at[wg], q_bar.at[wg])
            row_pos = pos0 + plgpu.broadcasted_iota(
                jnp.int32, (WG_ROWS, bk), 0, layout=plgpu.Layout.WGMMA
            )
            col = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
            plgpu.barrier_wait(q_bar.at[wg])

            def softmax(j, s, carry, masked: bool):
                """Online softmax of step j's scores: P in the input dtype, the carry rescaled."""
                acc, m_i, l_i = carry
                if masked:
                    s = jnp.where(col + j * bk <= row_pos, s, -jnp.inf)
                # Scale the row max, not the tile: exp2(s * c - m) is one FMA per score.
                m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                return p.astype(dtype), (acc, m_new, l_i)

            def p_operand(p16):
                """P as the P·V wgmma's A operand: registers, or shared memory for the
                interpreter."""
                if not interpret:
                    return p16
                p_smem[wg] = p16
                plgpu.commit_smem()
                return p_smem.at[wg]

            def pv_into(acc, p16, slot, then=lambda: None):
                """acc + P·V from K/V slot `slot`, calling `then` right after the issue. The
                interpreter's accumulators start at zero, so there the product is added."""
                p_op = p_operand(p16)

                def pv(o_ref):
                    plgpu.wgmma(o_ref, p_op, v_smem.at[slot])
                    then()

                def pv_interpreted(o_ref):
                    pv(o_ref)
                    return o_ref[...]

                if interpret:
                    return acc + pl.run_scoped(pv_interpreted, plgpu.ACC((WG_ROWS, d), jnp.float32))
                return pl.run_state(pv)(plgpu.ACC.init(acc))

            def release(j):
                # Step j is only other warpgroups' work: give its slots back unread. Waiting
                # for the data first keeps this warpgroup from arriving twice on a slot before
                # another one once.
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])

            def finish(acc, l_i):
                nonzero = l_i > 0.0
                inv = jnp.where(nonzero, 1.0 / jnp.where(nonzero, l_i, 1.0), 0.0)
                o_smem[wg] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
                plgpu.commit_smem()
                # Rows [a, b) go out as power-of-two pieces: TMA boxes have static shapes.
                base = a
                size = WG_ROWS
                while size >= 1:
                    piece = (b - a) & size

                    @pl.when(piece != 0)
                    def _store(base=base, size=size):
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[wg, pl.ds(base, size)],
                            out_ref.at[pl.ds(tile_row + wg * WG_ROWS + base, size), h],
                        )

                    base = base + piece
                    size //= 2
                plgpu.wait_smem_to_gmem(0)

            m0 = plgpu.layout_cast(
                jnp.full((WG_ROWS,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
            )
            l0 = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc0 = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
            carry = (acc0, m0, l0)

            def ping_pong():
                """Two warpgroups alternate on the tensor cores: each hands them over after its
                Q·K issue and again after its softmax, so one's softmax runs while the other's
                two matmuls do."""

                def schedule() -> None:
                    plgpu.barrier_arrive(order)
                    plgpu.barrier_wait(order)

                def step(j, carry, masked: bool):
                    slot = lax.rem(j, stages)

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
                        schedule()
                        return acc_ref[...]

                    # (Named scopes: the regions `profile_dir` traces; nothing otherwise.)
                    with jax.named_scope("qk"):
                        plgpu.barrier_wait(k_bar.at[slot])
                        s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    with jax.named_scope("softmax"):
                        p16, (acc, m_i, l_i) = softmax(j, s, carry, masked)
                    # Ping-pong: the other warpgroup's matmuls run while this one does softmax.
                    plgpu.barrier_arrive(order)

                    with jax.named_scope("pv"):
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_wait(order)
                        acc = pv_into(acc, p16, slot)
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_i, l_i

                def unused(j, carry):
                    # Taking part in the same two schedule phases as `step`.
                    release(j)
                    schedule()
                    schedule()
                    return carry

                c = carry
                pl.when(wg == 1)(schedule)  # warpgroup 1 runs one phase behind warpgroup 0
                c = lax.fori_loop(0, n_full, functools.partial(step, masked=False), c)
                c = lax.fori_loop(n_full, n_mine, functools.partial(step, masked=True), c)
                lax.fori_loop(n_mine, n_kv, unused, None)
                pl.when(wg == 0)(schedule)
                acc, _, l_i = c
                finish(acc, l_i)

            def ring():
                """Three warpgroups pass the tensor cores 0 -> 1 -> 2 -> 0, one turn per step:
                in its turn a warpgroup issues P_j·V_j and Q·K_{j+1} together, then waits for
                both and runs the softmax of step j+1 while the other two take their turns.
                Every warpgroup takes n_kv + 1 turns: its own steps, then turns passed on."""

                def pass_turn():
                    plgpu.barrier_arrive(order.at[lax.rem(wg + 1, wgs)])

                def first():  # turn 0: Q·K_0 alone
                    plgpu.barrier_wait(k_bar.at[0])
                    plgpu.barrier_wait(order.at[wg])

                    def qk(s_ref):
                        plgpu.wgmma(s_ref, q_smem.at[wg], k_smem.at[0].transpose((1, 0)))
                        pass_turn()
                        return s_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[0])
                    return s

                def step(j, c, masked: bool):  # turn j + 1
                    s, inner = c
                    with jax.named_scope("softmax"):
                        p16, (acc, m_i, l_i) = softmax(j, s, inner, masked)
                    with jax.named_scope("turn"):
                        acc, s = step_turn(j, p16, acc)
                    return s, (acc, m_i, l_i)

                def step_turn(j, p16, acc):
                    sv, sk = lax.rem(j, stages), lax.rem(j + 1, stages)
                    plgpu.barrier_wait(v_bar.at[sv])
                    plgpu.barrier_wait(k_bar.at[sk])
                    plgpu.barrier_wait(order.at[wg])
                    p_op = p_operand(p16)

                    def issue(o_ref, s_ref):
                        plgpu.wgmma(o_ref, p_op, v_smem.at[sv])
                        plgpu.wgmma(s_ref, q_smem.at[wg], k_smem.at[sk].transpose((1, 0)))
                        pass_turn()

                    def issue_interpreted(o_ref, s_ref):  # its accumulators start at 0
                        issue(o_ref, s_ref)
                        return o_ref[...], s_ref[...]

                    if interpret:
                        o, s = pl.run_scoped(
                            issue_interpreted,
                            plgpu.ACC((WG_ROWS, d), jnp.float32),
                            plgpu.ACC((WG_ROWS, bk), jnp.float32),
                        )
                        acc = acc + o
                    else:
                        acc, s = pl.run_state(lambda refs: issue(*refs))(
                            (plgpu.ACC.init(acc), plgpu.ACC.init(s_zero))
                        )
                    plgpu.barrier_arrive(v_free.at[sv])
                    plgpu.barrier_arrive(k_free.at[sk])
                    return acc, s

                def last(j, c):  # turn n_mine: P·V alone
                    s, inner = c
                    p16, (acc, m_i, l_i) = softmax(j, s, inner, masked=True)
                    sv = lax.rem(j, stages)
                    plgpu.barrier_wait(v_bar.at[sv])
                    plgpu.barrier_wait(order.at[wg])
                    acc = pv_into(acc, p16, sv, then=pass_turn)
                    plgpu.barrier_arrive(v_free.at[sv])
                    return acc, l_i

                def take_turn():
                    plgpu.barrier_wait(order.at[wg])
                    pass_turn()

                def unused(j, _):
                    release(j)
                    take_turn()

                s_zero = plgpu.layout_cast(
                    jnp.zeros((WG_ROWS, bk), jnp.float32), plgpu.Layout.WGMMA
                )

                pl.when(wg == wgs - 1)(pass_turn)  # warpgroup 0 has the first turn

                @pl.when(n_mine > 0)
                def _mine():
                    c = (first(), carry)
                    # The last step is always masked: a mask on an unmasked step changes nothing.
                    split = jnp.minimum(n_full, n_mine - 1)
                    c = lax.fori_loop(0, split, functools.partial(step, masked=False), c)
                    c = lax.fori_loop(split, n_mine - 1, functools.partial(step, masked=True), c)
                    acc, l_i = last(n_mine - 1, c)
                    lax.fori_loop(n_mine, n_kv, unused, None)
                    finish(acc, l_i)

                @pl.when(n_mine == 0)
                def _none():
                    lax.fori_loop(0, n_kv, unused, None)
                    take_turn()
                    finish(acc0, l0)  # zeros

                # Warpgroup 2's last pass lands on warpgroup 0's barrier: waited for, for the
                # interpreter's sake (it checks that every phase is seen).
                pl.when(wg == 0)(lambda: plgpu.barrier_wait(order.at[0]))

            (ping_pong if wgs == 2 else ring)()

        @pl.when(wg == wgs)
        def _memory():
            plgpu.set_max_registers(40 if wgs == 2 else 32, action="decrease")
            kvh = lax.div(h, group)
            k_head, v_head = k_ref.at[kvh], v_ref.at[kvh]
            # The sequence's block-table row, copied once: page numbers then come from shared
            # memory, not from a global load each (+1-2 % at B4 S4096 / S16384).
            for c in range(0, max_pages, TABLE_CHUNK):
                n = min(TABLE_CHUNK, max_pages - c)
                plgpu.copy_gmem_to_smem(
                    bt_ref.at[pl.ds(seq_row, 1), pl.ds(c, n)], bt_smem.at[:, pl.ds(c, n)], bt_bar
                )
            plgpu.barrier_wait(bt_bar)
            table = bt_smem.at[0]

            @pl.loop(0, n_kv)
            def _issue(j):
                slot = lax.rem(j, stages)
                pages = [
                    table[jnp.minimum(j * pages_per_step + i, max_pages - 1)]
                    for i in range(pages_per_step)
                ]

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                for i, page in enumerate(pages):
                    dst = k_smem.at[slot, pl.ds(i * page_size, page_size)]
                    plgpu.copy_gmem_to_smem(k_head.at[page], dst, k_bar.at[slot])

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                for i, page in enumerate(pages):
                    dst = v_smem.at[slot, pl.ds(i * page_size, page_size)]
                    plgpu.copy_gmem_to_smem(v_head.at[page], dst, v_bar.at[slot])

            if interpret:
                # The interpreter checks that a thread waiting on a barrier sees every phase of
                # it; on the GPU nothing needs the last `stages` releases, so they go unseen.
                @pl.loop(jnp.maximum(n_kv - stages, 0), n_kv)
                def _drain(j):
                    plgpu.barrier_wait(k_free.at[lax.rem(j, stages)])
                    plgpu.barrier_wait(v_free.at[lax.rem(j, stages)])

    profile = (
        dict(profile_space=PROFILE_EVENTS, profile_dir=profile_dir, profile_bounds_check=True)
        if profile_dir
        else {}
    )

    def entry(q_ref, k_ref, v_ref, bt_ref, work_ref, out_ref):
        kv_tile = plgpu.SMEM((stages, bk, d), dtype, transforms=tiles)
        pl.run_scoped(
            lambda *scratch: kernel(q_ref, k_ref, v_ref, bt_ref, work_ref, out_ref, scratch),
            plgpu.SMEM((wgs, WG_ROWS, d), dtype, transforms=tiles),
            kv_tile,
            kv_tile,
            plgpu.SMEM((wgs, WG_ROWS, d), dtype),
            plgpu.SMEM((1, max_pages), jnp.int32),
            (
                plgpu.Barrier(num_barriers=wgs),
                plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),
                plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),
                plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
                plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
                # ping-pong: one barrier both arrive on; ring: one turn barrier per warpgroup
                plgpu.Barrier(num_arrivals=2) if wgs == 2 else plgpu.Barrier(num_barriers=wgs),
                plgpu.Barrier(num_arrivals=-(-max_pages // TABLE_CHUNK)),
            ),
            *([plgpu.SMEM((wgs, WG_ROWS, bk), dtype, transforms=tiles)] if interpret else []),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((t, hq, d), dtype),
        grid=(hq, items),
        grid_names=("head", "item"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(q, k_pages, v_pages, block_tables, work)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "profile_dir"))
def paged_prefill(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    scale: float,
    interpret: bool = False,
    profile_dir: str | None = None,
) -> jax.Array:
    """q: [T, q_heads, D] packed chunks; see `prefill_attention_reference` for the contract.
    `interpret`: run in Pallas's Mosaic GPU interpreter on the CPU (see the module docstring).
    `profile_dir`: write a Mosaic GPU profiler trace of each call there (the named regions of a
    step, per warpgroup, in SM clock cycles; `tools/prefill_timeline.py` reads them)."""
    t, _, d = q.shape
    # Table rows are copied with TMA, whose global strides are multiples of 16 bytes.
    tables = block_tables.astype(jnp.int32)
    if tables.shape[1] % 4:
        tables = jnp.pad(tables, ((0, 0), (0, 4 - tables.shape[1] % 4)))
    cfg = choose_config(d, tables.shape[1])
    # Query tiles are read (and outputs written) in boxes of up to 64 rows, and Mosaic's tiled
    # TMA wants the row count a multiple of 8: pad the arrays to that (a copy, only when T is not
    # already one).
    t_pad = max(-(-t // 8) * 8, cfg.tile_rows)
    if t_pad != t:
        q = jnp.pad(q, ((0, t_pad - t), (0, 0), (0, 0)))
    work = build_work_list(cu_q_lens, seq_lens, t_pad, cfg.tile_rows)
    out = _prefill_call(
        q,
        k_pages,
        v_pages,
        tables,
        work,
        scale=scale,
        cfg=cfg,
        interpret=interpret,
        profile_dir=profile_dir,
    )
    return out[:t]
