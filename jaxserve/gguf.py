"""Reading llama.cpp GGUF files as Hugging Face checkpoints.

Owns the translation of a GGUF file into what `jaxserve.convert` consumes: a Hugging Face style
config dict synthesised from the GGUF metadata, and the tensors dequantized to float32 (F32, F16,
BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants, through `gguf.quants.dequantize`) under their
Hugging Face names. llama.cpp permutes the rows of the Llama-architecture q/k projections (so
its RoPE can rotate adjacent pairs); that permutation is undone here exactly as transformers'
GGUF loader does. Llama 3 RoPE scaling, which llama.cpp stores as a `rope_freqs` tensor of
per-frequency divisors, is turned back into the `llama3` rope parameters that reproduce it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from jaxserve.checkpoint import CheckpointError
from jaxserve.config import UnsupportedModelError
from jaxserve.tensor_source import TensorSource

# GGUF `general.architecture` → Hugging Face architecture. llama.cpp writes Mixtral as "llama"
# with experts; that case is picked by the expert count.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
# Architectures whose q/k rows llama.cpp's converter permutes.
PERMUTED_QK = ("llama",)
DEQUANTIZABLE = frozenset(
    GGMLQuantizationType[t]
    for t in ("F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split())
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPERT_PROJ = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_MIXTRAL_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)")


def _open(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        # The reader fails inside numpy when the header is garbage or the file is cut short.
        raise CheckpointError(f"{path}: not a valid GGUF file, or truncated ({e})") from e


# Per-token arrays: large, and read by `jaxserve.tokenizer`, not needed for the model config.
_VOCAB_FIELDS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
)


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    return {
        key: f.contents()
        for key, f in reader.fields.items()
        if not key.startswith("GGUF.") and key not in _VOCAB_FIELDS
    }


def _f32(x: float) -> float:
    # GGUF stores floats as float32; the shortest float32 repr recovers the decimal the
    # original config wrote (1e-5, not 9.999999747378752e-06).
    return float(str(np.float32(x)))


def _uniform(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    v = meta.get(key, default)
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise UnsupportedModelError(f"{key}={v!r}: per-layer values are not supported")
        v = v[0]
    return v


def _hf_name(gguf_name: str, arch: str) -> str | None:
    """Hugging Face name of a non-expert GGUF tensor (None for names this module does not know)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(3) is not None:
        return None
    layer, kind, _, suffix = m.groups()
    prefix = f"model.layers.{layer}."
    if kind == "ffn_gate_inp":
        return prefix + ("block_sparse_moe.gate." if arch == "llama" else "mlp.gate.") + suffix
    if kind in _LAYER_NAMES:
        return f"{prefix}{_LAYER_NAMES[kind]}.{suffix}"
    return None


