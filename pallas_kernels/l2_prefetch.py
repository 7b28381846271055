"""L2 prefetch of a weight from a second CUDA stream (Hopper, Mosaic GPU).

Owns the prefetch kernel, the box arithmetic it follows, `side_stream_prefetch` (the kernel run on
stream 1) and the experiment switch `JAXSERVE_L2_PREFETCH_MB`. It reads the weight and writes
nothing but its own token; where the prefetch starts and where it is joined is the caller's choice
(`models.llama.Attention`).

Why: at batch 1 decode the small kernels between a layer's q/k/v GEMM and its o_proj GEMM leave HBM
mostly idle, and o_proj then streams its weight from HBM. Prefetches issued from inside the decode
attention kernel sped o_proj up but held that kernel until they landed; issued from a kernel of
their own on another stream, nothing on the main stream waits for them.

Kernel: `CTAS` CTAs of one warpgroup. The rows that hold the first `nbytes` of the row-major
weight [K, N] are cut into boxes of at most `BOX` x `BOX` elements (a TMA box dimension is at most
256); CTA c issues boxes c, c + CTAS, ... with `cp.async.bulk.prefetch.tensor` (one thread each;
nothing waits for them). Each CTA writes how many boxes it issued into a [CTAS] int32 token: the
kernel's only output, which the caller must `join` to a value it uses, or XLA drops the kernel as
dead code.

Stream: `compute_on("gpu_stream:1")` lowers to a non-inlinable call marked
`_xla_stream_annotation="1"`, which XLA's GPU compiler wraps into an async call-start / call-done
pair run on stream 1. XLA honours the mark only under `--xla_gpu_experimental_stream_annotation`,
which is on by default in the XLA of jaxlib 0.11.2 (its DebugOptions default is true), so no flag
needs setting; with it off the mark is ignored and the call runs in order on the main stream.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax.experimental.compute_on import compute_on

from jaxserve import program_env

BOX = 256  # TMA's largest box dimension, in elements
CTAS = 4
STREAM = "gpu_stream:1"
ENV_VAR = program_env.L2_PREFETCH_MB


def requested_bytes() -> int:
    """How many bytes of a weight to prefetch: `JAXSERVE_L2_PREFETCH_MB` in MiB (fractions
    allowed), read when a step is traced; unset or 0 turns the prefetch off."""
    return int(float(os.environ.get(ENV_VAR) or 0) * (1 << 20))


@dataclasses.dataclass(frozen=True)
class BoxPlan:
    """The boxes that cover the first rows of a [K, N] weight, numbered row-major."""

    box: tuple[int, int]  # (rows, cols) of one box
    row_blocks: int
    col_blocks: int

    @property
    def num_boxes(self) -> int:
        return self.row_blocks * self.col_blocks

    def origin(self, b):
        """(row, col) of box `b`'s first element; `b` a Python or traced integer >= 0."""
        return (b // self.col_blocks) * self.box[0], (b % self.col_blocks) * self.box[1]


def covered_rows(shape: tuple[int, int], itemsize: int, nbytes: int) -> int:
    """The whole rows of a row-major [K, N] weight that hold its first `nbytes` bytes (all K at
    most)."""
    k, n = shape
    return min(k, -(-nbytes // (n * itemsize)))


def box_plan(shape: tuple[int, int], itemsize: int, nbytes: int) -> BoxPlan:
    """Boxes over the rows `covered_rows` gives, rounded up to whole boxes (a box past the
    weight's last row or column is cut short by TMA)."""
    k, n = shape
    box = (min(BOX, k), min(BOX, n))
    rows = covered_rows(shape, itemsize, nbytes)
    return BoxPlan(box, -(-rows // box[0]), -(-n // box[1]))


def boxes_per_cta(plan: BoxPlan) -> list[int]:
    """How many boxes each CTA issues (what the token holds)."""
    return [len(range(c, plan.num_boxes, CTAS)) for c in range(CTAS)]


def prefetch(w: jax.Array, nbytes: int, *, interpret: bool = False) -> jax.Array:
    """Issue L2 prefetches of the first `nbytes` of `w` [K, N] (see `box_plan`) on the stream
    this runs on; returns the [CTAS] int32 token. `interpret=True` runs it in Pallas's Mosaic
    GPU interpreter (on the CPU too), where a prefetch does nothing."""
    k, n = w.shape
    if n * w.dtype.itemsize % 16:
        raise ValueError(f"l2 prefetch: rows of {n} x {w.dtype} are not a multiple of 16 bytes")
    plan = box_plan((k, n), w.dtype.itemsize, nbytes)
    rounds = -(-plan.num_boxes // CTAS)

    def kernel(w_ref, token_ref):
        cta = lax.axis_index("cta")

        def issue(i, issued):
            b = cta + i * CTAS
            row, col = plan.origin(b)
            inside = b < plan.num_boxes
            box = w_ref.at[pl.ds(row, plan.box[0]), pl.ds(col, plan.box[1])]
            plgpu.async_prefetch(box, predicate=inside)
            return issued + inside.astype(jnp.int32)

        token_ref[cta] = lax.fori_loop(0, rounds, issue, jnp.int32(0))

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((CTAS,), jnp.int32),
        grid=(CTAS,),
        grid_names=("cta",),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(w)


def join(x: jax.Array, token: jax.Array) -> jax.Array:
    """`x`, made to depend on a prefetch's `token`: the main stream waits for the prefetch
    before anything reads the result. The dependency is data, an added zero XLA cannot prove
    zero (a token's counts are never negative): a token consumed by nothing but an optimization
    barrier is dead code to XLA, which then drops the prefetch altogether."""
    return x + (token[0] < 0).astype(x.dtype)


def side_stream_prefetch(w: jax.Array, nbytes: int) -> jax.Array:
    """`prefetch` of the first min(nbytes, size of w) bytes of `w`, run on CUDA stream 1.

    Returns the token. XLA starts the call once `w` exists (tie `w` to the value the prefetch
    should wait for, e.g. with an optimization barrier) and makes the main stream wait for it
    where the token is first used: `join` it to the result of the reads the prefetch is for."""
    nbytes = min(nbytes, w.size * w.dtype.itemsize)
    run = compute_on(compute_type=STREAM, out_memory_spaces=jax.memory.Space.Device)(
        functools.partial(prefetch, nbytes=nbytes)
    )
    return run(w)
