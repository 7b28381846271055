"""The Llama-family decoder: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2, and their MoE
variants (Mixtral, Qwen2-MoE, Qwen3-MoE) whose feed-forward is `models.moe.MoE`.

One forward serves prefill and decode: it takes a flat batch of tokens with their positions, the
paged KV cache (one (k_pages, v_pages) pair per layer) and the attention metadata, writes the new
K/V into the cache and returns final hidden states plus the updated cache. The step functions in
`jaxserve.engine` choose which rows become logits. Also owns `weight_map`: the table from Hugging
Face tensor names to this module's parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxserve import sharding
from jaxserve.config import ModelConfig
from models.layers import Linear, RMSNorm, apply_rope, param, rope_inv_freq, rope_tables
from models.moe import EXPERT_WEIGHTS, DenseMLP, MoE
from pallas_kernels.attention import AttentionMetadata, attention

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: [kv_heads, num_pages, page_size, head_dim]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        bias = cfg.qkv_bias
        self.q_proj = Linear(d, cfg.q_size, ("embed", "heads"), dtype=dtype, rngs=rngs, bias=bias)
        self.k_proj = Linear(
            d, cfg.kv_size, ("embed", "kv_heads"), dtype=dtype, rngs=rngs, bias=bias
        )
        self.v_proj = Linear(
            d, cfg.kv_size, ("embed", "kv_heads"), dtype=dtype, rngs=rngs, bias=bias
        )
        self.o_proj = Linear(cfg.q_size, d, ("heads", "embed"), dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.scale = cfg.head_dim**-0.5

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        kv: tuple[jax.Array, jax.Array],
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        t = x.shape[0]
        q_thd = self.q_proj(x).reshape(t, self.num_heads, self.head_dim)
        k_thd = self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        v_thd = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_thd, k_thd = self.q_norm(q_thd), self.k_norm(k_thd)
        q_thd = apply_rope(q_thd, rope)
        k_thd = apply_rope(k_thd, rope)
        o_thd, kv = attention(q_thd, k_thd, v_thd, kv, positions, meta, scale=self.scale)
        return self.o_proj(o_thd.reshape(t, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if layer in cfg.moe_layers:
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, rope, kv, meta):
        h, kv = self.self_attn(self.input_layernorm(x), positions, rope, kv, meta)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class CausalLM(nnx.Module):
    """Token ids → final hidden states (and logits for the rows the caller picks)."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[jax.Array, KVCache]:
        """tokens, positions: [T] → final-norm hidden states [T, D] and the updated cache."""
        x = self.embed_tokens[...][tokens]
        rope = rope_tables(positions, rope_inv_freq(self.cfg.rope, self.cfg.head_dim), x.dtype)
        new_cache = []
        for layer, kv in zip(self.layers, kv_cache, strict=True):
            graphdef, state = nnx.split(layer)
            x, kv = _apply_layer(graphdef, state, x, positions, rope, kv, meta)
            new_cache.append(kv)
        return self.norm(x), new_cache

    def logits(self, h: jax.Array) -> jax.Array:
        """[N, D] hidden states → [N, vocab] float32 logits."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.matmul(h, w.astype(h.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _apply_layer(graphdef, state, x, positions, rope, kv, meta):
    """One decoder layer as its own jitted function: every layer of a kind (same definition and
    shapes) then shares one trace and one lowered function, so compiling a step costs about one
    layer's tracing instead of `num_layers`; XLA inlines the calls, so the program is the same."""
    return nnx.merge(graphdef, state)(x, positions, rope, kv, meta)