def _expert_names(gguf_name: str, arch: str, num_experts: int) -> tuple[list[str], bool] | None:
    """Hugging Face names of the experts in a GGUF expert tensor, and whether it is stacked.

    Current llama.cpp files stack all experts in one `blk.N.ffn_gate_exps` tensor [E, out, in];
    older ones hold one `blk.N.ffn_gate.E.weight` per expert.
    """
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None:
        return None
    layer, kind, expert, suffix = m.groups()
    stacked = kind.endswith("_exps") and expert is None
    if stacked:
        proj, experts = _EXPERT_PROJ.get(kind.removesuffix("_exps")), range(num_experts)
    elif expert is not None:
        proj, experts = _EXPERT_PROJ.get(kind), [int(expert)]
    else:
        return None
    if proj is None:
        return None
    if arch == "llama":
        names = [
            f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MIXTRAL_PROJ[proj]}.{suffix}"
            for e in experts
        ]
    else:
        names = [f"model.layers.{layer}.mlp.experts.{e}.{proj}.{suffix}" for e in experts]
    return names, stacked


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection (weight [rows, in] or bias [rows]).

    llama.cpp reorders each head's rows from [first half, second half] to interleaved pairs; the
    inverse views the rows as [head, dim/2, 2] and swaps the last two axes back.
    """
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """The llama3 rope parameters that reproduce llama.cpp's per-frequency divisors.

    Frequencies with wavelength below H = old_ctx/high_freq_factor keep divisor 1, those above
    L = old_ctx/low_freq_factor get `factor`, and in between 1/divisor interpolates linearly in
    1/wavelength. Only L and H are observable, so low_freq_factor is taken as 1 and H/L is fitted
    from the interpolated frequencies (Llama 3's 4:1 when fewer than two of them exist).
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    f = factors.astype(np.float64)
    if f.shape != inv.shape:
        raise UnsupportedModelError(
            f"rope_freqs has {f.size} entries, expected head_dim/2 = {inv.size}"
        )
    factor = float(f.max())
    if np.allclose(f, 1.0):
        return {"rope_type": "default"}
    wavelen = 2 * math.pi / inv
    is_high = np.isclose(f, 1.0, rtol=1e-6)
    is_low = np.isclose(f, factor, rtol=1e-6)
    medium = ~is_high & ~is_low
    # smooth = (1/divisor - 1/factor) / (1 - 1/factor) = (1/w - 1/L) / (1/H - 1/L)
    smooth = (1 / f - 1 / factor) / (1 - 1 / factor)
    x = 1 / wavelen
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], smooth[medium], 1)
        inv_l = -intercept / slope
        inv_h = inv_l + 1 / slope
    elif medium.sum() == 1:
        # smooth = (L/w - 1) / 3 when H = L/4.
        inv_l = 1 / (wavelen[medium][0] * (3 * smooth[medium][0] + 1))
        inv_h = 4 * inv_l
    else:
        # Any L with every unscaled wavelength below L/4 and every scaled one above L will do.
        lo = 4 * wavelen[is_high].max() if is_high.any() else 0.0
        hi = wavelen[is_low].min()
        inv_l = 1 / (math.sqrt(lo * hi) if lo > 0 else hi / 2)
        inv_h = 4 * inv_l
    old = max(1, round(1 / inv_l))
    rope = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": _f32(factor),
        "low_freq_factor": float(f"{old * inv_l:.6g}"),
        "high_freq_factor": float(f"{old * inv_h:.6g}"),
        "original_max_position_embeddings": old,
    }
    if not np.allclose(_llama3_divisors(rope, wavelen), f, rtol=1e-4, atol=0):
        raise UnsupportedModelError(
            "rope_freqs: the per-frequency RoPE factors are not llama3 scaling"
        )
    return rope


def _llama3_divisors(rope: dict[str, Any], wavelen: np.ndarray) -> np.ndarray:
    old, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _rope_scaling(
    meta: dict[str, Any], arch: str, rope_freqs: np.ndarray | None, theta: float, head_dim: int
) -> dict[str, Any] | None:
    stype = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if stype == "none" and factor is not None and f"{arch}.rope.scale_linear" in meta:
        stype = "linear"
    if rope_freqs is not None:
        if stype != "none":
            raise UnsupportedModelError(f"rope_freqs together with rope scaling {stype!r}")
        rope = _llama3_rope(rope_freqs, theta, head_dim)
        return None if rope["rope_type"] == "default" else rope
    if stype == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": stype, "factor": _f32(factor or 1.0)}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling  # types other than linear are refused by ModelConfig with its own message


