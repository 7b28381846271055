"""On-device sampling: one jitted function turns a batch of logits rows into tokens and logprobs.

Owns the per-row sampling math (penalties, banned ids, temperature, top-k, top-p, min-p, seeded
categorical draws) and the logprobs that come back with each token. Rows are independent: a row's
token depends only on its logits, its parameters and its key (seed, sample index, step), never on
what else is in the batch. `SamplingBatch.build` packs host-side parameters into padded arrays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

NUM_TOP_LOGPROBS = 20  # upper bound of SamplingParams.logprobs; top-k logprobs are this wide


@dataclass(frozen=True)
class RowSpec:
    """What the sampler needs for one sampled row (plain host values)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0  # uint32 stream id of the request sample
    step: int = 0  # index of the token being drawn within its sample
    prompt_ids: tuple[int, ...] = ()  # only needed with a repetition penalty
    output_ids: tuple[int, ...] = ()  # only needed with penalties
    banned_ids: tuple[int, ...] = ()  # eos/stop ids masked while below min_tokens
    want_logprobs: bool = False

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _bucket(n: int, minimum: int = 0) -> int:
    if n <= minimum:
        return minimum
    return 1 << (n - 1).bit_length()


@jax.tree_util.register_dataclass
@dataclass
class SamplingBatch:
    """Padded per-row arrays. R rows; H history slots; N banned slots (0 when unused)."""

    temperature: jax.Array  # [R] f32
    top_k: jax.Array  # [R] i32, 0 = off
    top_p: jax.Array  # [R] f32
    min_p: jax.Array  # [R] f32
    repetition_penalty: jax.Array  # [R] f32
    presence_penalty: jax.Array  # [R] f32
    frequency_penalty: jax.Array  # [R] f32
    seed: jax.Array  # [R] u32
    step: jax.Array  # [R] u32
    hist_ids: jax.Array  # [R, H] i32, -1 = padding
    hist_is_output: jax.Array  # [R, H] bool
    banned_ids: jax.Array  # [R, N] i32, -1 = padding

    @staticmethod
    def build(rows: list[RowSpec], num_rows: int) -> tuple[SamplingBatch, dict]:
        """Pack rows (padded to num_rows) and the static flags the sampler is compiled for."""
        r = num_rows
        f = lambda name, dt: np.array(
            [getattr(x, name) for x in rows] + [getattr(RowSpec(), name)] * (r - len(rows)), dt
        )
        hist_len = (
            max(
                (len(x.prompt_ids) * (x.repetition_penalty != 1.0) + len(x.output_ids))
                for x in rows
                if x.uses_penalties
            )
            if any(x.uses_penalties for x in rows)
            else 0
        )
        h = _bucket(hist_len, 0) if hist_len else 0
        hist = np.full((r, h), -1, np.int32)
        is_out = np.zeros((r, h), bool)
        for i, x in enumerate(rows):
            if not x.uses_penalties:
                continue
            prompt = x.prompt_ids if x.repetition_penalty != 1.0 else ()
            ids = list(prompt) + list(x.output_ids)
            hist[i, : len(ids)] = ids
            is_out[i, len(prompt) : len(ids)] = True
        n = _bucket(max((len(x.banned_ids) for x in rows), default=0), 0)
        banned = np.full((r, n), -1, np.int32)
        for i, x in enumerate(rows):
            banned[i, : len(x.banned_ids)] = x.banned_ids
        batch = SamplingBatch(
            temperature=f("temperature", np.float32),
            top_k=f("top_k", np.int32),
            top_p=f("top_p", np.float32),
            min_p=f("min_p", np.float32),
            repetition_penalty=f("repetition_penalty", np.float32),
            presence_penalty=f("presence_penalty", np.float32),
            frequency_penalty=f("frequency_penalty", np.float32),
            seed=f("seed", np.uint32),
            step=f("step", np.uint32),
            hist_ids=hist,
            hist_is_output=is_out,
            banned_ids=banned,
        )
        return batch, sampler_flags(rows)


