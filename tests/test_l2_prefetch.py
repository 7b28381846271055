"""The side-stream L2 prefetch: its box arithmetic, the kernel in Pallas's Mosaic GPU interpreter,
when the model takes it, and (on a Hopper GPU) a matmul behind it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import init_kv_cache, llama
from models.layers import matmul
from pallas_kernels import l2_prefetch, paged_attention
from pallas_kernels.attention import AttentionMetadata

ON_HOPPER = jax.devices()[0].platform == "gpu" and paged_attention.mosaic_available(
    jax.devices()[0]
)
MIB = 1 << 20


def covered(plan: l2_prefetch.BoxPlan, shape: tuple[int, int]) -> np.ndarray:
    """How many times the boxes the CTAs issue (round robin) cover each element of `shape`."""
    hits = np.zeros(shape, np.int32)
    for cta in range(l2_prefetch.CTAS):
        for b in range(cta, plan.num_boxes, l2_prefetch.CTAS):
            row, col = plan.origin(b)
            hits[row : row + plan.box[0], col : col + plan.box[1]] += 1
    return hits


@pytest.mark.parametrize(
    ("shape", "itemsize", "nbytes", "rows", "blocks"),
    [
        ((4096, 4096), 2, 24 * MIB, 3072, (12, 16)),  # Llama-3-8B o_proj, 24 MiB of 32
        ((2048, 2048), 2, 8 * MIB, 2048, (8, 8)),  # Llama-3.2-1B o_proj, all of it
        ((2048, 2048), 2, 64 * MIB, 2048, (8, 8)),  # more than the weight: all of it
        ((2048, 2048), 2, 1, 1, (1, 8)),  # one byte: one row, one row of boxes
        ((300, 520), 4, 520 * 4 * 257, 257, (2, 3)),  # ragged edges, f32
        ((16, 64), 2, 10**9, 16, (1, 1)),  # smaller than one box
    ],
)
def test_boxes_cover_the_first_rows_once(shape, itemsize, nbytes, rows, blocks) -> None:
    plan = l2_prefetch.box_plan(shape, itemsize, nbytes)
    assert l2_prefetch.covered_rows(shape, itemsize, nbytes) == rows
    assert (plan.row_blocks, plan.col_blocks) == blocks
    assert plan.box == (min(256, shape[0]), min(256, shape[1]))
    hits = covered(plan, shape)
    assert np.all(hits[:rows] == 1), "a covered row missed or prefetched twice"
    assert np.all(hits[rows + plan.box[0] :] == 0), "more than a box row past the covered rows"
    assert sum(l2_prefetch.boxes_per_cta(plan)) == plan.num_boxes


def test_boxes_are_shared_round_robin() -> None:
    plan = l2_prefetch.box_plan((4096, 4096), 2, 24 * MIB)
    assert l2_prefetch.boxes_per_cta(plan) == [48, 48, 48, 48]
    plan = l2_prefetch.box_plan((300, 520), 2, 1)
    assert l2_prefetch.boxes_per_cta(plan) == [1, 1, 1, 0]


def test_requested_bytes_reads_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(l2_prefetch.ENV_VAR, raising=False)
    assert l2_prefetch.requested_bytes() == 0
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "24")
    assert l2_prefetch.requested_bytes() == 24 * MIB
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "0.5")
    assert l2_prefetch.requested_bytes() == MIB // 2


@pytest.mark.parametrize(
    ("shape", "dtype", "nbytes"),
    [((2048, 2048), jnp.bfloat16, 8 * MIB), ((300, 520), jnp.bfloat16, 10**5)],
)
def test_kernel_interpreted_issues_each_box_once(shape, dtype, nbytes) -> None:
    """The kernel's loop and predicate, in the interpreter (where a prefetch is a no-op): each
    CTA reports the boxes the plan gives it."""
    token = l2_prefetch.prefetch(jnp.zeros(shape, dtype), nbytes, interpret=True)
    plan = l2_prefetch.box_plan(shape, jnp.dtype(dtype).itemsize, nbytes)
    assert np.asarray(token).tolist() == l2_prefetch.boxes_per_cta(plan)


def test_join_adds_an_exact_zero() -> None:
    x = jnp.asarray([[1.5, -0.0, 3.0e38]], jnp.bfloat16)
    y = l2_prefetch.join(x, jnp.asarray([4, 4, 3, 3], jnp.int32))
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))


def test_model_prefetches_only_decoding_with_mosaic_on_one_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "8")
    i32 = np.zeros((1,), np.int32)

    def meta(is_decode: bool, backend: str) -> AttentionMetadata:
        return AttentionMetadata(i32, i32[None], i32, i32, is_decode, backend)

    decode = meta(True, "mosaic")
    assert llama._o_proj_prefetch_bytes(decode) == 0  # no Mosaic on the CPU
    monkeypatch.setattr(paged_attention, "mosaic_available", lambda device: True)
    assert llama._o_proj_prefetch_bytes(decode) == 8 * MIB
    assert llama._o_proj_prefetch_bytes(meta(False, "mosaic")) == 0
    assert llama._o_proj_prefetch_bytes(meta(True, "reference")) == 0
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("tensor",))):
        assert llama._o_proj_prefetch_bytes(decode) == 0
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "0")
    assert llama._o_proj_prefetch_bytes(decode) == 0


def test_decode_step_on_cpu_is_unchanged_by_the_switch(
    tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the prefetch is never traced (the kernel is not even called) and a decode
    step's output is the same with the switch on."""
    model = tiny_model()
    cfg, page = model.cfg, 4
    rows = 3
    positions = jnp.asarray([0, 5, 2], jnp.int32)
    tables = jnp.arange(1, 1 + rows * 2, dtype=jnp.int32).reshape(rows, 2)
    meta = AttentionMetadata(
        slot_mapping=tables[jnp.arange(rows), positions // page] * page + positions % page,
        block_tables=tables,
        seq_lens=positions + 1,
        cu_q_lens=jnp.arange(rows + 1, dtype=jnp.int32),
        is_decode=True,
    )
    tokens = jnp.asarray([3, 17, 40], jnp.int32)
    kv = init_kv_cache(cfg, 1 + rows * 2, page, jnp.float32)
    graphdef, state = nnx.split(model)

    def step() -> np.ndarray:
        jax.clear_caches()  # the switch is read when a layer is traced
        h, _ = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, positions, kv, meta))(state)
        return np.asarray(h)

    off = step()

    def not_on_cpu(*args):
        raise AssertionError("the L2 prefetch was traced on the CPU")

    monkeypatch.setattr(l2_prefetch, "side_stream_prefetch", not_on_cpu)
    monkeypatch.setenv(l2_prefetch.ENV_VAR, "8")
    try:
        np.testing.assert_array_equal(step(), off)
    finally:
        jax.clear_caches()


