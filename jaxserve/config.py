"""Model configuration: a frozen dataclass translated from a Hugging Face `config.json` exactly once.

Owns the mapping from Hugging Face config keys to `ModelConfig` and the list of what is supported.
Anything the model code cannot honour exactly (sliding windows, unknown RoPE types, other activations)
is rejected here with an error that names the option and lists what is supported, so a model that
loads is a model that computes what its authors trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# architecture name -> model_type, for the families in `models/`.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or option jaxserve does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs; hashable so it can be a static argument under `jit`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    # Mixture of experts; num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (sigmoid-gated)
    moe_layers: tuple[int, ...] = ()  # which layers use the MoE block (others are dense)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_hf(d)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no config.json in the model directory")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
        return _from_hf(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face style config.json that `from_hf_dict` maps back to this config."""
        rope: dict[str, Any] = {"rope_type": self.rope.type, "factor": self.rope.factor}
        if self.rope.type == "llama3":
            rope |= {
                "low_freq_factor": self.rope.low_freq_factor,
                "high_freq_factor": self.rope.high_freq_factor,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
            }
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.type == "default" else rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if self.eos_token_ids else None,
        }
        if self.is_moe:
            d |= {
                "num_local_experts" if self.model_type == "mixtral" else "num_experts": (
                    self.num_experts
                ),
                "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_intermediate_size,
                "norm_topk_prob": self.norm_topk_prob,
                "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
                "mlp_only_layers": [i for i in range(self.num_layers) if i not in self.moe_layers],
                "decoder_sparse_step": 1,
            }
        return d

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _unsupported(option: str, value: Any, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{option}={value!r} is not supported; supported: {supported}")


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs have
    # `rope_theta` + `rope_scaling`.
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise _unsupported("rope_scaling.rope_type", rtype, ", ".join(SUPPORTED_ROPE_TYPES))
    if float(d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported("partial_rotary_factor", d["partial_rotary_factor"], "1.0")
    factor = float(merged.get("factor", 1.0))
    if rtype == "default":
        return RopeConfig(theta=theta)
    if rtype == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        type="llama3",
        factor=factor,
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _from_hf(d: dict[str, Any]) -> ModelConfig:
    archs = d.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        arch = by_type.get(d.get("model_type", ""))
    if arch is None:
        name = archs[0] if archs else d.get("model_type")
        raise _unsupported("architecture", name, ", ".join(SUPPORTED_ARCHITECTURES))
    mtype = SUPPORTED_ARCHITECTURES[arch]

    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        raise _unsupported("hidden_act", act, "silu")
    window = d.get("sliding_window")
    uses_window = window is not None and (
        mtype in ("mistral", "mixtral") or d.get("use_sliding_window")
    )
    if uses_window:
        raise _unsupported("sliding_window", window, "null (full attention)")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag) and mtype not in ("qwen2", "qwen2_moe"):
            raise _unsupported(flag, d[flag], "false")
    if d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]):
        raise _unsupported("layer_types", sorted(set(d["layer_types"])), "full_attention only")

    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim") or hidden // num_heads
    num_layers = int(d["num_hidden_layers"])
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    moe: dict[str, Any] = {}
    if mtype in ("mixtral", "qwen2_moe", "qwen3_moe"):
        n_exp = int(d.get("num_local_experts", d.get("num_experts", 0)))
        step = int(d.get("decoder_sparse_step", 1))
        dense_only = set(d.get("mlp_only_layers") or [])
        moe = {
            "num_experts": n_exp,
            "num_experts_per_tok": int(d["num_experts_per_tok"]),
            "moe_intermediate_size": int(d.get("moe_intermediate_size") or d["intermediate_size"]),
            # Mixtral always renormalises the top-k softmax weights.
            "norm_topk_prob": mtype == "mixtral" or bool(d.get("norm_topk_prob", False)),
            "shared_expert_intermediate_size": int(d.get("shared_expert_intermediate_size") or 0)
            if mtype == "qwen2_moe"
            else 0,
            "moe_layers": tuple(
                i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0
            ),
        }
    return ModelConfig(
        architecture=arch,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d.get("intermediate_size") or 0),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(d),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=mtype in ("qwen2", "qwen2_moe"),
        qk_norm=mtype in ("qwen3", "qwen3_moe"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        **moe,
    )
