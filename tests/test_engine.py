"""Engine invariants on tiny fixture models: batching, chunking, preemption, caching, sampling."""

from __future__ import annotations

import concurrent.futures
import time

import jax
import numpy as np
import pytest

from jaxserve.engine import _OP_DECODE_RUN, EngineConfig, geometric_upto
from jaxserve.llm import LLM
from jaxserve.llm_engine import LLMEngine
from jaxserve.sampling_params import SamplingParams
from tests.conftest import FIXTURES
from tests.utils import full_forward


def make_llm(model, **overrides) -> LLM:
    cfg = dict(
        page_size=4,
        num_pages=96,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        max_prefill_seqs=4,
        max_model_len=128,
        attention_backend="reference",
    )
    cfg.update(overrides)
    return LLM.from_engine(LLMEngine(model, None, EngineConfig(**cfg)))


def ids_params(**kw) -> SamplingParams:
    return SamplingParams(detokenize=False, ignore_eos=True, **kw)


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


def assert_greedy_without_cache(model, prompts: list[list[int]], outputs: list[list[int]]):
    """Each output token is the argmax of a no-cache forward over prompt + the tokens before it
    (one teacher-forced pass per sequence, equivalent to recomputing at every step)."""
    full = [p + o for p, o in zip(prompts, outputs, strict=True)]
    for prompt, out, logits in zip(prompts, outputs, full_forward(model, full), strict=True):
        assert out == [int(t) for t in np.argmax(logits[len(prompt) - 1 : -1], axis=-1)]


@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "qwen2_moe", "qwen3"])
def test_batched_greedy_equals_recompute(tiny_model, name):
    model = tiny_model(name)
    prompts = random_prompts(model.cfg.vocab_size, [3, 17, 9, 40])
    outs = make_llm(model).generate(prompts, ids_params(temperature=0.0, max_tokens=8))
    assert_greedy_without_cache(model, prompts, [o.outputs[0].token_ids for o in outs])
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


def test_alone_equals_batched_and_chunked_equals_one_shot(tiny_model):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [45, 7, 23])
    params = ids_params(temperature=0.0, max_tokens=6, logprobs=2)
    batched = make_llm(model).generate(prompts, params)
    chunked = make_llm(model, max_num_batched_tokens=8, max_prefill_seqs=1).generate(
        prompts, params
    )
    for i, prompt in enumerate(prompts):
        alone = make_llm(model, max_num_batched_tokens=64).generate([prompt], params)[0]
        for other in (batched[i], chunked[i]):
            assert other.outputs[0].token_ids == alone.outputs[0].token_ids
            for a, b in zip(other.outputs[0].logprobs, alone.outputs[0].logprobs, strict=True):
                assert a.keys() == b.keys()
                np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-4)


def test_small_cache_preempts_and_gives_identical_outputs(tiny_model):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [20, 18, 22, 15, 19], seed=3)
    params = ids_params(temperature=0.0, max_tokens=12)
    big = make_llm(model).generate(prompts, params)
    small_llm = make_llm(model, num_pages=12)
    small = small_llm.generate(prompts, params)
    assert small_llm.engine.stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in small] == [o.outputs[0].token_ids for o in big]
    assert small_llm.engine.stats()["kv_used_tokens"] == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [10, 14, 6], seed=5)
    seeded = ids_params(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=10)
    alone = make_llm(model).generate([prompts[0]], seeded)[0].outputs[0].token_ids
    others = ids_params(temperature=1.0, max_tokens=10)
    mixed = make_llm(model).generate(prompts, [seeded, others, others])[0].outputs[0].token_ids
    assert alone == mixed
    other_seed = ids_params(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=10)
    assert make_llm(model).generate([prompts[0]], other_seed)[0].outputs[0].token_ids != alone