def sampler_flags(rows: list[RowSpec]) -> dict[str, bool]:
    """The static flags `sample` is compiled for, for a batch of these rows."""
    return dict(
        all_greedy=all(x.temperature == 0.0 for x in rows),
        need_sort=any(x.top_k > 0 or x.top_p < 1.0 for x in rows),
        need_logprobs=any(x.want_logprobs for x in rows),
    )


def apply_penalties(logits: jax.Array, b: SamplingBatch) -> jax.Array:
    """Repetition (prompt + output, divide positive / multiply negative logits), presence and
    frequency (output only) penalties, then banned ids to -inf."""
    r, v = logits.shape
    if b.hist_ids.shape[1]:
        valid = b.hist_ids >= 0
        ids = jnp.where(valid, b.hist_ids, 0)
        rows = jnp.arange(r)[:, None]
        seen = jnp.zeros((r, v), bool).at[rows, ids].max(valid)
        counts = (
            jnp.zeros((r, v), jnp.float32)
            .at[rows, ids]
            .add((valid & b.hist_is_output).astype(jnp.float32))
        )
        rep = b.repetition_penalty[:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - b.frequency_penalty[:, None] * counts
        logits = logits - b.presence_penalty[:, None] * (counts > 0)
    if b.banned_ids.shape[1]:
        valid = b.banned_ids >= 0
        ids = jnp.where(valid, b.banned_ids, 0)
        ban = jnp.zeros((r, v), bool).at[jnp.arange(r)[:, None], ids].max(valid)
        logits = jnp.where(ban, -jnp.inf, logits)
    return logits


def _filter(logits: jax.Array, b: SamplingBatch, need_sort: bool) -> jax.Array:
    """Temperature-scaled logits with top-k, top-p and min-p masked to -inf."""
    v = logits.shape[-1]
    temp = jnp.where(b.temperature > 0, b.temperature, 1.0)[:, None]
    x = logits / temp
    if need_sort:
        order = jnp.argsort(-x, axis=-1)
        xs = jnp.take_along_axis(x, order, axis=-1)
        rank = jnp.arange(v)[None, :]
        k = jnp.where(b.top_k > 0, b.top_k, v)[:, None]
        keep = rank < k
        probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = keep & (before < b.top_p[:, None])
        xs = jnp.where(keep, xs, -jnp.inf)
        x = jnp.full_like(x, -jnp.inf).at[jnp.arange(x.shape[0])[:, None], order].set(xs)
    probs = jax.nn.softmax(x, axis=-1)
    pmax = jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < b.min_p[:, None] * pmax, -jnp.inf, x)


@functools.partial(jax.jit, static_argnames=("all_greedy", "need_sort", "need_logprobs"))
def sample(
    logits: jax.Array,
    src_rows: jax.Array,
    b: SamplingBatch,
    *,
    all_greedy: bool,
    need_sort: bool,
    need_logprobs: bool,
) -> dict[str, jax.Array]:
    """logits: [N, V] f32; src_rows: [R] which logits row each sampled row reads.

    Returns tokens [R] and, when need_logprobs, the chosen token's logprob [R] (raw model
    log-softmax) and the top NUM_TOP_LOGPROBS ids/logprobs [R, K]. (Without them no pass over
    the vocabulary besides the argmax: at batch 1 each is a kernel launch per token.)
    """
    raw = logits[src_rows]
    x = apply_penalties(raw, b)
    greedy_tok = jnp.argmax(x, axis=-1)
    if all_greedy:
        tok = greedy_tok
    else:
        filtered = _filter(x, b, need_sort)

        def draw(seed: jax.Array, step: jax.Array, row: jax.Array) -> jax.Array:
            key = jax.random.fold_in(jax.random.key(seed), step)
            return jax.random.categorical(key, row)

        drawn = jax.vmap(draw)(b.seed, b.step, filtered)
        tok = jnp.where(b.temperature > 0, drawn, greedy_tok)
    out = {"tokens": tok.astype(jnp.int32)}
    if need_logprobs:
        lp = jax.nn.log_softmax(raw, axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, NUM_TOP_LOGPROBS)
        out |= {
            "logprob": jnp.take_along_axis(lp, tok[:, None], 1)[:, 0],
            "top_ids": top_ids.astype(jnp.int32),
            "top_logprobs": top_lp,
        }
    return out
