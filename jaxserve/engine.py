"""The device side of a step: params, the paged KV cache, and the jitted prefill / decode steps.

Owns everything that touches the device. It receives a `StepPlan` (plain data from the scheduler)
plus one `RowSpec` per sampled row, pads the plan to a shape bucket, runs the compiled step with
the KV cache donated (updated in place, never copied), samples on device and returns plain numpy
results. It keeps no per-request state: what a sequence is and when it ends is the scheduler's and
`LLMEngine`'s business.

Compiled shapes come from fixed bucket lists (decode batch, prefill tokens, pages per sequence), so
the set of compilations is small and known; `warmup()` compiles all of them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.sampling import RowSpec, SamplingBatch, sample
from models import CausalLM, KVCache
from pallas_kernels.attention import AttentionMetadata, resolve_backend
from serving.scheduler import ScheduledSeq, StepPlan

log = logging.getLogger(__name__)


def geometric_upto(n: int, start: int = 1, factor: int = 2) -> tuple[int, ...]:
    """start, start*factor, ... below n, then n itself."""
    out, b = [], start
    while b < n:
        out.append(b)
        b *= factor
    out.append(n)
    return tuple(out)


def enable_compilation_cache(directory: str | None) -> None:
    """Turn on JAX's persistent compilation cache so a restart skips recompiling the buckets."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
    max_prefill_seqs: int = 8
    max_model_len: int = 4096
    attention_backend: str = "auto"
    kv_cache_cpu_bytes: int = 1 << 30  # cache size on CPU, which reports no free memory
    # Compile-shape buckets; empty = derived: powers of two on accelerators, powers of four on
    # CPU (where each compilation costs more than the padding it saves).
    decode_buckets: tuple[int, ...] = ()
    prefill_buckets: tuple[int, ...] = ()
    page_buckets: tuple[int, ...] = ()
    compilation_cache_dir: str | None = field(
        default_factory=lambda: os.environ.get(
            "JAXSERVE_COMPILATION_CACHE",
            os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla"),
        )
    )

    def validate(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size: must be a power of two, got {self.page_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction: must be in (0, 1], got {self.kv_memory_fraction}")


@dataclass
class StepResult:
    """Host-side results of one step, keyed by the sampled seq id."""

    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, dict[int, float]] = field(default_factory=dict)
    # request_id -> list of (position, {token: logprob}) for prompt positions computed this step
    prompt_logprobs: dict[str, list[tuple[int, dict[int, float]]]] = field(default_factory=dict)


def _forward(graphdef, state, kv, tokens, positions, meta):
    model: CausalLM = nnx.merge(graphdef, state)
    return model, *model(tokens, positions, kv, meta)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_step(graphdef, state, kv, tokens, positions, meta):
    model, h, kv = _forward(graphdef, state, kv, tokens, positions, meta)
    return model.logits(h), kv


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill_step(graphdef, state, kv, tokens, positions, meta, last_idx):
    model, h, kv = _forward(graphdef, state, kv, tokens, positions, meta)
    return model.logits(h[last_idx]), kv


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill_step_with_prompt_logprobs(graphdef, state, kv, tokens, positions, meta, last_idx, targets):
    """Like `_prefill_step`, plus the logprob of `targets[t]` (the next prompt token) at every
    position and the top-k there — computed on device so [T, vocab] never leaves it."""
    model, h, kv = _forward(graphdef, state, kv, tokens, positions, meta)
    lp = jax.nn.log_softmax(model.logits(h), axis=-1)
    target_lp = jnp.take_along_axis(lp, targets[:, None], 1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, 20)
    return model.logits(h[last_idx]), kv, target_lp, top_ids, top_lp


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_pages(kv, src, dst):
    return [(k.at[:, dst].set(k[:, src]), v.at[:, dst].set(v[:, src])) for k, v in kv]


class Engine:
    """Params + KV cache on device and the compiled step functions."""

    def __init__(self, model: CausalLM, cfg: EngineConfig, *, kv_dtype=None):
        cfg.validate()
        self.model_config: ModelConfig = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.embed_tokens.dtype
        self.kv_dtype = kv_dtype or self.dtype
        self.backend = resolve_backend(cfg.attention_backend)
        max_pages_per_seq = math.ceil(cfg.max_model_len / cfg.page_size)
        num_pages = cfg.num_pages or self._pages_from_memory(cfg)
        if num_pages < 2:
            raise ValueError(f"num_pages: need at least 2 (page 0 is reserved), got {num_pages}")
        enable_compilation_cache(cfg.compilation_cache_dir)
        factor = 4 if jax.devices()[0].platform == "cpu" else 2
        page_buckets = cfg.page_buckets or (
            geometric_upto(max_pages_per_seq, 4, factor)
            if self.backend == "reference"
            else (max_pages_per_seq,)
        )
        self.cfg = cfg = EngineConfig(
            **{
                **cfg.__dict__,
                "num_pages": num_pages,
                "decode_buckets": cfg.decode_buckets or geometric_upto(cfg.max_num_seqs, 1, factor),
                "prefill_buckets": cfg.prefill_buckets
                or geometric_upto(cfg.max_num_batched_tokens, 16, factor),
                "page_buckets": page_buckets,
            }
        )
        shape = (self.model_config.num_kv_heads, num_pages, cfg.page_size, self.model_config.head_dim)
        self.kv: KVCache = [
            (jnp.zeros(shape, self.kv_dtype), jnp.zeros(shape, self.kv_dtype))
            for _ in range(self.model_config.num_layers)
        ]
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens (%.2f GiB, %s), attention backend %s",
            num_pages - 1,
            cfg.page_size,
            self.capacity_tokens,
            self.kv_bytes / 2**30,
            jnp.dtype(self.kv_dtype).name,
            self.backend,
        )

    # ---- sizing -------------------------------------------------------------------------------
    def _bytes_per_page(self, page_size: int) -> int:
        m = self.model_config
        return 2 * m.num_layers * m.num_kv_heads * page_size * m.head_dim * jnp.dtype(self.kv_dtype).itemsize

    def _pages_from_memory(self, cfg: EngineConfig) -> int:
        stats = jax.devices()[0].memory_stats() or {}
        limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
        budget = (limit - used) * cfg.kv_memory_fraction if limit else cfg.kv_cache_cpu_bytes
        return max(2, int(budget // self._bytes_per_page(cfg.page_size)))

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
    def _tables(self, rows: list[ScheduledSeq], num_rows: int) -> tuple[np.ndarray, int]:
        need = max((len(r.block_table) for r in rows), default=1)
        p = pick(self.cfg.page_buckets, max(need, 1))
        tables = np.zeros((num_rows, p), np.int32)
        for i, r in enumerate(rows):
            tables[i, : len(r.block_table)] = r.block_table
        return tables, p

    def _slots(self, row: ScheduledSeq) -> np.ndarray:
        pos = np.arange(row.start_pos, row.start_pos + len(row.token_ids))
        table = np.asarray(row.block_table, np.int64)
        return (table[pos // self.cfg.page_size] * self.cfg.page_size + pos % self.cfg.page_size).astype(
            np.int32
        )

    def _meta(self, slots, tables, seq_lens, cu, is_decode: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=jnp.asarray(slots),
            block_tables=jnp.asarray(tables),
            seq_lens=jnp.asarray(seq_lens),
            cu_q_lens=jnp.asarray(cu),
            is_decode=is_decode,
            backend=self.backend,
        )

    def _run_decode(self, rows: list[ScheduledSeq]) -> jax.Array:
        b = pick(self.cfg.decode_buckets, len(rows))
        tokens = np.zeros(b, np.int32)
        positions = np.zeros(b, np.int32)
        slots = np.zeros(b, np.int32)  # padding rows write into page 0
        seq_lens = np.zeros(b, np.int32)
        for i, r in enumerate(rows):
            tokens[i] = r.token_ids[0]
            positions[i] = r.start_pos
            slots[i] = self._slots(r)[0]
            seq_lens[i] = r.start_pos + 1
        tables, _ = self._tables(rows, b)
        meta = self._meta(slots, tables, seq_lens, np.arange(b + 1, dtype=np.int32), True)
        logits, self.kv = _decode_step(self.graphdef, self.state, self.kv, tokens, positions, meta)
        return logits

    def _run_prefill(
        self, rows: list[ScheduledSeq], prompt_targets: dict[int, np.ndarray]
    ) -> tuple[jax.Array, dict | None]:
        n_tok = sum(len(r.token_ids) for r in rows)
        t = pick(self.cfg.prefill_buckets, n_tok)
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
        tables, _ = self._tables(rows, s)
        meta = self._meta(slots, tables, seq_lens, cu, False)
        args = (self.graphdef, self.state, self.kv, tokens, positions, meta, last_idx)
        if prompt_targets:
            logits, self.kv, tlp, top_ids, top_lp = _prefill_step_with_prompt_logprobs(*args, targets)
            return logits, {"target_lp": tlp, "top_ids": top_ids, "top_lp": top_lp}
        logits, self.kv = _prefill_step(*args)
        return logits, None

    # ---- the step -----------------------------------------------------------------------------
    def execute(
        self,
        plan: StepPlan,
        specs: dict[int, RowSpec],
        prompt_targets: dict[int, np.ndarray] | None = None,
    ) -> StepResult:
        """Run one scheduled step. `specs[seq_id]` describes each sampled row; `prompt_targets`
        maps a prefill row's seq id to the next-token ids of its chunk when prompt logprobs are
        wanted (row order in the chunk)."""
        prompt_targets = prompt_targets or {}
        if plan.page_copies:
            self._copy(plan.page_copies)
        result = StepResult()
        if len(plan.prefill) > self.cfg.max_prefill_seqs:
            raise ValueError(f"plan has {len(plan.prefill)} prefill rows > max_prefill_seqs")
        pending = []
        if plan.decode:
            logits = self._run_decode(plan.decode)
            pending.append((logits, plan.decode))
        prompt_out = None
        if plan.prefill:
            logits, prompt_out = self._run_prefill(plan.prefill, prompt_targets)
            pending.append((logits, plan.prefill))
        samples = [self._sample(logits, rows, specs) for logits, rows in pending]
        for rows_out in samples:
            for sid, (tok, lp_map) in rows_out.items():
                result.tokens[sid] = tok
                if lp_map is not None:
                    result.logprobs[sid] = lp_map
        if prompt_out is not None:
            self._collect_prompt_logprobs(plan.prefill, prompt_targets, prompt_out, result)
        return result

    def _sample(self, logits: jax.Array, rows: list[ScheduledSeq], specs: dict[int, RowSpec]):
        src, sids = [], []
        for i, r in enumerate(rows):
            for sid in r.sample_seq_ids:
                src.append(i)
                sids.append(sid)
        if not sids:
            return {}
        r = pick(self.cfg.decode_buckets + (max(self.cfg.decode_buckets) * 16,), len(sids))
        row_specs = [specs[s] for s in sids]
        batch, flags = SamplingBatch.build(row_specs, r)
        src_arr = np.zeros(r, np.int32)
        src_arr[: len(src)] = src
        out = jax.device_get(sample(logits, src_arr, batch, **flags))
        res = {}
        for i, sid in enumerate(sids):
            tok = int(out["tokens"][i])
            lp_map = None
            if row_specs[i].want_logprobs:
                lp_map = {tok: float(out["logprob"][i])}
                for t_id, t_lp in zip(out["top_ids"][i], out["top_logprobs"][i], strict=True):
                    lp_map.setdefault(int(t_id), float(t_lp))
            res[sid] = (tok, lp_map)
        return res

    def _collect_prompt_logprobs(self, rows, prompt_targets, out, result: StepResult) -> None:
        out = jax.device_get(out)
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
                    for t_id, t_lp in zip(out["top_ids"][off + j], out["top_lp"][off + j], strict=True):
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
        self.kv = _copy_pages(self.kv, src, dst)

    # ---- warm-up ------------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compile every reachable (bucket, pages) shape of both steps and the greedy sampler.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        ps, s_rows = self.cfg.page_size, self.cfg.max_prefill_seqs
        for p in self.cfg.page_buckets:
            table = [0] * p
            for b in self.cfg.decode_buckets:
                rows = [_dummy_row(i, [0], table) for i in range(b)]
                self._sample(self._run_decode(rows), rows, {i: RowSpec(0.0) for i in range(b)})
            prev = 0
            for t in self.cfg.prefill_buckets:
                # A prefill of t tokens over rows of at most p pages exists only if some token
                # count in (prev, t] fits in s_rows rows of p * ps tokens.
                n = min(t, s_rows * p * ps)
                if n > prev:
                    sizes = [min(p * ps, n - k) for k in range(0, n, p * ps)]
                    rows = [_dummy_row(i, [0] * m, table) for i, m in enumerate(sizes)]
                    logits, _ = self._run_prefill(rows, {})
                    self._sample(logits, rows, {i: RowSpec(0.0) for i in range(len(rows))})
                prev = t
        jax.block_until_ready(self.kv)
        return time.perf_counter() - t0


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
