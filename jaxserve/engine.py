"""The device side of a step: params, the paged KV cache, and the jitted prefill / decode steps.

Owns everything that touches the device. It receives a `StepPlan` (plain data from the scheduler)
plus one `RowSpec` per sampled row, pads the plan to a shape bucket, runs the compiled step with
the KV cache donated (updated in place, never copied), samples on device and returns plain numpy
results; a call's small host arrays reach the device packed in one buffer (`_pack_host_arrays`).
It keeps no per-request state: what a sequence is and when it ends is the scheduler's and
`LLMEngine`'s business.

Compiled shapes come from fixed bucket lists (decode batch, prefill tokens, pages per sequence), so
the set of compilations is small and known; `warmup()` compiles all of them, several at once (or,
for a server, only the largest before returning and the rest in the background while steps run
padded into the largest compiled so far). Every device call runs an executable the engine holds
by shape key; on a GPU each is also kept on disk (`compile_cache.ExecutableStore`), so a restart
loads them instead of compiling.

Multi-step decoding (`dispatch_run`): `decode_steps` decode iterations in one compiled call, each
sampling on device and feeding its tokens to the next, so the host's per-call cost (argument
transfer, launch, read-back, scheduling) is paid once per run instead of once per token. A run
is dispatched and read back (`collect_run`) apart: a run planned while the one before it
computes (`StepPlan.follows_run`) takes that run's last samples as its input tokens from a small
device buffer every run leaves them in, so the host never waits between the two. A prefill step
that completes prompts can leave its samples there too (`dispatch_step(into_carry=True)`), so the
first run of those rows is dispatched before the step's tokens are read back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field, fields

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import models
from jaxserve import compile_cache, multihost, sharding
from jaxserve.config import ModelConfig
from jaxserve.sampling import RowSpec, SamplingBatch, sample, sampler_flags
from models import CausalLM, KVCache
from pallas_kernels.attention import AttentionMetadata, resolve_backend
from serving.scheduler import ScheduledSeq, StepPlan

log = logging.getLogger(__name__)

# The device calls an engine makes, numbered for `multihost.StepChannel` (0 is its STOP).
(
    _OP_COPY,
    _OP_DECODE,
    _OP_PREFILL,
    _OP_PREFILL_LOGPROBS,
    _OP_SAMPLE,
    _OP_DECODE_RUN,
    _OP_SAMPLE_INTO_CARRY,
) = range(1, 8)
_SAMPLERS = (_OP_SAMPLE, _OP_SAMPLE_INTO_CARRY)
_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingBatch))
_SAMPLE_FLAGS = ("all_greedy", "need_sort", "need_logprobs")


def _flag_ints(flags: dict[str, bool]) -> tuple[int, ...]:
    """Sampler flags as the ints a device call carries (see `multihost.StepChannel`)."""
    return tuple(int(flags[k]) for k in _SAMPLE_FLAGS)


def _flag_kwargs(ints) -> dict[str, bool]:
    return {k: bool(v) for k, v in zip(_SAMPLE_FLAGS, ints, strict=True)}


def _batch_arrays(batch: SamplingBatch) -> tuple[np.ndarray, ...]:
    return tuple(getattr(batch, name) for name in _SAMPLING_FIELDS)


def _batch_of(arrays) -> SamplingBatch:
    return SamplingBatch(**dict(zip(_SAMPLING_FIELDS, arrays, strict=True)))


def geometric_upto(
    n: int, start: int = 1, factor: int = 2, coarse_below: int = 0
) -> tuple[int, ...]:
    """start, then each times `factor` (times 4 while below `coarse_below`) below n, then n."""
    out, b = [], start
    while b < n:
        out.append(b)
        b *= 4 if b < coarse_below else factor
    out.append(n)
    return tuple(out)


def pick(buckets: tuple[int, ...], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 0  # total pages incl. the reserved page 0; 0 = size from memory
    kv_memory_fraction: float = 0.85  # of free device memory after the weights
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_prefill_seqs: int = 32  # sequences with prompt tokens in one step (a compiled shape)
    max_model_len: int = 4096
    attention_backend: str = "auto"
    # Decode iterations per device call when every running sequence is plainly decoding (see
    # `dispatch_run`); 1 turns multi-step decoding off; 0 = 8 with a kernel decode backend, else 1
    # (the CPU's reference path, where compute dwarfs the per-call cost).
    decode_steps: int = 0
    # Plan and dispatch the next multi-step run while one computes (`LLMEngine`).
    async_scheduling: bool = True
    # Reuse the K/V of full pages whose whole token prefix was computed before (the scheduler's).
    enable_prefix_caching: bool = True
    kv_cache_cpu_bytes: int = 1 << 30  # cache size on CPU, which reports no free memory
    # Compile-shape buckets; empty = derived: powers of two on accelerators, powers of four on
    # CPU (where each compilation costs more than the padding it saves).
    decode_buckets: tuple[int, ...] = ()
    prefill_buckets: tuple[int, ...] = ()
    page_buckets: tuple[int, ...] = ()
    # JAX's compilation cache and the engine's executable store (`jaxserve.compile_cache`).
    compilation_cache_dir: str | None = field(default_factory=compile_cache.default_directory)

    def validate(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size: must be a power of two, got {self.page_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.decode_steps < 0:
            raise ValueError(f"decode_steps: must be >= 0, got {self.decode_steps}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_memory_fraction: must be in (0, 1], got {self.kv_memory_fraction}"
            )


@dataclass
class StepResult:
    """Host-side results of one step, keyed by the sampled seq id."""

    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, dict[int, float]] = field(default_factory=dict)
    # request_id -> list of (position, {token: logprob}) for prompt positions computed this step
    prompt_logprobs: dict[str, list[tuple[int, dict[int, float]]]] = field(default_factory=dict)


@dataclass
class _Sampling:
    """A dispatched sampling pass: the seq ids it samples, their specs, its device output (None
    when it samples nothing) and whether its tokens also went to the run carry."""

    seq_ids: list[int]
    row_specs: list[RowSpec]
    out: dict | None
    into_carry: bool = False


@dataclass
class PendingStep:
    """A dispatched plain step (`Engine.dispatch_step`), read back by `Engine.collect_step`."""

    plan: StepPlan
    samplings: list[_Sampling]
    prompt_targets: dict[int, np.ndarray]
    prompt_out: dict | None  # the prompt logprob arrays, when asked for
    # Its samples are also the input tokens of a run that follows them (`dispatch_step`).
    in_carry: bool


@dataclass
class PendingRun:
    """A dispatched multi-step run: its plan, its rows' sampling specs and its device output
    (read back by `Engine.collect_run`)."""

    plan: StepPlan
    row_specs: list[RowSpec]
    out: dict


@dataclass
class RunResult:
    """Host-side results of a multi-step run: each row's tokens (and logprobs, when wanted) in
    order, as many as the row's `num_steps`."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)


