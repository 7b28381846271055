"""Weight matmuls of decode steps: a few rows of activations times one or more weight matrices.

Owns the dispatch between XLA's GEMMs and the Mosaic GPU kernel (`_mosaic_matmul`), and the
reference twin `matmul_reference`, which defines the function both compute: each x @ W_i
accumulated in f32 and cast back to x's dtype.

Measured on an H100 at 8 rows (`python -m jaxserve.bench kernels --kind matmul`), the kernel
streams small weights with less fixed cost than XLA's GEMMs (a 2048 x 2048 matrix: 6 us against
11 us), while from ~32 MB of weights on both run within a few percent of HBM bandwidth. So
"mosaic" takes the kernel for products of at most `KERNEL_MAX_BYTES` of weights, and XLA's GEMMs
for the rest and wherever the kernel does not apply (more than 64 rows, a mesh that shards the
weights, other dtypes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic_matmul

BACKENDS = ("xla", "mosaic")
KERNEL_MAX_BYTES = 32 * 2**20


def matmul_reference(
    x: jax.Array, ws: Sequence[jax.Array], *, transposed: bool = False
) -> list[jax.Array]:
    """x: [M, K]; each W_i is [K, N_i] ([N_i, K] when `transposed`). Returns the [M, N_i]."""
    outs = []
    for w in ws:
        w = w.T if transposed else w
        y = jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        outs.append(y.astype(x.dtype))
    return outs


def use_kernel(x: jax.Array, ws: Sequence[jax.Array], *, transposed: bool = False) -> bool:
    """Whether "mosaic" runs these shapes on the kernel (see the module docstring)."""
    widths = [w.shape[0] if transposed else w.shape[1] for w in ws]
    if _mosaic_matmul.supported(x.dtype, ws[0].dtype, x.shape[0], x.shape[1], widths):
        return False
    if any(w.dtype != ws[0].dtype for w in ws):
        return False
    if sum(w.size * w.dtype.itemsize for w in ws) > KERNEL_MAX_BYTES:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or all(size == 1 for size in mesh.shape.values())


def matmul(
    x: jax.Array, ws: Sequence[jax.Array], *, transposed: bool = False, backend: str = "xla"
) -> list[jax.Array]:
    """x @ W_i for every W_i (see `matmul_reference`), through `backend` ("xla" or "mosaic")."""
    if backend not in BACKENDS:
        raise ValueError(f"matmul backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "mosaic" and use_kernel(x, ws, transposed=transposed):
        if not _mosaic_matmul.available(jax.devices()[0]):
            raise ValueError("matmul backend: 'mosaic' needs an sm_90 (Hopper) GPU")
        return list(_mosaic_matmul.skinny_matmul(x, tuple(ws), transposed=transposed))
    return matmul_reference(x, ws, transposed=transposed)