# --- on a Hopper GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 (Hopper) GPU")
@pytest.mark.parametrize(
    ("shape", "mib"),
    [((4096, 4096), 24), ((2048, 2048), 8), ((4096, 4096), 64), ((2048, 8192), 3)],
)
def test_matmul_behind_a_side_stream_prefetch(shape: tuple[int, int], mib: int) -> None:
    """The o_proj pattern of `models.llama.Attention` (prefetch started on stream 1 with the
    input, joined to the matmul's result, the token not returned) compiles with the kernel in
    an async call on stream 1, and the matmul equals an f32 reference product, call after
    call. (That each CTA issues its boxes is the interpreter test's.)"""

    @jax.jit
    def step(x: jax.Array, w: jax.Array) -> jax.Array:
        _, w_b = jax.lax.optimization_barrier((x, w))
        token = l2_prefetch.side_stream_prefetch(w_b, mib * MIB)
        return l2_prefetch.join(matmul(x, w), token)

    rng = np.random.default_rng(shape[1] + mib)
    w = jnp.asarray(0.02 * rng.standard_normal(shape), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, shape[0])), jnp.bfloat16)
    text = step.lower(x, w).compile().as_text()
    assert "call-start" in text and '_xla_stream_annotation="1"' in text
    assert 'custom_call_target="mosaic_gpu_v2"' in text
    w32 = np.asarray(w, np.float32)
    for _ in range(4):
        x = jnp.asarray(rng.standard_normal((1, shape[0])), jnp.bfloat16)
        y = step(x, w)
        ref = np.asarray(x, np.float32) @ w32
        err = np.linalg.norm(np.asarray(y, np.float32) - ref) / np.linalg.norm(ref)
        assert err <= 1e-2
