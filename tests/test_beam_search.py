"""Beam search: `jaxserve.beam_search` against a textbook beam search that ranks every token of
the vocabulary, on a deterministic toy model (many configurations) and end to end on a tiny real
model (whose reference recomputes every beam's whole sequence at every step); plus the options'
validation and the engine's page accounting."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.beam_search import BeamSearch
from jaxserve.sampling_params import SamplingParams
from tests.test_engine import make_llm, random_prompts
from tests.utils import full_forward

NextLogprobs = Callable[[list[int]], np.ndarray]  # a context -> logprobs over the vocabulary


def reference_beam_search(
    next_logprobs: Callable[[list[list[int]]], list[np.ndarray]],
    prompt: list[int],
    *,
    width: int,
    n: int,
    max_tokens: int,
    max_model_len: int,
    length_penalty: float,
    early_stopping: bool,
    eos: set[int],
    stop: set[int],
) -> tuple[list[tuple[list[int], float, str]], int]:
    """(tokens, cumulative logprob, finish reason) of the n best hypotheses, best first, and the
    number of steps: each step every (beam, token) pair is a candidate, the 2 * width best are
    kept, finished ones compete for `width` places, unfinished ones continue."""

    def score(cum: float, num_tokens: int) -> float:
        return cum / (len(prompt) + num_tokens) ** length_penalty

    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int], float, str]] = []
    steps = 0
    while True:
        steps += 1
        lps = next_logprobs([prompt + tokens for tokens, _ in beams])
        candidates = [
            (cum + float(lp[t]), tokens + [t])
            for (tokens, cum), lp in zip(beams, lps, strict=True)
            for t in range(len(lp))
        ]
        candidates.sort(key=lambda c: -c[0])
        running = []
        for cum, tokens in candidates[: 2 * width]:
            t = tokens[-1]
            if t in eos:
                finished.append((score(cum, len(tokens) - 1), tokens, cum, "stop"))
            elif t in stop:
                finished.append((score(cum, len(tokens)), tokens, cum, "stop"))
            elif len(tokens) == max_tokens or len(prompt) + len(tokens) == max_model_len:
                finished.append((score(cum, len(tokens)), tokens, cum, "length"))
            else:
                running.append((tokens, cum))
        finished = sorted(finished, key=lambda f: -f[0])[:width]
        if not running:
            break
        if len(finished) == width and (
            early_stopping or finished[-1][0] >= score(running[0][1], len(running[0][0]))
        ):
            break
        beams = running[:width]
    return [(tokens, cum, reason) for _, tokens, cum, reason in finished[:n]], steps


class FakeSequences:
    """`BeamOps` over plain token lists, checking the search's bookkeeping."""

    def __init__(self, prompt: list[int]) -> None:
        self.tokens = {0: list(prompt)}
        self.ids = itertools.count(1)

    def fork_seq(self, seq_id: int) -> int:
        child = next(self.ids)
        self.tokens[child] = list(self.tokens[seq_id])
        return child

    def append_token(self, seq_id: int, token_id: int) -> None:
        self.tokens[seq_id].append(token_id)

    def free_seq(self, seq_id: int) -> None:
        del self.tokens[seq_id]


def run_search(
    next_logprobs: NextLogprobs, prompt: list[int], **kw
) -> tuple[list[tuple[list[int], float, str]], int]:
    """Drives `BeamSearch` as the engine does, handing it each beam's top-20 logprobs; returns
    the hypotheses and the number of rounds."""
    seqs = FakeSequences(prompt)
    search = BeamSearch(0, prompt_len=len(prompt), **kw)
    rounds = 0
    while not search.done:
        rounds += 1
        assert sorted(search.seq_ids) == sorted(seqs.tokens)
        for sid in search.seq_ids:
            lp = next_logprobs(seqs.tokens[sid])
            top = np.argsort(-lp, kind="stable")[:20]
            search.add_logprobs(sid, {int(t): float(lp[t]) for t in top})
        search.advance(seqs)
    assert not seqs.tokens  # every beam was freed
    best = [(list(h.token_ids), h.cumulative_logprob, h.finish_reason) for h in search.best()]
    return best, rounds


def toy_model(vocab: int, seed: int) -> NextLogprobs:
    """Deterministic, context-dependent log-softmax rows."""

    def next_logprobs(context: list[int]) -> np.ndarray:
        rng = np.random.default_rng([seed, len(context), *context])
        logits = rng.normal(size=vocab) * 3
        return logits - np.log(np.exp(logits).sum())

    return next_logprobs


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    prompt_len=st.integers(1, 6),
    width=st.integers(1, 8),
    n_from_width=st.integers(0, 7),
    max_tokens=st.integers(1, 7),
    max_model_len=st.integers(8, 16),
    length_penalty=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    early_stopping=st.booleans(),
    eos=st.sets(st.integers(0, 29), max_size=3),
    stop=st.sets(st.integers(0, 29), max_size=3),
)
def test_search_equals_the_textbook_search_on_a_toy_model(
    seed,
    prompt_len,
    width,
    n_from_width,
    max_tokens,
    max_model_len,
    length_penalty,
    early_stopping,
    eos,
    stop,
):
    model = toy_model(30, seed)
    prompt = list(range(prompt_len))
    options = dict(
        width=width,
        n=1 + n_from_width % width,
        max_tokens=max_tokens,
        max_model_len=max_model_len,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    got, rounds = run_search(
        model, prompt, eos_token_ids=frozenset(eos), stop_token_ids=frozenset(stop), **options
    )
    want, steps = reference_beam_search(
        lambda seqs: [model(s) for s in seqs], prompt, eos=eos, stop=stop - eos, **options
    )
    assert rounds == steps  # stopped at the same point
    assert [(t, r) for t, _, r in got] == [(t, r) for t, _, r in want]
    np.testing.assert_allclose([c for _, c, _ in got], [c for _, c, _ in want], rtol=1e-12)


def model_logprobs(model, pad_to: int, rows: int) -> Callable[[list[list[int]]], list[np.ndarray]]:
    """Next-token log-softmax of each sequence from a no-cache forward over the whole sequence;
    sequences and the batch are padded to fixed sizes (causal attention ignores what follows), so
    a single compilation serves the whole search."""

    def next_logprobs(seqs: list[list[int]]) -> list[np.ndarray]:
        padded = [s + [0] * (pad_to - len(s)) for s in seqs]
        padded += [padded[0]] * (rows - len(padded))
        logits = full_forward(model, padded)
        return [np.asarray(jax.nn.log_softmax(logits[i][len(s) - 1])) for i, s in enumerate(seqs)]

    return next_logprobs


@pytest.mark.parametrize(
    ("width", "n", "length_penalty", "early_stopping"),
    [
        (1, 1, 1.0, False),
        (2, 2, 1.0, False),
        (2, 1, 0.0, True),
        (4, 2, 1.0, False),
        (4, 4, 2.0, False),
        (4, 3, 0.5, True),
    ],
)
def test_engine_beam_search_equals_a_reference_on_a_tiny_model(
    tiny_model, width, n, length_penalty, early_stopping
):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [5, 11], seed=61)
    reference_lps = model_logprobs(model, pad_to=24, rows=8)
    # The second most likely first token of the first prompt stops: a finished candidate at once.
    stop_id = int(np.argsort(-reference_lps([prompts[0]])[0])[1])
    eos = set(model.cfg.eos_token_ids)
    params = SamplingParams(
        use_beam_search=True,
        temperature=0.0,
        n=n,
        best_of=width,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_tokens=8,
        stop_token_ids=[stop_id],
        logprobs=1,
        detokenize=False,
    )
    llm = make_llm(model)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        want, _ = reference_beam_search(
            reference_lps,
            prompt,
            width=width,
            n=n,
            max_tokens=8,
            max_model_len=128,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos=eos,
            stop={stop_id} - eos,
        )
        assert [c.index for c in out.outputs] == list(range(n))
        assert [(c.token_ids, c.finish_reason) for c in out.outputs] == [(t, r) for t, _, r in want]
        for c, (_, cum, _) in zip(out.outputs, want, strict=True):
            np.testing.assert_allclose(c.cumulative_logprob, cum, atol=1e-4)
            chosen = [lp[t] for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
            np.testing.assert_allclose(sum(chosen), c.cumulative_logprob, atol=1e-5)
            if c.finish_reason == "stop" and c.token_ids[-1] == stop_id:
                assert c.stop_reason == stop_id
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    assert all(bm.ref_count(p) == 0 for p in range(bm.num_pages))


@pytest.mark.parametrize("caching", [True, False])
def test_beam_search_under_preemption_equals_an_ample_cache(tiny_model, caching):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [14, 9, 17], seed=71)
    beams = SamplingParams(
        use_beam_search=True, temperature=0.0, n=2, best_of=4, max_tokens=10, detokenize=False
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, detokenize=False)
    params = [beams, greedy, beams]
    ample = make_llm(model).generate(prompts, params)
    llm = make_llm(model, num_pages=12, enable_prefix_caching=caching)
    tight = llm.generate(prompts, params)
    assert llm.engine.stats()["num_preemptions"] > 0
    for a, b in zip(tight, ample, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert llm.engine.stats()["kv_used_tokens"] == 0


class CharTokenizer:
    """Token t is the letter chr(97 + t % 26); id 2 is EOS."""

    eos_token_ids = (2,)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids if not (skip_special_tokens and t == 2))