def test_n_samples_share_prompt_pages(tiny_model):
    model = tiny_model()
    # 10 tokens with page_size 4: the last prompt page is shared and partly filled (copy-on-write).
    prompt = random_prompts(model.cfg.vocab_size, [10], seed=7)[0]
    llm = make_llm(model)
    greedy = llm.generate([prompt], ids_params(temperature=0.0, max_tokens=6, n=3))[0]
    assert [c.index for c in greedy.outputs] == [0, 1, 2]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == greedy.outputs[2].token_ids
    assert_greedy_without_cache(model, [prompt], [greedy.outputs[0].token_ids])
    sampled = llm.generate([prompt], ids_params(temperature=1.0, max_tokens=6, n=4, seed=3))[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1
    assert llm.engine.stats()["kv_used_tokens"] == 0


def test_logprobs_and_prompt_logprobs_match_log_softmax(tiny_model):
    model = tiny_model()
    prompt = random_prompts(model.cfg.vocab_size, [13], seed=11)[0]
    params = ids_params(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    out = make_llm(model, max_num_batched_tokens=8).generate([prompt], params)[0]
    full = prompt + out.outputs[0].token_ids
    logits = full_forward(model, [full])[0]
    lsm = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        d = out.prompt_logprobs[pos]
        assert prompt[pos] in d and len(d) <= 3
        for tok, lp in d.items():
            np.testing.assert_allclose(lp, lsm[pos - 1, tok], atol=1e-4)
        top2 = np.argsort(-lsm[pos - 1])[:2]
        assert set(int(t) for t in top2) <= set(d)
    for j, d in enumerate(out.outputs[0].logprobs):
        pos = len(prompt) + j - 1
        tok = out.outputs[0].token_ids[j]
        assert tok in d and len(d) <= 4
        np.testing.assert_allclose(d[tok], lsm[pos, tok], atol=1e-4)
        assert set(int(t) for t in np.argsort(-lsm[pos])[:3]) <= set(d)


def test_stop_token_ids_min_tokens_and_max_tokens(tiny_model):
    model = tiny_model()
    prompt = random_prompts(model.cfg.vocab_size, [9], seed=2)[0]
    free = make_llm(model).generate([prompt], ids_params(temperature=0.0, max_tokens=8))[0]
    toks = free.outputs[0].token_ids
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = (
        make_llm(model)
        .generate([prompt], ids_params(temperature=0.0, max_tokens=8, stop_token_ids=[stop_at]))[0]
        .outputs[0]
    )
    assert out.token_ids == toks[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    # Below min_tokens the stop id is masked, so the continuation changes and runs longer.
    held = (
        make_llm(model)
        .generate(
            [prompt],
            ids_params(
                temperature=0.0, max_tokens=8, stop_token_ids=[stop_at], min_tokens=first + 1
            ),
        )[0]
        .outputs[0]
    )
    assert stop_at not in held.token_ids[: first + 1]
    assert len(held.token_ids) > first + 1 or held.finish_reason == "length"


def test_abort_frees_pages(tiny_model):
    model = tiny_model()
    llm = make_llm(model)
    eng = llm.engine
    prompts = random_prompts(model.cfg.vocab_size, [30, 12], seed=4)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, ids_params(temperature=0.0, max_tokens=50))
    eng.step()
    eng.step()
    assert eng.stats()["kv_used_tokens"] > 0
    eng.abort_request("r0")
    outs = eng.step()
    aborted = [o for o in outs if o.request_id == "r0"]
    assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    eng.abort_request("r1")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats()["kv_used_tokens"] == 0


def test_invalid_requests_name_the_field(tiny_model):
    eng = make_llm(tiny_model()).engine
    with pytest.raises(ValueError, match="^prompt"):
        eng.add_request("a", [], ids_params())
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        eng.add_request("b", [1, 10**6], ids_params())
    with pytest.raises(ValueError, match="^max_tokens"):
        eng.add_request("c", [1, 2, 3], ids_params(max_tokens=200))
    with pytest.raises(ValueError, match="^prompt"):
        eng.add_request("d", "text needs a tokenizer", ids_params())
    assert not eng.has_unfinished_requests()


def count_compilations():
    """A list that grows by the compiling thread's name for every XLA compilation from now on."""
    import threading

    from jax._src import monitoring

    compiled = []
    monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_kw: (
            compiled.append(threading.current_thread().name)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    return compiled


def count_background_compiles(engine) -> list[tuple]:
    """A list that gets the key of every device-call variant the engine starts compiling on its
    compile threads from now on (`Engine._compile_in_background`)."""
    started, start = [], engine._compile_in_background

    def spy(key, compile_fn, *args):
        with engine._run_compiles_lock:
            if key not in engine._run_compiles:
                started.append(key)
        return start(key, compile_fn, *args)

    engine._compile_in_background = spy
    return started


def count_chained(llm: LLM) -> list[bool]:
    """A list that gets, for every step from now on that completes prompts and leaves their
    samples on device, whether their first run was chained onto it (dispatched before the
    samples are read back)."""
    engine = llm.engine
    dispatch_next, chained = engine._dispatch_next_run, []

    def spy(prev, kinds):
        inflight = dispatch_next(prev, kinds)
        if prev.prefill:
            chained.append(inflight is not None)
        return inflight

    engine._dispatch_next_run = spy
    return chained


def test_warmup_compiles_every_bucket_and_steady_state_does_not_recompile(tiny_model):
    """After `warmup()` serving compiles nothing on its own thread. The one kind of compilation
    allowed after it: a multi-step run shorter than `decode_steps`, which the engine starts
    compiling on its compile threads the first time rows that end together could use one,
    serving with the full run meanwhile (`Engine._run_steps`)."""
    import threading

    model = tiny_model()
    llm = make_llm(
        model, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32, decode_steps=3
    )
    engine = llm.engine.engine
    llm.engine.warmup()
    compiled = count_compilations()
    background = count_background_compiles(engine)
    prompts = random_prompts(model.cfg.vocab_size, [3, 9, 14, 5, 11, 2, 7], seed=9)
    llm.generate(prompts, ids_params(temperature=0.0, max_tokens=12))
    chained = count_chained(llm)
    llm.generate(prompts[:2], ids_params(temperature=0.0, max_tokens=12))
    engine.finish_compiles()
    assert threading.current_thread().name not in compiled
    assert all(k[0] == _OP_DECODE_RUN and k[1] < engine.cfg.decode_steps for k in background)
    assert len(compiled) <= len(background)
    assert llm.engine.stats()["decode_runs_total"] > 0 and chained == [True]


def test_time_blocked_on_device_results_is_counted(tiny_model, monkeypatch):
    """Every read-back of a step's or a run's results counts the time the host waits for the
    device into `device_wait_seconds_total`, which stays within the wall time: here each wait
    is made to last at least 20 ms."""
    model = tiny_model()
    llm = make_llm(model, decode_steps=3)
    prompts = random_prompts(model.cfg.vocab_size, [4, 9], seed=2)
    greedy = ids_params(temperature=0.0, max_tokens=7)
    llm.generate(prompts, greedy)  # compiles
    reads = []
    block = jax.block_until_ready

    def slow_block(x):
        time.sleep(0.02)
        reads.append(1)
        return block(x)

    monkeypatch.setattr(jax, "block_until_ready", slow_block)
    before = llm.engine.stats()["device_wait_seconds_total"]
    start = time.perf_counter()
    llm.generate(prompts, greedy)
    wall = time.perf_counter() - start
    waited = llm.engine.stats()["device_wait_seconds_total"] - before
    assert reads and 0.02 * len(reads) <= waited <= wall


def test_background_warmup_serves_from_the_largest_shapes_until_the_rest_compile(tiny_model):
    """With `warmup(background=True)` the engine answers once the largest decode and prefill
    shapes are compiled; steps before the rest are ready run padded into those, with the same
    greedy tokens (checked against a cache-free forward), and compile nothing on the serving
    thread. Once the background compiles finish, steps use their exact shapes again."""
    import threading

    model = tiny_model()
    llm = make_llm(model, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=64)
    engine = llm.engine.engine
    gate = threading.Event()
    compile_rest = engine._warm_in_background

    def gated(*args):
        gate.wait(timeout=120)
        compile_rest(*args)

    engine._warm_in_background = gated
    llm.engine.warmup(background=True)
    decode_shapes = {k for k in engine._executables if k[0] == 2}  # _OP_DECODE
    assert engine.compiles_pending() > 0
    assert len(decode_shapes) == 1  # the largest: 16 rows over the longest block table
    (only,) = decode_shapes
    assert only[2][0] == (16,) and only[5][0] == (16, max(engine.cfg.page_buckets))
    params = ids_params(temperature=0.0, max_tokens=6)
    prompts = random_prompts(model.cfg.vocab_size, [3, 9, 5], seed=21)
    compiled = count_compilations()
    early = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert compiled == []  # padded into the compiled shapes, samplers included
    assert {k for k in engine._executables if k[0] == 2} == decode_shapes
    assert_greedy_without_cache(model, prompts, early)

    gate.set()
    engine.finish_compiles()
    assert engine.compiles_pending() == 0 and engine._ready is None
    every = len(engine.cfg.decode_buckets) * len(engine.cfg.page_buckets)
    assert len({k for k in engine._executables if k[0] == 2}) == every
    compiled.clear()  # the background compiles
    late = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert compiled == [] and late == early


def assert_same_completions(expected, got) -> None:
    """The same tokens, finish and stop reasons, and logprobs (to float tolerance)."""
    for a, b in zip(expected, got, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)
            for lx, ly in zip(x.logprobs or [], y.logprobs or [], strict=True):
                assert lx.keys() == ly.keys()
                np.testing.assert_allclose(list(lx.values()), list(ly.values()), atol=1e-4)


def test_multi_step_runs_equal_single_steps(tiny_model):
    """Greedy and seeded sampling with logprobs, n > 1, stop ids and rows ending mid-run: the
    same tokens, logprobs and finish reasons with runs of 4 as with one step per call."""
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [5, 17, 9, 12], seed=11)
    greedy = ids_params(temperature=0.0, max_tokens=7)
    free = make_llm(model).generate([prompts[2]], greedy)[0].outputs[0].token_ids
    params = [
        ids_params(temperature=0.0, max_tokens=13, logprobs=3),
        ids_params(temperature=0.9, top_p=0.9, top_k=20, seed=5, max_tokens=10, n=2),
        ids_params(temperature=0.0, max_tokens=7, stop_token_ids=[free[4]]),
        ids_params(temperature=1.0, seed=8, max_tokens=3, logprobs=1),
    ]
    single = make_llm(model).generate(prompts, params)
    llm = make_llm(model, decode_steps=4)
    llm.generate(prompts, params)  # starts compiling the runs this batch needs
    llm.engine.engine.finish_compiles()
    runs = llm.generate(prompts, params)
    stats = llm.engine.stats()
    assert stats["decode_runs_total"] > 0 and stats["kv_used_tokens"] == 0
    assert_same_completions(single, runs)
    assert runs[2].outputs[0].finish_reason == "stop"


def test_the_last_run_of_rows_ending_together_loops_only_the_steps_they_need(tiny_model):
    """Two greedy requests of 12 tokens, runs of 4 decode steps: the prefill samples the first
    token and runs give 4 + 4 + 3. The last run loops 3 iterations once that variant is
    compiled (from its first use, in the background), 4 while it compiles; the tokens are
    those of single steps either way."""
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [6, 9], seed=21)
    params = ids_params(temperature=0.0, max_tokens=12)
    single = make_llm(model).generate(prompts, params)
    llm = make_llm(model, decode_steps=4)
    engine = llm.engine.engine
    for _ in range(2):  # the 4-step runs, then what a batch of them asks for
        llm.generate(prompts, params)
        engine.finish_compiles()
    loops = []
    device, compile_run = engine._device, engine._run_compile

    def spy(op, arrays, flags=()):
        if op == _OP_DECODE_RUN:
            loops.append(flags[-1])
        return device(op, arrays, flags)

    engine._device = spy
    compiled = llm.generate(prompts, params)
    assert loops == [4, 4, 3]
    loops.clear()
    compiling = concurrent.futures.Future()  # never done
    engine._run_compile = lambda key, steps=0: compiling if steps else compile_run(key)
    fallback = llm.generate(prompts, params)
    assert loops == [4, 4, 4]
    assert_same_completions(single, compiled)
    assert_same_completions(single, fallback)


def test_async_scheduling_runs_ahead_with_the_outputs_of_runs_read_back_first(tiny_model):
    """With asynchronous scheduling the next run is dispatched before the one in flight is read
    back. Greedy and seeded sampling with logprobs, n > 1 and a stop token mid-run: the same
    tokens, logprobs and finish reasons as with every run read back first, and no page held
    at the end."""
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [5, 17, 9, 12], seed=13)
    free = make_llm(model).generate([prompts[2]], ids_params(temperature=0.0, max_tokens=30))
    free = free[0].outputs[0].token_ids
    k = next(i for i in range(9, len(free)) if free[i] not in free[:i])  # mid-way, a new token
    params = [
        ids_params(temperature=0.0, max_tokens=30, logprobs=2),
        ids_params(temperature=0.9, top_p=0.9, top_k=20, seed=5, max_tokens=27, n=2),
        ids_params(temperature=0.0, max_tokens=30, stop_token_ids=[free[k]]),
        ids_params(temperature=1.0, seed=8, max_tokens=29, logprobs=1),
    ]
    outs, ahead = {}, {}
    for on in (False, True):
        llm = make_llm(model, decode_steps=4, async_scheduling=on)
        llm.generate(prompts, params)  # starts compiling the runs this batch needs
        llm.engine.engine.finish_compiles()
        sched = llm.engine.scheduler
        plan_next = sched.schedule_next_run
        planned = []
        sched.schedule_next_run = lambda *a, f=plan_next, p=planned: p.append(f(*a)) or p[-1]
        outs[on] = llm.generate(prompts, params)
        ahead[on] = sum(p is not None for p in planned)
        assert llm.engine.stats()["kv_used_tokens"] == 0
    assert ahead == {False: 0, True: ahead[True]} and ahead[True] >= 3
    assert outs[True][2].outputs[0].token_ids == free[: k + 1]
    assert_same_completions(outs[False], outs[True])


