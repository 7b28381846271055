"""Mixture-of-experts feed-forward block: Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE.

Tokens are routed (softmax over experts, top-k, optional renormalisation), sorted by expert, and run
through a grouped matmul (`jax.lax.ragged_dot`) so each expert only sees its own tokens; results are
unsorted and combined with the routing weights. No dense pass over every expert.

Under a mesh that splits the expert weights (expert and/or tensor parallelism, see
`jaxserve.sharding`), the experts run in a `shard_map`: every device takes all tokens, computes the
contributions of its own experts (its slice of their MLP columns) for the tokens routed to them,
and the partial outputs are summed with `psum`. Nothing is dropped however unbalanced the routing
is: a device's grouped matmul covers every row that could be routed to it. The mesh is read at
trace time, so the model code takes no mesh argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.sharding import EXPERT, partition_spec
from models.layers import Linear, param


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [M, K] sorted by group; w: [G, K, N]; rows of group g use w[g]. Returns [M, N]."""
    y = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


class DenseMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    The gate and up projections are one [d, 2, f] weight (`gate_up[:, 0]` is gate, `[:, 1]` up),
    so they are one matmul of 2f columns: a decode step reads them in one kernel instead of two,
    which saves one kernel's ramp-up and tail per layer (Llama-3-8B at batch 1: +2 % tokens/s).
    Sharded along f, each device keeps the matching gate and up columns."""

    def __init__(self, d: int, f: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate_up = param(rngs, (d, 2, f), ("embed", None, "mlp"), dtype)
        self.down_proj = Linear(f, d, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.gate_up[...].astype(x.dtype)
        # Written in x's dtype by the GEMM itself (which still accumulates in f32 on GPUs and
        # CPUs): asked for f32 and converted after, this [N, 2, f] product got a convert kernel
        # of its own wherever cuBLAS ran it — a pass over 3x its bf16 size, 1.07 s of a Llama-3-8B
        # offline run (docs/perf/engine_h100.md, item 21).
        y = jnp.einsum("...d,dkf->...kf", x, w, preferred_element_type=x.dtype)
        return self.down_proj(jax.nn.silu(y[..., 0, :]) * y[..., 1, :])


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # `MoE`'s stacked [E, in, out] parameters


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.cfg = cfg
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.router = Linear(d, e, ("embed", None), dtype=dtype, rngs=rngs)
        self.gate_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), dtype)
        self.up_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), dtype)
        self.down_proj = param(rngs, (e, f, d), ("experts", "mlp", "embed"), dtype)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(
                d, cfg.shared_expert_intermediate_size, dtype=dtype, rngs=rngs
            )
            self.shared_expert_gate = Linear(d, 1, ("embed", None), dtype=dtype, rngs=rngs)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def __call__(self, x: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)  # [T, E]
        weights, experts = jax.lax.top_k(probs, self.top_k)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(x.dtype)
        mesh = jax.sharding.get_abstract_mesh()
        specs = [] if mesh.empty else [self._spec(w, mesh) for w in self._expert_weights()]
        if any(axis is not None for spec in specs for axis in spec):
            out = self._sharded_experts(x, weights, experts, mesh, specs)
        else:
            out = self._experts(x, weights, experts)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(x))
            out = out + gate * self.shared_expert(x)
        return out

    def _expert_weights(self) -> tuple[nnx.Param, nnx.Param, nnx.Param]:
        return self.gate_proj, self.up_proj, self.down_proj

    def _spec(self, w: nnx.Param, mesh: jax.sharding.AbstractMesh) -> jax.P:
        return partition_spec(w.get_metadata()["axes"], w.shape, self.cfg, mesh.shape)

    def _experts(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """All experts on one device (or left to XLA when the mesh does not split them)."""
        t, d = x.shape
        e = self.gate_proj.shape[0]
        flat_expert = experts.reshape(-1)  # [T*k]
        order = jnp.argsort(flat_expert, stable=True)
        token_of = order // self.top_k
        xs = x[token_of]  # [T*k, D], grouped by expert
        group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
        h = jax.nn.silu(grouped_matmul(xs, self.gate_proj[...], group_sizes)) * grouped_matmul(
            xs, self.up_proj[...], group_sizes
        )
        ys = grouped_matmul(h, self.down_proj[...], group_sizes)  # [T*k, D]
        y = jnp.zeros((t * self.top_k, d), x.dtype).at[order].set(ys).reshape(t, self.top_k, d)
        out = jnp.einsum("tk,tkd->td", weights, y, preferred_element_type=jnp.float32)
        return out.astype(x.dtype)

    def _sharded_experts(
        self,
        x: jax.Array,
        weights: jax.Array,
        experts: jax.Array,
        mesh: jax.sharding.AbstractMesh,
        specs: list[jax.P],
    ) -> jax.Array:
        """Each device: its experts' share of the output for every token; then one psum."""
        gate_spec = specs[0]
        # The output is partial along each mesh axis that splits the experts (expert axis) or
        # their MLP columns (tensor axis): summing over exactly those gives the full output.
        psum_axes = tuple(a for a in (gate_spec[0], gate_spec[2]) if a is not None)
        top_k = self.top_k

        def local(x, weights, experts, gate, up, down):
            t, d = x.shape
            e_local = gate.shape[0]
            first = jax.lax.axis_index(EXPERT) * e_local if gate_spec[0] == EXPERT else 0
            flat = experts.reshape(-1) - first  # [T*k] local expert ids
            is_local = (flat >= 0) & (flat < e_local)
            # Rows routed elsewhere sort last, past every group: ragged_dot leaves them out.
            key = jnp.where(is_local, flat, e_local)
            order = jnp.argsort(key, stable=True)
            token_of = order // top_k
            group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
            xs = x[token_of]
            h = jax.nn.silu(grouped_matmul(xs, gate, group_sizes)) * grouped_matmul(
                xs, up, group_sizes
            )
            # f32 partial sums: the psum adds them before the one cast back to x's dtype.
            ys = jax.lax.ragged_dot(
                h, down.astype(h.dtype), group_sizes, preferred_element_type=jnp.float32
            )
            w = weights.reshape(-1)[order].astype(jnp.float32)
            ys = jnp.where(is_local[order][:, None], ys * w[:, None], 0.0)
            out = jnp.zeros((t, d), jnp.float32).at[token_of].add(ys)
            return jax.lax.psum(out, psum_axes)

        replicated = jax.P()
        out = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(replicated, replicated, replicated, *specs),
            out_specs=replicated,
        )(x, weights, experts, *(w[...] for w in self._expert_weights()))
        return out.astype(x.dtype)
