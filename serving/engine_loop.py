"""`EngineLoop`: the one thread that drives the engine on behalf of the asyncio gRPC server.

The engine is not thread-safe, so only this thread calls it (model info, warm-up, add/abort, step,
stats). The asyncio side talks to it through a locked inbox of commands that the thread drains at
each step boundary, and gets results back as one `call_soon_threadsafe` per step that fills each
request's `asyncio.Queue`. The thread sleeps on a condition while the engine has nothing to do.

It also owns admission: the registry of in-flight request ids (duplicates are refused), the bound
on queued requests (backpressure instead of an unbounded queue), and what happens when a step
raises: the affected requests fail with an `EngineFailure`, the others carry on, and after too
many consecutive failures the engine is declared unusable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from serving.metrics import ServerMetrics

log = logging.getLogger("jaxserve.serving.engine")

# Steps run after `stop()` to let the engine emit the abort outputs of what was left in it.
_MAX_DRAIN_STEPS = 64


class Engine(Protocol):
    """What the server needs of `jaxserve.llm_engine.LLMEngine`."""

    tokenizer: Any
    max_model_len: int

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def model_info(self) -> dict: ...

    def stats(self) -> dict: ...

    def warmup(self, background: bool = False) -> object: ...

    def compiles_pending(self) -> int: ...


@dataclass(frozen=True)
class EngineFailure:
    """Delivered instead of an output when the engine cannot finish a request.

    `code` is the lower-case name of the gRPC status the server answers with.
    """

    code: str
    message: str


class Unavailable(Exception):
    """The loop is warming up, stopping, or has given up on the engine."""


class DuplicateRequest(Exception):
    pass


class QueueFull(Exception):
    def __init__(self, queued: int, retry_after_ms: int) -> None:
        super().__init__(f"{queued} requests are already queued")
        self.queued = queued
        self.retry_after_ms = retry_after_ms


Sink = asyncio.Queue  # of RequestOutput | EngineFailure


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        *,
        max_queued_requests: int,
        retry_after_ms: int,
        max_consecutive_failures: int = 3,
        metrics: ServerMetrics | None = None,
        background_compile: bool = False,
    ) -> None:
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests: must be >= 1, got {max_queued_requests}")
        self._engine = engine
        self._loop = loop
        self._max_queued = max_queued_requests
        self._retry_after_ms = retry_after_ms
        self._max_failures = max_consecutive_failures
        self._metrics = metrics
        self._background_compile = background_compile
        self._on_ready: Callable[[], None] | None = None
        self._on_fatal: Callable[[str], None] | None = None
        self._cond = threading.Condition()
        # Guarded by _cond. A None sink is a request whose caller is gone: it stays registered
        # (its id taken) until the engine has emitted its final output.
        self._inbox: list[_Add | _Abort] = []
        self._live: dict[str, Sink | None] = {}
        self._pending_adds = 0
        self._waiting = 0
        self._stopping = False
        self._ready = False
        self._fatal: str | None = None
        # Read here, before the engine thread exists, so the server can describe the model
        # (and validate token ids against its vocabulary) while the engine warms up.
        self._model_info: dict = engine.model_info()
        self._stats: dict = engine.stats()
        # Engine-thread only.
        self._in_engine: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # --- asyncio side --------------------------------------------------------------------------

    def start(
        self,
        on_ready: Callable[[], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """Starts the thread: warm-up, then steps.

        `on_ready` runs on the event loop once warm-up is done; `on_fatal(message)` once the engine
        is declared unusable (every in-flight request has then failed with INTERNAL).
        """
        self._on_ready, self._on_fatal = on_ready, on_fatal
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def fatal_error(self) -> str | None:
        return self._fatal

    @property
    def model_info(self) -> dict:
        return self._model_info

    @property
    def stats(self) -> dict:
        """The engine's `stats()` as of its last step."""
        with self._cond:
            return self._stats

    def compiles_pending(self) -> int:
        """Step shapes the engine is still compiling in the background (any thread)."""
        return self._engine.compiles_pending()

    @property
    def num_live_requests(self) -> int:
        """Requests submitted and not yet finished in the engine, callers gone or not."""
        with self._cond:
            return len(self._live)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival_time: float
    ) -> Sink:
        """Queues a request; its outputs (deltas, last one finished) arrive on the returned queue.

        Must be called on the event loop's thread.
        """
        sink: Sink = asyncio.Queue()
        with self._cond:
            if self._fatal is not None:
                raise Unavailable(f"the engine is unusable: {self._fatal}")
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if not self._ready:
                raise Unavailable("the engine is warming up")
            if request_id in self._live:
                raise DuplicateRequest(request_id)
            queued = self._pending_adds + self._waiting
            if queued >= self._max_queued:
                raise QueueFull(queued, self._retry_after_ms)
            self._live[request_id] = sink
            self._pending_adds += 1
            self._inbox.append(_Add(request_id, prompt_ids, params, arrival_time))
            self._cond.notify()
        return sink

    def abort(self, request_id: str) -> None:
        """Stops a request whose caller has gone; nothing more is delivered for it."""
        with self._cond:
            if request_id not in self._live:
                return
            self._live[request_id] = None
            self._inbox.append(_Abort(request_id))
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Aborts whatever is left in the engine and ends the thread (blocking)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            log.info("engine warm-up started model=%s", self._model_info.get("model_name"))
            self._engine.warmup(background=self._background_compile)
        except Exception as e:
            log.exception("engine warm-up failed")
            self._give_up(f"warm-up failed: {e!r}")
            return
        with self._cond:
            self._ready = not self._stopping
        log.info("engine ready")
        if self._on_ready is not None:
            self._post(self._on_ready)
        busy = False
        failures = 0
        while True:
            with self._cond:
                while not (self._inbox or busy or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._inbox = self._inbox, []
                # Until the next stats snapshot, count the drained requests as waiting.
                self._waiting += self._pending_adds
                self._pending_adds = 0
            self._apply(commands)
            try:
                outputs = self._engine.step() if self._engine.has_unfinished_requests() else []
            except Exception as e:
                failures += 1
                if self._metrics is not None:
                    self._metrics.engine_step_failures.inc()
                log.exception("engine step failed (%d in a row)", failures)
                self._fail_in_engine(f"engine step failed: {e!r}")
                if failures >= self._max_failures:
                    self._give_up(f"{failures} engine steps in a row failed, the last with {e!r}")
                    return
            else:
                failures = 0
                self._dispatch(outputs)
            try:
                busy = self._engine.has_unfinished_requests()
                if not busy and self._in_engine:
                    self._forget(self._in_engine, "the engine dropped the request")
                stats = self._engine.stats()
            except Exception as e:
                log.exception("engine state query failed")
                self._give_up(f"engine state query failed: {e!r}")
                return
            with self._cond:
                self._stats = stats
                self._waiting = int(stats["num_waiting"])
            if self._metrics is not None:
                self._metrics.observe_engine_stats(stats)
        self._drain_on_stop()

    def _apply(self, commands: list[_Add | _Abort]) -> None:
        """Hands the inbox to the engine; a command that fails affects only its own request."""
        for cmd in commands:
            if isinstance(cmd, _Abort):
                if cmd.request_id in self._in_engine:
                    self._abort_in_engine(cmd.request_id)
                continue
            try:
                self._engine.add_request(
                    cmd.request_id, cmd.prompt_ids, cmd.params, arrival_time=cmd.arrival_time
                )
            except ValueError as e:
                self._finish(cmd.request_id, EngineFailure("invalid_argument", str(e)))
            except Exception as e:
                log.exception("add_request failed request_id=%s", cmd.request_id)
                self._finish(cmd.request_id, EngineFailure("internal", f"add_request: {e!r}"))
            else:
                self._in_engine.add(cmd.request_id)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        batch: list[tuple[Sink, RequestOutput | EngineFailure]] = []
        with self._cond:
            for out in outputs:
                rid = out.request_id
                if out.finished:
                    self._in_engine.discard(rid)
                    sink = self._live.pop(rid, None)
                else:
                    sink = self._live.get(rid)
                if sink is not None:
                    batch.append((sink, out))
        self._deliver(batch)

    def _finish(self, request_id: str, failure: EngineFailure) -> None:
        with self._cond:
            sink = self._live.pop(request_id, None)
        if sink is not None:
            self._deliver([(sink, failure)])

    def _fail_in_engine(self, message: str) -> None:
        """After a failed step: fail every request in the engine, and abort them to free pages.

        Their ids stay taken until the engine emits their final outputs (or turns out to have
        dropped them), so a retry with the same id cannot receive a stale output.
        """
        batch: list[tuple[Sink, RequestOutput | EngineFailure]] = []
        failure = EngineFailure("internal", message)
        with self._cond:
            for rid in self._in_engine:
                sink = self._live.get(rid)
                if sink is not None:
                    batch.append((sink, failure))
                    self._live[rid] = None
        self._deliver(batch)
        for rid in list(self._in_engine):
            self._abort_in_engine(rid)
        if batch:
            log.error("failed %d in-flight requests: %s", len(batch), message)

    def _abort_in_engine(self, request_id: str) -> None:
        try:
            self._engine.abort_request(request_id)
        except Exception:
            # The request runs to its end instead; its caller is gone, so it only costs pages.
            log.exception("abort_request failed request_id=%s", request_id)

    def _forget(self, request_ids: set[str], message: str) -> None:
        for rid in list(request_ids):
            log.warning("engine has no record of request_id=%s", rid)
            self._finish(rid, EngineFailure("internal", message))
        request_ids.clear()

    def _give_up(self, message: str) -> None:
        log.critical("engine unusable, giving up: %s", message)
        with self._cond:
            self._fatal = message
            self._ready = False
            self._inbox.clear()
            self._pending_adds = 0
            sinks = [s for s in self._live.values() if s is not None]
            self._live.clear()
        failure = EngineFailure("internal", f"the engine is unusable: {message}")
        self._deliver([(s, failure) for s in sinks])
        if self._on_fatal is not None:
            self._post(self._on_fatal, message)

    def _drain_on_stop(self) -> None:
        # Requests still in the inbox never reach the engine: they fail below with the rest.
        with self._cond:
            self._inbox.clear()
            self._pending_adds = 0
        for rid in list(self._in_engine):
            self._abort_in_engine(rid)
        try:
            for _ in range(_MAX_DRAIN_STEPS):
                if not self._engine.has_unfinished_requests():
                    break
                self._dispatch(self._engine.step())
        except Exception:
            log.exception("engine failed while draining at shutdown")
        with self._cond:
            sinks = [s for s in self._live.values() if s is not None]
            self._live.clear()
        failure = EngineFailure("unavailable", "the server is shutting down")
        self._deliver([(s, failure) for s in sinks])

    def _deliver(self, batch: list[tuple[Sink, RequestOutput | EngineFailure]]) -> None:
        if batch:
            self._post(_fill, batch)

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            # The event loop is closed: nobody is left to read the results.
            log.debug("event loop closed, dropping a callback")


def _fill(batch: list[tuple[Sink, RequestOutput | EngineFailure]]) -> None:
    for sink, item in batch:
        sink.put_nowait(item)