def test_a_request_aborted_while_its_run_is_in_flight_leaves_the_others_whole(tiny_model):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [7, 11], seed=14)
    params = ids_params(temperature=0.0, max_tokens=40)
    alone = make_llm(model).generate([prompts[1]], params)[0].outputs[0].token_ids
    llm = make_llm(model, decode_steps=4)
    llm.generate(prompts, params)
    llm.engine.engine.finish_compiles()
    engine = llm.engine
    for rid, prompt in zip("xy", prompts, strict=True):
        engine.add_request(rid, prompt, params)
    tokens = {"x": [], "y": []}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids  # deltas
        steps += 1
        if steps == 4:
            assert engine._inflight is not None  # the run after the one just read back
            engine.abort_request("x")
    assert 0 < len(tokens["x"]) < 40 and tokens["y"] == alone
    assert engine.stats()["kv_used_tokens"] == 0


def warmed_llm(model, prompts, params, **overrides) -> LLM:
    """An LLM with runs of 4 that has compiled, in the background, everything this batch needs."""
    llm = make_llm(model, decode_steps=4, **overrides)
    llm.generate(prompts, params)
    llm.engine.engine.finish_compiles()
    return llm


@pytest.mark.parametrize("case", ["greedy", "seeded", "batch"])
def test_a_first_run_chained_onto_the_prefill_gives_the_outputs_of_steps_read_back_first(
    tiny_model, case
):
    """The prefill that completes every prompt leaves its samples on device, and the rows'
    first run is dispatched before they are read back: greedy and seeded top-p sampling with
    logprobs, `min_tokens` 1 (a stop id masked for the first token only), prompts of different
    lengths and outputs that are not whole runs give the tokens, logprobs and finish reasons
    of runs dispatched after the read-back (asynchronous scheduling off) and of single steps."""
    model = tiny_model()
    greedy = ids_params(temperature=0.0, max_tokens=11, logprobs=2)
    seeded = ids_params(temperature=0.8, top_p=0.9, seed=3, max_tokens=10, logprobs=1)
    prompts = random_prompts(model.cfg.vocab_size, [7, 16, 9], seed=17)  # one prefill step
    first = make_llm(model).generate([prompts[2]], ids_params(temperature=0.0, max_tokens=1))
    held = ids_params(
        temperature=0.0,
        max_tokens=13,
        min_tokens=1,
        stop_token_ids=[first[0].outputs[0].token_ids[0]],
    )
    prompts, params = {
        "greedy": ([prompts[0]], [greedy]),
        "seeded": ([prompts[1]], [seeded]),
        "batch": (prompts, [greedy, seeded, held]),
    }[case]
    single = make_llm(model).generate(prompts, params)
    after = warmed_llm(model, prompts, params, async_scheduling=False)
    chained_llm = warmed_llm(model, prompts, params)
    not_chained, chained = count_chained(after), count_chained(chained_llm)
    read_back_first = after.generate(prompts, params)
    got = chained_llm.generate(prompts, params)
    assert chained[:1] == [True] and not_chained == []
    assert chained_llm.engine.stats()["kv_used_tokens"] == 0
    assert_same_completions(single, got)
    assert_same_completions(read_back_first, got)


