"""The gRPC server over the real engine and model (SmolLM2): same answers as the offline API."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from jaxserve import SamplingParams
from jaxserve.checkpoint import load_model
from jaxserve.engine import EngineConfig
from jaxserve.llm import LLM
from jaxserve.llm_engine import LLMEngine
from jaxserve.tokenizer import Tokenizer
from serving.client import AsyncClient, Client
from tests.fake_engine import running_server

PROMPTS = ["The sky is", "List three colors:", "def fibonacci(n):"]


def small_engine(path) -> LLMEngine:
    """Decodes in multi-step runs of 4, each planned while the plan before it computes (the
    first chained onto the prefill), as on a GPU: the greedy steps, runs and samplers are
    compiled up front (`warmup`)."""
    model, _ = load_model(path, dtype="float32")
    cfg = EngineConfig(
        page_size=16,
        num_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        max_prefill_seqs=4,
        max_model_len=128,
        attention_backend="reference",
        decode_buckets=(4,),
        prefill_buckets=(64,),
        page_buckets=(8,),
        decode_steps=4,
    )
    engine = LLMEngine(model, Tokenizer.from_dir(path), cfg, model_name="smollm2")
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def live(smollm2_path):
    engine = small_engine(smollm2_path)
    with running_server(engine, max_queued_requests=64) as server:
        server.engine = engine
        yield server, smollm2_path


def test_stream_and_unary_equal_offline(live):
    server, path = live
    offline = LLM.from_engine(small_engine(path))
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=12, stop=["\n"]),
    ]
    expected = offline.generate(PROMPTS, params, use_tqdm=False)
    with Client(server.target, timeout=60) as client:
        for prompt, p, exp in zip(PROMPTS, params, expected, strict=True):
            sampling = dict(temperature=p.temperature, max_tokens=p.max_tokens)
            if p.seed is not None:
                sampling |= dict(seed=p.seed, top_p=p.top_p)
            if p.stop:
                sampling |= dict(stop=p.stop)
            text, ids = "", []
            for delta in client.generate(prompt, **sampling):
                for choice in delta.choices:
                    text += choice.text
                    ids += list(choice.token_ids)
            unary = client.complete(prompt, **sampling)
            assert ids == exp.outputs[0].token_ids == list(unary.choices[0].token_ids)
            assert text == exp.outputs[0].text == unary.choices[0].text
            assert unary.usage.prompt_tokens == len(exp.prompt_token_ids)


def test_concurrent_clients_and_cancellation_leave_nothing_behind(live):
    server, _ = live

    async def one(ac: AsyncClient, i: int, cancel: bool) -> list[int]:
        stream = ac.generate(PROMPTS[i % 3], temperature=0.0, max_tokens=20)
        ids: list[int] = []
        async for delta in stream:
            for choice in delta.choices:
                ids += list(choice.token_ids)
            if cancel and len(ids) >= 2:
                stream.cancel()
                break
        return ids

    async def run() -> list[list[int]]:
        async with AsyncClient(server.target, timeout=120) as ac:
            return await asyncio.gather(*(one(ac, i, i % 4 == 3) for i in range(12)))

    runs = server.engine.decode_runs_total
    results = asyncio.run(run())
    assert server.engine.decode_runs_total > runs
    full = {i % 3: r for i, r in enumerate(results) if i % 4 != 3}
    for i, r in enumerate(results):
        if i % 4 != 3:
            assert r == full[i % 3] and len(r) == 20
    with Client(server.target, timeout=10) as client:
        deadline = time.monotonic() + 10
        while client.model_info().kv_used_tokens and time.monotonic() < deadline:
            time.sleep(0.05)
        info = client.model_info()
        assert info.kv_used_tokens == 0 and info.num_running == 0 and info.num_waiting == 0
        with pytest.raises(grpc.RpcError) as err:
            client.complete("x", max_tokens=500)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens" in err.value.details()


def test_beam_search_over_grpc_equals_offline(live):
    server, path = live
    params = SamplingParams(use_beam_search=True, best_of=3, n=2, temperature=0.0, max_tokens=6)
    expected = LLM.from_engine(small_engine(path)).generate([PROMPTS[0]], params, use_tqdm=False)
    with Client(server.target, timeout=60) as client:
        unary = client.complete(
            PROMPTS[0], use_beam_search=True, best_of=3, n=2, temperature=0.0, max_tokens=6
        )
    got = sorted(unary.choices, key=lambda c: c.index)
    want = expected[0].outputs
    assert [list(c.token_ids) for c in got] == [c.token_ids for c in want]
    for c, w in zip(got, want, strict=True):
        assert c.HasField("cumulative_logprob")
        assert abs(c.cumulative_logprob - w.cumulative_logprob) < 1e-5
