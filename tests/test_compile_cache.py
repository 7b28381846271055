"""The executable store: compiled device calls saved after compiling, loaded on the next start."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import compile_cache
from jaxserve.compile_cache import ExecutableStore, fingerprint


def f(x, idx):
    return jnp.take(x, idx, axis=0) * 2.0 + 1.0


X = np.arange(64, dtype=np.float32).reshape(16, 4)
IDX = np.array([3, 1, 2], np.int32)
FP = fingerprint(("test",))


class FakeSerialization:
    """Stands in for `jax.experimental.serialize_executable` on the CPU: XLA's CPU executables do
    not reliably survive a real round trip (a reloaded one can miss its fused functions, which is
    why the engine keeps executables on GPUs only, where `tests/test_engine_gpu.py` restarts an
    engine through the real one). Files hold a token; loading returns the executable saved
    under it in this process."""

    def __init__(self):
        self.saved: dict[bytes, object] = {}

    def serialize(self, compiled):
        token = str(len(self.saved)).encode()
        self.saved[token] = compiled
        return token, None, None

    def deserialize_and_load(self, blob, in_tree, out_tree):
        return self.saved[blob]


@pytest.fixture
def on_this_platform(monkeypatch):
    """Let the store keep executables on this machine's platform (CPU in CI), and compile with the
    GPU compiler options there."""
    monkeypatch.setattr(compile_cache, "_GPU_PLATFORMS", (jax.devices()[0].platform,))
    monkeypatch.setattr(compile_cache, "serialize_executable", FakeSerialization())


def test_second_store_loads_what_the_first_compiled(tmp_path, on_this_platform):
    first = ExecutableStore(str(tmp_path), FP)
    a = first.compile(("f", 1), jax.jit(f), (X, IDX))
    assert (first.compiled, first.loaded) == (1, 0)
    second = ExecutableStore(str(tmp_path), FP)
    b = second.compile(("f", 1), jax.jit(f), (X, IDX))
    assert (second.compiled, second.loaded) == (0, 1)
    np.testing.assert_array_equal(np.asarray(a(X, IDX)), np.asarray(f(X, IDX)))
    np.testing.assert_array_equal(np.asarray(b(X, IDX)), np.asarray(f(X, IDX)))
    # A different key is a different program.
    second.compile(("f", 2), jax.jit(f), (X, IDX[:2]))
    assert second.compiled == 1


def test_compiler_options_apply_on_gpus_unless_xla_flags_set_them(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compile_cache.compiler_options("cpu") == {}
    assert compile_cache.compiler_options("gpu") == compile_cache.GPU_COMPILER_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_graph_min_graph_size=5")
    assert compile_cache.compiler_options("gpu") == {}


def test_store_compiles_with_the_compiler_options(on_this_platform, monkeypatch):
    """The GPU options are XLA options (the CPU compiler accepts them too), and they reach XLA:
    an option XLA does not know is refused."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    store = ExecutableStore(None, FP)
    compiled = store.compile(("f",), jax.jit(f), (X, IDX))
    np.testing.assert_array_equal(np.asarray(compiled(X, IDX)), np.asarray(f(X, IDX)))
    monkeypatch.setattr(compile_cache, "GPU_COMPILER_OPTIONS", {"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        store.compile(("g",), jax.jit(f), (X, IDX))


def test_another_fingerprint_never_loads_a_stored_executable(tmp_path, on_this_platform):
    ExecutableStore(str(tmp_path), FP).compile(("f",), jax.jit(f), (X, IDX))
    other = ExecutableStore(str(tmp_path), fingerprint(("other",)))
    other.compile(("f",), jax.jit(f), (X, IDX))
    assert (other.compiled, other.loaded) == (1, 0)
    assert other.path != ExecutableStore(str(tmp_path), FP).path


def test_unreadable_file_is_recompiled_and_replaced(tmp_path, on_this_platform, caplog):
    store = ExecutableStore(str(tmp_path), FP)
    store.compile(("f",), jax.jit(f), (X, IDX))
    (file,) = store.path.iterdir()
    file.write_bytes(b"not an executable")
    again = ExecutableStore(str(tmp_path), FP)
    exe = again.compile(("f",), jax.jit(f), (X, IDX))
    assert (again.compiled, again.loaded) == (1, 0)
    assert "did not load" in caplog.text
    np.testing.assert_array_equal(np.asarray(exe(X, IDX)), np.asarray(f(X, IDX)))
    third = ExecutableStore(str(tmp_path), FP)
    third.compile(("f",), jax.jit(f), (X, IDX))
    assert third.loaded == 1


def test_only_the_most_recently_used_configurations_are_kept(tmp_path, on_this_platform):
    import os

    root = tmp_path / compile_cache.EXECUTABLES_DIR
    old = [root / f"old{i}" for i in range(compile_cache.KEEP_FOLDERS + 2)]
    for i, folder in enumerate(old):
        folder.mkdir(parents=True)
        (folder / "x.exe").write_bytes(b"")
        os.utime(folder, (1000 + i, 1000 + i))  # old0 is the least recently used
    store = ExecutableStore(str(tmp_path), FP)
    kept = {p.name for p in root.iterdir()}
    assert store.path.name in kept and len(kept) == compile_cache.KEEP_FOLDERS
    assert kept == {store.path.name} | {f.name for f in old[-(compile_cache.KEEP_FOLDERS - 1) :]}


def test_no_directory_or_unsupported_platform_keeps_nothing(tmp_path, monkeypatch):
    assert ExecutableStore(None, FP).path is None
    monkeypatch.setattr(compile_cache, "_GPU_PLATFORMS", ())
    store = ExecutableStore(str(tmp_path), FP)
    store.compile(("f",), jax.jit(f), (X, IDX))
    assert store.path is None and list(tmp_path.iterdir()) == []


def test_fingerprint_covers_parts_and_lowering_options(monkeypatch):
    assert fingerprint((1, "a")) == fingerprint((1, "a"))
    assert fingerprint((1, "a")) != fingerprint((1, "b"))
    before = fingerprint(())
    with jax.default_matmul_precision("bfloat16"):
        assert fingerprint(()) != before
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    assert fingerprint(()) != before


def test_engine_programs_differ_with_the_configuration(tiny_model):
    from jaxserve.engine import Engine, EngineConfig

    cfg = dict(page_size=4, num_pages=32, max_num_seqs=4, max_model_len=64)
    a = Engine(tiny_model(), EngineConfig(**cfg))
    b = Engine(tiny_model(), EngineConfig(**cfg))
    c = Engine(tiny_model(), EngineConfig(**{**cfg, "num_pages": 48}))
    d = Engine(tiny_model(), EngineConfig(**cfg, compilation_cache_dir="/elsewhere"))
    parts = [fingerprint(e._program_parts()) for e in (a, b, c, d)]
    assert parts[0] == parts[1] == parts[3] != parts[2]