def test_requests_whose_first_token_ends_them_leave_the_chained_run_to_the_others(tiny_model):
    """A stop token or a stop string that the first token completes ends its request at the
    prefill, as without chaining; the chained run's rows for it are dropped and the other
    requests go on whole. A request with `max_tokens` 1 is known to end there, so its batch
    chains no run, and finishes the same."""
    from jaxserve.tokenizer import Tokenizer

    model = tiny_model()
    tokenizer = Tokenizer.from_dir(FIXTURES / "tokenizers" / "spm_tiny")
    prompts = random_prompts(model.cfg.vocab_size, [6, 13, 9], seed=5)

    def llm(**overrides) -> LLM:
        cfg = dict(page_size=4, num_pages=96, max_num_seqs=8, max_num_batched_tokens=32)
        cfg |= dict(max_prefill_seqs=4, max_model_len=128, attention_backend="reference")
        return LLM.from_engine(LLMEngine(model, tokenizer, EngineConfig(**cfg | overrides)))

    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    (one,) = llm().generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=1))
    first_text = one.outputs[0].text
    assert first_text  # this prompt's first token has text
    (two,) = llm().generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=1))
    params = [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[first_text]),
        SamplingParams(
            temperature=0.0,
            max_tokens=10,
            ignore_eos=True,
            stop_token_ids=[two.outputs[0].token_ids[0]],
        ),
        greedy,
    ]
    results = []
    for batch in (params, [greedy, SamplingParams(temperature=0.0, max_tokens=1), greedy]):
        expected = llm().generate(prompts, batch)
        chained_llm = llm(decode_steps=4)
        chained_llm.generate(prompts, greedy)  # compiles the runs of three rows
        chained_llm.engine.engine.finish_compiles()
        chained = count_chained(chained_llm)
        got = chained_llm.generate(prompts, batch)
        assert chained == [batch is params]
        assert_same_completions(expected, got)
        assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
        assert chained_llm.engine.stats()["kv_used_tokens"] == 0
        results.append([o.outputs[0] for o in got])
    by_text, by_id, whole = results[0]
    assert by_text.token_ids == one.outputs[0].token_ids and by_text.text == ""
    assert (by_text.finish_reason, by_text.stop_reason) == ("stop", first_text)
    assert by_id.token_ids == two.outputs[0].token_ids
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", two.outputs[0].token_ids[0])
    assert len(whole.token_ids) == 10
    assert [len(c.token_ids) for c in results[1]] == [10, 1, 10]


