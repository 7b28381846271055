"""The on-disk format of a converted model and everything that reads or writes its weights.

A converted model directory holds `config.json` (Hugging Face style), tokenizer files, the
parameters as an orbax checkpoint under `params/` (the nested pure dict of the NNX state), and
`jaxserve.json` (format version, source, stored dtype, jaxserve version). `jaxserve.json` is the
completion marker: `jaxserve.convert` writes it last and publishes the directory with an atomic
rename, and every loader here refuses a directory without it.

Owns `save_params`, `load_params` / `load_model` (restore straight into device arrays of the
requested dtype and sharding) and `random_model` (random weights initialised on device, for
benchmarks of models too big to build on the host).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import jaxserve
from jaxserve.config import ModelConfig
from models import CausalLM, abstract_model
from models.layers import init_value

FORMAT_VERSION = 2  # 2: DenseMLP gate and up projections stored as one [d, 2, f] weight
MARKER = "jaxserve.json"
PARAMS_DIR = "params"
DTYPES = ("bfloat16", "float16", "float32")
RESTORE_CONCURRENT_GB = 4

# A pytree of shardings shaped like the model's pure state dict, an `nnx.State` of them, or a
# single sharding applied to every parameter.
Shardings = jax.sharding.Sharding | nnx.State | dict[Any, Any]


class CheckpointError(ValueError):
    """A model file or directory is missing, incomplete, corrupted or does not fit the model."""


def dtype_name(dtype: str | jnp.dtype | type) -> str:
    """'bfloat16' | 'float16' | 'float32' for any spelling of those dtypes; others are refused."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return name


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `jaxserve.json` of a converted model directory; refuses incomplete directories."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a converted model directory (run `jaxserve convert`)")
    marker = p / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{p}: no {MARKER}; not a converted model, or its conversion did not finish "
            "(convert it again)"
        )
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: not valid JSON ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{marker}: format_version {meta.get('format_version')!r}, this jaxserve reads "
            f"{FORMAT_VERSION} (convert the model again)"
        )
    return meta


def is_converted(path: str | Path) -> bool:
    """True when `path` is a complete converted model directory of this format version."""
    try:
        read_meta(path)
    except CheckpointError:
        return False
    return True


def write_meta(path: str | Path, *, source: str, source_format: str, dtype: str) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_format": source_format,
        "dtype": dtype_name(dtype),
        "jaxserve_version": jaxserve.__version__,
    }
    (Path(path) / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


class _Borrowed(np.ndarray):
    """A numpy array that orbax writes as it is instead of deep-copying it first.

    Orbax copies numpy leaves so that a caller mutating them during an asynchronous save cannot
    corrupt the checkpoint; `save_params` saves synchronously and never mutates, and the copy
    would be a second full copy of the model in host memory.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _Borrowed:
        return self


class _DropOcdbtMergeWarning(logging.Filter):
    # Orbax tries to merge OCDBT files at the end of every save, and warns when (as here, with
    # OCDBT off) there are none to merge.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT" not in record.getMessage()


def save_params(path: str | Path, params: CausalLM | dict[Any, Any]) -> None:
    """Write a model's parameters (or the pure dict of them: numpy or jax arrays) to `path`.

    Numpy leaves are written straight from their buffers, one array file each: OCDBT (orbax's
    default) would buffer the whole checkpoint in memory before committing it, so a converter
    holding the only host copy of the weights would briefly hold two.
    """
    tree = nnx.to_pure_dict(nnx.state(params)) if isinstance(params, nnx.Module) else params
    tree = jax.tree.map(lambda x: x.view(_Borrowed) if isinstance(x, np.ndarray) else x, tree)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))
    quiet = _DropOcdbtMergeWarning()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        ckptr.save(Path(path).absolute(), args=ocp.args.StandardSave(tree))
    finally:
        absl_logger.removeFilter(quiet)
        ckptr.close()


def _shardings_tree(shardings: Shardings | None, pure: dict[Any, Any]) -> dict[Any, Any]:
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, pure)
    if isinstance(shardings, nnx.State):
        shardings = nnx.to_pure_dict(shardings)
    if jax.tree.structure(shardings) != jax.tree.structure(pure):
        raise ValueError(
            "shardings: the tree does not match the model's parameters; expected the structure "
            f"{jax.tree.structure(pure)}, got {jax.tree.structure(shardings)}"
        )
    return shardings


def _key_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def _check_stored(params_dir: Path, target: dict[Any, Any]) -> None:
    """Name every parameter that is missing from, extra in, or shaped differently on disk."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored_tree = ckptr.metadata(params_dir).item_metadata.tree
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{params_dir}: unreadable parameter checkpoint ({e})") from e
    stored = {_key_str(p): m for p, m in jax.tree.leaves_with_path(stored_tree)}
    wanted = {_key_str(p): s for p, s in jax.tree.leaves_with_path(target)}
    problems = [f"missing {k}" for k in sorted(wanted.keys() - stored.keys())]
    problems += [f"unexpected {k}" for k in sorted(stored.keys() - wanted.keys())]
    problems += [
        f"{k}: stored shape {tuple(stored[k].shape)}, model expects {tuple(s.shape)}"
        for k, s in wanted.items()
        if k in stored and tuple(stored[k].shape) != tuple(s.shape)
    ]
    if problems:
        raise CheckpointError(
            f"{params_dir}: parameters do not fit the model in config.json: "
            + "; ".join(problems[:20])
            + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else "")
        )