class ModelDef:
    """The static half of a split model (its GraphDef and the treedef of its parameter state),
    bound into each step function; the parameters travel as a flat list."""

    __slots__ = ("graphdef", "state_def")

    def __init__(self, graphdef, state_def):
        self.graphdef, self.state_def = graphdef, state_def

    def model(self, params: list[jax.Array]) -> CausalLM:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, params))


def _forward(mdef: ModelDef, params, kv, tokens, positions, meta):
    model = mdef.model(params)
    h, kv = model(tokens, positions, kv, meta)
    return model, h, sharding.constrain_kv(kv)


def _decode_step(mdef, params, kv, tokens, positions, meta):
    model, h, kv = _forward(mdef, params, kv, tokens, positions, meta)
    return model.logits(h), kv


def _prefill_step(mdef, params, kv, tokens, positions, meta, last_idx):
    model, h, kv = _forward(mdef, params, kv, tokens, positions, meta)
    return model.logits(h[last_idx]), kv


def _prefill_step_with_prompt_logprobs(
    mdef, params, kv, tokens, positions, meta, last_idx, targets
):
    """Like `_prefill_step`, plus the logprob of `targets[t]` (the next prompt token) at every
    position and the top-k there — computed on device so [T, vocab] never leaves it."""
    model, h, kv = _forward(mdef, params, kv, tokens, positions, meta)
    lp = jax.nn.log_softmax(model.logits(h), axis=-1)
    target_lp = jnp.take_along_axis(lp, targets[:, None], 1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, 20)
    return model.logits(h[last_idx]), kv, target_lp, top_ids, top_lp


