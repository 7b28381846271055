"""The gRPC front end: the `jaxserve.v1.Generation` service plus health, reflection and metrics.

Owns everything between a client's RPC and the `EngineLoop`: request validation and
tokenization, admission errors as gRPC statuses, streaming the engine's deltas (or aggregating them
for `Complete`), aborting the engine request when a caller cancels or its deadline passes,
per-request metrics and logs, and the server's life cycle (warm-up gating through the health
service, graceful drain on SIGTERM/SIGINT, exit status).

Tokenizer calls run on a small thread pool so long prompts never stall the event loop; the
tokenizer must therefore tolerate concurrent calls (the engine itself is only touched by the
engine loop's thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams
from serving.engine_loop import (
    DuplicateRequest,
    Engine,
    EngineFailure,
    EngineLoop,
    QueueFull,
    Sink,
    Unavailable,
)
from serving.metrics import MetricsEndpoint, ServerMetrics
from serving.proto import generation_pb2 as pb
from serving.proto import generation_pb2_grpc
from serving.validation import (
    Limits,
    RequestError,
    check_chat_messages,
    check_context_length,
    check_prompt_text,
    check_request_id,
    check_stop_token_ids,
    check_token_ids,
    sampling_params_from_wire,
)

log = logging.getLogger("jaxserve.serving")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Generation"].full_name
RETRY_AFTER_KEY = "retry-after-ms"
R = TypeVar("R")
# After the drain, how long the last responses (aborts included) get to reach their clients.
_FINAL_FLUSH_SECONDS = 1.0

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_STATUS_BY_NAME = {
    "internal": grpc.StatusCode.INTERNAL,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True)
class ServerConfig:
    """Server knobs. `metrics_port`: None disables the /metrics endpoint, 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    max_queued_requests: int = 256
    grace_period: float = 30.0
    retry_after_ms: int = 1000
    max_consecutive_engine_failures: int = 3
    tokenizer_threads: int = 2
    # SERVING once the largest step shapes are compiled; the others compile while serving.
    background_compile: bool = True
    limits: Limits = field(default_factory=Limits)


class _RpcError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        outcome: str,
        trailing_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.outcome = outcome
        self.trailing_metadata = trailing_metadata


def _invalid(error: RequestError) -> _RpcError:
    return _RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(error), "invalid_argument")


def _unavailable(message: str) -> _RpcError:
    return _RpcError(grpc.StatusCode.UNAVAILABLE, message, "unavailable")


