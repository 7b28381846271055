"""`jaxserve convert SRC OUT`: a Hugging Face model directory or a `.gguf` file → a converted model
directory (the format `jaxserve.checkpoint` reads).

Owns reading Hugging Face checkpoints (single or sharded safetensors, parsed here from the file
format so bfloat16 works without torch and every corruption is reported with the file's name),
the tensor-by-tensor fill of the parameters, and the atomic publication of the output directory.
GGUF files are read by `jaxserve.gguf`, which presents them under Hugging Face tensor names.

Every source is checked against the model before any weight is read: missing, unexpected and
mis-shaped tensors are all named in one error. Weights are then streamed one tensor at a time
into one preallocated array per parameter in the target dtype, so the host never holds two
copies of the model. The output is built in a temporary directory beside OUT and renamed into
place only when complete, so a crash never leaves a directory that loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxserve.checkpoint import (
    PARAMS_DIR,
    CheckpointError,
    dtype_name,
    save_params,
    write_meta,
)
from jaxserve.config import ModelConfig, UnsupportedModelError
from jaxserve.gguf import gguf_source
from jaxserve.tensor_source import TensorSource
from models import abstract_model, weight_map

NP_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# Copied verbatim from a Hugging Face directory when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# config.json keys that `cfg.to_hf_dict()` restates in another form, dropped so the written
# config has a single source of truth for each setting.
STALE_CONFIG_KEYS = ("rope_parameters", "torch_dtype", "dtype", "num_local_experts", "num_experts")


# ---- safetensors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StEntry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, _StEntry]:
    """Parse and validate a safetensors header (8-byte length, JSON, then the data block)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: corrupted or truncated safetensors file (header of {n} bytes, "
                    f"file of {size})"
                )
            raw = f.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_start = 8 + n
    entries: dict[str, _StEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header entry {name!r}") from e
        if dtype_tag not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {dtype_tag}; supported: "
                + ", ".join(SAFETENSORS_DTYPES)
            )
        dtype = SAFETENSORS_DTYPES[dtype_tag]
        if end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: corrupted safetensors header: tensor {name} spans bytes "
                f"[{begin}, {end}) but has shape {list(shape)} of {dtype_tag}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte "
                f"{data_start + end}, the file has {size}"
            )
        entries[name] = _StEntry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


def _hf_weight_entries(src: Path) -> dict[str, _StEntry]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_files = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        shards: dict[str, list[str]] = {}
        for name, shard in weight_files.items():
            shards.setdefault(shard, []).append(name)
        entries: dict[str, _StEntry] = {}
        for shard, names in sorted(shards.items()):
            shard_path = src / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {src}")
            in_shard = read_safetensors_header(shard_path)
            absent = [n for n in names if n not in in_shard]
            if absent:
                raise CheckpointError(
                    f"{shard_path}: the index lists tensors this shard does not hold: "
                    + ", ".join(sorted(absent)[:10])
                )
            entries |= {n: in_shard[n] for n in names}
        return entries
    single = src / "model.safetensors"
    if single.is_file():
        return read_safetensors_header(single)
    raise CheckpointError(
        f"{src}: no model.safetensors or model.safetensors.index.json (only safetensors "
        "checkpoints are supported)"
    )


def hf_source(src: Path) -> TensorSource:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{src}: no config.json; not a Hugging Face model directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    entries = _hf_weight_entries(src)

    def read() -> Iterator[tuple[str, np.ndarray]]:
        by_file: dict[Path, list[str]] = {}
        for name, e in entries.items():
            by_file.setdefault(e.file, []).append(name)
        for path, names in by_file.items():
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            for name in sorted(names, key=lambda n: entries[n].begin):
                e = entries[name]
                yield name, mm[e.begin : e.end].view(e.dtype).reshape(e.shape)
            del mm

    def write_tokenizer(out: Path) -> None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)

    return TensorSource(
        path=src,
        format="safetensors",
        hf_config=hf_config,
        shapes={n: e.shape for n, e in entries.items()},
        reader=read,
        write_tokenizer=write_tokenizer,
    )


# ---- filling the parameters ---------------------------------------------------------------------


def _ignored(name: str, cfg: ModelConfig) -> bool:
    # Older Llama checkpoints store the RoPE frequency buffer (recomputed from the config), and
    # some tied checkpoints still carry a copy of the embedding as lm_head (unused when tied).
    return name.endswith("rotary_emb.inv_freq") or (
        cfg.tie_word_embeddings and name == "lm_head.weight"
    )


def _expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    params = nnx.to_pure_dict(nnx.state(abstract_model(cfg, jnp.float32)))
    out = {}
    for name, m in weight_map(cfg).items():
        shape = m.part_shape(tuple(m.param(params).shape))
        out[name] = shape[::-1] if m.transpose else shape
    return out


