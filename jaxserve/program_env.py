"""The environment variables that change what a compiled program is: XLA's flags and the
experiment switches read while a step is traced.

Owns their names. The executable store's fingerprint (`jaxserve.compile_cache`) includes them so
that a stored program of another setting is never loaded, and every benchmark JSON records the
ones set (`jaxserve.bench.report`). Imports nothing but the standard library, so a benchmark's
client process can report them without importing JAX.
"""

from __future__ import annotations

import os

XLA_FLAGS = "XLA_FLAGS"
# MiB of the output projection's weight each decode layer prefetches into L2 from a second CUDA
# stream (`pallas_kernels.l2_prefetch`); unset or 0: off.
L2_PREFETCH_MB = "JAXSERVE_L2_PREFETCH_MB"
NAMES = (XLA_FLAGS, L2_PREFETCH_MB)


def values() -> dict[str, str]:
    """The variables of `NAMES` that are set, with their values."""
    return {name: os.environ[name] for name in NAMES if name in os.environ}