def _position_logprobs(
    token_id: int, entries: dict[int, float] | None, top_k: int
) -> pb.PositionLogprobs:
    pos = pb.PositionLogprobs(token_id=token_id)
    if entries:
        if token_id in entries:
            pos.logprob = entries[token_id]
        best = sorted(entries.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        pos.top.extend(pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in best)
    return pos


def _merge_choice(choice: pb.Choice, delta: CompletionOutput, params: SamplingParams) -> None:
    """Appends one engine delta to a wire `Choice` (fresh for streaming, running for Complete)."""
    choice.token_ids.extend(delta.token_ids)
    choice.text += delta.text
    if delta.logprobs is not None:
        k = params.logprobs or 0
        # Not strict: a logprob list short of the tokens must not cost the client its text.
        choice.logprobs.extend(
            _position_logprobs(t, lp, k)
            for t, lp in zip(delta.token_ids, delta.logprobs, strict=False)
        )
    if delta.finish_reason is not None:
        choice.finish_reason = _FINISH_REASONS[delta.finish_reason]
    if isinstance(delta.stop_reason, str):
        choice.stop_string = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        choice.stop_token_id = delta.stop_reason
    if delta.cumulative_logprob is not None:
        choice.cumulative_logprob = delta.cumulative_logprob


def _request_outcome(reasons: Sequence[str]) -> str:
    """One label per request: the most severe of its samples' finish reasons."""
    for reason in ("abort", "length", "stop"):
        if reason in reasons:
            return reason
    return "stop"


class _Call:
    """One admitted Generate/Complete call: reads its outputs, keeps its accounting."""

    def __init__(
        self,
        *,
        request_id: str,
        params: SamplingParams,
        num_prompt_tokens: int,
        sink: Sink,
        arrival_time: float,
        started: float,
        engine_loop: EngineLoop,
        metrics: ServerMetrics,
        on_close: Callable[[], None],
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.num_prompt_tokens = num_prompt_tokens
        self._sink = sink
        self._arrival_time = arrival_time
        self._started = started
        self._engine_loop = engine_loop
        self._metrics = metrics
        self._on_close = on_close
        self.finished = False
        self.outcome: str | None = None
        self.completion_tokens = 0
        self._reasons: dict[int, str] = {}
        self._first_token_at: float | None = None
        self._last_token_at = started
        self._prompt_logprobs: list[dict[int, float] | None] | None = None

    async def next(self) -> RequestOutput:
        item = await self._sink.get()
        if isinstance(item, EngineFailure):
            # The engine loop has already forgotten this request.
            self.finished = True
            raise _RpcError(_STATUS_BY_NAME[item.code], item.message, item.code)
        self._observe(item)
        return item

    def _observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = [len(c.token_ids) for c in out.outputs]
        if any(new_tokens):
            if self._first_token_at is None:
                self._first_token_at = now
                self._metrics.time_to_first_token.observe(now - self._started)
            else:
                # Samples advance in lockstep, so the step's widest delta is the token count.
                self._metrics.inter_token_latency.observe(
                    (now - self._last_token_at) / max(new_tokens)
                )
            self._last_token_at = now
        self.completion_tokens += sum(new_tokens)
        for c in out.outputs:
            if c.finish_reason is not None:
                self._reasons[c.index] = c.finish_reason
        if out.prompt_logprobs is not None:
            self._prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finished = True
            self.outcome = _request_outcome(list(self._reasons.values()))
            self._metrics.e2e_latency.observe(now - self._started)

    def fill_final(self, response: pb.GenerateResponse, out: RequestOutput) -> None:
        """Adds what only the last response carries: usage, timings, prompt logprobs."""
        now = time.monotonic()
        response.finished = True
        response.usage.prompt_tokens = len(out.prompt_token_ids)
        response.usage.completion_tokens = self.completion_tokens
        response.usage.cached_tokens = out.num_cached_tokens
        m = out.metrics
        if m is not None and m.first_scheduled_time is not None:
            response.timings.queue_time = max(0.0, m.first_scheduled_time - self._arrival_time)
        first = self._first_token_at if self._first_token_at is not None else now
        response.timings.time_to_first_token = first - self._started
        response.timings.total_time = now - self._started
        if self._prompt_logprobs is not None:
            k = self.params.prompt_logprobs or 0
            response.prompt_logprobs.extend(
                _position_logprobs(t, lp, k)
                for t, lp in zip(out.prompt_token_ids, self._prompt_logprobs, strict=False)
            )

    def close(self, context: grpc.aio.ServicerContext) -> None:
        """Runs when the handler exits for any reason; aborts the engine request if unfinished."""
        if not self.finished:
            self._engine_loop.abort(self.request_id)
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self.outcome = "deadline_exceeded" if expired else "cancelled"
        outcome = self.outcome or "internal"
        self._metrics.record_outcome(outcome)
        self._on_close()
        log.info(
            "request.end request_id=%s outcome=%s prompt_tokens=%d completion_tokens=%d "
            "ttft=%s e2e=%.4f",
            self.request_id,
            outcome,
            self.num_prompt_tokens,
            self.completion_tokens,
            "-" if self._first_token_at is None else f"{self._first_token_at - self._started:.4f}",
            time.monotonic() - self._started,
        )


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        engine: Engine,
        engine_loop: EngineLoop,
        config: ServerConfig,
        metrics: ServerMetrics,
        tokenizer_pool: ThreadPoolExecutor,
    ) -> None:
        # None for engines built without one: they take token ids only.
        self._tokenizer = engine.tokenizer
        self._vocab_size = int(engine_loop.model_info["vocab_size"])
        self._max_model_len = engine.max_model_len
        self._loop = engine_loop
        self._config = config
        self._limits = config.limits
        self._metrics = metrics
        self._pool = tokenizer_pool
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- internals -------------------------------------------------------------------------------

    def _require_tokenizer(self, field: str) -> Any:
        if self._tokenizer is None:
            raise RequestError(field, "this model has no tokenizer; send token ids")
        return self._tokenizer

    async def _in_pool(self, fn: Callable[[], R]) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_prompt_text(text, self._limits, "text")
        tokenizer = self._require_tokenizer("text")
        return await self._in_pool(lambda: tokenizer.encode(text, add_special_tokens))

    async def _chat_ids(self, chat: pb.ChatMessages) -> list[int]:
        messages = check_chat_messages(chat.messages, self._limits)
        tokenizer = self._require_tokenizer("chat")

        def render() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            except ValueError as e:
                raise RequestError("chat.messages", str(e)) from None
            # The template already wrote the special tokens it wants.
            return tokenizer.encode(text, add_special_tokens=False)

        return await self._in_pool(render)

    async def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            ids = await self._encode(request.text)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            check_token_ids(ids, self._vocab_size, "token_ids.ids")
        elif kind == "chat":
            ids = await self._chat_ids(request.chat)
        else:
            raise RequestError("prompt", "one of text, token_ids or chat is required")
        if not ids:
            raise RequestError("prompt", "the prompt has no tokens")
        return ids

    def _call_closed(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no Generate/Complete call is in flight."""
        await self._idle.wait()

    @property
    def num_active(self) -> int:
        return self._active

    def _check_open(self) -> None:
        if self.draining:
            raise _unavailable("the server is shutting down")

    async def _admit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> _Call:
        started = time.monotonic()
        arrival_time = time.time()
        request_id = request.request_id or uuid.uuid4().hex
        try:
            self._check_open()
            check_request_id(request_id, self._limits)
            wire = request.sampling if request.HasField("sampling") else None
            params = sampling_params_from_wire(wire, self._limits)
            check_stop_token_ids(params, self._vocab_size)
            prompt_ids = await self._prompt_ids(request)
            check_context_length(len(prompt_ids), params, self._max_model_len)
            # A drain may have begun while the prompt was being tokenized.
            self._check_open()
            sink = self._loop.submit(request_id, prompt_ids, params, arrival_time)
        except RequestError as e:
            err = _invalid(e)
        except DuplicateRequest:
            err = _RpcError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {request_id!r} is already in flight",
                "already_exists",
            )
        except QueueFull as e:
            err = _RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server overloaded: {e}; retry after {e.retry_after_ms} ms",
                "resource_exhausted",
                ((RETRY_AFTER_KEY, str(e.retry_after_ms)),),
            )
        except Unavailable as e:
            err = _unavailable(str(e))
        except _RpcError as e:
            err = e
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self._metrics.record_outcome("deadline_exceeded" if expired else "cancelled")
            raise
        else:
            self._active += 1
            self._idle.clear()
            log.info(
                "request.start request_id=%s prompt_tokens=%d n=%d max_tokens=%s peer=%s",
                request_id,
                len(prompt_ids),
                params.n,
                params.max_tokens,
                context.peer(),
            )
            return _Call(
                request_id=request_id,
                params=params,
                num_prompt_tokens=len(prompt_ids),
                sink=sink,
                arrival_time=arrival_time,
                started=started,
                engine_loop=self._loop,
                metrics=self._metrics,
                on_close=self._call_closed,
            )
        self._metrics.record_outcome(err.outcome)
        log.info("request.rejected request_id=%s code=%s %s", request_id, err.code.name, err)
        await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata)

    # --- RPCs ------------------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = await self._admit(request, context)
        try:
            while not call.finished:
                out = await call.next()
                response = pb.GenerateResponse(request_id=call.request_id)
                for delta in out.outputs:
                    _merge_choice(response.choices.add(index=delta.index), delta, call.params)
                if out.finished:
                    call.fill_final(response, out)
                yield response
        except _RpcError as e:
            call.outcome = e.outcome
            await context.abort(e.code, e.message)
        finally:
            call.close(context)

    async def Complete(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        call = await self._admit(request, context)
        response = pb.GenerateResponse(request_id=call.request_id)
        choices = [response.choices.add(index=i) for i in range(call.params.n)]
        try:
            while True:
                out = await call.next()
                for delta in out.outputs:
                    _merge_choice(choices[delta.index], delta, call.params)
                if call.finished:
                    call.fill_final(response, out)
                    return response
        except _RpcError as e:
            call.outcome = e.outcome
            await context.abort(e.code, e.message)
        finally:
            call.close(context)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        try:
            self._check_open()
            kind = request.WhichOneof("input")
            if kind == "text":
                add_special = (
                    request.add_special_tokens if request.HasField("add_special_tokens") else True
                )
                ids = await self._encode(request.text, add_special)
            elif kind == "chat":
                ids = await self._chat_ids(request.chat)
            else:
                raise RequestError("input", "one of text or chat is required")
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _RpcError as e:
            await context.abort(e.code, e.message)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        ids = list(request.token_ids)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            self._check_open()
            tokenizer = self._require_tokenizer("token_ids")
            if ids:
                check_token_ids(ids, self._vocab_size, "token_ids")
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _RpcError as e:
            await context.abort(e.code, e.message)
        text = await self._in_pool(lambda: tokenizer.decode(ids, skip_special_tokens=skip))
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        info, stats = self._loop.model_info, self._loop.stats
        return pb.ModelInfo(
            model_name=str(info["model_name"]),
            architecture=str(info["architecture"]),
            dtype=str(info["dtype"]),
            max_model_len=int(info["max_model_len"]),
            vocab_size=int(info["vocab_size"]),
            page_size=int(info["page_size"]),
            kv_capacity_tokens=int(info["kv_capacity_tokens"]),
            device=str(info["device"]),
            mesh=str(info["mesh"]),
            kv_used_tokens=int(stats["kv_used_tokens"]),
            kv_usage=float(stats["kv_usage"]),
            num_running=int(stats["num_running"]),
            num_waiting=int(stats["num_waiting"]),
            compiles_pending=self._loop.compiles_pending(),
        )


class ServerHandle:
    """A started server. `stop()` drains it; `wait()` returns the process exit status."""

    def __init__(
        self,
        *,
        server: grpc.aio.Server,
        service: GenerationService,
        health_service: health.aio.HealthServicer,
        engine_loop: EngineLoop,
        metrics: ServerMetrics,
        metrics_endpoint: MetricsEndpoint | None,
        tokenizer_pool: ThreadPoolExecutor,
        config: ServerConfig,
        port: int,
    ) -> None:
        self._server = server
        self._service = service
        self._health = health_service
        self.engine_loop = engine_loop
        self.metrics = metrics
        self._metrics_endpoint = metrics_endpoint
        self._pool = tokenizer_pool
        self._config = config
        self.port = port
        self.metrics_port = None if metrics_endpoint is None else metrics_endpoint.port
        self.exit_code = 0
        self._stop_task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        host = self._config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    def on_engine_ready(self) -> None:
        log.info("serving address=%s", self.address)
        self._spawn(self._set_health(health_pb2.HealthCheckResponse.SERVING))

    def on_engine_fatal(self, message: str) -> None:
        self.exit_code = 1
        self.request_stop(f"engine unusable: {message}")

    def request_stop(self, reason: str) -> None:
        """Starts a graceful stop without waiting for it (for signal handlers and callbacks)."""
        log.info("shutdown requested: %s", reason)
        self._spawn(self.stop())

    async def stop(self, grace: float | None = None) -> None:
        """Refuses new calls (UNAVAILABLE), gives in-flight ones `grace` seconds to finish, then
        aborts the rest in the engine and shuts the server down."""
        if self._stop_task is None:
            period = self._config.grace_period if grace is None else grace
            self._stop_task = asyncio.ensure_future(self._shutdown(period))
        await asyncio.shield(self._stop_task)

    async def _shutdown(self, grace: float) -> None:
        # Listeners stay open while draining, so new calls get a clear UNAVAILABLE and health
        # checks see NOT_SERVING instead of refused connections.
        log.info("draining grace_period=%.1fs in_flight=%d", grace, self._service.num_active)
        self._service.draining = True
        await self._health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self._service.wait_idle(), grace)
        except TimeoutError:
            log.warning("grace period over, aborting in_flight=%d", self._service.num_active)
        # Stopping the engine loop aborts what is left: those streams end with finish_reason
        # ABORT (or UNAVAILABLE if never admitted to the engine) rather than a bare cancel.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.engine_loop.stop, 30.0)
        await self._server.stop(_FINAL_FLUSH_SECONDS)
        if self._metrics_endpoint is not None:
            await loop.run_in_executor(None, self._metrics_endpoint.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped exit_code=%d", self.exit_code)
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        return self.exit_code


async def start_server(
    engine: Engine, config: ServerConfig | None = None, **options: object
) -> ServerHandle:
    """Binds and starts the server; the engine warms up on its own thread meanwhile.

    Health reports NOT_SERVING (and generation RPCs answer UNAVAILABLE) until warm-up ends.
    `options` override fields of `config` (or of the default `ServerConfig`).
    """
    config = dataclasses.replace(config if config is not None else ServerConfig(), **options)
    loop = asyncio.get_running_loop()
    metrics = ServerMetrics()
    limits = config.limits
    max_message = max(4 << 20, 2 * limits.max_prompt_bytes + (1 << 20))
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_message),
        ]
    )
    health_service = health.aio.HealthServicer()
    for service in ("", SERVICE_NAME):
        await health_service.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    engine_loop = EngineLoop(
        engine,
        loop,
        max_queued_requests=config.max_queued_requests,
        retry_after_ms=config.retry_after_ms,
        max_consecutive_failures=config.max_consecutive_engine_failures,
        metrics=metrics,
        background_compile=config.background_compile,
    )
    pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenizer")
    service = GenerationService(engine, engine_loop, config, metrics, pool)
    generation_pb2_grpc.add_GenerationServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    host = f"[{config.host}]" if ":" in config.host else config.host
    port = server.add_insecure_port(f"{host}:{config.port}")
    endpoint = None
    if config.metrics_port is not None:
        endpoint = metrics.start_http(config.host, config.metrics_port)
    await server.start()
    handle = ServerHandle(
        server=server,
        service=service,
        health_service=health_service,
        engine_loop=engine_loop,
        metrics=metrics,
        metrics_endpoint=endpoint,
        tokenizer_pool=pool,
        config=config,
        port=port,
    )
    engine_loop.start(on_ready=handle.on_engine_ready, on_fatal=handle.on_engine_fatal)
    log.info(
        "listening address=%s metrics_port=%s max_queued_requests=%d",
        handle.address,
        handle.metrics_port,
        config.max_queued_requests,
    )
    return handle


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 50051,
    metrics_port: int | None = None,
    max_queued_requests: int = 256,
    grace_period: float = 30.0,
    **options: object,
) -> int:
    """Serves until SIGTERM/SIGINT (then drains) or until the engine becomes unusable.

    Returns the exit status: 0 after a graceful stop, 1 when the engine failed.
    """

    async def run() -> int:
        handle = await start_server(
            engine,
            host=host,
            port=port,
            metrics_port=metrics_port,
            max_queued_requests=max_queued_requests,
            grace_period=grace_period,
            **options,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handle.request_stop, signal.Signals(sig).name)
        return await handle.wait()

    return asyncio.run(run())