def test_a_request_that_arrives_while_the_chained_run_computes_is_admitted_after_it(tiny_model):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [7, 11], seed=19)
    params = ids_params(temperature=0.0, max_tokens=14)
    alone = [make_llm(model).generate([p], params)[0].outputs[0].token_ids for p in prompts]
    llm = warmed_llm(model, [prompts[0]], params)
    llm.generate(prompts, params)  # the runs of two rows
    llm.engine.engine.finish_compiles()
    chained = count_chained(llm)
    engine = llm.engine
    engine.add_request("x", prompts[0], params)
    (out,) = engine.step()  # the prefill, with the first run chained
    assert chained == [True]
    tokens = {"x": out.outputs[0].token_ids, "y": []}
    engine.add_request("y", prompts[1], params)
    (out,) = engine.step()  # the chained run read back; "y" waits for it
    assert out.request_id == "x" and len(out.outputs[0].token_ids) == 4
    tokens["x"] += out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
    assert [tokens["x"], tokens["y"]] == alone
    assert engine.stats()["kv_used_tokens"] == 0


def test_penalties_and_min_tokens_take_single_steps(tiny_model):
    model = tiny_model()
    prompt = random_prompts(model.cfg.vocab_size, [6], seed=12)
    llm = make_llm(model, decode_steps=4)
    for params in (
        ids_params(temperature=0.0, max_tokens=9, repetition_penalty=1.3),
        ids_params(temperature=0.0, max_tokens=9, min_tokens=9, stop_token_ids=[1]),
    ):
        for _ in range(2):
            llm.generate(prompt, params)
            llm.engine.engine.finish_compiles()
    assert llm.engine.stats()["decode_runs_total"] == 0


