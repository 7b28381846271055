"""Beam search over scheduler sequences, with vLLM's classic `use_beam_search` semantics.

Owns one request's search state: the live beams (one scheduler sequence each), their tokens and
cumulative logprobs, the finished hypotheses, and the selection made each round. Pure Python (no
`jax` import). The engine samples every live beam greedily with the top-20 logprobs of its next
token and hands them in with `add_logprobs`; once every live beam has reported, `advance` ranks
the candidates and applies the outcome through the scheduler's primitives (`append_token`,
`fork_seq`, `free_seq`), so beams that branch off one another share their common pages
copy-on-write.

One round, with width w: each live beam proposes its 2w most likely next tokens, scored by the
beam's cumulative logprob plus the token's; the 2w best proposals overall are kept. Those that
finish (an EOS or stop token id, `max_tokens`, the context length) join the finished hypotheses, of
which the w best by score are kept; the w best unfinished ones continue as the new beams. The search
ends when no proposal continues or, once w hypotheses are finished, when `early_stopping` says so:
True stops at once; False stops when the best continuing beam, scored at its current length, does
not beat the worst kept hypothesis. The result is the `n` best hypotheses, best first.

Score: cumulative logprob / length ** length_penalty, where the length counts the prompt and not a
final EOS token (the Hugging Face convention vLLM's beam search followed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


class BeamOps(Protocol):
    """The sequence primitives the search needs (`serving.scheduler.Scheduler` has them)."""

    def fork_seq(self, seq_id: int) -> int: ...

    def append_token(self, seq_id: int, token_id: int) -> None: ...

    def free_seq(self, seq_id: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """One finished beam."""

    token_ids: tuple[int, ...]  # generated tokens, the finishing one included
    cumulative_logprob: float
    logprobs: tuple[dict[int, float], ...]  # per generated token; empty unless kept
    finish_reason: Literal["stop", "length"]
    stop_reason: int | None  # the stop token id; None for EOS and length
    score: float


@dataclass(slots=True)
class _Beam:
    seq_id: int
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, float]]


@dataclass(frozen=True, slots=True)
class _Candidate:
    cumulative_logprob: float
    parent: _Beam
    token_id: int
    logprobs: dict[int, float]


class BeamSearch:
    """The search for one request, starting from its prompt sequence `seq_id`."""

    def __init__(
        self,
        seq_id: int,
        *,
        prompt_len: int,
        width: int,
        n: int,
        max_tokens: int,
        max_model_len: int,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        eos_token_ids: frozenset[int] = frozenset(),
        stop_token_ids: frozenset[int] = frozenset(),
        keep_logprobs: bool = False,
    ) -> None:
        if width < 1:
            raise ValueError(f"width: must be >= 1, got {width}")
        if not 1 <= n <= width:
            raise ValueError(f"n: must be in [1, width={width}], got {n}")
        self.width = width
        self.n = n
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.eos_token_ids = eos_token_ids
        self.stop_token_ids = stop_token_ids
        self.keep_logprobs = keep_logprobs
        self._beams = [_Beam(seq_id, [], 0.0, [])]
        self._reported: dict[int, dict[int, float]] = {}
        self._finished: list[Hypothesis] = []  # best first, at most `width`
        self.done = False

    @property
    def seq_ids(self) -> list[int]:
        """The live beams' sequence ids."""
        return [beam.seq_id for beam in self._beams]

    @property
    def ready(self) -> bool:
        """Every live beam has reported this round: `advance` can run."""
        return not self.done and len(self._reported) == len(self._beams)

    def add_logprobs(self, seq_id: int, logprobs: dict[int, float]) -> None:
        """The next-token logprobs of live beam `seq_id`: at least its 2 * width most likely."""
        if seq_id not in self.seq_ids:
            raise KeyError(f"seq {seq_id} is not a live beam")
        if seq_id in self._reported:
            raise ValueError(f"seq {seq_id} has already reported this round")
        if len(logprobs) < 2 * self.width:
            raise ValueError(f"logprobs: need the top {2 * self.width}, got {len(logprobs)}")
        self._reported[seq_id] = logprobs

    def advance(self, ops: BeamOps) -> None:
        """Runs one round (see the module docstring) and applies it to the sequences."""
        if not self.ready:
            raise RuntimeError("advance() needs every live beam's logprobs")
        proposals = 2 * self.width
        candidates = []
        for beam in self._beams:
            lps = self._reported[beam.seq_id]
            best = sorted(lps.items(), key=lambda kv: (-kv[1], kv[0]))[:proposals]
            candidates += [
                _Candidate(beam.cumulative_logprob + lp, beam, tok, lps) for tok, lp in best
            ]
        self._reported.clear()
        # Stable: equal scores keep beam order, then token order.
        candidates.sort(key=lambda c: -c.cumulative_logprob)
        continuing: list[_Candidate] = []
        finished = list(self._finished)
        for c in candidates[:proposals]:
            hypothesis = self._finish(c)
            if hypothesis is None:
                continuing.append(c)
            else:
                finished.append(hypothesis)
        finished.sort(key=lambda h: -h.score)
        self._finished = finished[: self.width]
        # Continuing candidates are one length, so their cumulative logprob order is score order.
        if not continuing or (len(finished) >= self.width and self._stop_early(continuing[0])):
            for beam in self._beams:
                ops.free_seq(beam.seq_id)
            self._beams = []
            self.done = True
            return
        self._beams = self._apply(continuing[: self.width], ops)

    def best(self) -> list[Hypothesis]:
        """The `n` best finished hypotheses, best first."""
        if not self.done:
            raise RuntimeError("the search has not finished")
        return self._finished[: self.n]

    def _apply(self, chosen: list[_Candidate], ops: BeamOps) -> list[_Beam]:
        """Turns the chosen candidates into the next beams: the first child of a beam continues
        its sequence, others fork it, beams without children are freed."""
        by_parent: dict[int, list[tuple[int, _Candidate]]] = {}
        for rank, c in enumerate(chosen):
            by_parent.setdefault(c.parent.seq_id, []).append((rank, c))
        new: list[tuple[int, _Beam]] = []
        for beam in self._beams:
            children = by_parent.get(beam.seq_id)
            if not children:
                continue
            # Forks first: they copy the parent's tokens before the parent is extended.
            seq_ids = [beam.seq_id] + [ops.fork_seq(beam.seq_id) for _ in children[1:]]
            for seq_id, (rank, c) in zip(seq_ids, children, strict=True):
                ops.append_token(seq_id, c.token_id)
                child = _Beam(
                    seq_id,
                    [*beam.token_ids, c.token_id],
                    c.cumulative_logprob,
                    [*beam.logprobs, c.logprobs] if self.keep_logprobs else [],
                )
                new.append((rank, child))
        for beam in self._beams:
            if beam.seq_id not in by_parent:
                ops.free_seq(beam.seq_id)
        return [beam for _, beam in sorted(new, key=lambda item: item[0])]

    def _finish(self, c: _Candidate) -> Hypothesis | None:
        """The hypothesis `c` completes, or None when it continues. Stop beats length."""
        num_out = len(c.parent.token_ids) + 1
        reason: Literal["stop", "length"] | None = None
        stop_reason = None
        if c.token_id in self.eos_token_ids:
            reason = "stop"
        elif c.token_id in self.stop_token_ids:
            reason, stop_reason = "stop", c.token_id
        elif num_out >= self.max_tokens or self.prompt_len + num_out >= self.max_model_len:
            reason = "length"
        if reason is None:
            return None
        ends_with_eos = reason == "stop" and stop_reason is None
        return Hypothesis(
            token_ids=(*c.parent.token_ids, c.token_id),
            cumulative_logprob=c.cumulative_logprob,
            logprobs=(*c.parent.logprobs, c.logprobs) if self.keep_logprobs else (),
            finish_reason=reason,
            stop_reason=stop_reason,
            score=self._score(c.cumulative_logprob, num_out - ends_with_eos),
        )

    def _stop_early(self, best: _Candidate) -> bool:
        """With `width` hypotheses finished: whether the best continuing beam can be given up."""
        if self.early_stopping:
            return True
        now = self._score(best.cumulative_logprob, len(best.parent.token_ids) + 1)
        return self._finished[self.width - 1].score >= now

    def _score(self, cumulative_logprob: float, num_out: int) -> float:
        return cumulative_logprob / (self.prompt_len + num_out) ** self.length_penalty
