"""Serving one model from several processes (hosts): start-up and the per-step broadcast.

Owns `initialize` (joining the process group through `jax.distributed`), `StepChannel` (how
process 0 tells the others which device call comes next) and `run` (process 0 serves, the others
follow). Process 0 runs the server, the scheduler and `LLMEngine`; every device call its `Engine`
makes (a prefill or decode step, a page copy, a sampling pass) is announced to the other
processes first, and each of them runs the same call on its own devices. The device arrays span
all processes' devices, so XLA's collectives tie the processes' steps together.

An announcement is two broadcasts through JAX's own collectives
(`multihost_utils.broadcast_one_to_all`): a fixed-size int32 header (operation, static flags,
and the dtype and shape of each array), then the padded step arrays themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

HEADER_LEN = 256
# Array dtypes a step can carry; the header names them by index.
DTYPES = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.float32), np.dtype(np.bool_))
STOP = 0  # the operation that ends `Engine.follow`


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join the process group; must run before anything else touches JAX's devices."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id: must be in [0, num_processes={num_processes}), got {process_id}"
        )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


class StepChannel:
    """Process 0 sends (operation, flags, arrays); every other process receives the same."""

    def send(self, op: int, flags: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
        header = [op, len(flags), *flags, len(arrays)]
        for a in arrays:
            header += [DTYPES.index(a.dtype), a.ndim, *a.shape]
        if len(header) > HEADER_LEN:
            raise ValueError(f"step header of {len(header)} ints exceeds {HEADER_LEN}")
        buf = np.zeros(HEADER_LEN, np.int32)
        buf[: len(header)] = header
        multihost_utils.broadcast_one_to_all(buf)
        if arrays:
            multihost_utils.broadcast_one_to_all(tuple(arrays))

    def receive(self) -> tuple[int, tuple[int, ...], list[np.ndarray]]:
        header = [
            int(v) for v in multihost_utils.broadcast_one_to_all(np.zeros(HEADER_LEN, np.int32))
        ]
        op, n_flags = header[0], header[1]
        flags = tuple(header[2 : 2 + n_flags])
        pos = 2 + n_flags
        n_arrays, pos = header[pos], pos + 1
        shapes = []
        for _ in range(n_arrays):
            dtype, ndim = DTYPES[header[pos]], header[pos + 1]
            shapes.append((dtype, tuple(header[pos + 2 : pos + 2 + ndim])))
            pos += 2 + ndim
        if not shapes:
            return op, flags, []
        zeros = tuple(np.zeros(shape, dtype) for dtype, shape in shapes)
        got = multihost_utils.broadcast_one_to_all(zeros)
        return op, flags, [np.asarray(a, dtype) for a, (dtype, _) in zip(got, shapes, strict=True)]


class Follower(Protocol):
    def follow(self) -> None: ...

    def release_followers(self) -> None: ...


def run(engine: Follower, serve: Callable[[], int]) -> int:
    """Process 0 runs `serve` and then releases the others; the others run the engine's steps
    until then."""
    if jax.process_index() > 0:
        log.info("process %d: following process 0's steps", jax.process_index())
        engine.follow()
        return 0
    try:
        return serve()
    finally:
        engine.release_followers()


def agree_min(value: int) -> int:
    """The smallest of every process's `value` (each process passes its own)."""
    if jax.process_count() == 1:
        return value
    return int(np.min(multihost_utils.process_allgather(np.int32(value))))
