"""Tests of the decode-step weight matmuls (`pallas_kernels.skinny_matmul`): the dispatch and the
reference twin on any platform, the Mosaic GPU kernel against the twin on Hopper GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _mosaic_matmul, skinny_matmul

ON_HOPPER = _mosaic_matmul.available(jax.devices()[0])
gpu = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm_90) GPU")


def _inputs(rng, rows, k, widths, transposed, dtype=jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    shapes = [(n, k) if transposed else (k, n) for n in widths]
    ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(k), dtype) for s in shapes]
    return x, ws


def _rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y))
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def test_reference_is_each_product_in_f32():
    rng = np.random.default_rng(0)
    x, ws = _inputs(rng, 5, 128, [64, 192], transposed=False)
    outs = skinny_matmul.matmul_reference(x, ws)
    for y, w in zip(outs, ws, strict=True):
        exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        assert y.shape == exact.shape and y.dtype == x.dtype
        assert _rel_err(y, exact) < 1e-2
    xt, wts = _inputs(rng, 3, 64, [128], transposed=True)
    (yt,) = skinny_matmul.matmul_reference(xt, wts, transposed=True)
    np.testing.assert_allclose(
        np.asarray(yt, np.float32),
        np.asarray(skinny_matmul.matmul_reference(xt, [wts[0].T])[0], np.float32),
    )


def test_xla_backend_is_the_reference():
    rng = np.random.default_rng(1)
    x, ws = _inputs(rng, 8, 256, [64, 64, 128], transposed=False)
    for y, r in zip(
        skinny_matmul.matmul(x, ws), skinny_matmul.matmul_reference(x, ws), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(r))
    with pytest.raises(ValueError, match="matmul backend"):
        skinny_matmul.matmul(x, ws, backend="cublas")


def test_kernel_choice():
    x = jnp.zeros((8, 2048), jnp.bfloat16)
    small = [jnp.zeros((2048, 2048), jnp.bfloat16)]
    assert skinny_matmul.use_kernel(x, small)
    big = [jnp.zeros((2048, 16384), jnp.bfloat16)]  # 64 MiB: XLA's GEMMs are as fast
    assert not skinny_matmul.use_kernel(x, big)
    assert not skinny_matmul.use_kernel(jnp.zeros((65, 2048), jnp.bfloat16), small)
    assert not skinny_matmul.use_kernel(x.astype(jnp.float32), small)
    assert not skinny_matmul.use_kernel(x, [jnp.zeros((2048, 96), jnp.bfloat16)])  # N % 64
    assert not skinny_matmul.use_kernel(jnp.zeros((8, 96), jnp.bfloat16), small)  # K % 64


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal off Hopper")
def test_mosaic_backend_needs_hopper():
    x = jnp.zeros((8, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="Hopper"):
        skinny_matmul.matmul(x, [jnp.zeros((256, 64), jnp.bfloat16)], backend="mosaic")


def test_config_fills_the_gpu():
    for rows, k, blocks in [(8, 2048, 32), (8, 8192, 32), (64, 4096, 448), (8, 576, 9)]:
        cfg = _mosaic_matmul.choose_config(rows, k, blocks, 132)
        assert k % (cfg.block_k * cfg.splits) == 0
        assert _mosaic_matmul._smem_per_cta(rows, cfg.block_k, cfg.stages, 2) <= (
            _mosaic_matmul.SMEM_BYTES
        )
        assert blocks * cfg.splits >= 0.9 * min(132, blocks * (k // cfg.block_k))
    # Few column blocks over a long K are split so every SM streams.
    assert _mosaic_matmul.choose_config(8, 8192, 32, 132).splits >= 4


CASES = [
    # rows, K, widths, transposed, config (None: the default choice)
    (1, 2048, [2048, 512, 512], False, None),
    (8, 2048, [2048], False, None),
    (5, 576, [576, 192, 192], False, None),
    (24, 4096, [1024], False, _mosaic_matmul.MatmulConfig(128, 3, 4)),
    (64, 8192, [2048], False, None),
    (16, 1024, [4096], False, _mosaic_matmul.MatmulConfig(256, 2, 1)),
    (8, 2048, [4096], True, None),
    (33, 512, [640], True, _mosaic_matmul.MatmulConfig(64, 6, 2)),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,widths,transposed,cfg", CASES)
def test_kernel_matches_reference(rows, k, widths, transposed, cfg):
    rng = np.random.default_rng(rows * 1000 + k)
    x, ws = _inputs(rng, rows, k, widths, transposed)
    outs = _mosaic_matmul.skinny_matmul(x, tuple(ws), transposed=transposed, config=cfg)
    refs = skinny_matmul.matmul_reference(x, ws, transposed=transposed)
    for y, ref in zip(outs, refs, strict=True):
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert _rel_err(y, ref) < 1e-2


@gpu
@pytest.mark.gpu
def test_kernel_fresh_inputs_each_call():
    """Two calls with different inputs give different, correct results (no stale tiles)."""
    rng = np.random.default_rng(7)
    for _ in range(2):
        x, ws = _inputs(rng, 8, 2048, [2048, 512, 512], False)
        outs = skinny_matmul.matmul(x, ws, backend="mosaic")
        for y, ref in zip(outs, skinny_matmul.matmul_reference(x, ws), strict=True):
            assert _rel_err(y, ref) < 1e-2
