"""Compiled device calls kept across restarts.

Two layers, both under one directory (`EngineConfig.compilation_cache_dir`):
- JAX's persistent compilation cache (`enable`): a restart that traces and lowers a program again
  finds XLA's compiled binary on disk instead of compiling it.
- `ExecutableStore`: the engine's own store of whole compiled executables, serialized after
  compiling and loaded by key on the next start, so a warm restart neither traces, lowers nor
  compiles. An executable's key is its device call (operation, static flags, argument shapes); the
  store's `fingerprint` covers everything else baked into the program (versions, device, model,
  engine configuration, XLA flags and this project's source), and each fingerprint has its own
  folder, so a stale executable is never loaded.

The store is used on GPUs only: XLA's CPU executables do not reliably survive serialization (a
reloaded one can miss its fused functions), and on the CPU a step compiles in about a second.

Every device call is compiled with `compiler_options()`: on GPUs, XLA option overrides measured to
make the engine's steps faster (see `GPU_COMPILER_OPTIONS`).

Loading deserializes with pickle, like JAX's own executable serialization: the directory must be
as trusted as the code (it is the user's cache, written by this engine).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import jax
import jaxlib
from jax.experimental import serialize_executable

from jaxserve import program_env

log = logging.getLogger(__name__)

EXECUTABLES_DIR = "executables"
KEEP_FOLDERS = 8  # fingerprint folders (engine configurations) kept in the store
# The packages whose code ends up in compiled programs: any change to them starts a new folder.
_SOURCE_PACKAGES = ("jaxserve", "models", "pallas_kernels")
# Where the store keeps executables (see the module docstring for why not on the CPU), and where
# `GPU_COMPILER_OPTIONS` apply.
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# XLA options every engine executable is compiled with on a GPU. `xla_gpu_graph_min_graph_size`:
# XLA records runs of consecutive kernels into CUDA graphs, but by default only runs of 5 or more,
# launching shorter runs (most likely those around a decode layer's Mosaic attention kernel) one by
# one. With 1, every run is a graph: batch-1 decode on an H100 went from 799 to
# 844 tok/s (Llama-3.2-1B) and from 174.5 to 179.5 (Llama-3-8B), time to first token no worse
# (one machine; docs/perf/engine_h100.md, item 20).
GPU_COMPILER_OPTIONS = {"xla_gpu_graph_min_graph_size": 1}
# JAX options that change how a traced program lowers.
_JAX_OPTIONS = (
    "jax_default_matmul_precision",
    "jax_enable_x64",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
)


def default_directory() -> str:
    """$JAXSERVE_COMPILATION_CACHE, else ~/.cache/jaxserve/xla."""
    return os.environ.get(
        "JAXSERVE_COMPILATION_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla"),
    )


def enable(directory: str | None) -> None:
    """Turn on JAX's persistent compilation cache in `directory` (nothing when empty). Every
    compilation is kept, small ones included: a restart then reloads them all."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@functools.cache
def source_digest() -> str:
    """sha256 of this project's Python sources (the packages that build compiled programs)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in _SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def compiler_options(platform: str | None = None) -> dict[str, int]:
    """The XLA option overrides the engine's executables are compiled with on `platform`
    (default: the first device's): `GPU_COMPILER_OPTIONS` on GPUs, less any option the user
    already sets in `XLA_FLAGS` (theirs wins); nothing elsewhere."""
    platform = platform or jax.devices()[0].platform
    if platform not in _GPU_PLATFORMS:
        return {}
    flags = os.environ.get(program_env.XLA_FLAGS, "")
    return {k: v for k, v in GPU_COMPILER_OPTIONS.items() if f"--{k}=" not in flags}


def fingerprint(parts: Iterable[object]) -> str:
    """A digest of `parts` (their reprs) plus the versions, device, XLA flags (`program_env`) and
    sources that decide what a compiled program is."""
    dev = jax.devices()[0]
    h = hashlib.sha256()
    for part in (
        jax.__version__,
        jaxlib.__version__,
        dev.platform,
        dev.device_kind,
        dev.client.platform_version,
        jax.device_count(),
        *(os.environ.get(name, "") for name in program_env.NAMES),
        source_digest(),
        *(getattr(jax.config, name) for name in _JAX_OPTIONS),
        *parts,
    ):
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


class ExecutableStore:
    """Compiles device calls, keeping each compiled executable on disk under its key.

    `directory=None`, or a platform other than a GPU, keeps nothing (each start compiles). The
    `KEEP_FOLDERS` most recently used fingerprint folders are kept, older ones deleted. Counters
    `loaded` / `compiled` say how many executables came from disk and how many were compiled."""

    def __init__(self, directory: str | None, fingerprint: str):
        keep = directory and jax.devices()[0].platform in _GPU_PLATFORMS
        self.path = Path(directory) / EXECUTABLES_DIR / fingerprint[:24] if keep else None
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            os.utime(self.path)  # used now
            _prune(self.path.parent, KEEP_FOLDERS)
        self.loaded = 0
        self.compiled = 0
        self._lock = threading.Lock()

    def compile(self, key: tuple, jitted, args: tuple) -> jax.stages.Compiled:
        """The executable of `jitted(*args)` (arrays or `jax.ShapeDtypeStruct`s), loaded from
        disk when this store has it, else compiled and saved."""
        file = self._file(key)
        if file is not None and file.exists():
            try:
                compiled = _load(file)
            except Exception as e:  # noqa: BLE001 - a bad file is recompiled and replaced
                log.warning("recompiling %s: its stored executable did not load (%r)", key, e)
            else:
                with self._lock:
                    self.loaded += 1
                return compiled
        compiled = jitted.trace(*args).lower().compile(compiler_options())
        with self._lock:
            self.compiled += 1
        if file is not None:
            try:
                _save(file, compiled)
            except Exception as e:  # noqa: BLE001 - serving goes on; the next start compiles
                log.warning("could not store the executable of %s: %r", key, e)
        return compiled

    def _file(self, key: tuple) -> Path | None:
        if self.path is None:
            return None
        return self.path / (hashlib.sha256(repr(key).encode()).hexdigest()[:32] + ".exe")


def _prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used folders under `root`."""
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _load(file: Path) -> jax.stages.Compiled:
    blob, in_tree, out_tree = pickle.loads(file.read_bytes())
    return serialize_executable.deserialize_and_load(blob, in_tree, out_tree)


def _save(file: Path, compiled: jax.stages.Compiled) -> None:
    data = pickle.dumps(serialize_executable.serialize(compiled))
    file.parent.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise
