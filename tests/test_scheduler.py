"""Tests for `serving.scheduler`, driven by a fake engine with no model.

The fake engine keeps a paged token store in place of the KV cache: it applies the plan's page
copies, writes every row's tokens through its block table, then reads each sampling row's whole
context back through the block table and asserts it is exactly the sequence's tokens. A wrong block
table, a missed copy-on-write, a page shared by mistake, a bad recompute or a cached page reused
for the wrong prefix therefore fails loudly. Sampled tokens (and the fake next-token logprobs beam
searches rank) depend on the context read back, so outputs are also compared across cache sizes
and with prefix caching on and off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxserve.beam_search import BeamSearch, Hypothesis
from serving.block_manager import hash_page
from serving.scheduler import Scheduler, SeqUpdate, StepPlan

VOCAB = 50
Sampler = Callable[[int, list[int]], int]


def context_hash(seed: int, context: list[int]) -> int:
    h = 7 * seed
    for pos, tok in enumerate(context):
        h = (h * 31 + (pos + 1) * (tok + 1)) % 1_000_003
    return h


def context_sampler(seq_id: int, context: list[int]) -> int:
    """A deterministic 'model': the next token depends on every context token and the seq."""
    return context_hash(seq_id, context) % VOCAB


def fake_logprobs(context: list[int]) -> dict[int, float]:
    """Deterministic next-token 'logprobs' of a context: its 20 most likely tokens, as the engine
    reports them to a beam search."""
    h = context_hash(1, context) + 1
    lps = {tok: -((h * (tok + 7)) % 1_000_003) / 100_000 for tok in range(VOCAB)}
    return dict(sorted(lps.items(), key=lambda kv: -kv[1])[:20])


class Harness:
    """Scheduler + fake engine + the client's view of every sequence's tokens."""

    def __init__(
        self,
        sampler: Sampler = context_sampler,
        decode_steps: int = 1,
        ahead: bool = False,
        **config: int,
    ) -> None:
        self.sched = Scheduler(**config)
        self.decode_steps = decode_steps  # > 1: try a multi-step run before every plain step
        # With runs: plan (and compute) the next run before updating each run, or each step that
        # completes prompts, as the engine's asynchronous scheduling does; the run so planned
        # and its samples wait here.
        self.ahead = ahead
        self.next_run: tuple[StepPlan, dict[int, list[int]]] | None = None
        # With `ahead`: a step of prompts admitted ahead, computed and not yet updated.
        self.prefill_ahead: tuple[StepPlan, dict[int, int]] | None = None
        bm = self.sched.block_manager
        self.page_size = bm.page_size
        self.pages: list[list[int | None]] = [[None] * bm.page_size for _ in range(bm.num_pages)]
        self.sampler = sampler
        self.prompts: dict[str, list[int]] = {}
        self.seq_request: dict[int, str] = {}
        self.outputs: dict[int, list[int]] = {}
        self.indexes: dict[int, int] = {}
        self.finished: dict[int, SeqUpdate | None] = {}  # None: finished by finish_seq
        self.aborted: set[str] = set()
        self.plans: list[StepPlan] = []
        # Beam searches: running ones, results of finished ones, every beam's tokens.
        self.beams: dict[str, BeamSearch] = {}
        self.beam_results: dict[str, list[Hypothesis]] = {}
        self.beam_tokens: dict[int, list[int]] = {}

    def add(self, request_id: str, prompt: list[int], **kw) -> None:
        kw.setdefault("n", 1)
        kw.setdefault("max_tokens", 8)
        self.sched.add_request(request_id, prompt, **kw)
        self.prompts[request_id] = list(prompt)

    def add_beam(self, request_id: str, prompt: list[int], width: int, **kw) -> None:
        """Adds a beam search of `width` beams, returning `n` (default 1) hypotheses."""
        n = kw.pop("n", 1)
        kw.setdefault("max_tokens", 8)
        seq_id = self.sched.add_request(request_id, prompt, n=1, beam_width=width, **kw)
        self.prompts[request_id] = list(prompt)
        self.seq_request[seq_id] = request_id
        self.beam_tokens[seq_id] = list(prompt)
        self.beams[request_id] = BeamSearch(
            seq_id,
            prompt_len=len(prompt),
            width=width,
            n=n,
            max_tokens=kw["max_tokens"],
            max_model_len=self.sched.max_model_len,
            eos_token_ids=frozenset(() if kw.get("ignore_eos") else kw.get("eos_token_ids", ())),
            stop_token_ids=frozenset(kw.get("stop_token_ids", ())),
        )

    def abort(self, request_id: str) -> None:
        self.sched.abort_request(request_id)
        self.aborted.add(request_id)
        self.beams.pop(request_id, None)

    def tokens(self, seq_id: int) -> list[int]:
        if seq_id in self.beam_tokens:
            return self.beam_tokens[seq_id]
        return self.prompts[self.seq_request[seq_id]] + self.outputs.get(seq_id, [])

    def live_seq_ids(self) -> list[int]:
        """Live sequences that are not beams (those are the beam search's to finish)."""
        return [
            sid
            for sid, rid in self.seq_request.items()
            if sid not in self.finished and rid not in self.aborted and sid not in self.beam_tokens
        ]

    def outputs_of(self, request_id: str) -> dict[int, list[int]]:
        """Sample index -> output tokens, for one request."""
        return {
            self.indexes[sid]: toks
            for sid, toks in self.outputs.items()
            if self.seq_request[sid] == request_id
        }

    def execute(self, plan: StepPlan) -> dict[int, int]:
        """What the device would do: copy, write, then sample from the context read back."""
        rows = [*plan.decode, *plan.prefill]
        assert len({row.seq_id for row in rows}) == len(rows)
        for src, dst in plan.page_copies:
            self.pages[dst] = list(self.pages[src])
        for row in plan.decode:
            assert len(row.token_ids) == 1 and not row.is_prefill
        for row in plan.prefill:
            assert row.token_ids and row.is_prefill
        for row in rows:
            self.seq_request.setdefault(row.seq_id, row.request_id)
            end = row.start_pos + len(row.token_ids)
            assert row.token_ids == self.tokens(row.seq_id)[row.start_pos : end]
            assert len(row.block_table) == -(-end // self.page_size)
            assert 0 not in row.block_table
            for pos, tok in enumerate(row.token_ids, start=row.start_pos):
                self.pages[row.block_table[pos // self.page_size]][pos % self.page_size] = tok
        sampled = {}
        for row in rows:
            if not row.sample_seq_ids:
                continue
            end = row.start_pos + len(row.token_ids)
            assert end == len(self.tokens(row.seq_id))
            assert row.sample_seq_ids[0] == row.seq_id
            context = [
                self.pages[row.block_table[pos // self.page_size]][pos % self.page_size]
                for pos in range(end)
            ]
            assert context == self.tokens(row.seq_id)
            for sid in row.sample_seq_ids:
                self.seq_request.setdefault(sid, row.request_id)
                sampled[sid] = self.sampler(sid, context)
        return sampled

    def execute_run(
        self, plan: StepPlan, prev: dict[int, list[int]] | None = None
    ) -> dict[int, list[int]]:
        """A multi-step run as the device does it: each row writes its last token, samples from
        the context read back, and feeds the sample in at the next position, `num_steps` times.
        A run that `follows_run` continues from `prev`, the samples of the run (or the step
        completing prompts) before it, which are not applied yet."""
        assert not plan.prefill and plan.num_steps > 1
        assert plan.follows_run == (prev is not None)
        for src, dst in plan.page_copies:
            self.pages[dst] = list(self.pages[src])
        sampled = {}
        for row in plan.decode:
            assert 1 <= row.num_steps <= plan.num_steps and row.sample_seq_ids == [row.seq_id]
            tokens = list(self.tokens(row.seq_id))
            if prev is not None:
                assert row.token_ids == [-1] and len(prev[row.seq_id]) in (1, self.decode_steps)
                tokens += prev[row.seq_id]
            else:
                assert row.token_ids == tokens[-1:]
            assert row.start_pos == len(tokens) - 1
            assert len(row.block_table) == -(-(row.start_pos + row.num_steps) // self.page_size)
            assert 0 not in row.block_table
            out = sampled[row.seq_id] = []
            for pos in range(row.start_pos, row.start_pos + row.num_steps):
                self.pages[row.block_table[pos // self.page_size]][pos % self.page_size] = tokens[
                    pos
                ]
                context = [
                    self.pages[row.block_table[p // self.page_size]][p % self.page_size]
                    for p in range(pos + 1)
                ]
                assert context == tokens
                out.append(self.sampler(row.seq_id, context))
                tokens.append(out[-1])
        return sampled

    def step(self, between: Callable[[], None] | None = None) -> tuple[StepPlan, list[SeqUpdate]]:
        """One schedule → execute → update round (a multi-step run when the harness runs them and
        the scheduler plans one); `between` runs after scheduling. With `ahead`, as the engine's
        asynchronous scheduling: after a single step, a step of prompts admitted ahead is
        planned and computed before that step's update, and updated in the next round, after
        the step that round plans (which it precedes on the device)."""
        plan = None
        if self.next_run is not None:
            (plan, runs), self.next_run = self.next_run, None
        elif self.decode_steps > 1 and self.prefill_ahead is None:
            plan = self.sched.schedule_decode_run(self.decode_steps)
            if plan is not None:
                runs = self.execute_run(plan)
        if plan is not None:
            if self.ahead and (nxt := self.sched.schedule_next_run(self.decode_steps)):
                self.next_run = nxt, self.execute_run(nxt, prev=runs)
            if between is not None:
                between()
            updates = self.sched.update_run(plan, runs)
            self._record(plan, updates, runs)
        else:
            plan = self.sched.schedule()
            assert plan.num_tokens <= self.sched.max_num_batched_tokens
            assert len(plan.prefill) <= self.sched.max_prefill_seqs
            sampled = self.execute(plan)
            if self.ahead and (nxt := self.sched.schedule_next_run(self.decode_steps)):
                chained = {sid: [token] for sid, token in sampled.items()}
                self.next_run = nxt, self.execute_run(nxt, prev=chained)
            ahead = None
            if self.ahead and self.next_run is None:
                if (first := self.sched.schedule_prefill_ahead()) is not None:
                    assert (
                        not first.decode and first.num_tokens <= self.sched.max_num_batched_tokens
                    )
                    assert len(first.prefill) <= self.sched.max_prefill_seqs
                    ahead = first, self.execute(first)
            if between is not None:
                between()
            updates = []
            if self.prefill_ahead is not None:
                earlier, earlier_sampled = self.prefill_ahead
                updates = self.sched.update(earlier, earlier_sampled)
                self._record(earlier, updates, earlier_sampled)
            self.prefill_ahead = ahead
            mine = self.sched.update(plan, sampled)
            self._record(plan, mine, sampled)
            updates += mine
        check_pages(self.sched)
        assert self.sched.num_running <= self.sched.max_num_seqs
        return plan, updates

    def _record(self, plan: StepPlan, updates: list[SeqUpdate], sampled: dict) -> None:
        """Checks one plan's updates against what it sampled (a run's: every row's tokens in
        order) and applies them to the client's view, then drives the beam searches."""
        self.plans.append(plan)
        seen: dict[int, int] = {}
        for u in updates:
            assert u.seq_id not in self.finished
            self.outputs.setdefault(u.seq_id, []).append(u.token_id)
            if plan.num_steps > 1:  # a run's updates give each row's tokens in order
                assert u.token_id == sampled[u.seq_id][seen.setdefault(u.seq_id, 0)]
                seen[u.seq_id] += 1
            else:
                assert u.token_id == sampled[u.seq_id]
            assert self.indexes.setdefault(u.seq_id, u.index) == u.index
            assert u.request_id == self.seq_request[u.seq_id]
            if u.finished:
                self.finished[u.seq_id] = u
        for row in (*plan.decode, *plan.prefill):
            search = self.beams.get(row.request_id)
            for sid in row.sample_seq_ids if search is not None else ():
                search.add_logprobs(sid, fake_logprobs(self.tokens(sid)))
        for rid, search in list(self.beams.items()):
            if search.ready:
                search.advance(BeamRecorder(self))
            if search.done:
                self.beam_results[rid] = search.best()
                del self.beams[rid]

    def run(self, max_steps: int = 10_000) -> int:
        """Steps until nothing is left; returns the number of steps."""
        steps = 0
        while (
            self.sched.has_unfinished()
            or self.next_run is not None
            or self.prefill_ahead is not None
        ):
            assert steps < max_steps, "scheduler did not terminate"
            self.step()
            steps += 1
        assert_all_free(self.sched)
        return steps


class BeamRecorder:
    """The scheduler's beam primitives, mirrored into the harness's view of every beam's tokens."""

    def __init__(self, h: Harness) -> None:
        self.h = h

    def fork_seq(self, seq_id: int) -> int:
        child = self.h.sched.fork_seq(seq_id)
        self.h.seq_request[child] = self.h.seq_request[seq_id]
        self.h.beam_tokens[child] = list(self.h.beam_tokens[seq_id])
        return child

    def append_token(self, seq_id: int, token_id: int) -> None:
        self.h.sched.append_token(seq_id, token_id)
        self.h.beam_tokens[seq_id].append(token_id)

    def free_seq(self, seq_id: int) -> None:
        self.h.sched.free_seq(seq_id)


def check_pages(sched: Scheduler) -> None:
    """Every page's refcount equals the number of live block tables holding it; free pages are
    exactly those with no holder, the evictable ones among them exactly the cached ones; every
    cached page a sequence holds is registered under the hash of that sequence's own prefix;
    running sequences hold pages for exactly their computed tokens."""
    bm = sched.block_manager
    holders = Counter(p for seq in sched._seqs.values() for p in seq.block_table)
    assert 0 not in holders
    for page in range(bm.num_pages):
        assert bm.ref_count(page) == holders[page], page
    assert bm.num_free_pages == bm.num_usable_pages - len(holders)
    assert {page: h for h, page in bm._cached.items()} == bm._page_hash
    assert not set(bm._free) & set(bm._evictable)
    assert set(bm._free) | set(bm._evictable) == set(range(1, bm.num_pages)) - set(holders)
    assert set(bm._evictable) == set(bm._page_hash) - set(holders)
    if not sched.enable_prefix_caching:
        assert not bm._page_hash
    for seq in sched._seqs.values():
        parent = None
        for i, page in enumerate(seq.block_table):
            if i * bm.page_size + bm.page_size > len(seq.token_ids):
                break
            parent = hash_page(parent, seq.token_ids[i * bm.page_size : (i + 1) * bm.page_size])
            assert bm.page_hash(page) in (None, parent)
    for seq in sched._running:
        assert len(seq.block_table) == bm.pages_for(seq.num_computed)
    # What lets decodes go first and running prefills skip the row limit (see `schedule`).
    prefilling = [seq.is_prefilling for seq in sched._running]
    assert prefilling == sorted(prefilling)
    assert sum(prefilling) <= sched.max_prefill_seqs
    for seq in sched._waiting:
        assert seq.block_table == [] and seq.num_computed == 0
    assert sched.num_running + sched.num_waiting == len(sched._seqs)


def assert_all_free(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.has_unfinished()
    assert bm.num_free_pages == bm.num_usable_pages
    assert all(bm.ref_count(p) == 0 for p in range(bm.num_pages))
    assert bm.usage == 0.0
    assert not sched._seqs and not sched._requests


def config(**overrides: int) -> dict[str, int]:
    """Scheduler arguments; prefix caching stays on unless `enable_prefix_caching=False`."""
    base = dict(
        num_pages=65,
        page_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=128,
        max_prefill_seqs=8,
    )
    return base | overrides


def prompt(length: int, seed: int = 0) -> list[int]:
    return [(seed * 17 + i * 3) % VOCAB for i in range(length)]


def expected_output(seq_id: int, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What the context sampler yields for a sequence nothing stops early."""
    toks = list(prompt_ids)
    for _ in range(max_tokens):
        toks.append(context_sampler(seq_id, toks))
    return toks[len(prompt_ids) :]


# --- construction and validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_seqs=8, max_num_batched_tokens=7), "max_num_batched_tokens"),
        (dict(max_model_len=1), "max_model_len"),
        (dict(max_prefill_seqs=0), "max_prefill_seqs"),
        (dict(num_pages=1), "num_pages"),
        (dict(page_size=0), "page_size"),
    ],
)
def test_constructor_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Scheduler(**config(**overrides))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompt_token_ids=[]), "prompt_token_ids"),
        (dict(prompt_token_ids=prompt(128)), "prompt_token_ids"),
        (dict(n=0), "n"),
        (dict(n=9), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    ],
)
def test_add_request_validation_names_the_field(kwargs, field):
    sched = Scheduler(**config())
    args = dict(request_id="r", prompt_token_ids=prompt(4), n=1, max_tokens=4) | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        sched.add_request(**args)
    assert not sched.has_unfinished()


def test_add_request_rejects_duplicates_and_sequences_larger_than_the_cache():
    sched = Scheduler(**config(num_pages=5, page_size=4, max_model_len=64))  # 16 cached tokens
    sched.add_request("a", prompt(4), n=1, max_tokens=4)
    with pytest.raises(ValueError, match="^request_id:"):
        sched.add_request("a", prompt(4), n=1, max_tokens=4)
    with pytest.raises(ValueError, match="^prompt_token_ids:.*KV-cache pages"):
        sched.add_request("b", prompt(17), n=1, max_tokens=1)
    # 16 prompt tokens + 1 output: the last token's K/V is never written, so it fits.
    sched.add_request("c", prompt(16), n=1, max_tokens=1)
    with pytest.raises(ValueError, match="^max_tokens:"):
        sched.add_request("d", prompt(16), n=1, max_tokens=2)
    assert sched.num_waiting == 2


# --- basic flow, budgets and chunking ---------------------------------------------------------


def test_single_request_prefills_then_decodes_until_max_tokens():
    h = Harness(**config())
    h.add("r", prompt(10), max_tokens=5)
    plan, updates = h.step()
    assert plan.decode == [] and len(plan.prefill) == 1
    row = plan.prefill[0]
    assert (row.start_pos, len(row.token_ids), row.is_prefill) == (0, 10, True)
    assert row.sample_seq_ids == [row.seq_id]
    assert plan.num_tokens == 10 and not plan.is_empty
    assert [u.finished for u in updates] == [False]
    for step in range(4):
        plan, updates = h.step()
        assert plan.prefill == [] and len(plan.decode) == 1
        assert plan.decode[0].start_pos == 10 + step
        assert plan.num_tokens == 1
    assert updates[0].finished and updates[0].finish_reason == "length"
    assert h.outputs_of("r") == {0: expected_output(row.seq_id, prompt(10), 5)}
    assert h.run() == 0
    assert h.sched.schedule().is_empty


def test_long_prompt_is_chunked_by_the_token_budget():
    h = Harness(**config(num_pages=300, max_model_len=2048))
    h.add("long", prompt(1000), max_tokens=2)
    chunks = []
    while not h.outputs:
        plan, _ = h.step()
        [row] = plan.prefill
        assert row.start_pos == sum(chunks)
        assert row.sample_seq_ids == ([] if row.start_pos + len(row.token_ids) < 1000 else [0])
        chunks.append(len(row.token_ids))
    assert chunks == [64] * 15 + [40]
    h.run()


def test_decodes_keep_running_every_step_while_a_long_prompt_is_chunked():
    h = Harness(**config(num_pages=300, max_model_len=2048))
    for i in range(4):
        h.add(f"short{i}", prompt(3, seed=i), max_tokens=100)
    h.step()
    h.add("long", prompt(1000, seed=9), max_tokens=1)
    chunk_steps = 0
    while "long" not in {h.seq_request[s] for s in h.outputs}:
        before = {sid: len(toks) for sid, toks in h.outputs.items()}
        plan, _ = h.step()
        assert len(plan.decode) == 4  # every short request decodes every step
        assert {sid: len(h.outputs[sid]) for sid in before} == {
            sid: n + 1 for sid, n in before.items()
        }
        assert len(plan.prefill) == 1
        chunk_steps += 1
    assert chunk_steps == -(-1000 // 60)  # 4 of the 64 tokens go to the decodes
    h.run()


def test_max_num_seqs_limits_running_sequences():
    h = Harness(**config(max_num_seqs=2))
    for i in range(3):
        h.add(f"r{i}", prompt(4, seed=i), max_tokens=3 + i)
    plan, _ = h.step()
    assert [row.request_id for row in plan.prefill] == ["r0", "r1"]
    assert (h.sched.num_running, h.sched.num_waiting) == (2, 1)
    h.step()
    plan, updates = h.step()  # r0 finishes here, freeing its slot
    assert [u.request_id for u in updates if u.finished] == ["r0"]
    plan, _ = h.step()
    assert [row.request_id for row in plan.prefill] == ["r2"]
    h.run()


def test_max_prefill_seqs_limits_prefill_rows_per_step():
    h = Harness(**config(max_prefill_seqs=2))
    for i in range(5):
        h.add(f"r{i}", prompt(4, seed=i), max_tokens=4)
    admitted = [[row.request_id for row in h.step()[0].prefill] for _ in range(3)]
    assert admitted == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    h.run()


def test_running_partial_prefills_count_against_max_prefill_seqs():
    h = Harness(**config(max_prefill_seqs=1, max_num_batched_tokens=16, max_num_seqs=4))
    h.add("a", prompt(40), max_tokens=2)
    h.add("b", prompt(4), max_tokens=2)
    for _ in range(3):  # a needs 3 chunks of 16; b waits behind it
        plan, _ = h.step()
        assert [row.request_id for row in plan.prefill] == ["a"]
    plan, _ = h.step()
    assert [row.request_id for row in plan.prefill] == ["b"]
    h.run()


def test_admission_is_first_come_first_served():
    # The head of the queue does not fit yet; smaller requests behind it must not overtake it.
    h = Harness(**config(num_pages=9, page_size=4, max_model_len=32))  # 32 cached tokens
    h.add("big0", prompt(20), max_tokens=4)
    h.step()
    h.add("big1", prompt(20), max_tokens=4)
    h.add("small", prompt(2), max_tokens=2)
    first_seen: dict[str, int] = {}
    step = 0
    while h.sched.has_unfinished():
        plan, _ = h.step()
        for row in plan.prefill:
            first_seen.setdefault(row.request_id, step)
        step += 1
    assert first_seen["big1"] <= first_seen["small"]
    assert_all_free(h.sched)


# --- finish rules ------------------------------------------------------------------------------


def scripted(tokens: list[int]) -> Sampler:
    """A sampler emitting `tokens` in order, whatever the context."""
    it = iter(tokens)
    return lambda seq_id, context: next(it)


def finish_of(script: list[int], **kw) -> tuple[list[int], SeqUpdate]:
    h = Harness(sampler=scripted(script), **config(max_model_len=kw.pop("max_model_len", 128)))
    h.add("r", prompt(kw.pop("prompt_len", 4)), **kw)
    h.run()
    [last] = h.finished.values()
    return h.outputs_of("r")[0], last


def test_finish_at_max_tokens_is_length():
    out, last = finish_of([1, 2, 3, 4, 5], max_tokens=3)
    assert out == [1, 2, 3]
    assert (last.finish_reason, last.stop_reason, last.token_id) == ("length", None, 3)


def test_finish_on_eos_is_stop_without_stop_reason():
    out, last = finish_of([1, 2, 9, 4], max_tokens=10, eos_token_ids=[9, 8])
    assert out == [1, 2, 9]
    assert (last.finish_reason, last.stop_reason) == ("stop", None)


def test_finish_on_stop_token_id_reports_it():
    out, last = finish_of([1, 7, 9], max_tokens=10, eos_token_ids=[9], stop_token_ids=[7])
    assert out == [1, 7]
    assert (last.finish_reason, last.stop_reason) == ("stop", 7)


def test_ignore_eos_keeps_generating_but_stop_ids_still_stop():
    out, last = finish_of([9, 9, 5], max_tokens=3, eos_token_ids=[9], ignore_eos=True)
    assert out == [9, 9, 5] and last.finish_reason == "length"
    out, last = finish_of(
        [9, 7], max_tokens=5, eos_token_ids=[9], stop_token_ids=[7], ignore_eos=True
    )
    assert out == [9, 7] and (last.finish_reason, last.stop_reason) == ("stop", 7)


def test_min_tokens_suppresses_stops_below_it():
    # Two outputs must precede a stop: the eos at index 0 and the stop id at index 1 do not count.
    out, last = finish_of(
        [9, 7, 9, 1], max_tokens=10, min_tokens=2, eos_token_ids=[9], stop_token_ids=[7]
    )
    assert out == [9, 7, 9]
    assert (last.finish_reason, last.stop_reason) == ("stop", None)


def test_stop_wins_over_length_on_the_same_token():
    out, last = finish_of([1, 9], max_tokens=2, eos_token_ids=[9])
    assert out == [1, 9] and last.finish_reason == "stop"


def test_finish_at_max_model_len_is_length():
    out, last = finish_of([1] * 20, max_tokens=20, prompt_len=14, max_model_len=16)
    assert out == [1, 1] and last.finish_reason == "length"


def test_updates_report_every_sampled_token_once():
    h = Harness(**config())
    h.add("a", prompt(5), max_tokens=4, n=2)
    h.add("b", prompt(6, seed=1), max_tokens=3)
    all_updates = []
    while h.sched.has_unfinished():
        all_updates += h.step()[1]
    per_seq = Counter(u.seq_id for u in all_updates)
    assert sorted(per_seq.values()) == [3, 4, 4]
    assert sorted((u.request_id, u.index) for u in all_updates if u.finished) == [
        ("a", 0),
        ("a", 1),
        ("b", 0),
    ]


# --- abort and finish_seq at every stage ------------------------------------------------------


def test_abort_while_waiting_mid_prefill_and_decoding_frees_everything():
    h = Harness(**config(max_num_batched_tokens=16, max_num_seqs=4, max_prefill_seqs=1))
    h.add("decoding", prompt(8), max_tokens=50)
    h.add("prefilling", prompt(60, seed=1), max_tokens=50)
    h.add("waiting", prompt(8, seed=2), max_tokens=50)
    h.step()
    h.step()
    h.step()
    stages = {
        r: sum(1 for s in h.sched._seqs.values() if s.request.request_id == r) for r in h.prompts
    }
    assert stages == {"decoding": 1, "prefilling": 1, "waiting": 1}
    assert h.sched.num_waiting == 1
    running = {s.request.request_id: s for s in h.sched._running}
    assert running["prefilling"].is_prefilling and not running["decoding"].is_prefilling
    for rid in ("waiting", "prefilling", "decoding"):
        h.abort(rid)
        check_pages(h.sched)
    assert_all_free(h.sched)
    h.abort("decoding")  # unknown (already gone): ignored
    assert h.sched.schedule().is_empty


def test_abort_after_fork_frees_shared_pages():
    h = Harness(**config())
    h.add("r", prompt(6), max_tokens=10, n=3)
    h.step()
    h.step()
    assert h.sched.num_running == 3
    h.abort("r")
    assert_all_free(h.sched)


def test_abort_and_finish_between_schedule_and_update_are_skipped():
    h = Harness(**config())
    h.add("a", prompt(4), max_tokens=5)
    h.add("b", prompt(4, seed=1), max_tokens=5)
    h.add("c", prompt(4, seed=2), max_tokens=5)
    h.step()
    c_seq = next(s for s, r in h.seq_request.items() if r == "c")

    def interfere() -> None:
        h.abort("a")
        h.sched.finish_seq(c_seq, "stop", "</s>")
        h.finished[c_seq] = None

    plan, updates = h.step(between=interfere)
    assert len(plan.decode) == 3
    assert [u.request_id for u in updates] == ["b"]
    h.run()


def test_finish_seq_frees_pages_and_rejects_bad_calls():
    h = Harness(**config())
    h.add("r", prompt(6), max_tokens=10, n=2)
    h.step()
    seq_ids = sorted(h.outputs)
    h.sched.finish_seq(seq_ids[0], "stop", "\n\n")
    check_pages(h.sched)
    with pytest.raises(KeyError):
        h.sched.finish_seq(seq_ids[0], "stop", None)
    with pytest.raises(ValueError, match="^reason:"):
        h.sched.finish_seq(seq_ids[1], "abort", None)
    with pytest.raises(ValueError, match="^stop_reason:"):
        h.sched.finish_seq(seq_ids[1], "length", "x")
    h.sched.finish_seq(seq_ids[1], "length", None)
    assert_all_free(h.sched)


def test_schedule_and_update_must_alternate():
    h = Harness(**config())
    h.add("a", prompt(4), max_tokens=5)
    h.add("b", prompt(4), max_tokens=5)
    plan = h.sched.schedule()
    with pytest.raises(RuntimeError, match="update"):
        h.sched.schedule()
    with pytest.raises(ValueError, match="^sampled:"):
        h.sched.update(plan, {plan.prefill[0].seq_id: 1})
    stale = StepPlan(plan.decode, plan.prefill, plan.page_copies, plan.preempted)
    with pytest.raises(ValueError, match="^plan:"):
        h.sched.update(stale, {})
    assert len(h.sched.update(plan, {row.seq_id: 1 for row in plan.prefill})) == 2
    assert h.sched.update(h.sched.schedule(), {0: 2, 1: 3})[0].token_id == 2


# --- preemption ---------------------------------------------------------------------------------


def test_preemption_evicts_the_newest_and_it_resumes_first_without_reemitting():
    # 4 pages of 2 tokens. a and b take 2 pages each; when a needs a third, b is evicted.
    h = Harness(**config(num_pages=5, page_size=2, max_num_seqs=4, max_model_len=8))
    h.add("a", prompt(3), max_tokens=5)
    h.add("b", prompt(3, seed=1), max_tokens=4)
    h.step()
    h.add("c", prompt(3, seed=2), max_tokens=2)
    plan, _ = h.step()
    assert plan.preempted == [] and h.sched.num_waiting == 1
    plan, _ = h.step()
    assert plan.preempted == ["b"] and h.sched.num_preemptions == 1
    assert [row.request_id for row in plan.decode] == ["a"]
    assert [s.request.request_id for s in h.sched._waiting] == ["b", "c"]
    b_tokens_at_preemption = h.tokens(1)
    assert len(b_tokens_at_preemption) == 5

    recompute = None
    while recompute is None:
        plan, _ = h.step()
        recompute = next((row for row in plan.prefill if row.request_id == "b"), None)
        assert all(row.request_id != "c" for row in plan.prefill)
    assert recompute.start_pos == 0 and recompute.is_prefill
    assert recompute.token_ids == b_tokens_at_preemption
    assert recompute.sample_seq_ids == [1]
    h.run()
    assert h.outputs_of("b") == {0: expected_output(1, prompt(3, seed=1), 4)}
    assert h.outputs_of("a") == {0: expected_output(0, prompt(3), 5)}


def test_a_tiny_cache_gives_the_same_outputs_as_a_large_one():
    def run(num_pages: int) -> tuple[dict[str, dict[int, list[int]]], int]:
        h = Harness(**config(num_pages=num_pages, page_size=4, max_num_seqs=6, max_model_len=48))
        for i in range(8):
            h.add(f"r{i}", prompt(5 + 3 * i, seed=i), max_tokens=12 + i)
        h.run()
        return {r: h.outputs_of(r) for r in h.prompts}, h.sched.num_preemptions

    ample, ample_preemptions = run(num_pages=200)
    tight, tight_preemptions = run(num_pages=13)
    assert ample_preemptions == 0 and tight_preemptions > 0
    assert tight == ample


def test_a_mid_prefill_sequence_can_be_preempted_and_restarts_its_prompt():
    # 8 pages of 2 tokens; a budget of 4 leaves b 3 prompt tokens a step next to a's decode.
    # Without prefix caching, so that the restart recomputes from the first token.
    h = Harness(
        **config(
            num_pages=9,
            page_size=2,
            max_num_seqs=2,
            max_num_batched_tokens=4,
            max_model_len=16,
            enable_prefix_caching=False,
        )
    )
    h.add("a", prompt(4), max_tokens=9)
    h.step()
    h.add("b", prompt(12, seed=1), max_tokens=1)
    assert [h.step()[0].prefill[0].start_pos for _ in range(2)] == [0, 3]
    plan, _ = h.step()  # a takes a 7th page; b's next chunk needs 2 pages of the 1 left
    assert plan.preempted == ["b"] and plan.prefill == []
    assert [row.request_id for row in plan.decode] == ["a"]
    plan, _ = h.step()
    assert [(row.request_id, row.start_pos, row.token_ids) for row in plan.prefill] == [
        ("b", 0, prompt(12, seed=1)[:3])
    ]
    h.run()
    assert h.outputs_of("a") == {0: expected_output(0, prompt(4), 9)}
    assert h.outputs_of("b") == {0: expected_output(1, prompt(12, seed=1), 1)}


# --- n > 1: fork and copy-on-write ---------------------------------------------------------------


def test_n_samples_share_the_prompt_pages_and_copy_the_partial_last_page():
    h = Harness(**config(page_size=4))
    h.add("r", prompt(10), max_tokens=6, n=3)  # pages [0,4) [4,8) [8,10): the last is partial
    plan, updates = h.step()
    [row] = plan.prefill
    assert row.sample_seq_ids == [0, 1, 2]
    assert [u.index for u in updates] == [0, 1, 2]
    bm = h.sched.block_manager
    tables = {s.seq_id: list(s.block_table) for s in h.sched._running}
    assert tables[0] == tables[1] == tables[2] == row.block_table
    assert [bm.ref_count(p) for p in row.block_table] == [3, 3, 3]

    plan, _ = h.step()
    assert [r.seq_id for r in plan.decode] == [0, 1, 2]
    partial = row.block_table[2]
    assert [src for src, _ in plan.page_copies] == [partial, partial]
    assert [dst for _, dst in plan.page_copies] == [r.block_table[2] for r in plan.decode[:2]]
    assert plan.decode[2].block_table == row.block_table  # the last holder writes in place
    assert [bm.ref_count(p) for p in row.block_table] == [3, 3, 1]
    h.run()
    assert len(h.outputs_of("r")) == 3


def test_n_samples_with_a_page_aligned_prompt_need_no_copies():
    h = Harness(**config(page_size=4))
    h.add("r", prompt(8), max_tokens=6, n=2)
    h.step()
    plan, _ = h.step()
    assert plan.page_copies == []
    assert plan.decode[0].block_table[:2] == plan.decode[1].block_table[:2]
    assert plan.decode[0].block_table[2] != plan.decode[1].block_table[2]
    h.run()


def test_n_samples_reserve_their_slots_before_admission():
    h = Harness(**config(max_num_seqs=4))
    h.add("a", prompt(4), max_tokens=4, n=3)
    h.add("b", prompt(4, seed=1), max_tokens=4, n=2)
    plan, _ = h.step()
    assert [row.request_id for row in plan.prefill] == ["a"]
    assert h.sched.num_running == 3
    h.run()


def test_chunked_n_sample_prompt_forks_only_at_its_last_chunk():
    h = Harness(**config(max_num_batched_tokens=16))
    h.add("r", prompt(40), max_tokens=3, n=2)
    samples = [h.step()[0].prefill[0].sample_seq_ids for _ in range(3)]
    assert samples == [[], [], [0, 1]]
    h.run()


def test_preempted_fork_recomputes_on_its_own():
    # 12 tokens of cache; without prefix caching, so that recomputes start from the first token.
    h = Harness(
        **config(
            num_pages=7,
            page_size=2,
            max_num_seqs=2,
            max_model_len=12,
            enable_prefix_caching=False,
        )
    )
    h.add("r", prompt(5), max_tokens=7, n=2)
    h.run()
    assert h.sched.num_preemptions > 0
    recomputes = [
        row
        for plan in h.plans
        for row in plan.prefill
        if row.start_pos == 0 and len(row.token_ids) > 5
    ]
    assert recomputes and all(row.sample_seq_ids == [row.seq_id] for row in recomputes)
    assert {i: len(t) for i, t in h.outputs_of("r").items()} == {0: 7, 1: 7}


# --- prefix caching ------------------------------------------------------------------------------


def test_a_repeated_prompt_attaches_its_cached_full_pages_but_computes_its_last_token():
    h = Harness(**config(page_size=4))
    h.add("a", prompt(10), max_tokens=3)
    h.run()
    bm = h.sched.block_manager
    # 10 prompt tokens + 2 fed-back outputs were computed: 3 full pages, now cached and free.
    assert (bm.num_cached_pages, bm.num_evictable_pages) == (3, 3)
    [a_row] = h.plans[0].prefill
    h.add("b", prompt(10), max_tokens=3)
    plan, _ = h.step()
    [row] = plan.prefill
    assert (row.start_pos, row.token_ids) == (8, prompt(10)[8:])
    assert row.block_table[:2] == a_row.block_table[:2]
    assert [bm.ref_count(p) for p in row.block_table] == [1, 1, 1]
    assert h.sched.num_cached_tokens("b") == 8
    # A prompt of exactly the cached pages still computes its last page: its last token's logits
    # are what gets sampled.
    a_out = h.outputs_of("a")[0]
    h.add("c", prompt(10) + a_out[:2], max_tokens=3)
    # A later turn of the conversation reuses the pages of the generated tokens too.
    h.add("d", prompt(10) + a_out + [1, 2, 3], max_tokens=3)
    plan, _ = h.step()
    assert [(r.request_id, r.start_pos) for r in plan.prefill] == [("c", 8), ("d", 12)]
    assert h.sched.num_cached_tokens("d") == 12
    h.run()
    assert h.outputs_of("b") == {0: expected_output(1, prompt(10), 3)}
    assert h.outputs_of("d") == {0: expected_output(3, prompt(10) + a_out + [1, 2, 3], 3)}
    assert (h.sched.prefix_cache_hits, h.sched.prefix_cache_queries) == (28, 10 + 10 + 12 + 16)


def test_running_sequences_share_the_pages_of_a_common_prefix():
    h = Harness(**config(page_size=4))
    h.add("a", prompt(20), max_tokens=10)
    h.step()
    h.add("b", prompt(18) + [7, 7, 7], max_tokens=10)
    plan, _ = h.step()
    [row] = plan.prefill
    a_table = next(s.block_table for s in h.sched._running if s.request.request_id == "a")
    assert row.start_pos == 16 and row.block_table[:4] == a_table[:4]
    bm = h.sched.block_manager
    assert [bm.ref_count(p) for p in row.block_table] == [2, 2, 2, 2, 1, 1]
    h.abort("a")
    assert [bm.ref_count(p) for p in row.block_table] == [1, 1, 1, 1, 1, 1]
    h.run()
    assert h.outputs_of("b") == {0: expected_output(1, prompt(18) + [7, 7, 7], 10)}


def test_a_preempted_sequence_resumes_after_its_cached_pages():
    # 8 pages of 2 tokens: b is preempted when a grows, and its first pages are still cached
    # when it comes back.
    def run(caching: bool) -> Harness:
        h = Harness(
            **config(
                num_pages=9,
                page_size=2,
                max_num_seqs=4,
                max_model_len=16,
                enable_prefix_caching=caching,
            )
        )
        h.add("a", prompt(3), max_tokens=10)
        h.add("b", prompt(5, seed=1), max_tokens=6)
        h.run()
        assert h.sched.num_preemptions == 1
        return h

    cached, uncached = run(True), run(False)
    recomputes = [[r for r in h.plans[10].prefill] for h in (cached, uncached)]
    assert [[(r.request_id, r.start_pos) for r in rows] for rows in recomputes] == [
        [("b", 4)],
        [("b", 0)],
    ]
    assert {r: cached.outputs_of(r) for r in "ab"} == {r: uncached.outputs_of(r) for r in "ab"}
    # The metric counts prompt tokens at the first admission only.
    assert cached.sched.prefix_cache_hits == 4


def test_skip_prefix_cache_computes_every_token():
    h = Harness(**config(page_size=4))
    h.add("a", prompt(12), max_tokens=2)
    h.run()
    h.add("b", prompt(12), max_tokens=2, skip_prefix_cache=True)
    h.add("c", prompt(12), max_tokens=2)
    plan, _ = h.step()
    assert [(r.request_id, r.start_pos) for r in plan.prefill] == [("b", 0), ("c", 8)]
    assert h.sched.prefix_cache_queries == 24  # b's tokens are not queries
    h.run()


@pytest.mark.parametrize("num_pages", [200, 14])
def test_outputs_with_prefix_caching_equal_outputs_without(num_pages):
    common = prompt(22, seed=5)

    def run(caching: bool) -> tuple[dict[str, dict[int, list[int]]], Scheduler]:
        h = Harness(
            **config(
                num_pages=num_pages,
                page_size=4,
                max_num_seqs=4,
                max_num_batched_tokens=24,
                max_model_len=48,
                max_prefill_seqs=2,
                enable_prefix_caching=caching,
            )
        )
        for i in range(8):
            h.add(f"r{i}", common[: 14 + i] + prompt(i % 3, seed=i), max_tokens=4 + i, n=1 + i % 2)
            h.step()
        h.run()
        return {r: h.outputs_of(r) for r in h.prompts}, h.sched

    with_cache, sched = run(True)
    without, plain = run(False)
    assert with_cache == without
    assert sched.prefix_cache_hits > 0 and plain.prefix_cache_queries == 0
    assert (sched.num_preemptions > 0) == (num_pages == 14)


# --- beam search primitives ----------------------------------------------------------------------


def test_sampled_beams_await_the_search_and_sit_out_until_extended():
    sched = Scheduler(**config(page_size=4))
    root = sched.add_request("r", prompt(6), n=1, max_tokens=4, beam_width=2)
    plan = sched.schedule()
    assert sched.update(plan, {root: 0}) == []  # a beam gets no token from the sampler
    assert sched.schedule().is_empty
    with pytest.raises(KeyError):
        sched.fork_seq(root + 1)
    child = sched.fork_seq(root)
    sched.append_token(root, 11)
    sched.append_token(child, 12)
    with pytest.raises(ValueError, match="awaiting"):
        sched.append_token(root, 13)
    with pytest.raises(ValueError, match="awaiting"):
        sched.fork_seq(child)
    plan = sched.schedule()
    assert [(r.seq_id, r.token_ids, r.start_pos) for r in plan.decode] == [
        (root, [11], 6),
        (child, [12], 6),
    ]
    # Both write into the shared partial page: the first writer gets a copy.
    assert plan.page_copies == [(plan.decode[1].block_table[1], plan.decode[0].block_table[1])]
    assert plan.decode[0].block_table[0] == plan.decode[1].block_table[0]
    sched.update(plan, {root: 0, child: 0})
    sched.free_seq(child)
    with pytest.raises(KeyError):
        sched.free_seq(child)
    assert sched.has_unfinished()
    sched.free_seq(root)
    assert_all_free(sched)


def test_a_beam_search_reserves_its_width_in_batch_slots():
    h = Harness(**config(max_num_seqs=4))
    h.add_beam("beams", prompt(5), width=3, max_tokens=4)
    h.add("other", prompt(5, seed=1), max_tokens=4, n=2)
    plan, _ = h.step()
    assert [row.request_id for row in plan.prefill] == ["beams"]
    assert h.sched.num_running == 3  # the search branched into its full width
    h.run()
    assert len(h.beam_results["beams"]) == 1 and len(h.outputs_of("other")) == 2


@pytest.mark.parametrize("caching", [True, False])
def test_beam_searches_in_a_tiny_cache_equal_those_in_an_ample_one(caching):
    def run(num_pages: int) -> tuple[dict[str, list[Hypothesis]], Harness]:
        h = Harness(
            **config(
                num_pages=num_pages,
                page_size=2,
                max_num_seqs=8,
                max_model_len=24,
                enable_prefix_caching=caching,
            )
        )
        h.add_beam("a", prompt(7), width=4, n=2, max_tokens=12, eos_token_ids=[3])
        h.add("plain", prompt(9, seed=2), max_tokens=10)
        h.add_beam("b", prompt(5, seed=1), width=3, n=3, max_tokens=10)
        h.run()
        return h.beam_results, h

    ample, _ = run(200)
    tight, h = run(13)  # 12 pages of 2: barely the longest sequence
    assert h.sched.num_preemptions > 0
    assert tight == ample
    assert [len(ample[r]) for r in "ab"] == [2, 3]


# --- random interleavings ------------------------------------------------------------------------

request_st = st.fixed_dictionaries(
    {
        "prompt_len": st.integers(1, 40),
        # Prompts of one seed are prefixes of one another: the prefix cache gets hits.
        "seed": st.integers(0, 3),
        "n": st.integers(1, 3),
        "beam_width": st.sampled_from([0, 0, 1, 2, 3]),
        "max_tokens": st.integers(1, 16),
        "min_tokens": st.integers(0, 2),
        "eos": st.lists(st.integers(0, VOCAB - 1), max_size=2),
        "stop": st.lists(st.integers(0, VOCAB - 1), max_size=2),
        "ignore_eos": st.booleans(),
    }
)
op_st = st.one_of(
    st.tuples(st.just("add"), request_st),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("abort_in_step"), st.integers(0, 30)),
    st.tuples(st.just("finish"), st.integers(0, 30)),
)


def fuzz_harness(
    page_size: int,
    max_model_len: int,
    spare_pages: int,
    max_num_seqs: int,
    spare_budget: int,
    max_prefill_seqs: int,
    enable_prefix_caching: bool,
    decode_steps: int,
    ahead: bool,
) -> Harness:
    """A harness for the fuzz tests: from a cache that holds just one longest sequence
    (constant preemption) to a roomier one, a token budget of at least one row per sequence."""
    return Harness(
        decode_steps=decode_steps,
        ahead=ahead,
        num_pages=1 + -(-max_model_len // page_size) + spare_pages,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_seqs + spare_budget,
        max_model_len=max_model_len,
        max_prefill_seqs=max_prefill_seqs,
        enable_prefix_caching=enable_prefix_caching,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.integers(1, 4),
    max_model_len=st.integers(4, 40),
    spare_pages=st.integers(0, 8),
    max_num_seqs=st.integers(1, 5),
    spare_budget=st.integers(0, 12),
    max_prefill_seqs=st.integers(1, 3),
    enable_prefix_caching=st.booleans(),
    decode_steps=st.sampled_from([1, 3]),
    ahead=st.booleans(),
    initial=st.lists(request_st, min_size=1, max_size=6),
    ops=st.lists(op_st, max_size=30),
)
def test_random_interleavings_never_leak_pages_and_terminate(
    page_size,
    max_model_len,
    spare_pages,
    max_num_seqs,
    spare_budget,
    max_prefill_seqs,
    enable_prefix_caching,
    decode_steps,
    ahead,
    initial,
    ops,
):
    h = fuzz_harness(
        page_size,
        max_model_len,
        spare_pages,
        max_num_seqs,
        spare_budget,
        max_prefill_seqs,
        enable_prefix_caching,
        decode_steps,
        ahead,
    )
    added: list[str] = []

    def add(req: dict) -> None:
        rid = f"r{len(added)}"
        max_tokens = req["max_tokens"]
        ids = prompt(1 + req["prompt_len"] % (max_model_len - 1), seed=req["seed"])
        stops = dict(
            eos_token_ids=req["eos"], stop_token_ids=req["stop"], ignore_eos=req["ignore_eos"]
        )
        width = min(req["beam_width"], max_num_seqs)
        if width:
            h.add_beam(rid, ids, width, n=min(req["n"], width), max_tokens=max_tokens, **stops)
        else:
            h.add(
                rid,
                ids,
                n=min(req["n"], max_num_seqs),
                max_tokens=max_tokens,
                min_tokens=min(req["min_tokens"], max_tokens),
                **stops,
            )
        added.append(rid)

    for req in initial:
        add(req)
    for op, arg in ops:
        if op == "add":
            add(arg)
        elif op == "step":
            for _ in range(arg):
                h.step()
        elif op == "abort":
            h.abort(added[arg % len(added)])
        elif op == "abort_in_step":
            h.step(between=partial(h.abort, added[arg % len(added)]))
        elif op == "finish" and h.live_seq_ids():
            live = h.live_seq_ids()
            sid = live[arg % len(live)]
            h.sched.finish_seq(sid, "stop", "stop string")
            h.finished[sid] = None
        check_pages(h.sched)
    h.run(max_steps=5_000)

    event(f"steps: {min(len(h.plans) // 25 * 25, 100)}+")
    for name, hit in [
        ("preempted", h.sched.num_preemptions),
        ("copied", any(p.page_copies for p in h.plans)),
        ("forked", any(len(r.sample_seq_ids) > 1 for p in h.plans for r in p.prefill)),
        ("chunked", any(not r.sample_seq_ids for p in h.plans for r in p.prefill)),
        ("cache hit", h.sched.prefix_cache_hits),
        ("beam search", h.beam_results),
        ("multi-step run", any(p.num_steps > 1 for p in h.plans)),
        ("run planned ahead", any(p.follows_run for p in h.plans)),
        ("prompts admitted ahead", any(p.ahead for p in h.plans)),
        (
            "run chained onto prompts",
            any(p.prefill and q.follows_run for p, q in pairwise(h.plans)),
        ),
    ]:
        event(f"{name}: {bool(hit)}")
    for rid in added:
        if rid in h.aborted:
            continue
        room = max_model_len - len(h.prompts[rid])
        for toks in h.outputs_of(rid).values():
            assert 1 <= len(toks) <= room
        for hyp in h.beam_results.get(rid, ()):
            assert 1 <= len(hyp.token_ids) <= room


# --- multi-step decode runs --------------------------------------------------------------------


def run_workload(decode_steps: int, ahead: bool = False, **overrides: int) -> Harness:
    h = Harness(decode_steps=decode_steps, ahead=ahead, **config(**overrides))
    h.add("a", prompt(9, 1), max_tokens=23)
    h.add("b", prompt(4, 2), max_tokens=5, n=2)
    h.add("c", prompt(13, 3), max_tokens=40, eos_token_ids={7})
    h.add("d", prompt(6, 4), max_tokens=30, stop_token_ids=[11, 12])
    h.add("e", prompt(9, 1), max_tokens=17)  # shares "a"'s first two pages
    h.run()
    return h


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("overrides", [{}, dict(num_pages=14), dict(enable_prefix_caching=False)])
def test_multi_step_runs_give_the_outputs_of_single_steps(overrides, ahead):
    single = run_workload(1, **overrides)
    runs = run_workload(4, ahead, **overrides)
    for rid in "abcde":
        assert runs.outputs_of(rid) == single.outputs_of(rid)
        for sid, u in runs.finished.items():
            if runs.seq_request[sid] == rid:
                twin = next(
                    v
                    for t, v in single.finished.items()
                    if single.seq_request[t] == rid and single.indexes[t] == runs.indexes[sid]
                )
                assert (u.finish_reason, u.stop_reason) == (twin.finish_reason, twin.stop_reason)
    run_plans = [p for p in runs.plans if p.num_steps > 1]
    assert run_plans and len(runs.plans) < len(single.plans)
    assert any(p.follows_run for p in run_plans) == ahead
    if not overrides:  # rows near their max_tokens take fewer steps than the run
        assert any(r.num_steps < p.num_steps for p in run_plans for r in p.decode)


def test_a_run_is_planned_only_when_every_sequence_plainly_decodes():
    h = Harness(decode_steps=4, **config(max_num_batched_tokens=8))
    h.add("a", prompt(3), max_tokens=20)
    assert h.sched.schedule_decode_run(4) is None  # nothing runs yet
    h.step()
    h.add("b", prompt(20, 1), max_tokens=20)
    assert h.sched.schedule_decode_run(4) is None  # "b" waits
    h.step()  # "b" starts its prompt in chunks
    assert h.sched.schedule_decode_run(4) is None  # "b" is mid-prefill
    while h.sched._running[-1].is_prefilling:
        h.step()
    h.step()
    asked = []
    assert h.sched.schedule_decode_run(4, lambda n, ctx: asked.append((n, ctx)) and False) is None
    lens = [len(h.tokens(sid)) for sid in h.live_seq_ids()]
    assert asked == [(2, max(lens) - 1 + 4)]
    plan = h.sched.schedule_decode_run(4, lambda n, ctx: True)
    assert plan is not None and plan.num_steps == 4 and not plan.prefill
    with pytest.raises(ValueError, match="update_run"):
        h.sched.update(plan, {})
    with pytest.raises(ValueError, match="too few tokens"):
        h.sched.update_run(plan, {r.seq_id: [1] for r in plan.decode})
    h.sched.update_run(plan, h.execute_run(plan))


def test_a_run_stops_at_the_length_limits_and_waits_for_free_pages():
    h = Harness(decode_steps=8, **config(max_model_len=16, num_pages=6))
    h.add("a", prompt(10), max_tokens=6)
    h.step()  # prefill, first token: 11 tokens, 5 output tokens left
    plan = h.sched.schedule_decode_run(8)
    assert [r.num_steps for r in plan.decode] == [5]
    updates = h.sched.update_run(plan, h.execute_run(plan))
    assert [u.finish_reason for u in updates] == [None] * 4 + ["length"]
    assert not h.sched.has_unfinished()
    # A 12-token prompt holds 3 pages of 4 after its first step; a run of 8 needs 2 more.
    h = Harness(decode_steps=8, **config(max_model_len=32, num_pages=9))
    h.add("b", prompt(12), max_tokens=10, ignore_eos=True)
    h.step()
    bm = h.sched.block_manager
    held = bm.allocate(bm.num_free_pages - 1)
    assert h.sched.schedule_decode_run(8) is None
    bm.free(held[:1])
    assert [r.num_steps for r in h.sched.schedule_decode_run(8).decode] == [8]


def test_the_next_run_is_planned_ahead_only_while_every_row_surely_goes_on():
    """`schedule_next_run` plans on while the run computes only if every row takes all its
    steps and has a token to go after them, the rows are the running ones and no waiting
    sequence could take a slot; plans are updated oldest first."""
    h = Harness(decode_steps=4, **config(max_num_seqs=2))
    h.add("a", prompt(5, 1), max_tokens=14)
    h.add("b", prompt(7, 2), max_tokens=9)
    h.step()  # both prompts; first tokens
    assert h.sched.schedule_next_run(4) is None  # nothing in flight
    first = h.sched.schedule_decode_run(4)
    runs = h.execute_run(first)
    nxt = h.sched.schedule_next_run(4)
    assert nxt is not None and nxt.follows_run and nxt.num_steps == 4
    assert [r.token_ids for r in nxt.decode] == [[-1], [-1]]
    assert [r.start_pos for r in nxt.decode] == [r.start_pos + 4 for r in first.decode]
    assert h.sched.schedule_next_run(4) is None  # one ahead at most
    with pytest.raises(RuntimeError, match="update"):
        h.sched.schedule()
    with pytest.raises(ValueError, match="oldest"):
        h.sched.update_run(nxt, h.execute_run(nxt, prev=runs))
    nxt_runs = h.execute_run(nxt, prev=runs)
    h.sched.update_run(first, runs)
    check_pages(h.sched)
    updates = h.sched.update_run(nxt, nxt_runs)
    assert [u.token_id for u in updates] == nxt_runs[nxt.decode[0].seq_id] + nxt_runs[
        nxt.decode[1].seq_id
    ]
    assert updates[-1].finish_reason == "length"  # "b": 1 + 4 + 4 = its 9 tokens
    (seq,) = h.sched._running
    assert seq.token_ids[5:] == [
        *h.tokens(seq.seq_id)[5:],
        *runs[seq.seq_id],
        *updates_of(updates, seq.seq_id),
    ]
    last = h.sched.schedule_decode_run(4)
    assert [r.num_steps for r in last.decode] == [4]
    assert h.sched.schedule_next_run(4) is None  # one token left after it: no run of two
    h.sched.cancel_pending()  # a failed step: back to what was computed before it
    assert seq.num_computed == last.decode[0].start_pos == len(seq.token_ids) - 1
    assert h.sched.schedule_decode_run(4) is not None

    # A waiting request that has a slot to take stops the planning ahead.
    h = Harness(decode_steps=4, **config(max_num_seqs=2))
    h.add("a", prompt(5, 1), max_tokens=30)
    h.step()
    run = h.sched.schedule_decode_run(4)
    h.add("b", prompt(4, 3), max_tokens=5)
    assert h.sched.schedule_next_run(4) is None
    h.sched.update_run(run, h.execute_run(run))


def updates_of(updates: list[SeqUpdate], seq_id: int) -> list[int]:
    return [u.token_id for u in updates if u.seq_id == seq_id]


def test_a_sequence_that_stops_in_a_run_wastes_only_the_run_planned_after_it():
    """Planned ahead, the next run also computes a row that stops in the run before it; its
    update skips that row, whose pages are free again and whose output is that of single
    steps, and the other rows go on unchanged."""
    free = Harness(**config())
    free.add("a", prompt(6, 1), max_tokens=25)
    free.add("b", prompt(9, 2), max_tokens=25)
    free.run()
    (b_out,) = free.outputs_of("b").values()
    # An end token "b" first samples as its 7th: mid-way through its second run of 4.
    k = next(i for i in range(6, len(b_out)) if b_out[i] not in b_out[:i])
    single = Harness(**config())
    ahead = Harness(decode_steps=4, ahead=True, **config())
    for h in (single, ahead):
        h.add("a", prompt(6, 1), max_tokens=25)
        h.add("b", prompt(9, 2), max_tokens=25, eos_token_ids={b_out[k]})
        h.run()
        assert [u.finish_reason for u in h.finished.values()] == ["stop", "length"]
        assert list(h.outputs_of("b").values()) == [b_out[: k + 1]]
    assert ahead.outputs_of("a") == single.outputs_of("a") == free.outputs_of("a")
    # "b" stopped in a run after which the next was already planned with it.
    assert any(
        p.follows_run and len(p.decode) == 2 and p.decode[1].start_pos > 9 + k for p in ahead.plans
    )


def test_the_first_run_is_chained_onto_the_step_that_completes_every_prompt():
    """When one step completes the prompt of every running sequence, each sampling one token,
    `schedule_next_run` plans their first run before that step's update, each row one token
    past its prompt. A row whose first token ends it is skipped by the run's update and its
    pages freed; the other rows get the outputs of single steps."""
    single = Harness(**config())
    single.add("a", prompt(5, 1), max_tokens=14)
    single.add("b", prompt(7, 2), max_tokens=9)
    single.run()
    ((b_first, *_),) = single.outputs_of("b").values()
    h = Harness(decode_steps=4, ahead=True, **config())
    h.add("a", prompt(5, 1), max_tokens=14)
    h.add("b", prompt(7, 2), max_tokens=9, eos_token_ids={b_first})
    plan, updates = h.step()
    assert [r.request_id for r in plan.prefill] == ["a", "b"] and not plan.decode
    nxt, _ = h.next_run
    assert nxt.follows_run and nxt.num_steps == 4
    rows = [(r.token_ids, r.start_pos, r.num_steps) for r in nxt.decode]
    assert rows == [([-1], 5, 4), ([-1], 7, 4)]
    assert [u.finish_reason for u in updates] == [None, "stop"]
    assert not h.sched.is_live(nxt.decode[1].seq_id)
    h.run()
    assert h.outputs_of("a") == single.outputs_of("a")
    assert h.outputs_of("b") == {0: [b_first]}

    def chained(*requests: dict, **overrides: int) -> bool:
        """Whether the step that completes these requests' prompts chains a run."""
        h = Harness(decode_steps=4, ahead=True, **config(**overrides))
        for i, kw in enumerate(requests):
            h.add(f"r{i}", prompt(10, i), **{"max_tokens": 9} | kw)
        while not h.sched._running or h.sched._running[-1].is_prefilling:
            h.step()
        return h.next_run is not None

    assert chained({}, {})
    # A chunked prompt's last chunk is planned ahead of the step before it (no chain: that
    # step's samples are read back on their own).
    assert not chained({}, max_num_batched_tokens=8)
    assert not chained({}, {"n": 2})  # a fork
    assert not chained({}, {"max_tokens": 1})  # its first token surely ends it
    assert not chained({}, {}, max_prefill_seqs=1)  # the second waits with a slot to take
    assert chained({}, {}, max_num_seqs=1)  # ... without one, it waits for the runs to end


def test_runs_go_on_while_requests_wait_for_a_batch_slot():
    h = Harness(decode_steps=4, **config(max_num_seqs=2))
    for i in range(5):
        h.add(f"r{i}", prompt(5, i), max_tokens=9)
    h.run()
    waits = [p for p in h.plans if p.num_steps > 1]
    assert len(waits) >= 4
    single = Harness(**config(max_num_seqs=2))
    for i in range(5):
        single.add(f"r{i}", prompt(5, i), max_tokens=9)
    single.run()
    for i in range(5):
        assert h.outputs_of(f"r{i}") == single.outputs_of(f"r{i}")


def test_a_burst_sharing_a_prefix_computes_it_once():
    h = Harness(**config())
    shared = prompt(12, 5)  # 3 full pages of 4
    h.add("a", shared + [1, 2])
    h.add("b", shared + [3])
    h.add("c", prompt(6, 9))  # shares nothing, queued behind "b": FCFS holds it too
    plan, _ = h.step()
    assert [r.request_id for r in plan.prefill] == ["a"]
    plan, _ = h.step()
    rows = {r.request_id: r for r in plan.prefill}
    assert rows["b"].start_pos == 12 and rows["c"].start_pos == 0
    assert h.sched.num_cached_tokens("b") == 12
    h.run()


# --- prompts admitted ahead --------------------------------------------------------------------


def sample_all(plan: StepPlan, token: int = 1) -> dict[int, int]:
    return {sid: token for row in (*plan.decode, *plan.prefill) for sid in row.sample_seq_ids}


def test_prompts_are_admitted_ahead_while_a_step_computes_and_sit_out_the_next_plan():
    sched = Scheduler(**config(max_num_batched_tokens=16))
    for rid in "abcd":
        sched.add_request(rid, prompt(8, ord(rid)), n=1, max_tokens=4)
    assert sched.schedule_prefill_ahead() is None  # nothing computing
    first = sched.schedule()
    assert [r.request_id for r in first.prefill] == ["a", "b"]
    ahead = sched.schedule_prefill_ahead()
    assert ahead.ahead and not ahead.decode
    assert [(r.request_id, r.start_pos, len(r.token_ids)) for r in ahead.prefill] == [
        ("c", 0, 8),
        ("d", 0, 8),
    ]
    with pytest.raises(RuntimeError, match="update"):
        sched.schedule()  # `first` is not an ahead plan: it is updated first
    sched.update(first, sample_all(first))
    second = sched.schedule()  # c and d are computing: a and b decode alone
    assert [r.request_id for r in second.decode] == ["a", "b"] and not second.prefill
    with pytest.raises(ValueError, match="^plan:"):
        sched.update(second, sample_all(second))  # plans are updated in order
    assert [u.request_id for u in sched.update(ahead, sample_all(ahead))] == ["c", "d"]
    sched.update(second, sample_all(second))
    assert sorted(r.request_id for r in sched.schedule().decode) == ["a", "b", "c", "d"]


def test_the_rest_of_a_chunked_prompt_goes_ahead_first_and_nothing_goes_ahead_of_a_run():
    sched = Scheduler(**config(max_num_batched_tokens=16))
    sched.add_request("long", prompt(20), n=1, max_tokens=4)
    sched.add_request("next", prompt(4), n=1, max_tokens=4)
    sched.add_request("third", prompt(14, 2), n=1, max_tokens=4)
    plan = sched.schedule()  # 16 of long's 20 prompt tokens
    ahead = sched.schedule_prefill_ahead()  # its last 4 first, then admission, FCFS
    assert [(r.request_id, r.start_pos, len(r.token_ids)) for r in ahead.prefill] == [
        ("long", 16, 4),
        ("next", 0, 4),
        ("third", 0, 8),
    ]
    assert ahead.prefill[0].sample_seq_ids and not ahead.prefill[2].sample_seq_ids
    sched.update(plan, {})
    plan = sched.schedule()  # third's last 6 tokens; long and next are computing
    assert [(r.request_id, r.start_pos) for r in plan.prefill] == [("third", 8)]
    assert not plan.decode
    sched.update(ahead, sample_all(ahead))
    sched.update(plan, sample_all(plan))
    run = sched.schedule_decode_run(2)
    assert run is not None
    sched.add_request("late", prompt(4, 3), n=1, max_tokens=4)
    assert sched.schedule_prefill_ahead() is None  # a run computing
    sched.update_run(run, {r.seq_id: [1, 1] for r in run.decode})

    beams = Scheduler(**config(max_num_batched_tokens=16))
    beams.add_request("beam", prompt(4), n=1, max_tokens=4, beam_width=2)
    beams.add_request("after", prompt(4, 1), n=1, max_tokens=4)
    plan = beams.schedule()
    assert [r.request_id for r in plan.prefill] == ["beam", "after"]
    beams.add_request("plain", prompt(4, 2), n=1, max_tokens=4)
    assert beams.schedule_prefill_ahead() is None  # a beam search runs


def test_while_prompts_computed_ahead_a_step_stalls_instead_of_preempting():
    # 8 usable pages of 4 tokens: a and b take 2 pages each, ahead c takes 2 and keeps 2 free
    # (one per running sequence), so c's page-opening decode must wait for c's update.
    sched = Scheduler(**config(num_pages=9, max_num_batched_tokens=16))
    sched.add_request("a", prompt(8, 1), n=1, max_tokens=8)
    sched.add_request("b", prompt(8, 2), n=1, max_tokens=8)
    sched.add_request("c", prompt(8, 3), n=1, max_tokens=8)
    sched.add_request("d", prompt(4, 4), n=1, max_tokens=8)
    first = sched.schedule()
    assert [r.request_id for r in first.prefill] == ["a", "b"]
    ahead = sched.schedule_prefill_ahead()
    assert [r.request_id for r in ahead.prefill] == ["c"]  # d would leave too few pages
    assert sched.block_manager.num_free_pages == 2
    sched.update(first, sample_all(first))
    sched.block_manager.allocate(1)  # another user of the cache: one page left
    second = sched.schedule()
    assert [r.request_id for r in second.decode] == ["a"]  # b stalls; nothing preempted
    assert not second.preempted and sched.num_preemptions == 0
    sched.update(ahead, sample_all(ahead))
    sched.update(second, sample_all(second))


def test_a_prompt_waits_for_the_shared_pages_a_prompt_admitted_ahead_computes():
    sched = Scheduler(**config(max_num_batched_tokens=16))
    shared = prompt(12, 5)  # 3 full pages of 4
    sched.add_request("first", prompt(16, 1), n=1, max_tokens=4)
    sched.add_request("a", shared + [1], n=1, max_tokens=4)
    plan = sched.schedule()
    ahead = sched.schedule_prefill_ahead()
    assert [r.request_id for r in ahead.prefill] == ["a"]
    sched.add_request("b", shared + [2], n=1, max_tokens=4)
    sched.update(plan, sample_all(plan))
    second = sched.schedule()  # b's first page is in `ahead`, not yet cached: b waits
    assert not second.prefill
    sched.update(ahead, sample_all(ahead))
    sched.update(second, sample_all(second))
    third = sched.schedule()
    assert [(r.request_id, r.start_pos) for r in third.prefill] == [("b", 12)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.integers(1, 4),
    spare_pages=st.integers(0, 20),
    max_num_seqs=st.integers(1, 6),
    spare_budget=st.integers(0, 24),
    max_prefill_seqs=st.integers(1, 4),
    enable_prefix_caching=st.booleans(),
    decode_steps=st.sampled_from([1, 4]),
    requests=st.lists(
        st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(0, 3)),
        min_size=2,
        max_size=12,
    ),
)
def test_prompts_admitted_ahead_give_the_outputs_of_steps_updated_first(
    page_size,
    spare_pages,
    max_num_seqs,
    spare_budget,
    max_prefill_seqs,
    enable_prefix_caching,
    decode_steps,
    requests,
):
    """Asynchronous scheduling (runs planned ahead, prompts admitted ahead) against plain
    alternation: every request's output tokens and finish are the same (the fake model samples
    from the context it reads back through the pages), through preemption, chunking, prefix
    sharing and stop tokens, and nothing leaks."""
    max_model_len = 40
    outs = {}
    for ahead in (False, True):
        h = fuzz_harness(
            page_size,
            max_model_len,
            spare_pages,
            max_num_seqs,
            spare_budget,
            max_prefill_seqs,
            enable_prefix_caching,
            decode_steps,
            ahead,
        )
        for i, (length, max_tokens, seed) in enumerate(requests):
            # Seeds repeat, so prompts share prefixes; token 3 stops some of them early.
            h.add(
                f"r{i}",
                prompt(min(length, max_model_len - 1), seed),
                max_tokens=max_tokens,
                stop_token_ids=[3],
            )
        h.run()
        event(f"prompts admitted ahead: {any(p.ahead for p in h.plans)}")
        outs[ahead] = [
            (
                h.outputs_of(f"r{i}"),
                [
                    (u.finish_reason, u.stop_reason)
                    for sid, u in h.finished.items()
                    if h.seq_request[sid] == f"r{i}"
                ],
            )
            for i in range(len(requests))
        ]
    assert outs[True] == outs[False]


def test_a_long_prompt_goes_one_chunk_per_step_while_others_decode():
    sched = Scheduler(**config(max_num_batched_tokens=16))
    sched.add_request("short", prompt(4), n=1, max_tokens=20)
    plan = sched.schedule()
    sched.update(plan, sample_all(plan))
    sched.add_request("long", prompt(60, 1), n=1, max_tokens=4)
    plan = sched.schedule()  # short decodes, long's first 15 tokens
    assert [(r.request_id, len(r.token_ids)) for r in (*plan.decode, *plan.prefill)] == [
        ("short", 1),
        ("long", 15),
    ]
    assert sched.schedule_prefill_ahead() is None  # 45 left: more than a step's budget
    sched.update(plan, sample_all(plan))

    alone = Scheduler(**config(max_num_batched_tokens=16))
    alone.add_request("long", prompt(60, 1), n=1, max_tokens=4)
    plan = alone.schedule()
    ahead = alone.schedule_prefill_ahead()  # nothing decodes: the next chunk goes ahead
    assert [(r.start_pos, len(r.token_ids)) for r in ahead.prefill] == [(16, 16)]
