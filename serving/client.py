"""Python clients of the `jaxserve.v1.Generation` API: blocking `Client` and asyncio `AsyncClient`.

Both build requests the same way (`build_request`): a prompt given as text, token ids or chat
messages, and sampling options as keyword arguments named like `SamplingParams`' fields.
`generate` sends the request at once and returns a stream of the server's `GenerateResponse`
deltas; cancelling the stream (or leaving its `with` block) aborts the request on the server.
Errors surface as `grpc.RpcError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto import generation_pb2 as pb
from serving.proto import generation_pb2_grpc

Message = Mapping[str, str] | tuple[str, str]

# Every non-repeated field of the wire SamplingParams (the repeated ones are handled by name).
_SCALAR_SAMPLING = frozenset(
    f.name for f in pb.SamplingParams.DESCRIPTOR.fields if not f.is_repeated
)


def _chat(messages: Sequence[Message]) -> pb.ChatMessages:
    chat = pb.ChatMessages()
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        chat.messages.add(role=role, content=content)
    return chat


def build_sampling(**sampling: Any) -> pb.SamplingParams:
    """Keyword arguments named like `SamplingParams` fields; None leaves a field unset."""
    wire = pb.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop":
            wire.stop.extend([value] if isinstance(value, str) else value)
        elif name == "stop_token_ids":
            wire.stop_token_ids.extend(value)
        elif name in _SCALAR_SAMPLING:
            setattr(wire, name, value)
        else:
            raise TypeError(f"unknown sampling option {name!r}")
    return wire


def build_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[Message] | None = None,
    request_id: str = "",
    **sampling: Any,
) -> pb.GenerateRequest:
    """Exactly one of `prompt` (text), `token_ids` or `messages` (chat) must be given."""
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise TypeError("give exactly one of prompt, token_ids or messages")
    request = pb.GenerateRequest(request_id=request_id, sampling=build_sampling(**sampling))
    if prompt is not None:
        request.text = prompt
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    else:
        assert messages is not None
        request.chat.CopyFrom(_chat(messages))
    return request


def _tokenize_request(
    text: str | None, messages: Sequence[Message] | None, add_special_tokens: bool | None
) -> pb.TokenizeRequest:
    if (text is None) == (messages is None):
        raise TypeError("give exactly one of text or messages")
    request = pb.TokenizeRequest()
    if text is not None:
        request.text = text
    else:
        assert messages is not None
        request.chat.CopyFrom(_chat(messages))
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def _detokenize_request(
    token_ids: Sequence[int], skip_special_tokens: bool | None
) -> pb.DetokenizeRequest:
    request = pb.DetokenizeRequest(token_ids=token_ids)
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    return request


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class ResponseStream:
    """The deltas of one Generate call. `cancel()` (or leaving a `with` block) stops it early,
    which aborts the request on the server; so does dropping the last reference to it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> ResponseStream:
        return self

    def __next__(self) -> pb.GenerateResponse:
        return next(self._call)

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stops the call; a no-op once it has finished."""
        self._call.cancel()


class AsyncResponseStream:
    """asyncio twin of `ResponseStream`."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __aiter__(self) -> AsyncResponseStream:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        response = await self._call.read()
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return response

    async def __aenter__(self) -> AsyncResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """Blocking client. `timeout` (seconds) is the default deadline of every call."""

    def __init__(self, target: str, *, timeout: float | None = None) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[Message] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> ResponseStream:
        """Sends the request now; iterate the result for the deltas."""
        request = build_request(
            prompt, token_ids=token_ids, messages=messages, request_id=request_id, **sampling
        )
        return ResponseStream(self._stub.Generate(request, timeout=self._deadline(timeout)))

    def complete(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[Message] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> pb.GenerateResponse:
        request = build_request(
            prompt, token_ids=token_ids, messages=messages, request_id=request_id, **sampling
        )
        return self._stub.Complete(request, timeout=self._deadline(timeout))

    def tokenize(
        self,
        text: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        request = _tokenize_request(text, messages, add_special_tokens)
        return list(self._stub.Tokenize(request, timeout=self._timeout).token_ids)

    def detokenize(
        self, token_ids: Sequence[int], *, skip_special_tokens: bool | None = None
    ) -> str:
        request = _detokenize_request(token_ids, skip_special_tokens)
        return self._stub.Detokenize(request, timeout=self._timeout).text

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout)

    def health(self, service: str = "") -> str:
        """The serving status name: "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(self._health.Check(request, timeout=self._timeout))

    def wait_until_serving(self, timeout: float) -> None:
        """Polls health until SERVING; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(f"server not SERVING after {timeout} s")
            time.sleep(0.05)


class AsyncClient:
    """asyncio client; create and use it inside one running event loop."""

    def __init__(self, target: str, *, timeout: float | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[Message] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncResponseStream:
        """Sends the request now; iterate the result with `async for` for the deltas."""
        request = build_request(
            prompt, token_ids=token_ids, messages=messages, request_id=request_id, **sampling
        )
        return AsyncResponseStream(self._stub.Generate(request, timeout=self._deadline(timeout)))

    async def complete(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[Message] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> pb.GenerateResponse:
        request = build_request(
            prompt, token_ids=token_ids, messages=messages, request_id=request_id, **sampling
        )
        return await self._stub.Complete(request, timeout=self._deadline(timeout))

    async def tokenize(
        self,
        text: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        request = _tokenize_request(text, messages, add_special_tokens)
        return list((await self._stub.Tokenize(request, timeout=self._timeout)).token_ids)

    async def detokenize(
        self, token_ids: Sequence[int], *, skip_special_tokens: bool | None = None
    ) -> str:
        request = _detokenize_request(token_ids, skip_special_tokens)
        return (await self._stub.Detokenize(request, timeout=self._timeout)).text

    async def model_info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout)

    async def health(self, service: str = "") -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(await self._health.Check(request, timeout=self._timeout))

    async def wait_until_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health() == "SERVING":
                    return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(f"server not SERVING after {timeout} s")
            await asyncio.sleep(0.05)
