"""Device meshes and the one set of logical-axis rules that every sharding is derived from.

Owns the mesh (axes `expert` x `tensor`), `LOGICAL_AXIS_RULES` (which mesh axis each logical
axis name declared by `models.layers.param` is split over), and everything derived from them:
each parameter's `NamedSharding` (read from the `axes` metadata of the abstract model), the KV
cache's, and the per-device memory they come to.

Tensor parallelism is Megatron's layout, partitioned by XLA from these shardings: q/k/v and the
MLP gate/up are split by output columns (whole heads, MLP columns), o and the MLP down by input
rows, the embedding and the logits by vocabulary rows. Expert parallelism splits the stacked
expert weights over `expert`; `models.moe` runs its experts in a `shard_map` over the mesh.

A logical dimension is split only when it divides evenly: heads and KV heads by whole heads (so a
model with fewer KV heads than the tensor size keeps its K/V projections and KV cache replicated),
every other dimension by size. What is not split is replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import ModelConfig

EXPERT = "expert"
TENSOR = "tensor"
AXIS_NAMES = (EXPERT, TENSOR)

# Logical axis -> mesh axis. `embed`, `norm` and unnamed dimensions are replicated.
LOGICAL_AXIS_RULES: dict[str, str] = {
    "vocab": TENSOR,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "experts": EXPERT,
}

Axes = Sequence[str | None]
MeshShape = Mapping[str, int]


def make_mesh(
    tensor_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """An (expert, tensor) mesh over the first tp * ep devices (all processes' devices)."""
    for name, size in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("expert_parallel_size", expert_parallel_size),
    ):
        if size < 1:
            raise ValueError(f"{name}: must be >= 1, got {size}")
    n = tensor_parallel_size * expert_parallel_size
    pool = list(jax.devices() if devices is None else devices)
    if n > len(pool):
        raise ValueError(
            f"tensor_parallel_size x expert_parallel_size: {tensor_parallel_size} x "
            f"{expert_parallel_size} = {n} devices, but only {len(pool)} are available"
        )
    if jax.process_count() > 1 and n != jax.device_count():
        # Every process runs every step, so every process's devices must hold part of the model.
        raise ValueError(
            f"tensor_parallel_size x expert_parallel_size: {n} devices, but a multi-process run "
            f"must use all {jax.device_count()} devices of its {jax.process_count()} processes"
        )
    # Auto axes: XLA propagates shardings from the parameters and the KV cache.
    return jax.make_mesh(
        (expert_parallel_size, tensor_parallel_size),
        AXIS_NAMES,
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=pool[:n],
    )


def validate(cfg: ModelConfig, mesh_shape: MeshShape) -> None:
    """Refuse expert parallelism that cannot split the model's experts evenly."""
    ep = mesh_shape.get(EXPERT, 1)
    if ep > 1 and not cfg.is_moe:
        raise ValueError(f"expert_parallel_size: {ep}, but {cfg.architecture} has no experts")
    if ep > 1 and cfg.num_experts % ep:
        raise ValueError(
            f"expert_parallel_size: {ep} does not divide the model's {cfg.num_experts} experts"
        )


def replicated_dims(cfg: ModelConfig, mesh_shape: MeshShape) -> list[str]:
    """The model dimensions the tensor axis does not divide: they stay whole on every device."""
    tp = mesh_shape.get(TENSOR, 1)
    sizes = {
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "vocab": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size if len(cfg.moe_layers) < cfg.num_layers else 0,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
    }
    return [f"{name} ({n})" for name, n in sizes.items() if n and n % tp]


def mesh_axis(
    logical: str | None, size: int, cfg: ModelConfig, mesh_shape: MeshShape
) -> str | None:
    """The mesh axis a dimension of `size` named `logical` is split over, or None (replicated)."""
    axis = LOGICAL_AXIS_RULES.get(logical or "")
    n = mesh_shape.get(axis or "", 1)
    if n == 1:
        return None
    # Heads are only ever split whole; the attention of one head needs all of its columns.
    units = {"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}.get(logical or "", size)
    return axis if units % n == 0 and size % n == 0 else None


def partition_spec(
    axes: Axes, shape: Sequence[int], cfg: ModelConfig, mesh_shape: MeshShape
) -> PartitionSpec:
    """The PartitionSpec of one array whose dimensions have the logical names `axes`."""
    assert len(axes) == len(shape), (axes, shape)
    return PartitionSpec(
        *(mesh_axis(a, s, cfg, mesh_shape) for a, s in zip(axes, shape, strict=True))
    )


def kv_spec(num_kv_heads: int, mesh_shape: MeshShape) -> PartitionSpec:
    """KV cache [kv_heads, num_pages, page_size, head_dim]: split by whole KV heads, as the
    `kv_heads` columns of k_proj / v_proj are."""
    axis = LOGICAL_AXIS_RULES["kv_heads"]
    n = mesh_shape.get(axis, 1)
    return PartitionSpec(axis) if n > 1 and num_kv_heads % n == 0 else PartitionSpec()


def kv_shards(num_kv_heads: int, mesh_shape: MeshShape) -> int:
    """How many devices one KV page is split across (1 when the cache is replicated)."""
    spec = kv_spec(num_kv_heads, mesh_shape)
    return mesh_shape[spec[0]] if spec != PartitionSpec() else 1


def kv_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, kv_spec(cfg.num_kv_heads, mesh.shape))


def constrain_kv(kv: list[tuple[jax.Array, jax.Array]]) -> list[tuple[jax.Array, jax.Array]]:
    """Pin a step's output KV cache to the KV cache layout of the mesh it is traced under.

    The cache is donated, so the output must come back in the input's sharding for XLA to update
    it in place; left to propagation, a step could hand back the cache in another layout. A no-op
    outside a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kv
    return [
        tuple(jax.lax.with_sharding_constraint(x, kv_spec(x.shape[0], mesh.shape)) for x in layer)
        for layer in kv
    ]


def constrain_replicated(x: jax.Array) -> jax.Array:
    """Pin a step's output to a full copy on every device of the mesh it is traced under (what
    a donated replicated input needs back to be updated in place); a no-op outside a mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def device_bytes(tree: Any) -> int:
    """The most bytes any one device holds of the arrays in `tree` (this process's devices)."""
    per_device: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def describe(mesh: Mesh | None, weights_bytes: int, kv_bytes: int) -> str:
    """One line for logs and `model_info()["mesh"]`: the layout and what each device holds."""
    memory = f"per device: weights {format_bytes(weights_bytes)}, KV cache {format_bytes(kv_bytes)}"
    if mesh is None:
        return f"1 device, single-device; {memory}"
    layout = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{mesh.size} devices{hosts} ({layout}); {memory}"


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`tree` fully replicated over `mesh`, so that any process can read it back to the host."""
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)
