"""Tests of `serving.client` (request building, sync and async clients) and `serving.cli`."""

from __future__ import annotations

import argparse
import asyncio
import io
import threading
from collections.abc import Iterator

import grpc
import pytest

from serving import cli
from serving.client import AsyncClient, Client, build_request, build_sampling
from tests.fake_engine import (
    FakeEngine,
    LiveServer,
    chat_prompt_ids,
    generated_text,
    running_server,
    wait_for,
)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with running_server(FakeEngine(step_delay=0.002)) as server:
        yield server


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers(required=True))
    return parser.parse_args(argv)


# --- request building ----------------------------------------------------------------------------


def test_build_request_prompt_forms() -> None:
    assert build_request("hi").text == "hi"
    assert list(build_request(token_ids=[1, 2]).token_ids.ids) == [1, 2]
    chat = build_request(messages=[{"role": "system", "content": "s"}, ("user", "u")]).chat
    assert [(m.role, m.content) for m in chat.messages] == [("system", "s"), ("user", "u")]
    assert build_request("hi", request_id="r1").request_id == "r1"
    for bad in ({}, {"prompt": "a", "token_ids": [1]}, {"token_ids": [1], "messages": []}):
        with pytest.raises(TypeError, match="exactly one"):
            build_request(**bad)


def test_build_sampling_sets_only_what_is_given() -> None:
    wire = build_sampling(temperature=0.0, max_tokens=None, stop="x", stop_token_ids=[3])
    assert wire.HasField("temperature") and wire.temperature == 0.0
    assert not wire.HasField("max_tokens")
    assert (list(wire.stop), list(wire.stop_token_ids)) == (["x"], [3])
    assert list(build_sampling(stop=["a", "b"]).stop) == ["a", "b"]
    assert build_sampling(detokenize=False).HasField("detokenize")
    with pytest.raises(TypeError, match="unknown sampling option 'temprature'"):
        build_sampling(temprature=0.5)


# --- clients -------------------------------------------------------------------------------------


def test_sync_client(live: LiveServer) -> None:
    with Client(live.target, timeout=10) as client:
        assert client.health() == "SERVING"
        deltas = [c.text for r in client.generate("a", max_tokens=3) for c in r.choices]
        assert deltas == ["q", "r", "s"]
        assert client.complete(token_ids=[69], max_tokens=2).choices[0].text == "rs"
        assert client.tokenize("a") == [0, 68]
        assert client.detokenize([68]) == "a"
        assert client.model_info().model_name == "fake-tiny"


def test_cancelling_a_stream_aborts_it_on_the_server(live: LiveServer) -> None:
    with Client(live.target, timeout=10) as client:
        with client.generate("a", max_tokens=200, request_id="leaver") as stream:
            next(stream)
            assert live.handle.engine_loop.num_live_requests == 1
        wait_for(lambda: live.handle.engine_loop.num_live_requests == 0, timeout=1.0)
        assert client.model_info().kv_used_tokens == 0


def test_async_client(live: LiveServer) -> None:
    async def main() -> None:
        async with AsyncClient(live.target, timeout=10) as client:
            await client.wait_until_serving(5)
            assert await client.health("jaxserve.v1.Generation") == "SERVING"
            texts = [c.text async for r in client.generate("a", max_tokens=3) for c in r.choices]
            assert texts == ["q", "r", "s"]
            r = await client.complete("a", max_tokens=4, n=2)
            assert [c.text for c in r.choices] == ["qrst", "rstu"]
            messages = [("user", "hi")]
            assert await client.tokenize(messages=messages) == chat_prompt_ids(
                [{"role": "user", "content": "hi"}]
            )
            assert await client.tokenize("ab", add_special_tokens=False) == [68, 69]
            assert await client.detokenize([0, 68], skip_special_tokens=False) == "<s>a"
            assert (await client.model_info()).page_size == 4
            async with client.generate("a", max_tokens=200) as stream:
                async for _ in stream:
                    break
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.complete("a", temperature=-1.0)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_wait_until_serving_times_out_while_warming_up() -> None:
    warm = threading.Event()
    with running_server(FakeEngine(warmup_event=warm), wait_serving=False) as server:
        with Client(server.target, timeout=5) as client, pytest.raises(TimeoutError):
            client.wait_until_serving(0.2)

        async def check() -> None:
            async with AsyncClient(server.target, timeout=5) as client:
                with pytest.raises(TimeoutError):
                    await client.wait_until_serving(0.2)

        asyncio.run(check())
        warm.set()
        with Client(server.target, timeout=5) as client:
            client.wait_until_serving(5)