def reader_shape(t: ReaderTensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy order (GGUF lists dimensions innermost first)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _dequantize(t: ReaderTensor) -> np.ndarray:
    w = dequantize(t.data, t.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape(reader_shape(t))


def hf_config(meta: dict[str, Any], tensors: dict[str, ReaderTensor], path: Path) -> dict[str, Any]:
    """A Hugging Face config dict equivalent to a GGUF file's metadata and tensors."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            + ", ".join(ARCHITECTURES)
        )

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full not in meta and default is ...:
            raise CheckpointError(f"{path}: GGUF metadata lacks {full}")
        return _uniform(meta, full, None if default is ... else default)

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor")
    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    theta = _f32(key("rope.freq_base", 10000.0))
    rope_freqs = tensors.get("rope_freqs.weight")
    num_experts = int(key("expert_count", 0))
    d: dict[str, Any] = {
        "architectures": [
            "MixtralForCausalLM" if arch == "llama" and num_experts else ARCHITECTURES[arch]
        ],
        # The embedding's rows are the vocabulary the weights were trained with; the token list
        # may be shorter (padded embeddings) but can never index past them.
        "vocab_size": reader_shape(tensors["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length", 0)),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 4096)),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(
            meta, arch, None if rope_freqs is None else _dequantize(rope_freqs), theta, head_dim
        ),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        # llama.cpp ends generation on end-of-turn / end-of-message tokens as well as on EOS.
        "eos_token_id": list(
            dict.fromkeys(
                meta[k]
                for k in (
                    "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.eot_token_id",
                    "tokenizer.ggml.eom_token_id",
                )
                if k in meta
            )
        )
        or None,
    }
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        d["partial_rotary_factor"] = rope_dim / head_dim  # refused by ModelConfig
    if f"{arch}.attention.sliding_window" in meta:
        d["sliding_window"] = key("attention.sliding_window")
        d["use_sliding_window"] = True  # refused by ModelConfig
    if num_experts:
        num_layers = d["num_hidden_layers"]
        moe = [i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" in tensors]
        shexp = tensors.get(f"blk.{moe[0] if moe else 0}.ffn_gate_shexp.weight")
        d |= {
            "num_local_experts" if arch == "llama" else "num_experts": num_experts,
            "num_experts_per_tok": int(key("expert_used_count")),
            "moe_intermediate_size": int(key("expert_feed_forward_length", d["intermediate_size"])),
            # llama.cpp renormalises the top-k weights for every MoE family but Qwen2-MoE.
            "norm_topk_prob": bool(key("expert_weights_norm", arch != "qwen2moe")),
            "shared_expert_intermediate_size": int(
                key(
                    "expert_shared_feed_forward_length",
                    0 if shexp is None else reader_shape(shexp)[0],
                )
            ),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(num_layers) if i not in moe],
        }
    return d


def gguf_source(path: Path) -> TensorSource:
    """The GGUF file at `path` as a `TensorSource` of float32 Hugging Face tensors."""
    reader = _open(path)
    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = hf_config(meta, tensors, path)
    arch = meta["general.architecture"]
    num_experts = int(config.get("num_local_experts", config.get("num_experts", 0)))
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    # GGUF tensor → its Hugging Face (name, shape)s: several for a stacked expert tensor.
    plan: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    stacked: set[str] = set()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # folded into the config's rope scaling
            continue
        shape = reader_shape(t)
        experts = _expert_names(t.name, arch, num_experts)
        hf = None if experts else _hf_name(t.name, arch)
        if experts and experts[1]:
            plan[t.name] = [(n, shape[1:]) for n in experts[0]]
            stacked.add(t.name)
        elif experts:
            plan[t.name] = [(experts[0][0], shape)]
        elif hf is None:
            plan[t.name] = [(f"<GGUF tensor {t.name}>", shape)]  # reported as unexpected
        elif hf.endswith("shared_expert_gate.weight") and len(shape) == 1:
            plan[t.name] = [(hf, (1, *shape))]  # llama.cpp stores this [1, d] weight as [d]
        else:
            plan[t.name] = [(hf, shape)]
        if t.tensor_type not in DEQUANTIZABLE:
            raise CheckpointError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}; supported GGUF types: "
                + ", ".join(sorted(q.name for q in DEQUANTIZABLE))
            )

    def read() -> Iterator[tuple[str, np.ndarray]]:
        for name, targets in plan.items():
            w = _dequantize(tensors[name])
            if arch in PERMUTED_QK and re.search(r"\.attn_[qk]\.", name):
                w = unpermute_qk(w, num_heads if ".attn_q." in name else num_kv_heads)
            if name in stacked:
                for e, (hf, shape) in enumerate(targets):
                    yield hf, w[e].reshape(shape)
            else:
                yield targets[0][0], w.reshape(targets[0][1])

    def write_tokenizer(out: Path) -> None:
        # Only GGUF files that carry a vocabulary get tokenizer files.
        if "tokenizer.ggml.tokens" in reader.fields:
            from jaxserve.tokenizer import Tokenizer

            Tokenizer.from_gguf(path).save(out)

    return TensorSource(
        path=path,
        format="gguf",
        hf_config=config,
        shapes={hf: shape for targets in plan.values() for hf, shape in targets},
        reader=read,
        write_tokenizer=write_tokenizer,
    )