def test_the_engine_keeps_long_lived_objects_out_of_garbage_collection(tiny_model):
    import gc

    llm = make_llm(tiny_model())
    llm.engine.warmup()
    # Collections walk only what the steps allocate, not the model, modules and compiled steps.
    assert gc.get_freeze_count() > 10 * len(gc.get_objects())


def test_host_arrays_travel_packed_and_come_back_whole():
    """A call's host arrays go to the device as one int32 buffer, each on a 256-byte boundary
    (Mosaic GPU kernels want aligned inputs), and the compiled function gets them back with
    their shapes, dtypes and values; device arguments before them pass through untouched."""
    from jaxserve.engine import _PACK_ALIGN, _pack_host_arrays

    rng = np.random.default_rng(3)
    host = (
        rng.integers(-5, 5, (3,)).astype(np.int32),
        {"t": rng.integers(0, 9, (2, 5)).astype(np.int32), "f": rng.random(7).astype(np.float32)},
        np.array([2**32 - 1, 7], np.uint32),
        np.array([[True, False, True]]),
    )
    device = jax.numpy.arange(4.0)

    def fn(d, a, tree, u, b):
        return d * 2, a, tree, u, b

    packed, args = _pack_host_arrays(fn, (device,), host)
    assert len(args) == 2 and args[0] is device
    (pack,) = args[1:]
    assert pack.dtype == np.int32 and pack.size % _PACK_ALIGN == 0
    assert pack.size == _PACK_ALIGN * 5  # five arrays, each padded to a boundary
    d, a, tree, u, b = jax.jit(packed)(*args)
    np.testing.assert_array_equal(d, np.arange(4.0) * 2)
    for got, want in zip(jax.tree.leaves((a, tree, u, b)), jax.tree.leaves(host), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(TypeError, match="not packable"):
        _pack_host_arrays(fn, (device,), (np.zeros(2, np.int64),))


def test_bucket_ladders():
    assert geometric_upto(256, 8, 2) == (8, 16, 32, 64, 128, 256)
    # 4x apart below the knee, 2x above, always ending at the maximum.
    assert geometric_upto(256, 8, 2, coarse_below=128) == (8, 32, 128, 256)
    assert geometric_upto(2048, 16, 2, coarse_below=256) == (16, 64, 256, 512, 1024, 2048)
    assert geometric_upto(100, 16, 2, coarse_below=256) == (16, 64, 100)
    assert geometric_upto(8, 8, 2, coarse_below=128) == (8,)


def test_prompts_admitted_ahead_give_the_outputs_of_steps_read_back_first(tiny_model):
    """With asynchronous scheduling a step of waiting prompts is dispatched before the step in
    flight is read back (`Scheduler.schedule_prefill_ahead`). More prompts than one step's
    budget, greedy and seeded sampling with logprobs, n > 1, a stop token and prompt logprobs:
    the same tokens, logprobs and finish reasons as with every step read back first, and no
    page held at the end."""
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [9, 14, 6, 11, 13, 8, 10, 12, 7, 9], seed=21)
    free = make_llm(model).generate([prompts[3]], ids_params(temperature=0.0, max_tokens=12))
    free = free[0].outputs[0].token_ids
    k = next(i for i in range(4, len(free)) if free[i] not in free[:i])
    kinds = [
        ids_params(temperature=0.0, max_tokens=9, logprobs=2),
        ids_params(temperature=0.9, top_p=0.9, seed=5, max_tokens=7, n=2),
        ids_params(temperature=0.0, max_tokens=8, prompt_logprobs=1),
        ids_params(temperature=0.0, max_tokens=12, stop_token_ids=[free[k]]),
        ids_params(temperature=1.0, seed=8, max_tokens=6, logprobs=1),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    outs, ahead = {}, {}
    for on in (False, True):
        llm = make_llm(model, async_scheduling=on, max_num_seqs=16, max_prefill_seqs=2)
        sched = llm.engine.scheduler
        plan_ahead, planned = sched.schedule_prefill_ahead, []
        sched.schedule_prefill_ahead = lambda f=plan_ahead, p=planned: p.append(f()) or p[-1]
        outs[on] = llm.generate(prompts, params)
        ahead[on] = sum(p is not None for p in planned)
        assert llm.engine.stats()["kv_used_tokens"] == 0
    assert ahead[False] == 0 and ahead[True] >= 2
    assert outs[True][3].outputs[0].token_ids == free[: k + 1]
    assert_same_completions(outs[False], outs[True])
    for a, b in zip(outs[False], outs[True], strict=True):
        assert a.prompt_logprobs == b.prompt_logprobs


def test_a_request_aborted_while_its_prompt_computes_ahead_leaves_the_others_whole(tiny_model):
    model = tiny_model()
    prompts = random_prompts(model.cfg.vocab_size, [12, 12, 12, 12], seed=23)
    params = ids_params(temperature=0.0, max_tokens=10)
    alone = [o.outputs[0].token_ids for o in make_llm(model).generate(prompts, params)]
    llm = make_llm(model, max_num_batched_tokens=24, max_prefill_seqs=2)
    engine = llm.engine
    for rid, prompt in zip("wxyz", prompts, strict=True):
        engine.add_request(rid, prompt, params)
    tokens = {rid: [] for rid in "wxyz"}
    for out in engine.step():  # w and x computed and read back; y and z dispatched ahead
        tokens[out.request_id] += out.outputs[0].token_ids
    assert engine._ahead is not None
    assert [r.request_id for r in engine._ahead[0].prefill] == ["y", "z"]
    engine.abort_request("y")
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
    assert tokens["y"] == []
    assert [tokens[r] for r in "wxz"] == [alone[0], alone[1], alone[3]]
    assert engine.stats()["kv_used_tokens"] == 0