@dataclass(frozen=True)
class WeightMapping:
    """Hugging Face tensor `hf_name` ([out, in] for linear weights) fills the parameter at `path`.

    `transpose`: store its transpose. `part`: it fills `param[part]` only, e.g. `(e,)` for expert
    e of a stacked [E, ...] parameter, `(slice(None), 1)` for the up half of a [d, 2, f] gate/up.
    """

    path: tuple[str | int, ...]
    transpose: bool = False
    part: tuple[int | slice, ...] = ()

    def param(self, tree: Any) -> Any:
        """The parameter at `path` in a (nested dict) tree of parameters."""
        for k in self.path:
            tree = tree[k]
        return tree

    def part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of `param[part]` for a parameter of `shape` (ints drop a dimension)."""
        for i, index in reversed(list(enumerate(self.part))):
            if isinstance(index, int):
                shape = shape[:i] + shape[i + 1 :]
            elif index != slice(None):
                raise ValueError(f"part: only whole slices and indices, got {index}")
        return shape


_GATE_UP = {"gate_proj": 0, "up_proj": 1}  # their halves of DenseMLP.gate_up [d, 2, f]


def _dense_mlp(hf: str, ours: tuple[str | int, ...]) -> dict[str, WeightMapping]:
    """The tensors of one `DenseMLP` (`hf`: its Hugging Face prefix, ending in '.')."""
    m = {
        f"{hf}{proj}.weight": WeightMapping(
            (*ours, "gate_up"), transpose=True, part=(slice(None), half)
        )
        for proj, half in _GATE_UP.items()
    }
    m[f"{hf}down_proj.weight"] = WeightMapping((*ours, "down_proj", "kernel"), transpose=True)
    return m


def weight_map(cfg: ModelConfig) -> dict[str, WeightMapping]:
    """Every Hugging Face tensor of a checkpoint of `cfg`, and where it goes."""
    m: dict[str, WeightMapping] = {"model.embed_tokens.weight": WeightMapping(("embed_tokens",))}
    m["model.norm.weight"] = WeightMapping(("norm", "scale"))
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = WeightMapping(("lm_head",), transpose=True)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        m[hf + "input_layernorm.weight"] = WeightMapping((*ours, "input_layernorm", "scale"))
        m[hf + "post_attention_layernorm.weight"] = WeightMapping(
            (*ours, "post_attention_layernorm", "scale")
        )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[f"{hf}self_attn.{proj}.weight"] = WeightMapping(
                (*ours, "self_attn", proj, "kernel"), transpose=True
            )
            if cfg.qkv_bias and proj != "o_proj":
                m[f"{hf}self_attn.{proj}.bias"] = WeightMapping((*ours, "self_attn", proj, "bias"))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                m[f"{hf}self_attn.{norm}.weight"] = WeightMapping(
                    (*ours, "self_attn", norm, "scale")
                )
        mlp = (*ours, "mlp")
        if i not in cfg.moe_layers:
            m |= _dense_mlp(f"{hf}mlp.", mlp)
            continue
        if cfg.model_type == "mixtral":
            moe_prefix, names = (
                "block_sparse_moe",
                {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
            )
        else:
            moe_prefix, names = "mlp", {p: p for p in EXPERT_WEIGHTS}
        m[f"{hf}{moe_prefix}.gate.weight"] = WeightMapping(
            (*mlp, "router", "kernel"), transpose=True
        )
        for e in range(cfg.num_experts):
            for hf_proj, proj in names.items():
                m[f"{hf}{moe_prefix}.experts.{e}.{hf_proj}.weight"] = WeightMapping(
                    (*mlp, proj), transpose=True, part=(e,)
                )
        if cfg.shared_expert_intermediate_size:
            m |= _dense_mlp(f"{hf}mlp.shared_expert.", (*mlp, "shared_expert"))
            m[f"{hf}mlp.shared_expert_gate.weight"] = WeightMapping(
                (*mlp, "shared_expert_gate", "kernel"), transpose=True
            )
    return m


def abstract_model(cfg: ModelConfig, dtype: jnp.dtype) -> CausalLM:
    """The model with ShapeDtypeStructs instead of arrays: shapes, dtypes and axes, no memory."""
    return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def param_specs(cfg: ModelConfig, dtype: jnp.dtype, mesh_shape: sharding.MeshShape) -> dict:
    """PartitionSpec of every parameter, from the logical axes each one was declared with, as a
    pytree shaped like the model's pure state dict."""
    specs = jax.tree.map(
        lambda v: sharding.partition_spec(v.get_metadata()["axes"], v.shape, cfg, mesh_shape),
        nnx.state(abstract_model(cfg, dtype)),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.to_pure_dict(specs)


def param_shardings(cfg: ModelConfig, dtype: jnp.dtype, mesh: Mesh) -> dict:
    """NamedSharding of every parameter, shaped like the pure state dict (`load_model`'s
    `shardings`)."""
    sharding.validate(cfg, mesh.shape)
    specs = param_specs(cfg, dtype, mesh.shape)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype) -> KVCache:
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
