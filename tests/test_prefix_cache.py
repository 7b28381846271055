"""Automatic prefix caching end to end on a tiny model: outputs equal those computed without the
cache, cached token counts and the hit rate are reported, pages are all free afterwards."""

from __future__ import annotations

import numpy as np

from jaxserve.outputs import RequestOutput
from tests.test_engine import ids_params, make_llm, random_prompts


def assert_same_outputs(got: list[RequestOutput], want: list[RequestOutput]) -> None:
    for a, b in zip(got, want, strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            for da, db in zip(ca.logprobs or [], cb.logprobs or [], strict=True):
                assert da.keys() == db.keys()
                np.testing.assert_allclose(list(da.values()), list(db.values()), atol=1e-4)


def assert_pages_free(llm) -> None:
    """Every page is free or cached-and-evictable, and nothing holds a reference."""
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    assert all(bm.ref_count(p) == 0 for p in range(bm.num_pages))
    assert bm.num_evictable_pages == bm.num_cached_pages
    assert llm.engine.stats()["kv_used_tokens"] == 0


def test_a_shared_system_prompt_and_a_later_turn_are_served_from_the_cache(tiny_model):
    model = tiny_model()
    vocab = model.cfg.vocab_size
    system = random_prompts(vocab, [37], seed=21)[0]
    prompts = [system + q for q in random_prompts(vocab, [3, 9, 5, 12], seed=22)]
    params = ids_params(temperature=0.0, max_tokens=6, logprobs=3)
    results = {}
    for caching in (True, False):
        llm = make_llm(model, enable_prefix_caching=caching)
        first = llm.generate(prompts[:1], params)
        rest = llm.generate(prompts[1:], params)
        # The next turn of the first conversation: its prompt, its answer, a new question.
        turn = prompts[0] + first[0].outputs[0].token_ids + [5, 6, 7]
        second = llm.generate([turn], params)
        results[caching] = (first + rest + second, llm)
    (outs, llm), (plain, plain_llm) = results[True], results[False]
    assert_same_outputs(outs, plain)
    # 9 full pages of the 37-token system prompt; then the first conversation's 45 computed
    # tokens (40 of prompt, 5 of its 6 outputs) make 11 full pages.
    assert [o.num_cached_tokens for o in outs] == [0, 36, 36, 36, 44]
    assert [o.num_cached_tokens for o in plain] == [0] * 5
    stats = llm.engine.stats()
    queries = sum(len(o.prompt_token_ids) for o in outs)
    assert (stats["prefix_cache_queries_total"], stats["prefix_cache_hits_total"]) == (queries, 152)
    assert stats["prefix_cache_hit_rate"] == 152 / queries
    assert plain_llm.engine.stats()["prefix_cache_hit_rate"] == 0.0
    assert_pages_free(llm)


def test_chunked_prefill_and_preemption_with_prefix_caching_give_identical_outputs(tiny_model):
    model = tiny_model()
    vocab = model.cfg.vocab_size
    common = random_prompts(vocab, [13], seed=31)[0]
    prompts = [common + s for s in random_prompts(vocab, [2, 7, 4, 9, 5], seed=32)]
    params = [ids_params(temperature=0.0, max_tokens=10, n=1 + i % 2) for i in range(5)]
    plain = make_llm(model, enable_prefix_caching=False).generate(prompts, params)
    small = make_llm(model, num_pages=14, max_num_batched_tokens=8, max_prefill_seqs=2)
    outs = small.generate(prompts, params)
    stats = small.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits_total"] > 0
    assert_same_outputs(outs, plain)
    assert_pages_free(small)


def test_prompt_logprobs_requests_compute_every_prompt_position(tiny_model):
    model = tiny_model()
    prompt = random_prompts(model.cfg.vocab_size, [18], seed=41)[0]
    params = ids_params(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    llm = make_llm(model)
    llm.generate([prompt], ids_params(temperature=0.0, max_tokens=2))
    out = llm.generate([prompt], params)[0]
    plain = make_llm(model, enable_prefix_caching=False).generate([prompt], params)[0]
    assert out.num_cached_tokens == 0
    assert out.prompt_logprobs[0] is None and all(d is not None for d in out.prompt_logprobs[1:])
    for got, want in zip(out.prompt_logprobs[1:], plain.prompt_logprobs[1:], strict=True):
        assert got.keys() == want.keys()
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-4)
    # A plain request right after it still reads the cache.
    assert (
        llm.generate([prompt], ids_params(temperature=0.0, max_tokens=2))[0].num_cached_tokens == 16
    )


def test_page_accounting_stays_exact_under_heavy_sharing_and_aborts(tiny_model):
    model = tiny_model()
    vocab = model.cfg.vocab_size
    common = random_prompts(vocab, [21], seed=51)[0]
    prompts = [common + s for s in random_prompts(vocab, [1, 6, 3, 11, 2, 8], seed=52)]
    llm = make_llm(model, num_pages=30, max_num_batched_tokens=16)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, ids_params(temperature=1.0, seed=i, max_tokens=12, n=3))
    for step in range(12):
        eng.step()
        if step in (3, 7):
            eng.abort_request(f"r{step // 2}")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats()["prefix_cache_hits_total"] > 0
    assert_pages_free(llm)