# --- command line --------------------------------------------------------------------------------


def test_every_serve_engine_option_reaches_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """`LLMEngine.from_cli_args` hands every engine option of `jaxserve serve` on: an option
    added to the command line but not passed to the engine would be silently ignored."""
    from jaxserve.llm_engine import LLMEngine

    seen: dict[str, object] = {}

    def fake_from_pretrained(cls: type, model: str, **kwargs: object) -> str:
        seen.update(kwargs, model=model)
        return "engine"

    monkeypatch.setattr(LLMEngine, "from_pretrained", classmethod(fake_from_pretrained))
    value = {int: "3", float: "0.5", str: "auto"}
    argv = ["serve", "my-model"]
    for flag, kind, _ in cli.ENGINE_OPTIONS:
        argv += [flag, value[kind]]
    argv += [flag for flag, _, _ in cli.ENGINE_SWITCHES]
    assert LLMEngine.from_cli_args(cli.engine_args(parse(*argv))) == "engine"
    names = {flag[2:].replace("-", "_") for flag, _, _ in cli.ENGINE_OPTIONS}
    names |= {dest for _, dest, _ in cli.ENGINE_SWITCHES}
    assert set(seen) == names | {"model"}
    assert seen["max_prefill_seqs"] == 3 and seen["kv_memory_fraction"] == 0.5
    assert seen["enable_prefix_caching"] is False and seen["async_scheduling"] is False


def test_serve_arguments_reach_the_engine_factory_and_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import serving.server

    seen: dict[str, object] = {}

    def fake_serve(engine: object, **kwargs: object) -> int:
        seen.update(kwargs, engine=engine)
        return 7

    monkeypatch.setattr(serving.server, "serve", fake_serve)
    args = parse(
        "serve", "my-model", "--port", "6000", "--metrics-port", "0", "--max-queued-requests",
        "9", "--grace-period", "2.5", "--page-size", "32", "--kv-memory-fraction", "0.5",
        "--no-background-compile", "--no-async-scheduling",
    )  # fmt: skip
    engine = FakeEngine()
    options: list[argparse.Namespace] = []

    def factory(ns: argparse.Namespace) -> FakeEngine:
        options.append(ns)
        return engine

    assert args.func(args, engine_factory=factory) == 7
    assert vars(options[0]) == {
        "model": "my-model",
        "page_size": 32,
        "num_pages": None,
        "max_num_seqs": None,
        "max_num_batched_tokens": None,
        "max_prefill_seqs": None,
        "max_model_len": None,
        "dtype": None,
        "seed": None,
        "kv_memory_fraction": 0.5,
        "decode_steps": None,
        "attention_backend": None,
        "enable_prefix_caching": None,
        "async_scheduling": False,
        "tensor_parallel_size": None,
        "expert_parallel_size": None,
    }
    assert seen == {
        "engine": engine,
        "host": "127.0.0.1",
        "port": 6000,
        "metrics_port": None,
        "max_queued_requests": 9,
        "grace_period": 2.5,
        "background_compile": False,
    }
    defaults = parse("serve")
    assert (defaults.model, defaults.port, defaults.metrics_port) == (None, 50051, 9090)
    assert defaults.background_compile


def test_generate_command_streams_to_stdout(
    live: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("generate", "a", "--target", live.target, "--max-tokens", "6", "--stop", "u")
    assert args.func(args) == 0
    assert capsys.readouterr().out == "qrst\n"
    bad = parse("generate", "a", "--target", live.target, "--temperature", "-1")
    assert bad.func(bad) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: temperature: ")


def test_chat_command_keeps_the_history(
    live: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nmore\n"))
    args = parse("chat", "--target", live.target, "--system", "terse", "--max-tokens", "3")
    assert args.func(args) == 0
    history = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    first = generated_text(chat_prompt_ids(history), 3)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "more"}]
    second = generated_text(chat_prompt_ids(history), 3)
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def test_chat_command_reports_errors_and_goes_on(
    live: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhi\n"))
    args = parse("chat", "--target", live.target, "--max-tokens", "2", "--top-p", "0")
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("error: INVALID_ARGUMENT: top_p: ") == 2
