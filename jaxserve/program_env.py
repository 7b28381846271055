"""The environment variables that change what a compiled program is (XLA's flags).

Owns their names. The executable store's fingerprint (`jaxserve.compile_cache`) includes them so
that a stored program of another setting is never loaded, and every benchmark JSON records the
ones set (`jaxserve.bench.report`). Imports nothing but the standard library, so a benchmark's
client process can report them without importing JAX.
"""

from __future__ import annotations

import os

XLA_FLAGS = "XLA_FLAGS"
NAMES = (XLA_FLAGS,)


def values() -> dict[str, str]:
    """The variables of `NAMES` that are set, with their values."""
    return {name: os.environ[name] for name in NAMES if name in os.environ}
