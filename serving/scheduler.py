"""`Scheduler`: iteration-level continuous batching over a paged KV cache.

Owns the waiting and running sequences, the per-step token budget, chunked prefill, preemption by
recomputation, parallel sampling (n > 1) by forking, automatic prefix caching, the sequence
primitives beam search is built on, and the finish rules. There is no separate prefill or decode
phase: every sequence has its tokens and `num_computed` (tokens whose K/V is in the cache), and
each step feeds it the tokens it has not computed yet, as many as the budget allows. Pure Python:
the engine turns each `StepPlan` into a device step and reports the sampled tokens back through
`update`.

Prefix caching: once a step has written a sequence's K/V, `update` registers its newly full pages
with the block manager under their hash chain. A sequence being admitted (a new prompt or a
preempted one) attaches the longest cached run of full pages of its tokens, short of its last
token (which must be computed to give logits), and its `num_computed` starts after them.

Beam search (`add_request(beam_width=w)`) is driven from outside (`jaxserve.beam_search`): a beam
sequence that has been sampled keeps its token list as is and *awaits* the search's decision, and
is not scheduled meanwhile; the search then continues it with `append_token`, branches it with
`fork_seq` (pages shared copy-on-write) or drops it with `free_seq`.

Multi-step decoding (`schedule_decode_run(k)`): when every running sequence is plainly decoding
and no waiting one has a batch slot to take, one plan covers up to k decode iterations per sequence, run by the engine in one
device call that feeds each sampled token back on device; `update_run` then appends the tokens in
order and applies the finish rules after each, dropping what a sequence sampled past its end.
While a run computes, `schedule_next_run` may plan the one after it on the assumption that no
sequence stops: the engine feeds that run the first one's last samples on device, so the host
schedules while the device computes. A sequence that does stop in the first run wastes its rows
of the second, whose `update_run` skips it. A step that completes the prompt of every running
sequence (each sampling one token) may be followed the same way by their first run.

Prompts admitted ahead (`schedule_prefill_ahead`): while single steps compute, a step of prompt
tokens alone (the rest of a chunked prompt, then waiting prompts) may be planned before their
update, since none of it depends on what they sample; the engine dispatches it before reading
them back, so the device is not idle while the host applies tokens and plans. The next
`schedule()` may then run before that plan's update: its sequences sit it out (but for the rest
of a prompt it cut), and it preempts nothing (a victim could be one of theirs).

Protocol: `schedule()` (or `schedule_decode_run`) and `update(plan, sampled)` (`update_run`)
alternate, except that one `schedule_next_run` plan may follow a run, or a step completing
prompts, before its update, and `schedule_prefill_ahead` plans may follow single steps, and
`schedule()` follow those, before their updates; plans are updated in the order they were
made. `update` must see every non-empty plan (with `{}` when it samples nothing).
`add_request`, `abort_request` and `finish_seq` may be called at any point in between; the beam
primitives after `update`, before the next `schedule()`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from serving.block_manager import BlockManager, hash_page

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One row of a step: feed `token_ids` at positions `start_pos..`, through `block_table`."""

    seq_id: int
    request_id: str
    # A prompt (or recompute) chunk, or the single last token for a decode.
    token_ids: list[int]
    # Absolute position of token_ids[0]; equals the sequence's computed tokens before the step.
    start_pos: int
    # Page ids covering positions [0, start_pos + len(token_ids)).
    block_table: list[int]
    # Seq ids that get a token sampled from this row's last logits: [] while a prompt is only
    # partly prefilled, [seq_id] normally, n ids when an n > 1 prompt finishes prefill (fork).
    sample_seq_ids: list[int]
    # True for a prompt or recompute chunk, False for a decode.
    is_prefill: bool
    # Decode iterations this row takes in a multi-step run (`schedule_decode_run`): it samples
    # that many tokens, feeding each back as the next input; `block_table` covers them all.
    num_steps: int = 1


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one engine step computes."""

    decode: list[ScheduledSeq]
    prefill: list[ScheduledSeq]
    # (src, dst) page copies for copy-on-write, to apply in order before the step writes K/V.
    page_copies: list[tuple[int, int]]
    # One request id per sequence preempted this step.
    preempted: list[str]
    # Decode iterations the device runs (> 1 only for a `schedule_decode_run` plan); each row
    # keeps the tokens of its own `num_steps` and drops the rest.
    num_steps: int = 1
    # A `schedule_next_run` plan: the same rows as the run (or prompt-completing step) before
    # it, whose last samples (on the device, not yet known here) are its input tokens;
    # `token_ids` then hold -1.
    follows_run: bool = False
    # A `schedule_prefill_ahead` plan: waiting prompts admitted while the plans before it compute.
    ahead: bool = False
    # Prefix-cache hashes of the full prompt pages it computes (registered at its update): a
    # prompt admitted by a later plan meanwhile waits for them instead of computing them too.
    computes: set[bytes] = field(default_factory=set)

    @property
    def num_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.decode) + sum(
            len(row.token_ids) for row in self.prefill
        )

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(frozen=True, slots=True)
class SeqUpdate:
    """One sampled token applied to one sequence."""

    seq_id: int
    request_id: str
    index: int  # sample index 0..n-1 within the request
    token_id: int
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: int | None  # the matched stop token id; None for EOS and length


@dataclass(eq=False, slots=True)
class _Request:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    min_tokens: int
    eos_token_ids: frozenset[int]  # empty when ignore_eos
    stop_token_ids: frozenset[int]
    beam_width: int = 0  # 0: not beam search
    reads_cache: bool = True  # False: every token is computed (e.g. prompt logprobs are wanted)
    num_cached_tokens: int | None = None  # prompt tokens taken from the cache; None: not admitted
    seqs: list[_Seq] = field(default_factory=list)  # live ones


@dataclass(eq=False, slots=True)
class _Seq:
    seq_id: int
    request: _Request
    index: int
    token_ids: list[int]
    # Tokens to compute before sampling again: the prompt, or everything held when preempted.
    prefill_len: int
    # Siblings still to fork off when the prompt finishes prefill (n - 1 for a fresh n > 1 request).
    pending_forks: int = 0
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    # Hash chain of the leading full pages of token_ids, extended as needed (tokens never change).
    page_hashes: list[bytes] = field(default_factory=list)
    # Leading block_table pages already offered to the prefix cache.
    num_registered: int = 0
    # A beam sampled at its current length, waiting for the beam search to extend or drop it.
    awaiting: bool = False

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def num_slots(self) -> int:
        return 1 + self.pending_forks

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_len


class Scheduler:
    """Decides every step which tokens of which sequences to compute, within the budgets."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        max_prefill_seqs: int = 32,
        enable_prefix_caching: bool = True,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        # Every running sequence must be able to decode every step.
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens: must be >= max_num_seqs ({max_num_seqs}), "
                f"got {max_num_batched_tokens}"
            )
        if max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {max_model_len}")
        if max_prefill_seqs < 1:
            raise ValueError(f"max_prefill_seqs: must be >= 1, got {max_prefill_seqs}")
        self.block_manager = BlockManager(num_pages, page_size)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_prefill_seqs = max_prefill_seqs
        self.enable_prefix_caching = enable_prefix_caching
        self.num_preemptions = 0
        # Tokens of admitted sequences looked up in the prefix cache, and those found there.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # admission order
        self._seqs: dict[int, _Seq] = {}  # live (waiting or running)
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        # Plans scheduled and not yet updated, oldest first (two only while a run computes and
        # the next one is planned ahead of its update).
        self._pending: deque[StepPlan] = deque()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def usage(self) -> float:
        return self.block_manager.usage

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def is_live(self, seq_id: int) -> bool:
        """Whether sequence `seq_id` is still waiting or running."""
        return seq_id in self._seqs

    def num_cached_tokens(self, request_id: str) -> int:
        """Prompt tokens the request's first admission took from the prefix cache (0 before)."""
        return self._requests[request_id].num_cached_tokens or 0

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        n: int,
        max_tokens: int,
        min_tokens: int = 0,
        eos_token_ids: Iterable[int] = (),
        stop_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        beam_width: int = 0,
        skip_prefix_cache: bool = False,
    ) -> int:
        """Queues a request and returns the id of its first sequence; raises ValueError naming the
        offending field when it cannot run. `beam_width > 0` makes it a beam search of up to that
        many sequences (n must be 1; tokens and finishing are then the search's business);
        `skip_prefix_cache` computes every token instead of reading cached pages."""
        num_prompt = len(prompt_token_ids)
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already scheduled")
        if num_prompt == 0:
            raise ValueError("prompt_token_ids: must not be empty")
        if num_prompt > self.max_model_len - 1:
            raise ValueError(
                f"prompt_token_ids: {num_prompt} tokens, at most max_model_len - 1 "
                f"({self.max_model_len - 1}) leave room to generate"
            )
        if not 1 <= n <= self.max_num_seqs:
            raise ValueError(f"n: must be in [1, max_num_seqs={self.max_num_seqs}], got {n}")
        if not 0 <= beam_width <= self.max_num_seqs:
            raise ValueError(
                f"beam_width: must be in [0, max_num_seqs={self.max_num_seqs}], got {beam_width}"
            )
        if beam_width and n != 1:
            raise ValueError(f"n: must be 1 for a beam search, got {n}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
        if not 0 <= min_tokens <= max_tokens:
            raise ValueError(f"min_tokens: must be in [0, max_tokens], got {min_tokens}")
        # A sequence alone must always fit, or preemption could never make room for it. The last
        # token's K/V is never written, hence the - 1.
        bm = self.block_manager
        if bm.pages_for(num_prompt) > bm.num_usable_pages:
            raise ValueError(
                f"prompt_token_ids: {num_prompt} tokens need {bm.pages_for(num_prompt)} KV-cache "
                f"pages, the cache has {bm.num_usable_pages}"
            )
        longest = min(num_prompt + max_tokens, self.max_model_len) - 1
        if bm.pages_for(longest) > bm.num_usable_pages:
            raise ValueError(
                f"max_tokens: {max_tokens} would grow the sequence to {longest} cached tokens, "
                f"the KV cache holds {bm.num_usable_pages * bm.page_size}"
            )
        request = _Request(
            request_id=request_id,
            num_prompt_tokens=num_prompt,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            eos_token_ids=frozenset() if ignore_eos else frozenset(eos_token_ids),
            stop_token_ids=frozenset(stop_token_ids),
            beam_width=beam_width,
            reads_cache=not skip_prefix_cache,
        )
        seq = _Seq(
            seq_id=next(self._seq_ids),
            request=request,
            index=0,
            token_ids=list(prompt_token_ids),
            prefill_len=num_prompt,
            pending_forks=n - 1,
        )
        request.seqs.append(seq)
        self._requests[request_id] = request
        self._seqs[seq.seq_id] = seq
        self._waiting.append(seq)
        return seq.seq_id

    def abort_request(self, request_id: str) -> None:
        """Drops every sequence of the request and frees its pages; unknown ids are ignored
        (the request may have just finished)."""
        request = self._requests.get(request_id)
        if request is not None:
            for seq in list(request.seqs):
                self._remove(seq)

    def finish_seq(self, seq_id: int, reason: FinishReason, stop_reason: str | int | None) -> None:
        """Finishes one sequence for a reason found outside the scheduler (e.g. a stop string
        matched in the detokenized text) and frees its pages. The engine reports `reason` and
        `stop_reason` to the client; they are checked here so that a bad value fails early."""
        if reason not in ("stop", "length"):
            raise ValueError(f"reason: must be 'stop' or 'length', got {reason!r}")
        if reason == "length" and stop_reason is not None:
            raise ValueError("stop_reason: must be None when reason is 'length'")
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"seq {seq_id} is not live")
        self._remove(seq)

    def schedule(self) -> StepPlan:
        """Plans the next step: running sequences first in admission order (a decode token each,
        or their next prompt chunk), preempting from the newest when pages run out; then, if
        nothing was preempted, waiting sequences in FCFS order while budget, slots and pages last,
        each starting after its cached prefix. Beams awaiting the search's decision sit out."""
        if any(not p.ahead for p in self._pending):
            raise RuntimeError("update() the previous plan before scheduling the next step")
        # Plans still computing (`schedule_prefill_ahead`): their sequences sit this step out,
        # and nothing is preempted, since a victim could be one of theirs.
        computing_ahead = bool(self._pending)
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        decode: list[ScheduledSeq] = []
        prefill: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted: list[str] = []
        forks: dict[int, list[_Seq]] = {}
        stalled = False

        # Mid-prefill sequences always trail the decoding ones in `_running`: a prompt chunk can
        # only leave budget over by completing its prompt, so prompts complete in admission
        # order. Decodes thus come first and, as max_num_seqs <= max_num_batched_tokens, always
        # fit; chunks share what is left. Admission stops at max_prefill_seqs rows, so no more
        # sequences than that are ever mid-prefill and running ones need no row check.
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed, budget)
            # Awaiting beams compute nothing until the search extends them; a sequence with no
            # token left to compute has them all in a plan still computing.
            if seq.awaiting or num_new == 0:
                i += 1
                continue
            start, end = seq.num_computed, seq.num_computed + num_new
            if computing_ahead and not bm.can_write(seq.block_table, start, end):
                stalled = True  # it and the rest wait for those plans' update
                break
            # Victims are the newest awaiting beams, which have no row and cannot move before
            # their siblings do, then the tail, i.e. the rows not scheduled yet this step.
            while not bm.can_write(seq.block_table, start, end):
                j = self._victim_index()
                victim = self._running.pop(j)
                if j < i:  # an awaiting beam passed over above
                    i -= 1
                self._preempt(victim)
                preempted.append(victim.request.request_id)
                if victim is seq:
                    break
            else:
                copies += bm.prepare_write(seq.block_table, start, end)
                row, children = self._schedule_row(seq, num_new)
                (prefill if row.is_prefill else decode).append(row)
                budget -= num_new
                if children:
                    forks[seq.seq_id] = children
                i += 1
        self._place_forks(forks)

        # Admitting while running sequences are being evicted would only evict them again.
        computes: set[bytes] = set()
        if not preempted and not stalled:
            self._admit(budget, decode, prefill, copies, preempted, computes)

        plan = StepPlan(
            decode=decode,
            prefill=prefill,
            page_copies=copies,
            preempted=preempted,
            computes=computes,
        )
        if not plan.is_empty:
            self._pending.append(plan)
        return plan

    def schedule_prefill_ahead(self) -> StepPlan | None:
        """While the plans made last compute (single steps, not yet updated), plans a step of
        prompt tokens alone: the rest of a running prompt cut by the last step's budget, then
        waiting prompts. None of it depends on what those plans sample, so the engine can
        dispatch it before reading them back, and the device computes it while the host applies
        their tokens and plans the step after. As in `schedule()`: running prompts first, then
        admission FCFS within the token, row, slot and page budgets; except that nothing is
        preempted, admission stops at a beam search, and one page per running sequence stays
        free (each one's next token may open a page), so that the next `schedule()`, which
        cannot preempt while this plan computes, rarely has to leave a row out. Returns None
        unless single steps are pending, no beam search runs, no prompt with more than a
        budget's tokens left is being chunked while other sequences decode, and there is a
        prompt token to compute."""
        if not self._pending or any(p.num_steps > 1 for p in self._pending):
            return None
        if any(s.request.beam_width for s in self._running):
            return None
        budget = self.max_num_batched_tokens
        if any(not s.is_prefilling for s in self._running) and any(
            len(s.token_ids) - s.num_computed > budget for s in self._running if s.is_prefilling
        ):
            # A prompt longer than a step's budget goes one chunk per step while others decode
            # (chunked prefill's pace: their next tokens wait for one chunk, not two).
            return None
        bm = self.block_manager
        reserve = len(self._running)
        prefill: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        forks: dict[int, list[_Seq]] = {}
        for seq in self._running:  # prompts mid-prefill trail the decoding sequences
            if not seq.is_prefilling:
                continue
            num_new = min(len(seq.token_ids) - seq.num_computed, budget)
            start, end = seq.num_computed, seq.num_computed + num_new
            if not bm.can_allocate(bm.pages_needed(seq.block_table, start, end) + reserve):
                break
            copies += bm.prepare_write(seq.block_table, start, end)
            row, children = self._schedule_row(seq, num_new)
            prefill.append(row)
            budget -= num_new
            if children:
                forks[seq.seq_id] = children
            if budget == 0:
                break
        self._place_forks(forks)
        computes: set[bytes] = set()
        if budget and not any(s.is_prefilling for s in self._running):
            self._admit(budget, [], prefill, copies, [], computes, ahead=True)
        if not prefill:
            return None
        plan = StepPlan(
            decode=[],
            prefill=prefill,
            page_copies=copies,
            preempted=[],
            ahead=True,
            computes=computes,
        )
        self._pending.append(plan)
        return plan

    def _admit(
        self,
        budget: int,
        decode: list[ScheduledSeq],
        prefill: list[ScheduledSeq],
        copies: list[tuple[int, int]],
        preempted: list[str],
        computes: set[bytes],
        ahead: bool = False,
    ) -> None:
        """Admits waiting sequences in FCFS order while `budget` tokens, prefill rows, batch
        slots and pages last, each starting after its cached prefix; their rows go to `prefill`,
        their page copies to `copies`, the full pages they compute to `computes`. `ahead`: for
        `schedule_prefill_ahead` (no beams, no preemption, a page kept per running sequence)."""
        bm = self.block_manager
        reserve = len(self._running) if ahead else 0
        slots = self._slots_in_use()
        while budget > 0 and len(prefill) < self.max_prefill_seqs:
            # Awaiting beams (preempted after being sampled) need nothing until extended.
            seq = next((s for s in self._waiting if not s.awaiting), None)
            if seq is None or (ahead and seq.request.beam_width):
                break
            prefix = self._cached_prefix(seq)
            if self._computed_by_another(seq, len(prefix), computes):
                break  # a later step finds those pages cached instead of computing them too
            start = len(prefix) * bm.page_size
            num_new = min(len(seq.token_ids) - start, budget)
            need_slots = self._slots_to_admit(seq)
            pages = bm.pages_to_attach(prefix) + bm.pages_needed(prefix, start, start + num_new)
            if slots + need_slots > self.max_num_seqs or not bm.can_allocate(pages + reserve):
                if (
                    ahead
                    or decode
                    or prefill
                    or not self._running
                    or not self._running[-1].awaiting
                ):
                    break
                # Nothing runs, so every running sequence is an awaiting beam, maybe waiting
                # for this very sequence: make room, or nothing would ever run again.
                victim = self._running.pop(self._victim_index())
                self._preempt(victim)
                preempted.append(victim.request.request_id)
                slots = self._slots_in_use()
                continue
            self._waiting.remove(seq)
            slots += need_slots
            seq.block_table = bm.attach(prefix)
            seq.num_computed = start
            seq.num_registered = len(prefix)
            request = seq.request
            if request.num_cached_tokens is None:
                request.num_cached_tokens = start
            copies += bm.prepare_write(seq.block_table, start, start + num_new)
            if self.enable_prefix_caching and request.reads_cache:
                self.prefix_cache_queries += len(seq.token_ids)
                self.prefix_cache_hits += start
                full = (start + num_new) // bm.page_size
                computes.update(self._page_hashes(seq, full)[len(prefix) :])
            row, children = self._schedule_row(seq, num_new)
            prefill.append(row)
            budget -= num_new
            self._running += [seq, *children]

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[SeqUpdate]:
        """Registers the pages `plan` filled in the prefix cache, appends the tokens sampled for
        it and applies the finish rules. Sequences aborted or finished since `schedule()` are
        skipped; every other sampled sequence needs a token. Sampled beams get no token and no
        update: they await the beam search (`append_token` / `fork_seq` / `free_seq`)."""
        if plan.is_empty:
            return []
        self._check_pending(plan)
        if plan.num_steps > 1:
            raise ValueError("plan: a multi-step run; use update_run")
        targets = [
            self._seqs[sid]
            for row in (*plan.decode, *plan.prefill)
            for sid in row.sample_seq_ids
            if sid in self._seqs
        ]
        missing = [seq.seq_id for seq in targets if seq.seq_id not in sampled]
        if missing:
            raise ValueError(f"sampled: no token for seq ids {missing}")
        self._pending.popleft()
        if self.enable_prefix_caching:
            for row in (*plan.decode, *plan.prefill):
                seq = self._seqs.get(row.seq_id)
                if seq is not None:
                    # The K/V this plan wrote; a run planned ahead of this update (its sampled
                    # token not known yet) has advanced `num_computed` past it already.
                    self._register_full_pages(seq, row.start_pos + len(row.token_ids))
        updates = []
        for seq in targets:
            if seq.request.beam_width:
                seq.awaiting = True
                continue
            updates.append(self._append(seq, sampled[seq.seq_id]))
            if updates[-1].finished:
                self._remove(seq)
        return updates

    def schedule_decode_run(
        self, num_steps: int, ready: Callable[[int, int], bool] | None = None
    ) -> StepPlan | None:
        """Plans `num_steps` decode iterations of every running sequence for one device call, or
        returns None when a plain `schedule()` is due: a waiting sequence has a free batch slot,
        a sequence prefills, forks or is a beam, no sequence has two steps left before its length limit, the pages for the run are
        not free (a plain step then preempts as usual), or `ready(num_rows, context_len)` (the
        engine: is such a run compiled?) says no. Each row takes the steps its limits
        (`max_tokens`, `max_model_len`) leave, at most `num_steps`, and its table covers them;
        its `num_computed` advances by them."""
        if self._pending:
            raise RuntimeError("update() the previous plan before scheduling the next step")
        if not self._running:
            return None
        if self._admissible():
            return None
        steps: list[int] = []
        for seq in self._running:
            request = seq.request
            if (
                seq.awaiting
                or request.beam_width
                or seq.pending_forks
                or len(seq.token_ids) - seq.num_computed != 1
            ):
                return None
            left = min(
                request.max_tokens - seq.num_output_tokens,
                self.max_model_len - len(seq.token_ids),
            )
            steps.append(max(1, min(num_steps, left)))
        return self._plan_run(steps, ready, follows_run=False)

    def schedule_next_run(
        self, num_steps: int, ready: Callable[[int, int], bool] | None = None
    ) -> StepPlan | None:
        """While the plan just made computes (not yet updated), plans the next run of its rows
        on the assumption that none stops in it (no stop token, no stop string). That plan is a
        run every row of which takes all `num_steps` steps, or a step that completes the prompt
        of every running sequence, each sampling one token (no fork, no beam). The rows start
        where it ends and take, as in any run, the steps their length limits leave, at most
        `num_steps`. The new plan `follows_run`: its input tokens are the last samples of the
        plan before it, which the engine keeps on the device. Returns None, and the caller
        updates that plan and schedules as usual, unless it is such a plan, every row still has
        a token to go after it, its rows are still exactly the running sequences, no waiting
        sequence has a batch slot to take, and the pages (and `ready`) allow the run."""
        if len(self._pending) != 1 or self._pending[0].ahead:
            return None  # (the engine dispatches a step admitted ahead with its samples apart)
        prev = self._pending[0]
        # The tokens each row gets from `prev`: a run's every step, or a prefill's one sample.
        if prev.prefill:
            rows, ahead = prev.prefill, 1
            if prev.decode or any(row.sample_seq_ids != [row.seq_id] for row in rows):
                return None
        elif prev.num_steps == num_steps:
            rows, ahead = prev.decode, num_steps
        else:
            return None
        if len(rows) != len(self._running) or self._admissible():
            return None
        steps: list[int] = []
        for seq, row in zip(self._running, rows, strict=True):
            if seq.seq_id != row.seq_id or row.num_steps != ahead or seq.request.beam_width:
                return None
            # Its output and length once `prev`'s tokens are in.
            left = min(
                seq.request.max_tokens - seq.num_output_tokens - ahead,
                self.max_model_len - len(seq.token_ids) - ahead,
            )
            if left < 1:
                return None
            steps.append(min(num_steps, left))
        return self._plan_run(steps, ready, follows_run=True)

    def _plan_run(
        self, steps: list[int], ready: Callable[[int, int], bool] | None, follows_run: bool
    ) -> StepPlan | None:
        """The run taking `steps[i]` decode iterations of running sequence i from its
        `num_computed` on (None if under two steps, not `ready` or short of pages); it advances
        their `num_computed` and becomes pending."""
        if max(steps) < 2:
            return None
        context = max(seq.num_computed + k for seq, k in zip(self._running, steps, strict=True))
        if ready is not None and not ready(len(self._running), context):
            return None
        bm = self.block_manager
        need = sum(
            bm.pages_needed(seq.block_table, seq.num_computed, seq.num_computed + k)
            for seq, k in zip(self._running, steps, strict=True)
        )
        if not bm.can_allocate(need):
            return None
        decode, copies = [], []
        for seq, k in zip(self._running, steps, strict=True):
            start = seq.num_computed
            copies += bm.prepare_write(seq.block_table, start, start + k)
            seq.num_computed += k
            decode.append(
                ScheduledSeq(
                    seq_id=seq.seq_id,
                    request_id=seq.request.request_id,
                    token_ids=[-1 if follows_run else seq.token_ids[-1]],
                    start_pos=start,
                    block_table=list(seq.block_table),
                    sample_seq_ids=[seq.seq_id],
                    is_prefill=False,
                    num_steps=k,
                )
            )
        plan = StepPlan(
            decode=decode,
            prefill=[],
            page_copies=copies,
            preempted=[],
            num_steps=max(steps),
            follows_run=follows_run,
        )
        self._pending.append(plan)
        return plan

    def update_run(self, plan: StepPlan, sampled: dict[int, Sequence[int]]) -> list[SeqUpdate]:
        """`update` for a `schedule_decode_run` plan: `sampled[seq_id]` holds the run's tokens in
        order (at least the row's `num_steps`). Appends them one by one with the finish rules
        after each; a sequence that finishes keeps no token after its last and no K/V past it.
        Returns the updates in order, several per sequence."""
        self._check_pending(plan)
        rows = [row for row in plan.decode if row.seq_id in self._seqs]
        short = [r.seq_id for r in rows if len(sampled.get(r.seq_id, ())) < r.num_steps]
        if short:
            raise ValueError(f"sampled: too few tokens for seq ids {short}")
        self._pending.popleft()
        updates = []
        for row in rows:
            seq = self._seqs[row.seq_id]
            finished = False
            for token in list(sampled[row.seq_id])[: row.num_steps]:
                updates.append(self._append(seq, int(token)))
                if finished := updates[-1].finished:
                    break
            if finished:
                # What was computed from tokens past a finish is not this sequence's K/V.
                seq.num_computed = min(seq.num_computed, len(seq.token_ids) - 1)
            if self.enable_prefix_caching:
                # K/V is in for every token but the last sampled; a run planned ahead of this
                # update has advanced `num_computed` past them already.
                self._register_full_pages(seq, len(seq.token_ids) - 1)
            if finished:
                self._remove(seq)
        return updates

    def cancel_pending(self) -> None:
        """Forgets the plans not yet updated (their step failed): each of their sequences is
        back to what it had computed before them, as far as it is still live."""
        while self._pending:
            plan = self._pending.pop()
            for row in (*plan.decode, *plan.prefill):
                seq = self._seqs.get(row.seq_id)
                if seq is not None:
                    seq.num_computed = min(seq.num_computed, row.start_pos)

    def _check_pending(self, plan: StepPlan) -> None:
        if not self._pending or plan is not self._pending[0]:
            raise ValueError("plan: not the oldest plan scheduled and not yet updated")

    def _admissible(self) -> bool:
        """Whether a waiting sequence has a batch slot to go to (a plain step admits it; one
        with none waits for a sequence to finish either way)."""
        first = next((s for s in self._waiting if not s.awaiting), None)
        return first is not None and (
            self._slots_in_use() + self._slots_to_admit(first) <= self.max_num_seqs
        )

    def _schedule_row(self, seq: _Seq, num_new: int) -> tuple[ScheduledSeq, list[_Seq]]:
        """Advances `seq` by `num_new` tokens (its pages already prepared) and returns its row plus
        the siblings forked off it when this row finishes an n > 1 prompt."""
        start = seq.num_computed
        seq.num_computed += num_new
        samples = seq.num_computed == len(seq.token_ids)
        children = self._fork(seq) if samples and seq.pending_forks else []
        row = ScheduledSeq(
            seq_id=seq.seq_id,
            request_id=seq.request.request_id,
            token_ids=seq.token_ids[start : seq.num_computed],
            start_pos=start,
            block_table=list(seq.block_table),
            sample_seq_ids=[seq.seq_id, *(c.seq_id for c in children)] if samples else [],
            is_prefill=seq.num_computed <= seq.prefill_len,
        )
        return row, children

    def _place_forks(self, forks: dict[int, list[_Seq]]) -> None:
        """Puts the siblings forked off each parent (by seq id) right after it in `_running`."""
        if forks:
            self._running = [s for seq in self._running for s in [seq, *forks.get(seq.seq_id, ())]]

    def _fork(self, parent: _Seq) -> list[_Seq]:
        """Creates the parent's n - 1 siblings, sharing all its pages; they get their first token
        from the same logits as the parent."""
        children = [
            self._copy_seq(parent, parent.index + 1 + k) for k in range(parent.pending_forks)
        ]
        parent.pending_forks = 0
        return children

    def _copy_seq(self, parent: _Seq, index: int) -> _Seq:
        """A new live sequence of the parent's request in the parent's state, sharing its pages;
        the caller places it in a queue."""
        child = _Seq(
            seq_id=next(self._seq_ids),
            request=parent.request,
            index=index,
            token_ids=list(parent.token_ids),
            prefill_len=parent.prefill_len,
            num_computed=parent.num_computed,
            block_table=self.block_manager.fork(parent.block_table),
            page_hashes=list(parent.page_hashes),
            num_registered=parent.num_registered,
            awaiting=parent.awaiting,
        )
        parent.request.seqs.append(child)
        self._seqs[child.seq_id] = child
        return child

    def _victim_index(self) -> int:
        """Where in `_running` the next sequence to preempt is: the newest awaiting beam, or else
        the newest sequence."""
        for j in range(len(self._running) - 1, -1, -1):
            if self._running[j].awaiting:
                return j
        return len(self._running) - 1

    def _preempt(self, seq: _Seq) -> None:
        """Evicts a sequence already taken off `_running`: it loses its pages (its full ones stay
        in the prefix cache until evicted) and, ahead of every other waiting sequence, later
        recomputes the tokens it holds that are not cached by then."""
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.prefill_len = len(seq.token_ids)
        self._waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- prefix caching ---------------------------------------------------------------------
    def _page_hashes(self, seq: _Seq, num_pages: int) -> list[bytes]:
        """The hash chain of the first `num_pages` full pages of the sequence's tokens."""
        ps = self.block_manager.page_size
        hashes = seq.page_hashes
        for i in range(len(hashes), num_pages):
            hashes.append(
                hash_page(hashes[-1] if hashes else None, seq.token_ids[i * ps : (i + 1) * ps])
            )
        return hashes[:num_pages]

    def _cached_prefix(self, seq: _Seq) -> list[int]:
        """Cached pages for the longest full-page prefix of a waiting sequence's tokens, leaving
        at least its last token to compute (its logits are what gets sampled)."""
        if not self.enable_prefix_caching or not seq.request.reads_cache:
            return []
        max_pages = (len(seq.token_ids) - 1) // self.block_manager.page_size
        return self.block_manager.cached_prefix(self._page_hashes(seq, max_pages))

    def _computed_by_another(self, seq: _Seq, num_cached: int, computing: set[bytes]) -> bool:
        """Whether the first full page of a waiting sequence's tokens past its `num_cached`
        cached ones is being computed by a prompt admitted before it, in this step (`computing`)
        or in a plan not yet updated (a shared system prompt arriving in a burst): it then waits
        and attaches that page from the cache rather than computing the same K/V twice."""
        if not self.enable_prefix_caching or not seq.request.reads_cache:
            return False
        others = [p.computes for p in self._pending if p.computes]
        if not computing and not others:
            return False
        if (len(seq.token_ids) - 1) // self.block_manager.page_size <= num_cached:
            return False  # no further full page it could take from the cache
        page = self._page_hashes(seq, num_cached + 1)[num_cached]
        return page in computing or any(page in c for c in others)

    def _register_full_pages(self, seq: _Seq, num_done: int) -> None:
        """Offers the pages a step has just filled with computed K/V (its first `num_done`
        tokens have theirs) to the prefix cache."""
        full = min(num_done, seq.num_computed) // self.block_manager.page_size
        if full > seq.num_registered:
            hashes = self._page_hashes(seq, full)
            for i in range(seq.num_registered, full):
                self.block_manager.register(seq.block_table[i], hashes[i])
            seq.num_registered = full

    # ---- slots ------------------------------------------------------------------------------
    def _slots_in_use(self) -> int:
        """Batch slots the running sequences hold: their own plus the n > 1 forks still to come,
        and a beam search's full width as long as any of its beams runs."""
        slots = 0
        beam_requests = set()
        for seq in self._running:
            if seq.request.beam_width:
                beam_requests.add(seq.request.request_id)
            else:
                slots += seq.num_slots
        return slots + sum(self._requests[rid].beam_width for rid in beam_requests)

    def _slots_to_admit(self, seq: _Seq) -> int:
        request = seq.request
        if not request.beam_width:
            return seq.num_slots
        running = any(s.block_table for s in request.seqs)
        return 0 if running else request.beam_width

    # ---- beam search primitives ---------------------------------------------------------------
    def fork_seq(self, seq_id: int) -> int:
        """A new sequence continuing from awaiting beam `seq_id`: the same tokens, sharing all its
        pages (copy-on-write), queued right after it. Returns the new sequence's id."""
        parent = self._awaiting(seq_id)
        child = self._copy_seq(parent, parent.index)
        queue = self._running if parent.block_table else self._waiting
        queue.insert(queue.index(parent) + 1, child)
        return child.seq_id

    def append_token(self, seq_id: int, token_id: int) -> None:
        """Extends awaiting beam `seq_id` by `token_id`, which it computes from the next step."""
        seq = self._awaiting(seq_id)
        seq.token_ids.append(token_id)
        seq.awaiting = False
        if not seq.block_table:  # preempted: everything is recomputed
            seq.prefill_len = len(seq.token_ids)

    def free_seq(self, seq_id: int) -> None:
        """Drops one beam and its page references; the request ends with its last sequence."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"seq {seq_id} is not live")
        self._remove(seq)

    def _awaiting(self, seq_id: int) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"seq {seq_id} is not live")
        if not seq.awaiting:
            raise ValueError(f"seq {seq_id} is not a sampled beam awaiting its next token")
        return seq

    def _remove(self, seq: _Seq) -> None:
        """Takes a finished or aborted sequence out of every queue and frees its pages."""
        # Running sequences always hold pages for their computed tokens, waiting ones none.
        if seq.block_table:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        del self._seqs[seq.seq_id]
        request = seq.request
        request.seqs.remove(seq)
        if not request.seqs:
            del self._requests[request.request_id]

    def _append(self, seq: _Seq, token: int) -> SeqUpdate:
        """Appends a sampled token to a sequence and applies the finish rules (the caller
        removes a finished sequence)."""
        seq.token_ids.append(token)
        reason, stop_reason = self._check_finish(seq, token)
        return SeqUpdate(
            seq_id=seq.seq_id,
            request_id=seq.request.request_id,
            index=seq.index,
            token_id=token,
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=stop_reason,
        )

    def _check_finish(self, seq: _Seq, token: int) -> tuple[FinishReason | None, int | None]:
        """Stop beats length when both apply: the model did end the text. Stop tokens below
        `min_tokens` outputs do not count (the engine masks them too)."""
        request = seq.request
        if seq.num_output_tokens > request.min_tokens:
            if token in request.eos_token_ids:
                return "stop", None
            if token in request.stop_token_ids:
                return "stop", token
        if seq.num_output_tokens >= request.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length", None
        return None, None