def test_beam_outputs_carry_text_and_arrive_once_finished(tiny_model):
    from jaxserve.engine import EngineConfig
    from jaxserve.llm_engine import LLMEngine

    model = tiny_model()
    config = EngineConfig(
        page_size=4,
        num_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_prefill_seqs=4,
        max_model_len=64,
        attention_backend="reference",
    )
    eng = LLMEngine(model, CharTokenizer(), config)
    prompt = random_prompts(model.cfg.vocab_size, [6], seed=81)[0]
    params = SamplingParams(use_beam_search=True, temperature=0.0, n=2, best_of=3, max_tokens=5)
    eng.add_request("b", prompt, params)
    deltas = []
    while eng.has_unfinished_requests():
        deltas += [o for o in eng.step() if o.outputs]
    [out] = deltas  # nothing streams before the end
    assert out.finished and [c.index for c in out.outputs] == [0, 1]
    for c in out.outputs:
        assert c.text == CharTokenizer().decode(c.token_ids)
    assert out.metrics.first_token_time is not None
    assert eng.stats()["generation_tokens_total"] == sum(len(c.token_ids) for c in out.outputs)

    def score(c) -> float:  # length_penalty 1; a final EOS does not count
        eos = c.finish_reason == "stop" and c.stop_reason is None
        return c.cumulative_logprob / (len(prompt) + len(c.token_ids) - eos)

    assert score(out.outputs[0]) >= score(out.outputs[1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(use_beam_search=True), "temperature"),
        (dict(use_beam_search=True, temperature=0.0, top_k=5), "top_k"),
        (dict(use_beam_search=True, temperature=0.0, top_p=0.9), "top_p"),
        (dict(use_beam_search=True, temperature=0.0, presence_penalty=0.5), "presence_penalty"),
        (dict(use_beam_search=True, temperature=0.0, min_tokens=1), "min_tokens"),
        (dict(use_beam_search=True, temperature=0.0, stop=["x"]), "stop"),
        (dict(use_beam_search=True, temperature=0.0, n=9), "n"),
        (dict(use_beam_search=True, temperature=0.0, best_of=9), "best_of"),
        (dict(use_beam_search=True, temperature=0.0, n=3, best_of=2), "best_of"),
        (
            dict(use_beam_search=True, temperature=0.0, length_penalty=float("inf")),
            "length_penalty",
        ),
        (dict(use_beam_search="yes", temperature=0.0), "use_beam_search"),
        (dict(use_beam_search=True, temperature=0.0, early_stopping="never"), "early_stopping"),
        (dict(best_of=2), "best_of"),
        (dict(length_penalty=0.5), "length_penalty"),
        (dict(early_stopping=True), "early_stopping"),
    ],
)
def test_beam_search_options_are_validated_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_beam_width_beyond_max_num_seqs_is_rejected(tiny_model):
    eng = make_llm(tiny_model(), max_num_seqs=2).engine
    params = SamplingParams(use_beam_search=True, temperature=0.0, best_of=3)
    with pytest.raises(ValueError, match="^best_of:"):
        eng.add_request("b", [1, 2, 3], params)
    assert not eng.has_unfinished_requests()


def test_aborting_a_beam_search_frees_every_beam(tiny_model):
    llm = make_llm(tiny_model())
    eng = llm.engine
    prompt = random_prompts(eng.model_config.vocab_size, [10], seed=91)[0]
    params = SamplingParams(use_beam_search=True, temperature=0.0, n=2, best_of=4, max_tokens=20)
    eng.add_request("b", prompt, params)
    for _ in range(3):
        assert eng.step() == []
    assert eng.scheduler.num_running == 4
    eng.abort_request("b")
    [out] = eng.step()
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert not eng.has_unfinished_requests()
    assert eng.stats()["kv_used_tokens"] == 0
