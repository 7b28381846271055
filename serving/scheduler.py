"""`Scheduler`: iteration-level continuous batching over a paged KV cache.

Owns the waiting and running sequences, the per-step token budget, chunked prefill, preemption by
recomputation, parallel sampling (n > 1) by forking, and the finish rules. There is no separate
prefill or decode phase: every sequence has its tokens and `num_computed` (tokens whose K/V is in
the cache), and each step feeds it the tokens it has not computed yet, as many as the budget allows.
Pure Python: the engine turns each `StepPlan` into a device step and reports the sampled tokens
back through `update`.

Protocol: `schedule()` and `update(plan, sampled)` alternate; `update` must see every non-empty plan
(with `{}` when it samples nothing). `add_request`, `abort_request` and `finish_seq` may be called
at any point in between.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from serving.block_manager import BlockManager

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


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one engine step computes."""

    decode: list[ScheduledSeq]
    prefill: list[ScheduledSeq]
    # (src, dst) page copies for copy-on-write, to apply in order before the step writes K/V.
    page_copies: list[tuple[int, int]]
    # One request id per sequence preempted this step.
    preempted: list[str]

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
        max_prefill_seqs: int = 8,
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
        self.num_preemptions = 0
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # admission order
        self._seqs: dict[int, _Seq] = {}  # live (waiting or running)
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._pending_plan: StepPlan | None = None

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
    ) -> None:
        """Queues a request; raises ValueError naming the offending field when it cannot run."""
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
        nothing was preempted, waiting sequences in FCFS order while budget, slots and pages last."""
        if self._pending_plan is not None:
            raise RuntimeError("update() the previous plan before scheduling the next step")
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        decode: list[ScheduledSeq] = []
        prefill: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted: list[str] = []
        forks: dict[int, list[_Seq]] = {}

        # Mid-prefill sequences always trail the decoding ones in `_running`: a prompt chunk can
        # only leave budget over by completing its prompt, so prompts complete in admission
        # order. Decodes thus come first and, as max_num_seqs <= max_num_batched_tokens, always
        # fit; chunks share what is left. Admission stops at max_prefill_seqs rows, so no more
        # sequences than that are ever mid-prefill and running ones need no row check.
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed, budget)
            start, end = seq.num_computed, seq.num_computed + num_new
            # Victims come off the tail, i.e. from the rows not scheduled yet this step.
            while not bm.can_write(seq.block_table, start, end):
                victim = self._running.pop()
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
        if forks:
            self._running = [s for seq in self._running for s in [seq, *forks.get(seq.seq_id, ())]]

        # Admitting while running sequences are being evicted would only evict them again.
        if not preempted:
            slots = sum(seq.num_slots for seq in self._running)
            while self._waiting and budget > 0 and len(prefill) < self.max_prefill_seqs:
                seq = self._waiting[0]
                num_new = min(len(seq.token_ids), budget)
                if slots + seq.num_slots > self.max_num_seqs or not bm.can_write(
                    seq.block_table, 0, num_new
                ):
                    break
                self._waiting.popleft()
                slots += seq.num_slots
                copies += bm.prepare_write(seq.block_table, 0, num_new)
                row, children = self._schedule_row(seq, num_new)
                prefill.append(row)
                budget -= num_new
                self._running += [seq, *children]

        plan = StepPlan(decode=decode, prefill=prefill, page_copies=copies, preempted=preempted)
        self._pending_plan = None if plan.is_empty else plan
        return plan

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[SeqUpdate]:
        """Appends the tokens sampled for `plan` and applies the finish rules. Sequences aborted
        or finished since `schedule()` are skipped; every other sampled sequence needs a token."""
        if plan.is_empty:
            return []
        if plan is not self._pending_plan:
            raise ValueError("plan: not the plan returned by the last schedule()")
        targets = [
            self._seqs[sid]
            for row in (*plan.decode, *plan.prefill)
            for sid in row.sample_seq_ids
            if sid in self._seqs
        ]
        missing = [seq.seq_id for seq in targets if seq.seq_id not in sampled]
        if missing:
            raise ValueError(f"sampled: no token for seq ids {missing}")
        self._pending_plan = None
        updates = []
        for seq in targets:
            token = sampled[seq.seq_id]
            seq.token_ids.append(token)
            reason, stop_reason = self._check_finish(seq, token)
            if reason is not None:
                self._remove(seq)
            updates.append(
                SeqUpdate(
                    seq_id=seq.seq_id,
                    request_id=seq.request.request_id,
                    index=seq.index,
                    token_id=token,
                    finished=reason is not None,
                    finish_reason=reason,
                    stop_reason=stop_reason,
                )
            )
        return updates

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

    def _fork(self, parent: _Seq) -> list[_Seq]:
        """Creates the parent's n - 1 siblings, sharing all its pages; they get their first token
        from the same logits as the parent."""
        children = [
            _Seq(
                seq_id=next(self._seq_ids),
                request=parent.request,
                index=parent.index + 1 + k,
                token_ids=list(parent.token_ids),
                prefill_len=parent.prefill_len,
                num_computed=parent.num_computed,
                block_table=self.block_manager.fork(parent.block_table),
            )
            for k in range(parent.pending_forks)
        ]
        parent.pending_forks = 0
        parent.request.seqs += children
        for child in children:
            self._seqs[child.seq_id] = child
        return children

    def _preempt(self, seq: _Seq) -> None:
        """Evicts a sequence already taken off `_running`: it loses its pages and, ahead of every
        other waiting sequence, later recomputes all the tokens it holds."""
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.prefill_len = len(seq.token_ids)
        self._waiting.appendleft(seq)
        self.num_preemptions += 1

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
