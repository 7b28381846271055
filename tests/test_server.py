"""End-to-end tests of the gRPC server on loopback, driven against `FakeEngine`.

Expected outputs are worked out by hand from the fake's rules (see `tests/fake_engine.py`): the
prompt "a" is ids [0, 68] (BOS, "a"), whose sum 68 is 16 mod 26, so sample 0 generates
"qrstu..." (ids 84, 85, 86, ...) and sample 1 starts one letter later.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from jaxserve.sampling_params import SamplingParams
from serving.client import AsyncClient, Client
from serving.proto import generation_pb2 as pb
from tests.fake_engine import (
    FakeEngine,
    LiveServer,
    chat_prompt_ids,
    generated_ids,
    generated_text,
    running_server,
    wait_for,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
Q, R, S, T, U = 84, 85, 86, 87, 88  # ids of "q".."u"
# Long enough (40 s at the slow engine's 10 ms per step) that a request left running shows up.
LONG = 4000
# Aborted requests must free their pages within one engine step; this bounds it with CI slack.
ONE_STEP_AND_SLACK = 1.0


def idle(live: LiveServer, engine: FakeEngine, client: Client) -> bool:
    """No request, page or id left anywhere (read through the API and from the engine)."""
    info = client.model_info()
    return (
        info.kv_used_tokens == 0
        and info.num_running == 0
        and info.num_waiting == 0
        and live.handle.engine_loop.num_live_requests == 0
        and engine.num_requests == 0
        and engine.used_pages == 0
    )


def status_of(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


@pytest.fixture(scope="module")
def fast() -> Iterator[tuple[LiveServer, FakeEngine, Client]]:
    engine = FakeEngine(max_model_len=64)
    with running_server(engine, max_queued_requests=512) as live:
        with Client(live.target, timeout=10) as client:
            yield live, engine, client


@pytest.fixture
def slow() -> Iterator[tuple[LiveServer, FakeEngine, Client]]:
    engine = FakeEngine(step_delay=0.01, max_model_len=LONG + 8)
    with running_server(engine) as live:
        with Client(live.target, timeout=10) as client:
            yield live, engine, client


# --- results -------------------------------------------------------------------------------------


def test_stream_yields_engine_deltas(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    responses = list(client.generate("a", max_tokens=5, request_id="stream-1"))
    assert [r.request_id for r in responses] == ["stream-1"] * 5
    assert [c.text for r in responses for c in r.choices] == ["q", "r", "s", "t", "u"]
    assert [list(c.token_ids) for r in responses for c in r.choices] == [[Q], [R], [S], [T], [U]]
    assert [r.finished for r in responses] == [False] * 4 + [True]
    assert [r.choices[0].finish_reason for r in responses] == [pb.FINISH_REASON_UNSPECIFIED] * 4 + [
        pb.FINISH_REASON_LENGTH
    ]
    assert not any(r.HasField("usage") for r in responses[:-1])
    last = responses[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 5)
    assert last.usage.cached_tokens == 0
    t = last.timings
    assert 0 <= t.queue_time <= t.time_to_first_token <= t.total_time < 5


def test_unary_aggregates_every_sample(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    r = client.complete("a", n=2, max_tokens=8, stop=["t"])
    assert r.finished
    first, second = r.choices
    assert (first.index, first.text, list(first.token_ids)) == (0, "qrs", [Q, R, S, T])
    assert (second.index, second.text, list(second.token_ids)) == (1, "rs", [R, S, T])
    for c in r.choices:
        assert c.finish_reason == pb.FINISH_REASON_STOP
        assert c.WhichOneof("stop_reason") == "stop_string" and c.stop_string == "t"
    assert r.usage.completion_tokens == 7


def test_default_max_tokens_and_prefix_cache(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    prompt = "prefix cache probe"  # 19 ids with BOS; page size 4
    ids = [0] + [ord(c) - 29 for c in prompt]
    first = client.complete(prompt)
    assert first.choices[0].text == generated_text(ids, 16)  # SamplingParams' default
    assert first.usage.cached_tokens == 0
    assert client.complete(prompt, max_tokens=1).usage.cached_tokens == 16


def test_stop_string_split_across_tokens_is_held_back(
    fast: tuple[LiveServer, FakeEngine, Client],
) -> None:
    _, _, client = fast
    texts = [c.text for r in client.generate("a", max_tokens=10, stop=["st"]) for c in r.choices]
    assert "".join(texts) == "qr"
    assert "s" not in "".join(texts)
    included = client.complete("a", max_tokens=10, stop=["st"], include_stop_str_in_output=True)
    assert included.choices[0].text == "qrst"


def test_stop_token_ids_and_min_tokens(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    r = client.complete("a", max_tokens=10, stop_token_ids=[S])
    c = r.choices[0]
    assert (c.text, list(c.token_ids), c.stop_token_id) == ("qr", [Q, R, S], S)
    assert (
        client.complete("a", max_tokens=10, stop_token_ids=[S], include_stop_str_in_output=True)
        .choices[0]
        .text
        == "qrs"
    )
    # min_tokens=1 keeps "q" (the first token) from stopping the sample.
    held = client.complete("a", max_tokens=3, stop=["q"], min_tokens=1).choices[0]
    assert (held.text, held.finish_reason) == ("qrs", pb.FINISH_REASON_LENGTH)


def test_logprobs_and_prompt_logprobs(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    responses = list(client.generate("a", max_tokens=2, logprobs=2, prompt_logprobs=1))
    positions = [p for r in responses for c in r.choices for p in c.logprobs]
    assert [(p.token_id, p.logprob) for p in positions] == [(Q, -0.25), (R, -0.25)]
    assert [[(t.token_id, t.logprob) for t in p.top] for p in positions] == [
        [(Q, -0.25), (R, -0.5)],
        [(R, -0.25), (S, -0.5)],
    ]
    assert not responses[0].prompt_logprobs  # prompt logprobs come with the last response
    first, second = responses[-1].prompt_logprobs
    assert first.token_id == 0 and not first.HasField("logprob") and not first.top
    assert (second.token_id, second.logprob) == (68, -2.0)
    assert [(t.token_id, t.logprob) for t in second.top] == [(3, -0.125)]
    plain = client.complete("a", max_tokens=2)
    assert not plain.choices[0].logprobs and not plain.prompt_logprobs


def test_token_id_and_chat_prompts(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    assert client.complete(token_ids=[69], max_tokens=3).choices[0].text == "rst"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = chat_prompt_ids(messages)
    assert client.tokenize(messages=messages) == ids
    r = client.complete(messages=messages, max_tokens=4)
    assert r.choices[0].text == generated_text(ids, 4)
    assert r.usage.prompt_tokens == len(ids) == len("<s>[system]be brief\n[user]hi\n[assistant]")


def test_token_ids_only(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    c = client.complete("a", max_tokens=3, detokenize=False).choices[0]
    assert (c.text, list(c.token_ids)) == ("", [Q, R, S])
    err = status_of(lambda: client.complete("a", detokenize=False, stop=["x"]))
    assert err.details().startswith("stop: ")
    with (
        running_server(FakeEngine(with_tokenizer=False)) as live,
        Client(live.target, timeout=5) as bare,
    ):
        c = bare.complete(token_ids=[69], max_tokens=3).choices[0]
        assert (c.text, list(c.token_ids)) == ("", [R, S, T])
        for call, field in (
            (lambda: bare.complete("a"), "text"),
            (lambda: bare.complete(messages=[("user", "a")]), "chat"),
            (lambda: bare.tokenize("a"), "text"),
            (lambda: bare.detokenize([5]), "token_ids"),
        ):
            err = status_of(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == f"{field}: this model has no tokenizer; send token ids"


def test_tokenize_detokenize_and_model_info(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    _, _, client = fast
    assert client.tokenize("ab") == [0, 68, 69]
    assert client.tokenize("ab", add_special_tokens=False) == [68, 69]
    assert client.detokenize([0, 68, 69]) == "ab"
    assert client.detokenize([0, 68, 69], skip_special_tokens=False) == "<s>ab"
    info = client.model_info()
    assert (info.model_name, info.architecture, info.dtype, info.device) == (
        "fake-tiny",
        "FakeForCausalLM",
        "float32",
        "cpu",
    )
    assert (info.max_model_len, info.vocab_size, info.page_size) == (64, 98, 4)
    assert info.kv_capacity_tokens == 4096 * 4


def test_fifty_concurrent_clients_get_their_own_tokens(
    fast: tuple[LiveServer, FakeEngine, Client],
) -> None:
    live, engine, client = fast
    prompts = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(50)]

    async def one(i: int) -> tuple[list[int], str]:
        ids, text = [], ""
        # A channel (connection) per client, as 50 separate processes would have.
        async with AsyncClient(live.target, timeout=30) as ac:
            async for r in ac.generate(prompts[i], max_tokens=5 + i % 20, request_id=f"c{i}"):
                assert r.request_id == f"c{i}"
                for c in r.choices:
                    ids += c.token_ids
                    text += c.text
        return ids, text

    async def main() -> list[tuple[list[int], str]]:
        return await asyncio.gather(*(one(i) for i in range(50)))

    results = asyncio.run(main())
    for i, (ids, text) in enumerate(results):
        prompt_ids = [0] + [ord(c) - 29 for c in prompts[i]]
        assert ids == generated_ids(prompt_ids, 5 + i % 20)
        assert text == generated_text(prompt_ids, 5 + i % 20)
    wait_for(lambda: idle(live, engine, client))


# --- validation ----------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[dict, str]] = [
    ({"prompt": ""}, "text"),
    ({"token_ids": []}, "token_ids.ids"),
    ({"messages": []}, "chat.messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "chat.messages[0].role"),
    ({"prompt": "a" * 70}, "prompt"),
    ({"prompt": "a", "max_tokens": 63}, "max_tokens"),
    ({"token_ids": [5, 98]}, "token_ids.ids"),
    ({"token_ids": [-1]}, "token_ids.ids"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "temperature": float("nan")}, "temperature"),
    ({"prompt": "a", "top_p": 0.0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "min_p": 1.5}, "min_p"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"prompt": "a", "repetition_penalty": 0.0}, "repetition_penalty"),
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": -3.0}, "frequency_penalty"),
    ({"prompt": "a", "n": 17}, "n"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "a", "seed": 2**63}, "seed"),
    ({"prompt": "a", "stop": ["x"] * 17}, "stop"),
    ({"prompt": "a", "stop": ["x" * 257]}, "stop"),
    ({"prompt": "a", "stop_token_ids": [98]}, "stop_token_ids"),
    ({"prompt": "a", "request_id": "has space"}, "request_id"),
    ({"prompt": "a", "request_id": "x" * 129}, "request_id"),
]


def test_every_invalid_request_names_its_field(
    fast: tuple[LiveServer, FakeEngine, Client],
) -> None:
    live, engine, client = fast
    for kwargs, field in BAD_REQUESTS:
        for call in (client.complete, lambda **kw: list(client.generate(**kw))):
            err = status_of(lambda call=call, kwargs=kwargs: call(**kwargs))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, err)
            assert err.details().startswith(f"{field}: "), (kwargs, err.details())
    missing = status_of(lambda: client._stub.Complete(pb.GenerateRequest()))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing.details().startswith("prompt: ")
    assert client.complete("a", max_tokens=3).choices[0].text == "qrs"
    wait_for(lambda: idle(live, engine, client))


def test_size_limits_are_configurable() -> None:
    from serving.validation import Limits

    limits = Limits(max_prompt_bytes=8, max_message_bytes=4, max_messages=2)
    with running_server(FakeEngine(), limits=limits) as live, Client(live.target, timeout=5) as c:
        assert status_of(lambda: c.complete("é" * 5)).details().startswith("text: at most 8 bytes")
        assert (
            status_of(lambda: c.complete(messages=[("user", "12345")]))
            .details()
            .startswith("chat.messages[0].content: at most 4 bytes")
        )
        three = [("user", "a")] * 3
        assert status_of(lambda: c.complete(messages=three)).details().startswith("chat.messages: ")
        assert status_of(lambda: c.tokenize("123456789")).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.complete("a" * 8, max_tokens=1).finished


def test_duplicate_in_flight_request_id(slow: tuple[LiveServer, FakeEngine, Client]) -> None:
    live, engine, client = slow
    stream = client.generate("a", max_tokens=LONG, request_id="dup")
    next(stream)
    err = status_of(lambda: client.complete("b", request_id="dup"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in err.details()
    stream.cancel()
    wait_for(lambda: idle(live, engine, client), ONE_STEP_AND_SLACK)
    assert client.complete("a", max_tokens=1, request_id="dup").choices[0].text == "q"


def test_detokenize_rejects_ids_outside_the_vocabulary(
    fast: tuple[LiveServer, FakeEngine, Client],
) -> None:
    _, _, client = fast
    err = status_of(lambda: client.detokenize([1, 98]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("token_ids: id 98 at position 1")
    assert client.detokenize([]) == ""
    assert (
        status_of(lambda: client._stub.Tokenize(pb.TokenizeRequest()))
        .details()
        .startswith("input: ")
    )


# --- cancellation, deadlines, backpressure -------------------------------------------------------


def test_cancel_mid_stream_frees_pages(slow: tuple[LiveServer, FakeEngine, Client]) -> None:
    live, engine, client = slow
    stream = client.generate("a", max_tokens=LONG)
    for _ in range(3):
        next(stream)
    assert client.model_info().kv_used_tokens > 0
    stream.cancel()
    wait_for(lambda: idle(live, engine, client), ONE_STEP_AND_SLACK)
    assert live.handle.metrics.requests.labels(outcome="cancelled")._value.get() == 1


def test_deadline_expiry_aborts_the_request(slow: tuple[LiveServer, FakeEngine, Client]) -> None:
    live, engine, client = slow
    err = status_of(lambda: list(client.generate("a", max_tokens=LONG, timeout=0.2)))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    err = status_of(lambda: client.complete("a", max_tokens=LONG, timeout=0.2))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: idle(live, engine, client), ONE_STEP_AND_SLACK)
    outcomes = live.handle.metrics.requests
    wait_for(lambda: outcomes.labels(outcome="deadline_exceeded")._value.get() == 2)


def test_overload_is_refused_with_a_retry_hint() -> None:
    engine = FakeEngine(max_num_seqs=1, step_delay=0.01, max_model_len=LONG + 8)
    with (
        running_server(engine, max_queued_requests=2, retry_after_ms=250) as live,
        Client(live.target, timeout=10) as client,
    ):
        running = client.generate("a", max_tokens=LONG)
        next(running)
        queued = [client.generate("b", max_tokens=5) for _ in range(2)]
        wait_for(lambda: client.model_info().num_waiting == 2)
        err = status_of(lambda: client.complete("c", max_tokens=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after 250 ms" in err.details()
        assert dict(err.trailing_metadata())["retry-after-ms"] == "250"
        running.cancel()
        for stream in queued:
            assert "".join(c.text for r in stream for c in r.choices) == "rstuv"
        assert client.complete("c", max_tokens=2).choices[0].text == "st"
        wait_for(lambda: idle(live, engine, client), ONE_STEP_AND_SLACK)


# --- health, reflection, metrics -----------------------------------------------------------------


def test_health_is_not_serving_until_warmup_finishes() -> None:
    warm = threading.Event()
    engine = FakeEngine(warmup_event=warm)
    with running_server(engine, wait_serving=False) as live, Client(live.target, timeout=5) as c:
        wait_for(lambda: live.handle.engine_loop.model_info is not None)
        assert c.health() == "NOT_SERVING"
        assert c.health("jaxserve.v1.Generation") == "NOT_SERVING"
        err = status_of(lambda: c.complete("a"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in err.details()
        assert c.model_info().model_name == "fake-tiny"  # model info is known before warm-up
        engine.pending_compiles = 3
        warm.set()
        c.wait_until_serving(5)
        # By default the server answers while the engine compiles its smaller shapes.
        assert engine.warmed_up and engine.warmed_up_in_background
        assert c.model_info().compiles_pending == 3
        assert c.health("jaxserve.v1.Generation") == "SERVING"
        assert c.complete("a", max_tokens=1).choices[0].text == "q"


def test_reflection_lists_the_services(fast: tuple[LiveServer, FakeEngine, Client]) -> None:
    live, _, _ = fast
    with grpc.insecure_channel(live.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {
            "jaxserve.v1.Generation",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        file = db.FindFileContainingSymbol("jaxserve.v1.Generation")
        assert file.package == "jaxserve.v1"
        assert [m.name for m in file.service[0].method] == [
            "Generate",
            "Complete",
            "Tokenize",
            "Detokenize",
            "GetModelInfo",
        ]


def test_metrics_endpoint() -> None:
    engine = FakeEngine()
    with running_server(engine, metrics_port=0) as live, Client(live.target, timeout=5) as c:
        assert c.complete("a", max_tokens=5).choices[0].finish_reason == pb.FINISH_REASON_LENGTH
        assert c.complete("a", max_tokens=5, stop=["s"]).choices[0].text == "qr"
        status_of(lambda: c.complete("a", temperature=-1.0))
        port = live.handle.metrics_port
        assert port

        def scrape() -> str:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read().decode()

        wait_for(lambda: "jaxserve_generation_tokens_total 8.0" in scrape())
        text = scrape()
        for line in (
            'jaxserve_requests_total{outcome="length"} 1.0',
            'jaxserve_requests_total{outcome="stop"} 1.0',
            'jaxserve_requests_total{outcome="invalid_argument"} 1.0',
            'jaxserve_requests_total{outcome="internal"} 0.0',
            "jaxserve_prompt_tokens_total 4.0",
            "jaxserve_time_to_first_token_seconds_count 2.0",
            "jaxserve_e2e_request_latency_seconds_count 2.0",
            "jaxserve_inter_token_latency_seconds_count 6.0",
            "jaxserve_num_requests_running 0.0",
            "jaxserve_kv_cache_usage_ratio 0.0",
            "jaxserve_num_preemptions_total 0.0",
        ):
            assert line in text, line


# --- engine failures -----------------------------------------------------------------------------


def test_failed_step_fails_in_flight_requests_and_serving_goes_on(
    slow: tuple[LiveServer, FakeEngine, Client],
) -> None:
    live, engine, client = slow
    for reset in (False, True):
        stream = client.generate("a", max_tokens=LONG, request_id="victim")
        next(stream)
        engine.fail_steps(1, reset=reset)
        err = status_of(lambda stream=stream: list(stream))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "injected engine failure" in err.details()
        wait_for(lambda: idle(live, engine, client), ONE_STEP_AND_SLACK)
        # The id is free again: the failed request left nothing behind.
        assert client.complete("a", max_tokens=2, request_id="victim").choices[0].text == "qr"
    assert client.health() == "SERVING"
    assert live.handle.metrics.engine_step_failures._value.get() == 2


def test_unusable_engine_stops_the_server_with_status_1() -> None:
    engine = FakeEngine(step_delay=0.01)
    with (
        running_server(engine, max_consecutive_engine_failures=2) as live,
        Client(live.target, timeout=5) as client,
    ):
        stream = client.generate("a", max_tokens=200)
        next(stream)
        engine.fail_steps(2)
        err = status_of(lambda: list(stream))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert live.run(live.handle.wait(), timeout=10) == 1
        assert live.handle.engine_loop.fatal_error is not None


class PickyEngine(FakeEngine):
    """Refuses prompts ending in "x" (ValueError) and crashes on ones ending in "y"."""

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if prompt[-1] == ord("x") - 29:
            raise ValueError("prompt: the engine refuses it")
        if prompt[-1] == ord("y") - 29:
            raise RuntimeError("engine bug")
        super().add_request(request_id, prompt, params, arrival_time)


def test_add_request_errors_fail_only_their_request() -> None:
    engine = PickyEngine()
    with running_server(engine) as live, Client(live.target, timeout=5) as client:
        refused = status_of(lambda: client.complete("ax"))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.details() == "prompt: the engine refuses it"
        crashed = status_of(lambda: list(client.generate("ay", request_id="y")))
        assert crashed.code() == grpc.StatusCode.INTERNAL and "engine bug" in crashed.details()
        assert client.complete("a", max_tokens=2, request_id="y").choices[0].text == "qr"
        wait_for(lambda: idle(live, engine, client))


class BrokenWarmupEngine(FakeEngine):
    def warmup(self, background: bool = False) -> None:
        raise RuntimeError("no device")


def test_failed_warmup_stops_the_server_with_status_1() -> None:
    with running_server(BrokenWarmupEngine(), wait_serving=False) as live:
        assert live.run(live.handle.wait(), timeout=10) == 1
        assert "no device" in (live.handle.engine_loop.fatal_error or "")
        assert not live.handle.engine_loop.ready


# --- shutdown ------------------------------------------------------------------------------------


def start_process(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_engine", *args],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if match := re.search(r"listening address=127\.0\.0\.1:(\d+)", line):
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("server process did not start")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_streams_then_exits_0(sig: signal.Signals) -> None:
    proc, port = start_process(
        "--step-delay", "0.02", "serve", "--port", "0", "--metrics-port", "0", "--grace-period", "5"
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(10)
            stream = client.generate("a", max_tokens=25)
            first = next(stream)
            proc.send_signal(sig)
            wait_for(lambda: client.health() == "NOT_SERVING")
            err = status_of(lambda: client.complete("a", max_tokens=1))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)
            text = first.choices[0].text + "".join(c.text for r in rest for c in r.choices)
            assert text == generated_text([0, 68], 25)
            assert rest[-1].choices[0].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_grace_period_expiry_aborts_remaining_streams() -> None:
    proc, port = start_process(
        "--step-delay",
        "0.02",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--grace-period",
        "0.3",
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(10)
            stream = client.generate("a", max_tokens=200)
            next(stream)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)
            assert rest[-1].finished
            assert rest[-1].choices[0].finish_reason == pb.FINISH_REASON_ABORT
            assert 0.3 <= time.monotonic() - started < 3
            assert sum(len(c.token_ids) for r in rest for c in r.choices) < 199
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- soak ----------------------------------------------------------------------------------------


def test_soak_with_random_cancellations_leaves_nothing_behind() -> None:
    engine = FakeEngine(max_num_seqs=32, step_delay=0.001)
    rng = random.Random(1234)
    plans = [
        (
            chr(ord("a") + rng.randrange(26)) * rng.randint(1, 6),
            rng.randint(1, 12),
            rng.choice(["finish", "finish", "cancel", "deadline"]),
            rng.randint(0, 4),
            rng.uniform(0.002, 0.03),
        )
        for _ in range(1000)
    ]
    with running_server(engine, max_queued_requests=1000) as live:

        async def one(ac: AsyncClient, sem: asyncio.Semaphore, i: int) -> str:
            prompt, max_tokens, how, after, deadline = plans[i]
            async with sem:
                if how == "finish":
                    r = await ac.complete(prompt, max_tokens=max_tokens, request_id=f"s{i}")
                    expected = generated_text([0] + [ord(c) - 29 for c in prompt], max_tokens)
                    assert r.choices[0].text == expected
                    return "finish"
                timeout = deadline if how == "deadline" else None
                stream = ac.generate(
                    prompt, max_tokens=max_tokens, timeout=timeout, request_id=f"s{i}"
                )
                try:
                    async with stream:
                        seen = 0
                        async for _ in stream:
                            seen += 1
                            if how == "cancel" and seen > after:
                                break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
                return how

        async def main() -> list[str]:
            sem = asyncio.Semaphore(64)
            async with AsyncClient(live.target, timeout=30) as ac:
                return await asyncio.gather(*(one(ac, sem, i) for i in range(1000)))

        started = time.monotonic()
        outcomes = asyncio.run(main())
        assert time.monotonic() - started < 20
        assert outcomes.count("finish") > 300
        with Client(live.target, timeout=5) as client:
            wait_for(lambda: idle(live, engine, client))