def _decode_run(
    mdef,
    num_steps,
    sample_flags,
    params,
    kv,
    carry,
    tokens,
    positions,
    last_pos,
    meta,
    batch,
    follows,
):
    """`num_steps` decode iterations in one call. Each samples every row's next token on device
    and feeds it back as the row's next input at the next position; the slot each writes comes
    from the row's block table. A row past its `last_pos` (and a padding row, `seq_lens == 0`)
    writes into page 0 and attends to nothing. The input tokens are `tokens`, or when `follows`
    the previous run's last samples, which every run leaves at the front of `carry`. Returns the
    sampler's outputs stacked over the steps ([num_steps, R, ...]), the cache and `carry`."""
    tokens = jnp.where(follows, carry[: tokens.shape[0]], tokens)
    page_size = kv[0][0].shape[2]
    rows = jnp.arange(tokens.shape[0])
    in_use = meta.seq_lens > 0

    def step(carry, i):
        kv, tok, pos = carry
        live = in_use & (pos <= last_pos)
        page = jnp.take_along_axis(meta.block_tables, (pos // page_size)[:, None], 1, mode="clip")
        m = dataclasses.replace(
            meta,
            slot_mapping=jnp.where(live, page[:, 0] * page_size + pos % page_size, 0),
            seq_lens=jnp.where(live, pos + 1, 0),
        )
        model, h, kv = _forward(mdef, params, kv, tok, pos, m)
        b = dataclasses.replace(batch, step=batch.step + i.astype(batch.step.dtype))
        out = sample(model.logits(h), rows, b, **sample_flags)
        return (kv, out["tokens"], pos + 1), out

    (kv, last, _), outs = jax.lax.scan(step, (kv, tokens, positions), jnp.arange(num_steps))
    return outs, kv, sharding.constrain_replicated(carry.at[: last.shape[0]].set(last))


def _sample_into_carry(sample_flags, logits, carry, src_rows, batch):
    """`sample`, whose tokens also go to the front of `carry` (in sampled-row order), where the
    multi-step run that follows them reads its input tokens (`_decode_run` with `follows`)."""
    out = sample(logits, src_rows, batch, **sample_flags)
    tokens = out["tokens"]
    return out, sharding.constrain_replicated(carry.at[: tokens.shape[0]].set(tokens))


def _copy_pages(kv, src, dst):
    return sharding.constrain_kv(
        [(k.at[:, dst].set(k[:, src]), v.at[:, dst].set(v[:, src])) for k, v in kv]
    )


class Engine:
    """Params + KV cache on device and the compiled step functions.

    With a `mesh` (`jaxserve.sharding.make_mesh`), the parameters are laid out by
    `sharding.param_shardings`, the KV cache is split by KV head, and every step runs under the
    mesh; the step functions are the same ones either way. In a multi-process run, process 0's
    engine announces each device call and the other processes' engines run it in `follow`.
    """

    def __init__(
        self, model: CausalLM, cfg: EngineConfig, *, kv_dtype=None, mesh: Mesh | None = None
    ):
        cfg.validate()
        self.model_config: ModelConfig = model.cfg
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.embed_tokens.dtype
        if mesh is not None:
            # A no-op for parameters already restored into these shardings.
            pure = nnx.to_pure_dict(self.state)
            shardings = models.param_shardings(self.model_config, self.dtype, mesh)
            nnx.replace_by_pure_dict(self.state, jax.device_put(pure, shardings))
        # The parameters travel to the steps as a flat list: flattening an nnx.State per call
        # costs more than the list.
        self._mdef = ModelDef(self.graphdef, jax.tree.structure(self.state))
        self._params = jax.tree.leaves(self.state)
        self._channel = multihost.StepChannel() if jax.process_count() > 1 else None
        self._logits: dict[int, jax.Array] = {}  # the last decode / prefill step's, to sample
        self.kv_dtype = kv_dtype or self.dtype
        self.backend, self.prefill_backend = resolve_backend(cfg.attention_backend)
        max_pages_per_seq = math.ceil(cfg.max_model_len / cfg.page_size)
        # Every process must build the same cache; the tightest memory sizes it.
        num_pages = cfg.num_pages or multihost.agree_min(self._pages_from_memory(cfg))
        if num_pages < 2:
            raise ValueError(f"num_pages: need at least 2 (page 0 is reserved), got {num_pages}")
        compile_cache.enable(cfg.compilation_cache_dir)
        on_cpu = jax.devices()[0].platform == "cpu"
        factor = 4 if on_cpu else 2
        page_buckets = cfg.page_buckets or geometric_upto(max_pages_per_seq, 4, factor)
        # On a GPU, XLA turns matmuls of fewer than 8 rows into reductions that read the weights
        # at a fraction of the bandwidth (Llama-3-8B: 8.0 ms per step at batch 1, 6.2 at 8).
        min_decode = 1 if on_cpu else 8
        # Up to ~128 decode rows / ~256 prefill tokens a step's time is reading the weights, so
        # padding there is nearly free: buckets 4x apart (a third fewer compilations at start-up).
        coarse_decode, coarse_prefill = (0, 0) if on_cpu else (128, 256)
        self.cfg = cfg = EngineConfig(
            **{
                **cfg.__dict__,
                "num_pages": num_pages,
                "decode_buckets": cfg.decode_buckets
                or geometric_upto(cfg.max_num_seqs, min_decode, factor, coarse_decode),
                "prefill_buckets": cfg.prefill_buckets
                or geometric_upto(cfg.max_num_batched_tokens, 16, factor, coarse_prefill),
                "page_buckets": page_buckets,
                "decode_steps": cfg.decode_steps or (1 if self.backend == "reference" else 8),
            }
        )
        shape = (
            self.model_config.num_kv_heads,
            num_pages,
            cfg.page_size,
            self.model_config.head_dim,
        )
        # Committed from the start, like every cache a step returns: one compiled signature.
        kv_device = (
            jax.sharding.SingleDeviceSharding(jax.devices()[0])
            if mesh is None
            else sharding.kv_sharding(self.model_config, mesh)
        )
        self._kv_shape, self._kv_sharding = shape, kv_device
        # The run carry: the input tokens of a run that follows the last run (its final samples)
        # or a prefill step (its samples), one per row of the largest decode bucket; and the
        # seq ids of those rows.
        self._carry_sharding = (
            kv_device
            if mesh is None
            else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
        self._carry = jnp.zeros(max(cfg.decode_buckets), jnp.int32, device=self._carry_sharding)
        self._last_run_rows: list[int] = []
        # Seconds the host has spent blocked on device results (`_read`): near zero while the
        # host is what bounds the steps, the device's lead over the host otherwise.
        self.device_wait_s = 0.0
        self.kv: KVCache = [
            (
                jnp.zeros(shape, self.kv_dtype, device=kv_device),
                jnp.zeros(shape, self.kv_dtype, device=kv_device),
            )
            for _ in range(self.model_config.num_layers)
        ]
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens (%.2f GiB, %s); attention: decode %s, "
            "prefill %s",
            num_pages - 1,
            cfg.page_size,
            self.capacity_tokens,
            self.kv_bytes / 2**30,
            jnp.dtype(self.kv_dtype).name,
            self.backend,
            self.prefill_backend,
        )
        # Compiles off the serving thread: warm-up's, several at once, and, by key, the multi-step
        # decode variants (`decode_run_ready`) and samplers into the run carry (`dispatch_step`)
        # first needed while serving. One per core: XLA's compiles are CPU-bound (cold
        # Llama-3-8B warm-up on a 16-core host: 62 s with 8, 53 s with 16).
        self._compiler = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(32, os.cpu_count() or 1), thread_name_prefix="jaxserve-compile"
        )
        self._run_compiles: dict[tuple, concurrent.futures.Future] = {}
        self._run_compiles_lock = threading.Lock()
        # While warm-up compiles in the background: per step kind, the (bucket, pages) shapes
        # compiled so far (replaced, never mutated, under the lock); None otherwise.
        self._ready: dict[int, frozenset[tuple[int, int]]] | None = None
        self._ready_lock = threading.Lock()
        self._warm_jobs: list[concurrent.futures.Future] = []
        self._warm_left = 0
        # Every device call runs a compiled executable from here, keyed by its shapes; a warm
        # restart loads them from the store instead of tracing and compiling them again.
        self._executables: dict[tuple, jax.stages.Compiled] = {}
        self._store = compile_cache.ExecutableStore(
            None if self._channel is not None else cfg.compilation_cache_dir,
            compile_cache.fingerprint(self._program_parts()),
        )
        log.info("mesh: %s", self.mesh_summary())
        if mesh is not None and (whole := sharding.replicated_dims(self.model_config, mesh.shape)):
            log.warning(
                "not divisible by the tensor axis, so on every device: %s", ", ".join(whole)
            )

    def _program_parts(self) -> tuple:
        """What, besides a call's shapes, decides the compiled programs of this engine."""
        params = tuple((p.shape, p.dtype, p.sharding) for p in self._params)
        kv = (self._kv_shape, self.kv_dtype, self._kv_sharding)
        cfg = dataclasses.replace(self.cfg, compilation_cache_dir=None)
        return (cfg, self.model_config, self._mdef.state_def, params, kv, self.mesh)

    # ---- sizing -------------------------------------------------------------------------------
    def _bytes_per_page(self, page_size: int) -> int:
        m = self.model_config
        return (
            2
            * m.num_layers
            * m.num_kv_heads
            * page_size
            * m.head_dim
            * jnp.dtype(self.kv_dtype).itemsize
        )

    def _pages_from_memory(self, cfg: EngineConfig) -> int:
        page_bytes = self._bytes_per_page(cfg.page_size)
        if self.mesh is None:
            devices = jax.devices()[:1]
        else:
            devices = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
            # Each device holds its KV heads' share of every page.
            page_bytes //= sharding.kv_shards(self.model_config.num_kv_heads, self.mesh.shape)
        free = []
        for dev in devices:
            stats = dev.memory_stats() or {}
            if stats.get("bytes_limit"):
                free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        if not free:
            return max(2, int(cfg.kv_cache_cpu_bytes // self._bytes_per_page(cfg.page_size)))
        # The device with the least free memory (after its share of the weights) sets the size.
        return max(2, int(min(free) * cfg.kv_memory_fraction // page_bytes))

    @property
    def num_pages(self) -> int:
        return self.cfg.num_pages

    @property
    def capacity_tokens(self) -> int:
        return (self.cfg.num_pages - 1) * self.cfg.page_size

    @property
    def kv_bytes(self) -> int:
        return self.cfg.num_pages * self._bytes_per_page(self.cfg.page_size)

    # ---- step inputs --------------------------------------------------------------------------
    def page_buckets(self, is_decode: bool) -> tuple[int, ...]:
        """Block-table widths compiled for a step kind. A kernel backend reads only the pages a
        sequence has, so one width (the longest) serves all; the reference path gathers the
        whole table, so it gets geometric widths."""
        if (self.backend if is_decode else self.prefill_backend) == "reference":
            return self.cfg.page_buckets
        return (math.ceil(self.cfg.max_model_len / self.cfg.page_size),)

    def _shape(self, op: int, n: int, rows: list[ScheduledSeq]) -> tuple[int, int]:
        """(rows or tokens bucket, page bucket) of a step of `n` rows (decode) or tokens
        (prefill) over `rows`: the smallest compiled for them. While warm-up compiles in the
        background (`warmup(background=True)`), that is the smallest of those compiled so far
        that fits (a larger one pads more, and is never wrong); after, the exact bucket."""
        is_decode = op == _OP_DECODE
        buckets = self.cfg.decode_buckets if is_decode else self.cfg.prefill_buckets
        need = _pages_needed(rows)
        exact = (pick(buckets, n), pick(self.page_buckets(is_decode), need))
        ready = self._ready  # one read: the compile threads replace it, never change it
        if ready is None or exact in ready.get(op, ()):
            return exact
        fits = [k for k in ready.get(op, ()) if k[0] >= n and k[1] >= need]
        return min(fits) if fits else exact

    def _tables(self, rows: list[ScheduledSeq], num_rows: int, p: int) -> np.ndarray:
        tables = np.zeros((num_rows, p), np.int32)
        for i, r in enumerate(rows):
            tables[i, : len(r.block_table)] = r.block_table
        return tables

    def _slots(self, row: ScheduledSeq) -> np.ndarray:
        pos = np.arange(row.start_pos, row.start_pos + len(row.token_ids))
        table = np.asarray(row.block_table, np.int64)
        return _slot(table, pos, self.cfg.page_size).astype(np.int32)

    def _meta(self, slots, tables, seq_lens, cu, is_decode: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables,
            seq_lens=seq_lens,
            cu_q_lens=cu,
            is_decode=is_decode,
            backend=self.backend if is_decode else self.prefill_backend,
        )

    def _run_decode(self, rows: list[ScheduledSeq]) -> None:
        b, p = self._shape(_OP_DECODE, len(rows), rows)
        self._device(_OP_DECODE, self._decode_arrays(rows, b, p))

    def _decode_arrays(self, rows: list[ScheduledSeq], b: int, p: int) -> tuple[np.ndarray, ...]:
        tokens = np.zeros(b, np.int32)
        positions = np.zeros(b, np.int32)
        slots = np.zeros(b, np.int32)  # padding rows write into page 0
        seq_lens = np.zeros(b, np.int32)
        n, ps = len(rows), self.cfg.page_size
        # Built as lists, one assignment per array: a run dispatches up to max_num_seqs rows.
        pos = [r.start_pos for r in rows]
        tokens[:n] = [r.token_ids[0] for r in rows]
        positions[:n] = pos
        slots[:n] = [_slot(r.block_table, q, ps) for r, q in zip(rows, pos, strict=True)]
        seq_lens[:n] = positions[:n] + 1
        tables = self._tables(rows, b, p)
        cu = np.arange(b + 1, dtype=np.int32)
        return tokens, positions, slots, tables, seq_lens, cu

    def _run_buckets(self, num_rows: int, pages: int) -> tuple[int, int]:
        """The batch and page buckets a multi-step run of `num_rows` rows with block tables of
        at most `pages` pages is padded to."""
        return pick(self.cfg.decode_buckets, num_rows), pick(self.page_buckets(True), pages)

    def _run_arrays(
        self,
        rows: list[ScheduledSeq],
        b: int,
        p: int,
        specs: list[RowSpec],
        kinds: list[RowSpec],
        follows: bool = False,
    ) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
        """The inputs of a multi-step run over `rows` sampled by `specs`, padded to `b` rows
        and `p` pages per row, and the flags of the sampler compiled for rows like `kinds` (a
        superset of theirs serves them too); `follows`: its input tokens are the previous run's
        last samples."""
        tokens, positions, slots, tables, seq_lens, cu = self._decode_arrays(rows, b, p)
        last_pos = np.zeros(b, np.int32)
        last_pos[: len(rows)] = [r.start_pos + r.num_steps - 1 for r in rows]
        batch, _ = SamplingBatch.build(specs, b)
        arrays = (
            tokens,
            positions,
            last_pos,
            slots,
            tables,
            seq_lens,
            cu,
            np.array(follows),
            *_batch_arrays(batch),
        )
        return arrays, _flag_ints(sampler_flags(kinds))

    def _run_prefill(
        self, rows: list[ScheduledSeq], prompt_targets: dict[int, np.ndarray]
    ) -> dict | None:
        """Runs the step; returns the prompt logprob arrays when `prompt_targets` asks for them."""
        n_tok = sum(len(r.token_ids) for r in rows)
        # Prompt logprobs compile on first use, at the exact bucket.
        op = _OP_PREFILL_LOGPROBS if prompt_targets else _OP_PREFILL
        t, p = self._shape(op, n_tok, rows)
        arrays = self._prefill_arrays(rows, prompt_targets, t, p)
        if prompt_targets:
            return self._device(_OP_PREFILL_LOGPROBS, arrays)
        self._device(_OP_PREFILL, arrays[:-1])
        return None

    def _prefill_arrays(
        self, rows: list[ScheduledSeq], prompt_targets: dict[int, np.ndarray], t: int, p: int
    ) -> tuple[np.ndarray, ...]:
        """The inputs of a prefill step padded to `t` tokens and `p` pages per row; the last is
        the prompt-logprob targets."""
        s = self.cfg.max_prefill_seqs
        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slots = np.zeros(t, np.int32)
        targets = np.zeros(t, np.int32)
        seq_lens = np.zeros(s, np.int32)
        cu = np.zeros(s + 1, np.int32)
        last_idx = np.zeros(s, np.int32)
        off = 0
        for i, r in enumerate(rows):
            n = len(r.token_ids)
            tokens[off : off + n] = r.token_ids
            positions[off : off + n] = np.arange(r.start_pos, r.start_pos + n)
            slots[off : off + n] = self._slots(r)
            if r.seq_id in prompt_targets:
                targets[off : off + n] = prompt_targets[r.seq_id]
            seq_lens[i] = r.start_pos + n
            off += n
            cu[i + 1] = off
            last_idx[i] = off - 1
        cu[len(rows) + 1 :] = off
        tables = self._tables(rows, s, p)
        return tokens, positions, slots, tables, seq_lens, cu, last_idx, targets

    # ---- the step -----------------------------------------------------------------------------
    def dispatch_step(
        self,
        plan: StepPlan,
        specs: dict[int, RowSpec],
        prompt_targets: dict[int, np.ndarray] | None = None,
        into_carry: bool = False,
    ) -> PendingStep:
        """Start one scheduled step: its page copies, its decode and prefill calls and the
        sampling of their logits, none of it read back yet (`collect_step`). `specs[seq_id]`
        describes each sampled row; `prompt_targets` maps a prefill row's seq id to the
        next-token ids of its chunk when prompt logprobs are wanted (row order in the chunk).

        `into_carry`: a multi-step run is to follow the step's samples before they are read back
        (a plan that `follows_run` it, over the step's rows in their order). The samples then go
        to the run's input buffer too, if the step is prefill rows only, each sampling its own
        sequence, no more than a run has rows, and the sampler that does so is compiled for
        them (if not, it starts compiling in the background); `PendingStep.in_carry` says
        whether they did."""
        prompt_targets = prompt_targets or {}
        if plan.page_copies:
            self._copy(plan.page_copies)
        if len(plan.prefill) > self.cfg.max_prefill_seqs:
            raise ValueError(f"plan has {len(plan.prefill)} prefill rows > max_prefill_seqs")
        steps = []
        if plan.decode:
            self._run_decode(plan.decode)
            steps.append((_OP_DECODE, plan.decode))
        prompt_out = None
        if plan.prefill:
            prompt_out = self._run_prefill(plan.prefill, prompt_targets)
            steps.append((_OP_PREFILL, plan.prefill))
        into_carry = (
            into_carry
            and self.cfg.decode_steps > 1
            and not plan.decode
            and 0 < len(plan.prefill) <= self.cfg.max_num_seqs
            and all(r.sample_seq_ids == [r.seq_id] for r in plan.prefill)
        )
        samplings = [self._dispatch_sample(src, rows, specs, into_carry) for src, rows in steps]
        in_carry = any(s.into_carry for s in samplings)
        if in_carry:
            self._last_run_rows = [r.seq_id for r in plan.prefill]
        return PendingStep(plan, samplings, prompt_targets, prompt_out, in_carry)

    def collect_step(self, pending: PendingStep) -> StepResult:
        """Wait for a dispatched step and return its samples (and logprobs, prompt logprobs)."""
        result = StepResult()
        for sampling in pending.samplings:
            for sid, (tok, lp_map) in self._read_sample(sampling).items():
                result.tokens[sid] = tok
                if lp_map is not None:
                    result.logprobs[sid] = lp_map
        if pending.prompt_out is not None:
            self._collect_prompt_logprobs(
                pending.plan.prefill, pending.prompt_targets, pending.prompt_out, result
            )
        return result

    def dispatch_run(
        self, plan: StepPlan, specs: dict[int, RowSpec], kinds: list[RowSpec] | None = None
    ) -> PendingRun:
        """Start a multi-step plan (`Scheduler.schedule_decode_run` or `schedule_next_run`):
        `decode_steps` decode iterations in one device call (fewer where no row needs them all,
        `_run_steps`); row i keeps its first `num_steps` tokens. `kinds`: the rows
        `decode_run_ready` was asked about, whose sampler variant to use (default: the plan's
        own rows). A plan that `follows_run` must have the rows of the run dispatched last, in
        its order."""
        rows = plan.decode
        if plan.prefill or plan.num_steps > self.cfg.decode_steps:
            raise ValueError(
                f"plan: a run is decode rows only, of at most {self.cfg.decode_steps} steps"
            )
        seq_ids = [r.seq_id for r in rows]
        if plan.follows_run and seq_ids != self._last_run_rows:
            raise ValueError("plan: follows a run, but not the rows of the last one dispatched")
        if plan.page_copies:
            self._copy(plan.page_copies)
        row_specs = [specs[r.seq_id] for r in rows]
        b, p = self._run_buckets(len(rows), _pages_needed(rows))
        arrays, flags = self._run_arrays(
            rows, b, p, row_specs, kinds or row_specs, plan.follows_run
        )
        steps = self._run_steps(plan.num_steps, (b, p), flags)
        out = self._device(_OP_DECODE_RUN, arrays, (*flags, steps))
        self._last_run_rows = seq_ids
        return PendingRun(plan, row_specs, out)

    def collect_run(self, pending: PendingRun) -> RunResult:
        """Wait for a dispatched run and return each row's tokens (and logprobs)."""
        out = self._read(pending.out)
        result = RunResult()
        rows, row_specs = pending.plan.decode, pending.row_specs
        for i, (r, spec) in enumerate(zip(rows, row_specs, strict=True)):
            toks = [int(t) for t in out["tokens"][: r.num_steps, i]]
            result.tokens[r.seq_id] = toks
            if spec.want_logprobs:
                result.logprobs[r.seq_id] = [
                    _logprob_map(
                        tok, out["logprob"][j, i], out["top_ids"][j, i], out["top_logprobs"][j, i]
                    )
                    for j, tok in enumerate(toks)
                ]
        return result

    def _run_steps(self, needed: int, buckets: tuple[int, int], flags: tuple[int, ...]) -> int:
        """Decode iterations a run of these (batch, page) buckets and sampler flags loops:
        `decode_steps`, or `needed` when no row needs them all and that variant is compiled.
        Rows that end together end on such a run (a batch whose `max_tokens` is a multiple of
        `decode_steps` ends on one of `decode_steps - 1`, the prefill having sampled the first
        token), which would otherwise compute iterations nobody keeps. The variant compiles in
        the background on first use."""
        if needed >= self.cfg.decode_steps:
            return self.cfg.decode_steps
        short = self._run_compile((*buckets, *(bool(f) for f in flags)), needed)
        return needed if short.done() and short.exception() is None else self.cfg.decode_steps

    def decode_run_ready(self, num_rows: int, context_len: int, specs: list[RowSpec]) -> bool:
        """Whether the multi-step decode of `num_rows` rows of at most `context_len` positions,
        sampled like `specs`, is compiled. If not, its compilation starts in the background
        (single steps serve meanwhile): a new kind of sampling never stalls serving."""
        if self.cfg.decode_steps < 2 or num_rows > self.cfg.max_num_seqs:
            return False
        flags = sampler_flags(specs)
        buckets = self._run_buckets(num_rows, math.ceil(context_len / self.cfg.page_size))
        future = self._run_compile((*buckets, *(flags[k] for k in _SAMPLE_FLAGS)))
        return future.done() and future.exception() is None

    def finish_compiles(self) -> None:
        """Wait for the shapes and multi-step variants compiling in the background (a benchmark
        calls this after its warm-up so that it times the steady state)."""
        for future in self._warm_jobs:
            future.exception()
        for future in list(self._run_compiles.values()):
            future.exception()

    def _run_compile(self, key: tuple, steps: int = 0) -> concurrent.futures.Future:
        """The compilation of multi-step decode variant `key` (batch bucket, page bucket,
        *sampler flags) looping `steps` iterations (default `decode_steps`), started on the
        compile threads if it was not yet."""
        steps = steps or self.cfg.decode_steps
        return self._compile_in_background(
            (_OP_DECODE_RUN, steps, *key), self._compile_run, steps, *key
        )

    def _carry_sampler(
        self, arrays: tuple[np.ndarray, ...], flags: tuple[int, ...]
    ) -> concurrent.futures.Future:
        """The compilation of the sampler that leaves its tokens in the run carry, for these
        inputs (`_sample_arrays`) and flags (the logits' source step first), started on the
        compile threads if it was not yet. The last step's logits of that source give their
        shape."""
        logits = self._logits[flags[0]]
        aval = jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=logits.sharding)
        key = (_OP_SAMPLE_INTO_CARRY, flags, *(a.shape for a in arrays))
        return self._compile_in_background(
            key, self._compile, _OP_SAMPLE_INTO_CARRY, arrays, flags, aval
        )

    def _compile_in_background(self, key: tuple, compile_fn, *args) -> concurrent.futures.Future:
        """`compile_fn(*args)`, which compiles the device-call variant `key` (op first), started
        on the compile threads if it was not yet."""
        with self._run_compiles_lock:
            if key not in self._run_compiles:
                future = self._compiler.submit(compile_fn, *args)
                future.add_done_callback(functools.partial(_log_compile_failure, key))
                self._run_compiles[key] = future
            return self._run_compiles[key]

    def _compile_run(self, steps: int, b: int, p: int, *flags: bool) -> None:
        rows = [_dummy_row(i, [0], [0] * p) for i in range(b)]
        spec = RowSpec(
            temperature=0.0 if flags[0] else 1.0,
            top_k=1 if flags[1] else 0,
            want_logprobs=flags[2],
        )
        arrays, sample_flags = self._run_arrays(rows, b, p, [spec] * b, [spec])
        self._compile(_OP_DECODE_RUN, arrays, (*sample_flags, steps))

    def _sample(self, source: int, rows: list[ScheduledSeq], specs: dict[int, RowSpec]):
        """Sample the rows of the last `source` (_OP_DECODE / _OP_PREFILL) step's logits."""
        return self._read_sample(self._dispatch_sample(source, rows, specs))

    def _dispatch_sample(
        self,
        source: int,
        rows: list[ScheduledSeq],
        specs: dict[int, RowSpec],
        into_carry: bool = False,
    ) -> _Sampling:
        """Start sampling the rows of the last `source` step's logits; `into_carry`: leave the
        tokens in the run carry as well, in the order sampled, if that sampler is compiled."""
        src, sids = [], []
        for i, r in enumerate(rows):
            for sid in r.sample_seq_ids:
                src.append(i)
                sids.append(sid)
        if not sids:
            return _Sampling([], [], None)
        row_specs = [specs[s] for s in sids]
        arrays, flags = self._sample_arrays(src, row_specs)
        flags = (source, *flags)
        if into_carry:
            future = self._carry_sampler(arrays, flags)
            into_carry = future.done() and future.exception() is None
        op = _OP_SAMPLE_INTO_CARRY if into_carry else _OP_SAMPLE
        return _Sampling(sids, row_specs, self._device(op, arrays, flags), into_carry)

    def _read_sample(self, sampling: _Sampling) -> dict[int, tuple[int, dict | None]]:
        """Wait for a sampling pass: each seq id's token and, when wanted, its logprobs."""
        if sampling.out is None:
            return {}
        out = self._read(sampling.out)
        res = {}
        for i, sid in enumerate(sampling.seq_ids):
            tok = int(out["tokens"][i])
            lp_map = None
            if sampling.row_specs[i].want_logprobs:
                lp_map = _logprob_map(
                    tok, out["logprob"][i], out["top_ids"][i], out["top_logprobs"][i]
                )
            res[sid] = (tok, lp_map)
        return res

    def _sample_arrays(
        self, src: list[int], row_specs: list[RowSpec]
    ) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
        """The sampler's padded inputs for rows `src` of the logits, and its flags."""
        r = pick(self._sample_buckets, len(src))
        batch, flags = SamplingBatch.build(row_specs, r)
        src_arr = np.zeros(r, np.int32)
        src_arr[: len(src)] = src
        return (src_arr, *_batch_arrays(batch)), _flag_ints(flags)

    def _read(self, out):
        """`out` on the host, once the device has computed it; the time spent waiting for that
        counts into `device_wait_s`."""
        start = time.perf_counter()
        jax.block_until_ready(out)
        self.device_wait_s += time.perf_counter() - start
        return jax.device_get(out)

    def _collect_prompt_logprobs(self, rows, prompt_targets, out, result: StepResult) -> None:
        out = self._read(out)
        off = 0
        for r in rows:
            n = len(r.token_ids)
            if r.seq_id in prompt_targets:
                entries = []
                tgt = prompt_targets[r.seq_id]
                for j in range(n):
                    pos = r.start_pos + j + 1  # the position whose token is the target
                    if j >= len(tgt) or tgt[j] < 0:
                        continue
                    d = {int(tgt[j]): float(out["target_lp"][off + j])}
                    for t_id, t_lp in zip(
                        out["top_ids"][off + j], out["top_lp"][off + j], strict=True
                    ):
                        d.setdefault(int(t_id), float(t_lp))
                    entries.append((pos, d))
                result.prompt_logprobs.setdefault(r.request_id, []).extend(entries)
            off += n

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        n = pick(geometric_upto(max(len(copies), 1)), len(copies))
        src = np.zeros(n, np.int32)
        dst = np.zeros(n, np.int32)
        src[: len(copies)] = [c[0] for c in copies]
        dst[: len(copies)] = [c[1] for c in copies]
        self._device(_OP_COPY, (src, dst))

    # ---- device calls -------------------------------------------------------------------------
    def _device(self, op: int, arrays: tuple[np.ndarray, ...], flags: tuple[int, ...] = ()):
        """Run one device call on the padded host `arrays`. In a multi-process run it is first
        announced to the other processes, which run the same call (`follow`)."""
        if self._channel is not None:
            self._channel.send(op, flags, arrays)
        return self._run_call(op, arrays, flags)

    def _run_call(self, op: int, arrays: tuple[np.ndarray, ...], flags: tuple[int, ...]):
        # Host arrays go in as they are: the executable places them replicated over the mesh.
        with self._mesh_context():
            exe, args = self._executable(op, arrays, flags, self.kv)
            if op == _OP_COPY:
                self.kv = exe(*args)
                return None
            if op == _OP_SAMPLE:
                return self._readable(exe(*args))
            if op == _OP_SAMPLE_INTO_CARRY:
                out, self._carry = exe(*args)
                return self._readable(out)
            if op == _OP_DECODE_RUN:
                out, self.kv, self._carry = exe(*args)
                return self._readable(out)
            if op in (_OP_DECODE, _OP_PREFILL):
                self._logits[op], self.kv = exe(*args)
                return None
            logits, self.kv, tlp, top_ids, top_lp = exe(*args)
            self._logits[_OP_PREFILL] = logits
            return self._readable({"target_lp": tlp, "top_ids": top_ids, "top_lp": top_lp})

    def _executable(
        self,
        op: int,
        arrays: tuple[np.ndarray, ...],
        flags: tuple[int, ...],
        kv,
        logits=None,
        carry=None,
    ):
        """The compiled device call for these argument shapes (compiled, or loaded from the
        executable store, on first use) and its arguments. `kv` is the cache, or its shapes
        (`_kv_shapes`) to compile a call without running it; likewise `logits` for the sampler
        (default: the last step's) and the run `carry` (default: the engine's)."""
        if op in _SAMPLERS and logits is None:
            logits = self._logits[flags[0]]
        key = (op, flags, *((a.shape, a.dtype.char) for a in arrays))
        if op in _SAMPLERS:
            key += (logits.shape,)
        carry = self._carry if carry is None else carry
        fn, donate, device_args, host_args = self._call(op, arrays, flags, kv, logits, carry)
        fn, args = _pack_host_arrays(fn, device_args, host_args)
        exe = self._executables.get(key)
        if exe is None:
            jitted = jax.jit(fn, donate_argnums=donate)
            exe = self._executables[key] = self._store.compile(key, jitted, args)
        return exe, args

    def _call(
        self, op: int, arrays: tuple[np.ndarray, ...], flags: tuple[int, ...], kv, logits, carry
    ):
        """The function of a device call with its static parts bound, the indices of the
        arguments it donates (the KV cache, the run carry), its device arguments and then its
        host ones."""
        if op == _OP_COPY:
            return _copy_pages, (0,), (kv,), arrays
        if op in _SAMPLERS:
            host = (arrays[0], _batch_of(arrays[1:]))
            if op == _OP_SAMPLE:
                return functools.partial(sample, **_flag_kwargs(flags[1:])), (), (logits,), host
            fn = functools.partial(_sample_into_carry, _flag_kwargs(flags[1:]))
            return fn, (1,), (logits, carry), host
        if op == _OP_DECODE_RUN:
            tokens, positions, last_pos, slots, tables, seq_lens, cu, follows, *sampling = arrays
            meta = self._meta(slots, tables, seq_lens, cu, True)
            *sample_flags, steps = flags
            fn = functools.partial(_decode_run, self._mdef, steps, _flag_kwargs(sample_flags))
            host = (tokens, positions, last_pos, meta, _batch_of(sampling), follows)
            return fn, (1, 2), (self._params, kv, carry), host
        tokens, positions, slots, tables, seq_lens, cu, *rest = arrays
        meta = self._meta(slots, tables, seq_lens, cu, op == _OP_DECODE)
        fn = {
            _OP_DECODE: _decode_step,
            _OP_PREFILL: _prefill_step,
            _OP_PREFILL_LOGPROBS: _prefill_step_with_prompt_logprobs,
        }[op]
        host = (tokens, positions, meta, *rest)
        return functools.partial(fn, self._mdef), (1,), (self._params, kv), host

    def _compile(
        self, op: int, arrays: tuple[np.ndarray, ...], flags: tuple[int, ...], logits=None
    ) -> jax.stages.Compiled | None:
        """Compile a device call without running it (any thread) and return it; later calls
        with the same shapes use it."""
        if self._channel is not None:
            return None  # every process must compile in step; they do so on the call itself
        carry = jax.ShapeDtypeStruct(self._carry.shape, jnp.int32, sharding=self._carry_sharding)
        with self._mesh_context():
            return self._executable(op, arrays, flags, self._kv_shapes(), logits, carry)[0]

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _kv_shapes(self) -> list[tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
        """The cache as shapes: what compiling needs, safe to use while a step donates it."""
        page = jax.ShapeDtypeStruct(self._kv_shape, self.kv_dtype, sharding=self._kv_sharding)
        return [(page, page)] * self.model_config.num_layers

    def _readable(self, tree):
        """Results process 0 reads back: replicated when the mesh spans processes, since a
        process can only read the shards on its own devices."""
        if self._channel is None:
            return tree
        return sharding.replicate(tree, self.mesh)

    def follow(self) -> None:
        """On processes other than 0: run process 0's device calls until it releases us."""
        if self._channel is None or jax.process_index() == 0:
            raise RuntimeError("follow: only processes other than 0 of a multi-process run follow")
        while True:
            op, flags, arrays = self._channel.receive()
            if op == multihost.STOP:
                return
            self._run_call(op, tuple(arrays), flags)

    def release_followers(self) -> None:
        """On process 0 of a multi-process run: end the other processes' `follow`."""
        if self._channel is not None:
            self._channel.send(multihost.STOP, (), ())

    def mesh_summary(self) -> str:
        """The device layout and how many bytes of weights and KV cache each device holds."""
        return sharding.describe(
            self.mesh, sharding.device_bytes(self.state), sharding.device_bytes(self.kv)
        )

    # ---- warm-up ------------------------------------------------------------------------------
    def warmup(self, background: bool = False) -> float:
        """Compile every reachable (bucket, pages) shape of both steps, the greedy sampler and the
        greedy multi-step decode of every batch bucket, and the greedy sampler that chains a
        prefill's first run (`_warm_carry_samplers`), several at once on the compile threads,
        and run each step once. Returns the seconds it took.

        `background`: return once the largest decode and prefill shapes are compiled and run
        (padded, they serve any step); the other shapes then compile on the compile threads
        while steps are served, each used from the moment it is ready (`_shape`).
        `compiles_pending` counts what is left; `finish_compiles` waits for it."""
        t0 = time.perf_counter()
        steps = list(self._warmup_steps())
        first, rest = steps, []
        # Processes of a multi-process run compile in step, on the call: all of it up front.
        if background and self._channel is None:
            first = [
                max((st for st in steps if st[0] == op), key=lambda st: st[1])
                for op in (_OP_DECODE, _OP_PREFILL)
            ]
            rest = [st for st in steps if st not in first]
        self._ready = {_OP_DECODE: frozenset(), _OP_PREFILL: frozenset()} if rest else None
        jobs = [self._compiler.submit(self._compile_step, *st) for st in first]
        for job in jobs:
            job.result()
        if not background:
            for op, (b, p), _ in first:
                if op == _OP_DECODE and self.cfg.decode_steps > 1:
                    self._run_compile((b, p, True, False, False)).result()
        for op, key, rows in first:
            self._device(op, self._step_arrays(op, key, rows))
            if op == _OP_DECODE:
                # Padded into the largest bucket, a step samples any number of its rows.
                n = len(rows) if not rest else 1
                for r in (b for b in self._sample_buckets if n <= b <= len(rows)):
                    sub = [dataclasses.replace(row, sample_seq_ids=[]) for row in rows]
                    for row in sub[:r]:
                        row.sample_seq_ids.append(row.seq_id)
                    self._sample(_OP_DECODE, sub, {row.seq_id: RowSpec(0.0) for row in rows})
            else:
                self._warm_prefill_sampler()
        for future in self._warm_carry_samplers():
            if not background:
                future.result()
        jax.block_until_ready(self.kv)
        if rest:
            for op, key, _ in first:
                self._mark_ready(op, key)
            self._warm_left = len(rest)
            self._warm_jobs = [self._compiler.submit(self._warm_in_background, *st) for st in rest]
            for (op, key, _), job in zip(rest, self._warm_jobs, strict=True):
                job.add_done_callback(functools.partial(_log_compile_failure, (op, *key)))
        return time.perf_counter() - t0

    def compiles_pending(self) -> int:
        """Shapes and multi-step variants still compiling in the background."""
        with self._run_compiles_lock:
            jobs = self._warm_jobs + list(self._run_compiles.values())
        return sum(not job.done() for job in jobs)

    def _compile_step(self, op: int, key: tuple[int, int], rows: list[ScheduledSeq]):
        """Compile one warm-up step and return it; a decode step's greedy multi-step run
        compiles after it (it has the step's matmuls, so it reuses the step's GEMM autotuning)."""
        exe = self._compile(op, self._step_arrays(op, key, rows), ())
        if op == _OP_DECODE and self.cfg.decode_steps > 1:
            self._run_compile((*key, True, False, False))
        return exe

    def _warm_in_background(self, op: int, key: tuple[int, int], rows: list[ScheduledSeq]) -> None:
        """Compile a step shape, and for decode the greedy sampler of its logits, then let steps
        use it. The last one to finish ends the background warm-up."""
        try:
            exe = self._compile_step(op, key, rows)
            if op == _OP_DECODE:
                out = exe.out_info[0]
                logits = jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=out.sharding)
                arrays, flags = self._sample_arrays(list(range(key[0])), [RowSpec(0.0)] * key[0])
                self._compile(_OP_SAMPLE, arrays, (_OP_DECODE, *flags), logits)
            self._mark_ready(op, key)
        finally:
            with self._ready_lock:
                self._warm_left -= 1
                if self._warm_left == 0:
                    self._ready = None

    def _mark_ready(self, op: int, key: tuple[int, int]) -> None:
        with self._ready_lock:
            if self._ready is not None:
                self._ready = {**self._ready, op: self._ready[op] | {key}}

    def _step_arrays(self, op: int, key: tuple[int, int], rows: list[ScheduledSeq]):
        if op == _OP_DECODE:
            return self._decode_arrays(rows, *key)
        return self._prefill_arrays(rows, {}, *key)[:-1]

    def _warmup_steps(self):
        """(op, (bucket, pages), rows) of one step of every reachable compiled shape."""
        ps, s_rows = self.cfg.page_size, self.cfg.max_prefill_seqs
        for p in self.page_buckets(is_decode=True):
            for b in self.cfg.decode_buckets:
                yield _OP_DECODE, (b, p), [_dummy_row(i, [0], [0] * p) for i in range(b)]
        for p in self.page_buckets(is_decode=False):
            table = [0] * p
            prev = 0
            for t in self.cfg.prefill_buckets:
                # A prefill of t tokens over rows of at most p pages exists only if some token
                # count in (prev, t] fits in s_rows rows of p * ps tokens.
                n = min(t, s_rows * p * ps)
                if n > prev:
                    sizes = [min(p * ps, n - k) for k in range(0, n, p * ps)]
                    rows = [_dummy_row(i, [0] * m, table) for i, m in enumerate(sizes)]
                    yield _OP_PREFILL, (t, p), rows
                prev = t

    def _warm_prefill_sampler(self) -> None:
        """A prefill step samples anywhere from 1 to max_prefill_seqs rows (more with n > 1
        forks, which compile on first use): compile the greedy sampler for each of those sizes."""
        top = pick(self._sample_buckets, self.cfg.max_prefill_seqs)
        for r in (b for b in self._sample_buckets if b <= top):
            row = _dummy_row(0, [0], [0])
            row = dataclasses.replace(row, sample_seq_ids=list(range(r)))
            self._sample(_OP_PREFILL, [row], {i: RowSpec(0.0) for i in range(r)})

    def _warm_carry_samplers(self) -> list[concurrent.futures.Future]:
        """When prefill steps chain their rows' first run (multi-step runs with asynchronous
        scheduling, `dispatch_step(into_carry=True)`): start compiling the greedy sampler into
        the run carry for every number of rows a prefill that completes only prompts samples,
        on the last prefill's logits; returns the compilations."""
        if self.cfg.decode_steps < 2 or not self.cfg.async_scheduling:
            return []
        top = pick(self._sample_buckets, min(self.cfg.max_prefill_seqs, self.cfg.max_num_seqs))
        futures = []
        for r in (b for b in self._sample_buckets if b <= top):
            arrays, flags = self._sample_arrays(list(range(r)), [RowSpec(0.0)] * r)
            futures.append(self._carry_sampler(arrays, (_OP_PREFILL, *flags)))
        return futures

    @property
    def _sample_buckets(self) -> tuple[int, ...]:
        return self.cfg.decode_buckets + (max(self.cfg.decode_buckets) * 16,)


def _pages_needed(rows: list[ScheduledSeq]) -> int:
    """The longest block table of a step's rows (at least one page)."""
    return max([1, *(len(r.block_table) for r in rows)])


# int32 words: XLA hands a kernel a slice of a buffer as a view into it, and Mosaic GPU kernels
# want their inputs 256-byte aligned.
_PACK_ALIGN = 64


def _slot(table, pos, page_size: int):
    """The cache slot of position `pos` (an int, or an array of them) of a sequence whose pages
    are `table` (a list, or an array when `pos` is one)."""
    return table[pos // page_size] * page_size + pos % page_size


def _pack_host_arrays(fn, device: tuple, host: tuple) -> tuple:
    """`fn(*device, *host)` as a function of the device arguments and one int32 buffer holding
    every numpy array of `host`, and those arguments.

    A call's arguments are device values (params, cache, logits) followed by the step's small
    host arrays (tokens, positions, block tables, sampling parameters...). Passed one by one,
    each is its own transfer: at batch 1 preparing and dispatching a multi-step run cost ~3 ms
    of host time while the device idled (Llama-3.2-1B: 3.1 ms against 10.5 ms of device time).
    Packed, they go over in one transfer and the compiled function slices them back out."""
    leaves, treedef = jax.tree.flatten(host)
    layout = []
    for x in leaves:
        if not isinstance(x, np.ndarray) or (x.dtype.itemsize != 4 and x.dtype != np.bool_):
            raise TypeError(
                f"host argument {type(x).__name__} {getattr(x, 'dtype', '')}: not packable"
            )
        layout.append((x.shape, x.dtype))
    # Each array starts on a 256-byte boundary (`_PACK_ALIGN`).
    words = []
    for x in leaves:
        w = (x.astype(np.int32) if x.dtype == np.bool_ else np.ascontiguousarray(x)).reshape(-1)
        words += [w.view(np.int32), np.zeros(-w.size % _PACK_ALIGN, np.int32)]
    pack = np.concatenate(words) if words else np.zeros(0, np.int32)

    def packed(*device_and_pack):
        *device_args, buf = device_and_pack
        out, off = [], 0
        for shape, dtype in layout:
            n = math.prod(shape)
            piece = buf[off : off + n].reshape(shape)
            if dtype == np.bool_:
                piece = piece != 0
            elif dtype != np.int32:
                piece = jax.lax.bitcast_convert_type(piece, dtype)
            out.append(piece)
            off += n + -n % _PACK_ALIGN
        return fn(*device_args, *jax.tree.unflatten(treedef, out))

    return packed, (*device, pack)


def _log_compile_failure(key: tuple, future: concurrent.futures.Future) -> None:
    """(op, *shape): a background compile that failed; the call compiles again on first use."""
    if future.exception() is not None:
        log.warning("background compile %s failed: %s", key, future.exception())


def _logprob_map(token: int, logprob, top_ids, top_logprobs) -> dict[int, float]:
    """{token: logprob} for the sampled token first, then the top ones not already in."""
    out = {token: float(logprob)}
    for t_id, t_lp in zip(top_ids, top_logprobs, strict=True):
        out.setdefault(int(t_id), float(t_lp))
    return out


def _dummy_row(i: int, tokens: list[int], table: list[int]) -> ScheduledSeq:
    """A warm-up row writing into the reserved page 0."""
    return ScheduledSeq(
        seq_id=i,
        request_id="",
        token_ids=tokens,
        start_pos=0,
        block_table=table,
        sample_seq_ids=[i],
        is_prefill=len(tokens) > 1,
    )
