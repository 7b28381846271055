"""Flax NNX model families. `build(cfg)` and `weight_map(cfg)` pick the family for a config.

Every supported architecture (see `jaxserve.config.SUPPORTED_ARCHITECTURES`) is a Llama-family
decoder (`models.llama`); the MoE ones swap in `models.moe.MoE` as their feed-forward.
"""

from models.llama import (
    CausalLM,
    KVCache,
    WeightMapping,
    abstract_model,
    init_kv_cache,
    param_shardings,
    param_specs,
    weight_map,
)

__all__ = [
    "CausalLM",
    "KVCache",
    "WeightMapping",
    "abstract_model",
    "init_kv_cache",
    "param_shardings",
    "param_specs",
    "weight_map",
]
