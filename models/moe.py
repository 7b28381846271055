"""Mixture-of-experts feed-forward block: Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE.

Tokens are routed (softmax over experts, top-k, optional renormalisation), sorted by expert, and run
through a grouped matmul (`jax.lax.ragged_dot`) so each expert only sees its own tokens; results are
unsorted and combined with the routing weights. No dense pass over every expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from models.layers import Linear, param


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [M, K] sorted by group; w: [G, K, N]; rows of group g use w[g]. Returns [M, N]."""
    y = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


class DenseMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(d, f, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
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
        t, d = x.shape
        e = self.gate_proj.shape[0]
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)  # [T, E]
        weights, experts = jax.lax.top_k(probs, self.top_k)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(x.dtype)

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
        out = out.astype(x.dtype)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(x))
            out = out + gate * self.shared_expert(x)
        return out
