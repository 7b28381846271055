"""`LLMEngine`: the request lifecycle around the scheduler and the device engine.

Owns per-request host state: prompt ids, sampling parameters, the n samples' tokens, incremental
detokenizers and stop strings, logprobs, metrics, and the output deltas handed back from `step()`.
Each `step()` asks the scheduler for a plan, runs it on the `Engine`, feeds sampled tokens back to the
scheduler and turns them into `RequestOutput` deltas. Not thread-safe: one thread drives it (the
offline `LLM` loop or the server's engine loop).

Asynchronous scheduling (`EngineConfig.async_scheduling`): while every sequence keeps decoding in
multi-step runs, a step dispatches the next run before it reads back the one in flight, so the
device computes while the host applies tokens, streams text and plans. Likewise a step that
completes the prompt of every running sequence dispatches their first run before it reads back
their first tokens (the run is chained onto the prefill). A sequence that stops (a stop token or
string) computes one run past its end, which is dropped; a request that arrives meanwhile is
admitted one run later. And while single steps compute, a step of prompt tokens alone (the rest
of a chunked prompt, then waiting prompts: nothing that depends on their samples) is dispatched
before they are read back (`Scheduler.schedule_prefill_ahead`), so that the device computes it
while the host applies their tokens and plans the next step; it is read back one step later.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import models
from jaxserve import compile_cache, sharding
from jaxserve.beam_search import BeamSearch
from jaxserve.engine import Engine, EngineConfig, PendingRun, PendingStep
from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.sampling import RowSpec
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import Tokenizer
from models import CausalLM
from serving.detokenizer import IncrementalDetokenizer
from serving.scheduler import Scheduler, SeqUpdate, StepPlan

log = logging.getLogger(__name__)


@dataclass
class _Sample:
    index: int
    detok: IncrementalDetokenizer | None  # None: token ids only
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Not yet returned to the caller:
    new_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    reported_finish: bool = False
    cumulative_logprob: float | None = None  # beam search only


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    samples: list[_Sample]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprobs_sent: bool = False
    beam: BeamSearch | None = None  # set for use_beam_search requests

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class LLMEngine:
    """Scheduler + device engine + tokenizer, driven one `step()` at a time."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        *,
        model_name: str = "",
        seed: int = 0,
        mesh: Mesh | None = None,
    ):
        self.model_config = model.cfg
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.engine = Engine(model, config, mesh=mesh)
        cfg = self.engine.cfg
        self.config = cfg
        self.max_model_len = cfg.max_model_len
        self.scheduler = Scheduler(
            num_pages=cfg.num_pages,
            page_size=cfg.page_size,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.max_model_len,
            max_prefill_seqs=cfg.max_prefill_seqs,
            enable_prefix_caching=cfg.enable_prefix_caching,
        )
        self._rng = np.random.default_rng(seed)
        self._requests: dict[str, _Request] = {}
        self._seq_index: dict[int, tuple[str, int]] = {}  # seq id -> (request id, sample index)
        self._aborted: list[_Request] = []
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.decode_runs_total = 0  # multi-step decode calls
        # A run dispatched and not yet read back, with the sampling kinds it was compiled for.
        self._inflight: tuple[PendingRun, list[RowSpec]] | None = None
        # A step of prompts admitted ahead (`Scheduler.schedule_prefill_ahead`), dispatched and
        # not yet read back.
        self._ahead: tuple[StepPlan, PendingStep] | None = None
        _freeze_heap()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        dtype: str | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_prefill_seqs: int = 32,
        max_model_len: int | None = None,
        kv_memory_fraction: float = 0.85,
        attention_backend: str = "auto",
        enable_prefix_caching: bool = True,
        decode_steps: int = 0,
        async_scheduling: bool = True,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        expert_parallel_size: int = 1,
    ) -> LLMEngine:
        """Load a converted model directory (or an HF dir / .gguf, converted on the fly; None is
        the embedded default model) and size the KV cache.

        `tensor_parallel_size` x `expert_parallel_size` devices share the model (see
        `jaxserve.sharding`): each restores only its own shards of the weights from disk."""
        from jaxserve.checkpoint import load_model
        from jaxserve.config import ModelConfig
        from jaxserve.default_model import resolve_model

        path = resolve_model(None if model is None else str(model))
        jdtype = resolve_dtype(dtype)
        compile_cache.enable(compile_cache.default_directory())  # loading compiles too
        mesh, shardings = None, None
        if tensor_parallel_size * expert_parallel_size > 1 or jax.process_count() > 1:
            mesh = sharding.make_mesh(tensor_parallel_size, expert_parallel_size)
            shardings = models.param_shardings(ModelConfig.from_dir(path), jdtype, mesh)
        lm, mcfg = load_model(path, dtype=jdtype, shardings=shardings)
        tokenizer = Tokenizer.from_dir(path)
        max_len = max_model_len or mcfg.max_position_embeddings
        if max_len > mcfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len: {max_len} exceeds the model's max_position_embeddings "
                f"({mcfg.max_position_embeddings})"
            )
        config = EngineConfig(
            page_size=page_size,
            num_pages=num_pages or 0,
            kv_memory_fraction=kv_memory_fraction,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
            max_prefill_seqs=max_prefill_seqs,
            max_model_len=max_len,
            attention_backend=attention_backend,
            enable_prefix_caching=enable_prefix_caching,
            decode_steps=decode_steps,
            async_scheduling=async_scheduling,
        )
        return cls(lm, tokenizer, config, model_name=_model_name(path), seed=seed, mesh=mesh)

    @classmethod
    def from_cli_args(cls, args) -> LLMEngine:
        """Build from `jaxserve serve`'s engine options (`serving.cli.engine_args`: the model
        and one attribute per engine option, named as `from_pretrained`'s keywords); options
        left unset keep their defaults."""
        given = {k: v for k, v in vars(args).items() if k != "model" and v is not None}
        return cls.from_pretrained(args.model, **given)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request. Raises ValueError("<field>: ...") for anything it cannot serve."""
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this engine has no tokenizer; send token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(
                f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {vocab})"
            )
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})"
            )
        eos = self._eos_ids()
        detokenize = params.detokenize and self.tokenizer is not None
        width = params.beam_width if params.use_beam_search else 0
        if width > self.scheduler.max_num_seqs:
            raise ValueError(
                f"{'n' if params.best_of is None else 'best_of'}: beam width {width} exceeds "
                f"max_num_seqs ({self.scheduler.max_num_seqs})"
            )
        seq_id = self.scheduler.add_request(
            request_id,
            ids,
            n=1 if width else params.n,
            max_tokens=max_tokens,
            min_tokens=params.min_tokens,
            eos_token_ids=eos,
            stop_token_ids=params.stop_token_ids,
            ignore_eos=params.ignore_eos,
            beam_width=width,
            # Cached positions are never computed, so they would have no prompt logprobs.
            skip_prefix_cache=params.prompt_logprobs is not None,
        )
        beam = None
        if width:
            beam = BeamSearch(
                seq_id,
                prompt_len=len(ids),
                width=width,
                n=params.n,
                max_tokens=max_tokens,
                max_model_len=self.max_model_len,
                length_penalty=params.length_penalty,
                early_stopping=params.early_stopping,
                eos_token_ids=frozenset(() if params.ignore_eos else eos),
                stop_token_ids=frozenset(params.stop_token_ids),
                keep_logprobs=params.logprobs is not None,
            )
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63))
        samples = [
            _Sample(
                index=i,
                detok=IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
                if detokenize
                else None,
            )
            for i in range(params.n)
        ]
        self._requests[request_id] = _Request(
            request_id=request_id,
            prompt=text,
            prompt_ids=ids,
            params=params,
            seed=seed,
            samples=samples,
            metrics=RequestMetrics(arrival_time=arrival_time or time.time()),
            prompt_logprobs=[None] + [None] * (len(ids) - 1)
            if params.prompt_logprobs is not None
            else None,
            beam=beam,
        )
        self.prompt_tokens_total += len(ids)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort_request(request_id)
        for s in req.samples:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        self._aborted.append(req)

    def has_unfinished_requests(self) -> bool:
        return (
            bool(self._requests)
            or bool(self._aborted)
            or self._inflight is not None
            or self._ahead is not None
        )

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the new tokens/text of every request that advanced."""
        outputs = [self._output(r) for r in self._aborted]
        self._aborted = []
        try:
            return outputs + self._step()
        except Exception:
            # Nothing in flight is read back: the scheduler forgets what it planned (the
            # caller fails and aborts the requests).
            self._inflight = self._ahead = None
            self.scheduler.cancel_pending()
            raise

    def _step(self) -> list[RequestOutput]:
        if self._inflight is None and self._ahead is None:
            plan, kinds = self._schedule_run()
            if plan is not None:
                self._inflight = self._dispatch_run(plan, kinds, 0)
        if self._inflight is not None:
            (current, kinds), self._inflight = self._inflight, None
            if self.engine.cfg.async_scheduling:
                self._inflight = self._dispatch_next_run(current.plan, kinds)
            return self._collect_run(current)
        plan = self.scheduler.schedule()
        step = None if plan.is_empty else self._dispatch_step(plan)
        ahead = None
        if self.engine.cfg.async_scheduling and self._inflight is None:
            # Prompts admitted now compute while the host reads back and applies the steps in
            # flight and plans the next one.
            ahead_plan = self.scheduler.schedule_prefill_ahead()
            if ahead_plan is not None:
                ahead = self._dispatch_step(ahead_plan)
        touched: dict[str, _Request] = {}
        for done in (self._ahead, step):
            if done is not None:
                touched.update(self._collect_step(*done))
        self._ahead = ahead
        return self._flush(touched.values())

    def _dispatch_step(self, plan: StepPlan) -> tuple[StepPlan, PendingStep]:
        """Starts a single step (and, when it completes every running prompt, their first run,
        chained onto it: `_chain_kinds`)."""
        now = time.time()
        specs, targets = self._row_specs(plan)
        for row in (*plan.decode, *plan.prefill):
            req = self._requests[row.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.num_cached_tokens = self.scheduler.num_cached_tokens(row.request_id)
        kinds = self._chain_kinds(plan, targets)
        pending = self.engine.dispatch_step(plan, specs, targets, into_carry=kinds is not None)
        if pending.in_carry:
            # The rows' first run computes while the host reads their first tokens back and
            # applies them; the next step collects it.
            self._inflight = self._dispatch_next_run(plan, kinds)
        return plan, pending

    def _collect_step(self, plan: StepPlan, pending: PendingStep) -> dict[str, _Request]:
        """Reads a dispatched single step back and applies its tokens; returns the requests
        that advanced, by id."""
        result = self.engine.collect_step(pending)
        updates = self.scheduler.update(plan, result.tokens)
        for rid, entries in result.prompt_logprobs.items():
            req = self._requests.get(rid)
            if req is not None and req.prompt_logprobs is not None:
                for pos, d in entries:
                    if pos < len(req.prompt_ids):
                        req.prompt_logprobs[pos] = d
        touched = self._apply_updates(updates, [result.logprobs.get(u.seq_id) for u in updates])
        for req in self._advance_beams(plan, result.logprobs):
            touched[req.request_id] = req
        return touched

    def _dispatch_run(
        self, plan: StepPlan, kinds: list[RowSpec], ahead: int
    ) -> tuple[PendingRun, list[RowSpec]]:
        specs, _ = self._row_specs(plan, ahead)
        self.decode_runs_total += 1
        return self.engine.dispatch_run(plan, specs, kinds), kinds

    def _dispatch_next_run(
        self, prev: StepPlan, kinds: list[RowSpec]
    ) -> tuple[PendingRun, list[RowSpec]] | None:
        """Dispatches the run after `prev` (a run, or a step completing prompts, in flight) if
        the scheduler can plan it before `prev`'s tokens are known
        (`Scheduler.schedule_next_run`)."""
        steps = self.engine.cfg.decode_steps
        plan = self.scheduler.schedule_next_run(
            steps, lambda rows, context: self.engine.decode_run_ready(rows, context, kinds)
        )
        return None if plan is None else self._dispatch_run(plan, kinds, prev.num_steps)

    def _collect_run(self, pending: PendingRun) -> list[RequestOutput]:
        run = self.engine.collect_run(pending)
        updates = self.scheduler.update_run(pending.plan, run.tokens)
        per_seq = {sid: iter(lps) for sid, lps in run.logprobs.items()}
        logprobs = [next(per_seq[u.seq_id]) if u.seq_id in per_seq else None for u in updates]
        return self._flush(self._apply_updates(updates, logprobs).values())

    def _schedule_run(self) -> tuple[StepPlan | None, list[RowSpec]]:
        """A multi-step decode plan when every request allows one (`_run_kinds`) and the engine
        has the run compiled for requests sampled like these (returned with it); else None."""
        if self.engine.cfg.decode_steps < 2 or not self._requests:
            return None, []
        kinds: list[RowSpec] = []

        def ready(rows: int, context: int) -> bool:
            # Asked only once the scheduler's own conditions hold: the per-request walk stays
            # off the steps that could never be runs.
            found = self._run_kinds()
            if found is None:
                return False
            kinds.extend(found)
            return self.engine.decode_run_ready(rows, context, kinds)

        plan = self.scheduler.schedule_decode_run(self.engine.cfg.decode_steps, ready)
        return plan, kinds

    def _chain_kinds(self, plan: StepPlan, targets: dict[int, np.ndarray]) -> list[RowSpec] | None:
        """The sampling kinds of a first run to chain onto step `plan` (`_step`), when
        asynchronous scheduling runs ahead and the step only completes prompts, each sampling
        one sequence, with no prompt logprobs wanted, no step of prompts admitted ahead is in
        flight or is `plan` itself (its samples are read back on their own), and every request
        allows a run once these have their first token; else None. Whether the rows are all that
        runs, have tokens to go, and the pages and compiled variants allow it is the scheduler's
        and the engine's to say."""
        cfg = self.engine.cfg
        if (
            cfg.decode_steps < 2
            or not cfg.async_scheduling
            or self._ahead is not None
            or plan.ahead
            or plan.decode
            or targets
            or any(row.sample_seq_ids != [row.seq_id] for row in plan.prefill)
        ):
            return None
        return self._run_kinds({row.request_id for row in plan.prefill})

    def _run_kinds(self, sampling: Container[str] = ()) -> list[RowSpec] | None:
        """Each request's sampling kind, for a multi-step run over them all, or None when one
        of them rules runs out: beam search, penalties, or `min_tokens` still masking stop ids
        (these change the sampling from token to token). The requests in `sampling` count the
        token they are sampling now."""
        kinds = []
        for req in self._requests.values():
            p = req.params
            extra = req.request_id in sampling
            if (
                p.use_beam_search
                or p.uses_penalties
                or any(len(s.token_ids) + extra < p.min_tokens for s in req.samples)
            ):
                return None
            kinds.append(
                RowSpec(
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    want_logprobs=p.logprobs is not None,
                )
            )
        return kinds

    def _apply_updates(
        self, updates: list[SeqUpdate], logprobs: list[dict[int, float] | None]
    ) -> dict[str, _Request]:
        """Apply sampled tokens in order (`logprobs[i]` goes with `updates[i]`); returns the
        requests that advanced, by id."""
        touched: dict[str, _Request] = {}
        for u, lp in zip(updates, logprobs, strict=True):
            if (req := self._apply_update(u, lp)) is not None:
                touched[u.request_id] = req
        return touched

    def _apply_update(self, u: SeqUpdate, logprobs: dict[int, float] | None) -> _Request | None:
        """Apply one sampled token to its sample: text, stop strings, finish. Returns the
        request, or None when the sample had already finished (a multi-step run's tokens after
        a stop string)."""
        req = self._requests.get(u.request_id)
        s = None if req is None else req.samples[u.index]
        if s is None or s.finish_reason is not None:
            return None
        self._seq_index[u.seq_id] = (u.request_id, u.index)
        s.token_ids.append(u.token_id)
        s.new_ids.append(u.token_id)
        self.generation_tokens_total += 1
        if logprobs is not None:
            s.new_logprobs.append(logprobs)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.time()
        delta = s.detok.add([u.token_id]) if s.detok is not None else None
        if delta is not None:
            s.new_text += delta.text
        if delta is not None and delta.stopped:
            s.finish_reason, s.stop_reason = "stop", delta.stop_reason
            # In a multi-step run the scheduler may have ended it at a later token already.
            if not u.finished and self.scheduler.is_live(u.seq_id):
                self.scheduler.finish_seq(u.seq_id, "stop", delta.stop_reason)
        elif u.finished:
            s.finish_reason, s.stop_reason = u.finish_reason, u.stop_reason
            if s.detok is not None:
                tail = s.detok.flush()
                s.new_text += tail.text
                if tail.stopped:  # held-back text completed a stop string
                    s.finish_reason, s.stop_reason = "stop", tail.stop_reason
        if s.finish_reason is not None:
            self._seq_index.pop(u.seq_id, None)
        return req

    def _flush(self, requests) -> list[RequestOutput]:
        """The output deltas of the requests a step advanced; finished ones are let go."""
        outputs = []
        for req in requests:
            outputs.append(self._output(req))
            if req.finished:
                del self._requests[req.request_id]
        return outputs

    def _advance_beams(
        self, plan: StepPlan, logprobs: dict[int, dict[int, float]]
    ) -> list[_Request]:
        """Hands each sampled beam's logprobs to its search, runs the rounds that are complete,
        and fills in the samples of the searches that finished (returned)."""
        searches: dict[str, _Request] = {}
        for row in (*plan.decode, *plan.prefill):
            req = self._requests.get(row.request_id)
            if req is not None and req.beam is not None:
                for sid in row.sample_seq_ids:
                    req.beam.add_logprobs(sid, logprobs[sid])
                searches[req.request_id] = req
        done = []
        for req in searches.values():
            if req.beam.ready:
                req.beam.advance(self.scheduler)
            if not req.beam.done:
                continue
            # A beam search streams nothing: its first tokens are its whole output.
            req.metrics.first_token_time = time.time()
            for s, hyp in zip(req.samples, req.beam.best(), strict=True):
                s.token_ids, s.new_ids = list(hyp.token_ids), list(hyp.token_ids)
                s.new_logprobs = list(hyp.logprobs)
                s.finish_reason, s.stop_reason = hyp.finish_reason, hyp.stop_reason
                s.cumulative_logprob = hyp.cumulative_logprob
                if s.detok is not None:
                    s.new_text = s.detok.add(s.token_ids).text + s.detok.flush().text
                self.generation_tokens_total += len(s.token_ids)
            done.append(req)
        return done

    def _row_specs(
        self, plan: StepPlan, ahead: int = 0
    ) -> tuple[dict[int, RowSpec], dict[int, np.ndarray]]:
        """Each sampled row's `RowSpec` and each prefill row's prompt-logprob targets. `ahead`:
        tokens every row has sampled that are not applied yet (a run planned while the run
        before it computes)."""
        specs: dict[int, RowSpec] = {}
        targets: dict[int, np.ndarray] = {}
        for row in (*plan.decode, *plan.prefill):
            req = self._requests[row.request_id]
            p = req.params
            if row.is_prefill and req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
                # Target of position i is token i + 1 of the prompt; -1 past the prompt's end.
                nxt = np.full(len(row.token_ids), -1, np.int32)
                lo = row.start_pos + 1
                hi = min(row.start_pos + len(row.token_ids) + 1, len(req.prompt_ids))
                if hi > lo:
                    nxt[: hi - lo] = req.prompt_ids[lo:hi]
                targets[row.seq_id] = nxt
            if p.use_beam_search:
                # Greedy, for the top-20 logprobs the search ranks; the token itself is unused.
                for sid in row.sample_seq_ids:
                    specs[sid] = RowSpec(temperature=0.0, want_logprobs=True)
                continue
            base_index = self._seq_index.get(row.seq_id, (row.request_id, 0))[1]
            for k, sid in enumerate(row.sample_seq_ids):
                index = base_index + k
                s = req.samples[index]
                banned: tuple[int, ...] = ()
                if len(s.token_ids) + ahead < p.min_tokens:
                    eos = () if p.ignore_eos else tuple(self._eos_ids())
                    banned = eos + tuple(p.stop_token_ids)
                specs[sid] = RowSpec(
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    min_p=p.min_p,
                    repetition_penalty=p.repetition_penalty,
                    presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty,
                    seed=_sample_seed(req.seed, index),
                    step=len(s.token_ids) + ahead,
                    prompt_ids=tuple(req.prompt_ids) if p.repetition_penalty != 1.0 else (),
                    output_ids=tuple(s.token_ids) if p.uses_penalties else (),
                    banned_ids=banned,
                    want_logprobs=p.logprobs is not None,
                )
        return specs, targets

    def _output(self, req: _Request) -> RequestOutput:
        comps = []
        for s in req.samples:
            if not s.new_ids and not s.new_text and (s.finish_reason is None or s.reported_finish):
                continue
            lps = None
            if req.params.logprobs is not None:
                lps = [
                    _top(d, s_id, req.params.logprobs)
                    for d, s_id in zip(s.new_logprobs, s.new_ids, strict=False)
                ]
            comps.append(
                CompletionOutput(
                    index=s.index,
                    text=s.new_text,
                    token_ids=s.new_ids,
                    logprobs=lps,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    cumulative_logprob=s.cumulative_logprob,
                )
            )
            s.reported_finish = s.finish_reason is not None
            s.new_ids, s.new_text, s.new_logprobs = [], "", []
        finished = req.finished
        if finished:
            req.metrics.finished_time = time.time()
        prompt_lps = None
        if (
            req.prompt_logprobs is not None
            and not req.prompt_logprobs_sent
            and (finished or any(s.token_ids for s in req.samples))
        ):
            k = req.params.prompt_logprobs
            prompt_lps = [None] + [
                None if d is None else _top(d, req.prompt_ids[i], k)
                for i, d in enumerate(req.prompt_logprobs[1:], start=1)
            ]
            req.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_ids,
            outputs=comps,
            finished=finished,
            prompt_logprobs=prompt_lps,
            metrics=req.metrics,
        )

    def _eos_ids(self) -> list[int]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return list(self.tokenizer.eos_token_ids)
        return list(self.model_config.eos_token_ids)

    # ---- introspection ------------------------------------------------------------------------
    def warmup(self, background: bool = False) -> float:
        """Compile and run every step shape (`Engine.warmup`); with `background`, return once
        the largest shapes are ready and compile the rest while serving."""
        seconds = self.engine.warmup(background)
        _freeze_heap()
        return seconds

    def compiles_pending(self) -> int:
        return self.engine.compiles_pending()

    def follow(self) -> None:
        """Processes other than 0 of a multi-process run: run process 0's steps (`Engine.follow`)."""
        self.engine.follow()

    def release_followers(self) -> None:
        self.engine.release_followers()

    def model_info(self) -> dict:
        dev = jax.devices()[0]
        m = self.model_config
        return {
            "model_name": self.model_name,
            "architecture": m.architecture,
            "dtype": jnp.dtype(self.engine.dtype).name,
            "max_model_len": self.max_model_len,
            "vocab_size": m.vocab_size,
            "page_size": self.config.page_size,
            "kv_capacity_tokens": self.engine.capacity_tokens,
            "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            "mesh": self.engine.mesh_summary(),
        }

    def stats(self) -> dict:
        sched = self.scheduler
        bm = sched.block_manager
        used_pages = bm.num_usable_pages - bm.num_free_pages
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_used_tokens": used_pages * self.config.page_size,
            "kv_usage": self.scheduler.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "decode_runs_total": self.decode_runs_total,
            "device_wait_seconds_total": self.engine.device_wait_s,
            # Tokens of admitted prompts and recomputes looked up in the prefix cache / found.
            "prefix_cache_queries_total": sched.prefix_cache_queries,
            "prefix_cache_hits_total": sched.prefix_cache_hits,
            "prefix_cache_hit_rate": sched.prefix_cache_hits / max(sched.prefix_cache_queries, 1),
        }


def _freeze_heap() -> None:
    """Move every object alive now (modules, the model, compiled steps: ~250k objects) out of
    the cyclic garbage collector's reach. Otherwise each full collection walks them all: with 256
    sequences and one decode per call, 12 ms of every step went to collections (CPU profile)."""
    gc.collect()
    gc.freeze()


def _top(d: dict[int, float], chosen: int, k: int) -> dict[int, float]:
    """The chosen token plus the k most likely, from a map holding at least those."""
    best = sorted(d.items(), key=lambda kv: -kv[1])[:k]
    out = dict(best)
    if chosen in d:
        out[chosen] = d[chosen]
    return out


def _sample_seed(seed: int, index: int) -> int:
    """A 32-bit stream id per (request seed, sample index): the device key derives from it."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 31
    return (x ^ (x >> 32)) & 0xFFFFFFFF


def resolve_dtype(dtype: str | None):
    """None → bfloat16 on accelerators, float32 on CPU (where bf16 matmuls are slow)."""
    if dtype is None:
        return jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    try:
        return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[dtype]
    except KeyError:
        raise ValueError(f"dtype: {dtype!r} is not one of bfloat16, float16, float32") from None


def _model_name(path: Path) -> str:
    return Path(path).name