def load_params(
    path: str | Path, abstract_state: nnx.State, shardings: Shardings | None = None
) -> nnx.State:
    """Restore a converted model's parameters into device arrays laid out like `abstract_state`.

    `abstract_state` (e.g. `nnx.state(abstract_model(cfg, dtype))`) gives every parameter's shape
    and target dtype; orbax reads each array from disk straight into its sharding and casts it to
    that dtype, so the model never exists twice in host memory.
    """
    path = Path(path)
    read_meta(path)
    pure = nnx.to_pure_dict(abstract_state)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        pure,
        _shardings_tree(shardings, pure),
    )
    params_dir = (path / PARAMS_DIR).absolute()
    _check_stored(params_dir, target)
    # Bounded read concurrency: each array is staged on the host on its way to its devices, and
    # only a few GB of them at a time, never the whole model.
    handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=RESTORE_CONCURRENT_GB)
    with ocp.Checkpointer(handler) as ckptr:
        restored = ckptr.restore(params_dir, args=ocp.args.StandardRestore(target))
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy: the caller's state stays abstract
    nnx.replace_by_pure_dict(state, restored)
    return state


def load_model(
    path: str | Path,
    dtype: str | jnp.dtype | type | None = None,
    shardings: Shardings | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """The model in a converted directory, in `dtype` (default: the dtype it was stored in)."""
    meta = read_meta(path)
    cfg = ModelConfig.from_dir(path)
    dt = jnp.dtype(dtype_name(meta["dtype"] if dtype is None else dtype))
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dt))
    state = load_params(path, abstract_state, shardings)
    return nnx.merge(graphdef, state), cfg


def random_model(
    cfg: ModelConfig,
    dtype: str | jnp.dtype | type = "bfloat16",
    seed: int = 0,
    shardings: Shardings | None = None,
) -> CausalLM:
    """A model with random weights, made on device (sharded when `shardings` is given).

    Each weight is drawn by a small jitted function per (shape, dtype, init kind, sharding) with
    the sharding as `out_shardings`, from the init kind its declaration carries: a few tiny
    compilations (made at once, on threads) instead of one of the whole model, and nothing
    model-sized on the host.
    """
    dt = jnp.dtype(dtype_name(dtype))
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dt))
    pure = nnx.to_pure_dict(abstract_state)
    shard_tree = _shardings_tree(shardings, pure)
    flat_shardings = dict(nnx.traversals.flatten_mapping(shard_tree))
    key = jax.random.key(seed)
    flat = nnx.to_flat_state(abstract_state)
    specs = [
        (var.shape, var.dtype, var.get_metadata().get("init", "normal"), flat_shardings[tuple(p)])
        for p, var in flat
    ]
    unique = list(dict.fromkeys(specs))
    with concurrent.futures.ThreadPoolExecutor(min(16, len(unique))) as pool:
        made = pool.map(lambda s: _random_init_fn(*s).lower(key).compile(), unique)
        compiled = dict(zip(unique, made, strict=True))
    values = {
        tuple(path): compiled[spec](jax.random.fold_in(key, i))
        for i, ((path, _), spec) in enumerate(zip(flat, specs, strict=True))
    }
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(values))
    return nnx.merge(graphdef, state)


@functools.cache
def _random_init_fn(shape, dtype, init: str, sharding):
    return jax.jit(
        functools.partial(init_value, shape=shape, dtype=dtype, init=init), out_shardings=sharding
    )