def check_source(source: TensorSource, cfg: ModelConfig) -> None:
    """Raise one error naming every missing, unexpected or mis-shaped tensor of the source."""
    expected = _expected_hf_shapes(cfg)
    have = {n: s for n, s in source.shapes.items() if not _ignored(n, cfg)}
    problems = []
    missing = sorted(expected.keys() - have.keys())
    unexpected = sorted(have.keys() - expected.keys())
    wrong = [
        f"{n} has shape {list(have[n])}, expected {list(s)}"
        for n, s in expected.items()
        if n in have and tuple(have[n]) != s
    ]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + _more(missing))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + _more(unexpected))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:10]) + _more(wrong))
    if problems:
        raise CheckpointError(
            f"{source.path}: the weights do not match the {cfg.architecture} config: "
            + " | ".join(problems)
        )


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 10} more)" if len(items) > 10 else ""


def fill_params(
    source: TensorSource, cfg: ModelConfig, dtype: str, progress: bool = True
) -> dict[Any, Any]:
    """The model's pure parameter dict as numpy arrays of `dtype`, filled tensor by tensor."""
    check_source(source, cfg)
    np_dtype = NP_DTYPES[dtype]
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg, jnp.float32)))
    params = jax.tree.map(lambda s: np.empty(s.shape, np_dtype), abstract)
    wmap = weight_map(cfg)
    bar = tqdm(
        total=len(wmap),
        desc=f"converting {source.path.name}",
        unit="tensor",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for name, arr in source.reader():
            if _ignored(name, cfg):
                continue
            m = wmap[name]
            # The assignment casts into the preallocated target array; no full-size temporary.
            m.param(params)[m.part] = arr.T if m.transpose else arr
            bar.update(1)
    return params


# ---- the output directory -----------------------------------------------------------------------


def _open_source(src: Path) -> tuple[TensorSource, ModelConfig]:
    if src.is_dir():
        source = hf_source(src)
        quant = source.hf_config.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise UnsupportedModelError(
                f"{src}: quantized checkpoints (quantization_config: {method}) are not "
                "supported; convert the unquantized checkpoint or a GGUF file"
            )
        return source, ModelConfig.from_hf_dict(source.hf_config)
    if src.is_file() and src.suffix == ".gguf":
        source = gguf_source(src)
        return source, ModelConfig.from_hf_dict(source.hf_config)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    raise CheckpointError(f"{src}: expected a Hugging Face model directory or a .gguf file")


def _output_config(source: TensorSource, cfg: ModelConfig) -> dict[str, Any]:
    out = {k: v for k, v in source.hf_config.items() if k not in STALE_CONFIG_KEYS}
    out |= cfg.to_hf_dict()
    if ModelConfig.from_hf_dict(out) != cfg:
        raise RuntimeError(f"config.json written for {source.path} does not map back to {cfg}")
    return out


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished `tmp` to `out` atomically; with `force`, replace whatever is there."""
    if force and (out.exists() or out.is_symlink()):
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        # Fails if `out` was created meanwhile (e.g. by a concurrent conversion), never merges.
        os.rename(tmp, out)
    except OSError as e:
        if out.exists():
            raise FileExistsError(f"{out} already exists (use --force to replace it)") from e
        raise


def convert(
    src: str | Path,
    out: str | Path,
    dtype: str = "bfloat16",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face directory or a .gguf file into a model directory at `out`."""
    src, out = Path(src), Path(out)
    dtype = dtype_name(dtype)
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    source, cfg = _open_source(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published directory is an ordinary one
    try:
        params = fill_params(source, cfg, dtype, progress)
        save_params(tmp / PARAMS_DIR, params)
        del params
        (tmp / "config.json").write_text(json.dumps(_output_config(source, cfg), indent=2) + "\n")
        source.write_tokenizer(tmp)
        # The completion marker goes last: a directory without it is refused by every loader.
        write_meta(tmp, source=str(src.absolute()), source_format=source.format, dtype=dtype)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert` on the `jaxserve` command line; the parser's `func` runs it."""
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face model directory or a .gguf file for jaxserve",
        description=(
            "Convert a Hugging Face model directory (config.json + safetensors + tokenizer "
            "files) or a .gguf file into a jaxserve model directory."
        ),
    )
    p.add_argument("src", type=Path, help="Hugging Face model directory or .gguf file")
    p.add_argument("out", type=Path, help="output directory (must not exist unless --force)")
    p.add_argument(
        "--dtype",
        choices=list(NP_DTYPES),
        default="bfloat16",
        help="parameter dtype to store (default: bfloat16; float32 keeps f32 sources exact)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    # Errors (ValueError, FileExistsError, ...) are reported by the `jaxserve` entry point.
    print(convert(args.src, args.out, dtype=args.dtype, force=args.force))
    return 0
