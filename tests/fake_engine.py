"""`FakeEngine`: a stand-in for `LLMEngine` whose every output can be worked out by hand.

Owns the serving tests' model of the engine contract (deltas from `step()`, abort emitted by the
next step, pages freed on finish/abort, stats and model info) without jax, and the harness that
serves one on loopback (`running_server`). Runnable as a server process through the real CLI path
(`python -m tests.fake_engine serve --port 0`) for tests that need signals.

The rules, all exact:
- Tokenizer: id 0 is BOS `<s>`, 1 is EOS `</s>` (both special), 2 is "\\n", and printable ASCII
  character c has id `ord(c) - 29` (so " " is 3, "a" is 68, "z" is 93). `vocab_size` is 98.
  `encode` prepends BOS when `add_special_tokens`; other characters map to "?".
- Generation: sample j's k-th token (k from 0) is the letter
  `"abcdefghijklmnopqrstuvwxyz"[(sum(prompt_ids) + k + j) % 26]`. Every running request gets one
  token per sample per step; the prompt is prefilled in the step that admits it.
- Logprobs (`logprobs=m`): the chosen token has logprob -0.25 and the r-th alternative, the letter
  r places after it, -0.25 * (r + 1); the dict holds max(m, 1) entries, chosen one included.
  Prompt logprobs (`prompt_logprobs=m`): None for position 0; otherwise ids 3..3+m-1 with
  -(r + 1) / 8 and the prompt token itself with -2.0.
- Stops (checked on each new token): a stop token id ends the sample (its text dropped unless include_stop_str_in_output); a
  stop string ends it with the text cut before the string (or after it, when included); text that
  could be the start of a stop string is held back until it cannot. Neither applies before
  `min_tokens` tokens. `max_tokens` (or the context length) ends it with "length".
- Text: none with `detokenize=False`, nor from an engine built `with_tokenizer=False` (which, like
  the real one, then takes token-id prompts only).
- KV cache: `num_pages` pages of `page_size` tokens; a sample of L tokens (prompt + generated) holds
  ceil(L / page_size) pages. A request is admitted only when its worst case fits, so there is no
  preemption. A prompt seen before reports `(len - 1) // page_size * page_size` cached tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serving.server import ServerHandle

T = TypeVar("T")

BOS, EOS, NEWLINE = 0, 1, 2
_FIRST_PRINTABLE = 3
VOCAB_SIZE = _FIRST_PRINTABLE + 95
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHOSEN_LOGPROB = -0.25
PROMPT_TOKEN_LOGPROB = -2.0


def char_id(c: str) -> int:
    if c == "\n":
        return NEWLINE
    if " " <= c <= "~":
        return ord(c) - 32 + _FIRST_PRINTABLE
    return ord("?") - 32 + _FIRST_PRINTABLE


def letter_id(i: int) -> int:
    return char_id(LETTERS[i % 26])


class FakeTokenizer:
    vocab_size = VOCAB_SIZE
    eos_token_ids = [EOS]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [char_id(c) for c in text]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = []
        for t in ids:
            if t in (BOS, EOS):
                if not skip_special_tokens:
                    out.append("<s>" if t == BOS else "</s>")
            elif t == NEWLINE:
                out.append("\n")
            else:
                out.append(chr(t - _FIRST_PRINTABLE + 32))
        return "".join(out)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        parts = ["<s>"]
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"unsupported chat role {m.get('role')!r}")
            parts.append(f"[{m['role']}]{m['content']}\n")
        if add_generation_prompt:
            parts.append("[assistant]")
        text = "".join(parts)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def chat_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    """The ids the fake's chat template gives (its "<s>" is literal text, as in real templates)."""
    text = FakeTokenizer().apply_chat_template(messages)
    assert isinstance(text, str)
    return FakeTokenizer().encode(text, add_special_tokens=False)


def generated_ids(prompt_ids: list[int], num_tokens: int, index: int = 0) -> list[int]:
    s = sum(prompt_ids)
    return [letter_id(s + k + index) for k in range(num_tokens)]


def generated_text(prompt_ids: list[int], num_tokens: int, index: int = 0) -> str:
    return FakeTokenizer().decode(generated_ids(prompt_ids, num_tokens, index))


def token_logprobs(chosen: int, k: int | None) -> dict[int, float]:
    start = chosen - char_id("a")
    return {letter_id(start + r): CHOSEN_LOGPROB * (r + 1) for r in range(max(k or 0, 1))}


def prompt_position_logprobs(token: int, k: int) -> dict[int, float]:
    entries = {_FIRST_PRINTABLE + r: -(r + 1) / 8 for r in range(k)}
    entries[token] = PROMPT_TOKEN_LOGPROB
    return entries


@dataclass
class _Sample:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list[_Sample]
    max_tokens: int
    pages: int = 0
    worst_pages: int = 0
    prompt_logprobs_sent: bool = False


class FakeEngine:
    """Single-threaded like the real engine; tests read its counters only while it is idle."""

    def __init__(
        self,
        *,
        max_model_len: int = 256,
        page_size: int = 4,
        num_pages: int = 4096,
        max_num_seqs: int = 64,
        step_delay: float = 0.0,
        warmup_event: threading.Event | None = None,
        with_tokenizer: bool = True,
    ) -> None:
        # Like the real engine, one built without a tokenizer takes token ids and emits no text.
        self.tokenizer = FakeTokenizer() if with_tokenizer else None
        self._codec = FakeTokenizer()
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_num_seqs = max_num_seqs
        self.step_delay = step_delay
        self.warmup_event = warmup_event
        self.warmed_up = False
        self.warmed_up_in_background = False
        self.pending_compiles = 0  # what `compiles_pending` reports
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._aborted: list[_Request] = []
        self._seen_prompts: set[tuple[int, ...]] = set()
        self._fail_steps = 0
        self._fail_reset = False
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0

    # --- test controls -------------------------------------------------------------------------

    def fail_steps(self, count: int, *, reset: bool = False) -> None:
        """Makes the next `count` steps raise; with `reset` the engine also drops every request."""
        self._fail_reset = reset
        self._fail_steps = count

    @property
    def used_pages(self) -> int:
        return sum(r.pages for r in self._running)

    @property
    def num_requests(self) -> int:
        return len(self._waiting) + len(self._running) + len(self._aborted)

    # --- engine interface ----------------------------------------------------------------------

    def warmup(self, background: bool = False) -> None:
        if self.warmup_event is not None:
            self.warmup_event.wait()
        self.warmed_up = True
        self.warmed_up_in_background = background

    def compiles_pending(self) -> int:
        return self.pending_compiles

    def model_info(self) -> dict:
        return {
            "model_name": "fake-tiny",
            "architecture": "FakeForCausalLM",
            "dtype": "float32",
            "max_model_len": self.max_model_len,
            "vocab_size": VOCAB_SIZE,
            "page_size": self.page_size,
            "kv_capacity_tokens": self.num_pages * self.page_size,
            "device": "cpu",
            "mesh": "{}",
        }

    def stats(self) -> dict:
        used = self.used_pages
        return {
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "kv_used_tokens": used * self.page_size,
            "kv_usage": used / self.num_pages,
            "num_preemptions": 0,
            "prompt_tokens_total": self._prompt_tokens_total,
            "generation_tokens_total": self._generation_tokens_total,
        }

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if any(r.request_id == request_id for r in self._all()):
            raise ValueError(f"request_id: {request_id!r} is already in the engine")
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("prompt: this engine has no tokenizer; send token ids")
        ids = self._codec.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, the limit is {self.max_model_len - 1}")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        req = _Request(
            request_id=request_id,
            prompt=text,
            prompt_ids=ids,
            params=params,
            metrics=RequestMetrics(arrival_time=arrival_time or time.time()),
            samples=[_Sample(index=j) for j in range(params.n)],
            max_tokens=max_tokens,
        )
        req.worst_pages = params.n * self._pages_for(len(ids) + max_tokens)
        self._waiting.append(req)

    def abort_request(self, request_id: str) -> None:
        for queue in (self._waiting, self._running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    req.pages = 0
                    self._aborted.append(req)
                    return

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    def step(self) -> list[RequestOutput]:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self._fail_steps > 0:
            self._fail_steps -= 1
            if self._fail_reset:
                self._waiting.clear()
                self._running.clear()
                self._aborted.clear()
            raise RuntimeError("injected engine failure")
        now = time.time()
        outputs = [self._abort_output(req, now) for req in self._aborted]
        self._aborted.clear()
        self._admit(now)
        for req in list(self._running):
            out = self._advance(req, now)
            if out.finished:
                self._running.remove(req)
            outputs.append(out)
        return outputs

    # --- internals -----------------------------------------------------------------------------

    def _all(self) -> list[_Request]:
        return self._waiting + self._running + self._aborted

    def _text_of(self, req: _Request, token: int) -> str:
        if not req.params.detokenize or self.tokenizer is None:
            return ""
        return self._codec.decode([token], skip_special_tokens=req.params.skip_special_tokens)

    def _pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def _admit(self, now: float) -> None:
        reserved = sum(r.worst_pages for r in self._running)
        while self._waiting and len(self._running) < self.max_num_seqs:
            req = self._waiting[0]
            if reserved + req.worst_pages > self.num_pages:
                break
            self._waiting.pop(0)
            reserved += req.worst_pages
            key = tuple(req.prompt_ids)
            if key in self._seen_prompts:
                cached = (len(req.prompt_ids) - 1) // self.page_size * self.page_size
                req.metrics.num_cached_tokens = cached
            self._seen_prompts.add(key)
            req.metrics.first_scheduled_time = now
            self._prompt_tokens_total += len(req.prompt_ids)
            self._running.append(req)

    def _advance(self, req: _Request, now: float) -> RequestOutput:
        params = req.params
        s = sum(req.prompt_ids)
        deltas = []
        for sample in req.samples:
            if sample.finish_reason is not None:
                continue
            k = len(sample.token_ids)
            token = letter_id(s + k + sample.index)
            sample.token_ids.append(token)
            sample.text += self._text_of(req, token)
            self._generation_tokens_total += 1
            self._check_stop(req, sample)
            deltas.append(self._delta(req, sample))
        req.pages = sum(
            self._pages_for(len(req.prompt_ids) + len(x.token_ids)) for x in req.samples
        )
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        finished = all(x.finish_reason is not None for x in req.samples)
        if finished:
            req.metrics.finished_time = now
            req.pages = 0
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            req.prompt_logprobs_sent = True
            prompt_logprobs = [None] + [
                prompt_position_logprobs(t, params.prompt_logprobs) for t in req.prompt_ids[1:]
            ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_ids,
            outputs=deltas,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            metrics=req.metrics,
        )

    def _check_stop(self, req: _Request, sample: _Sample) -> None:
        params = req.params
        token = sample.token_ids[-1]
        n = len(sample.token_ids)
        if n > params.min_tokens:
            if token in params.stop_token_ids:
                if not params.include_stop_str_in_output:
                    sample.text = sample.text[: len(sample.text) - len(self._text_of(req, token))]
                sample.finish_reason, sample.stop_reason = "stop", token
                return
            for stop in params.stop:
                # One character per token: a stop completed by this token ends the text.
                if sample.text.endswith(stop):
                    at = len(sample.text) - len(stop)
                    end = len(sample.text) if params.include_stop_str_in_output else at
                    sample.text = sample.text[:end]
                    sample.finish_reason, sample.stop_reason = "stop", stop
                    return
        if n >= req.max_tokens:
            sample.finish_reason = "length"

    def _delta(self, req: _Request, sample: _Sample) -> CompletionOutput:
        visible = len(sample.text)
        if sample.finish_reason is None:
            visible -= _held_back(sample.text, req.params.stop)
        new_ids = sample.token_ids[sample.sent_tokens :]
        out = CompletionOutput(
            index=sample.index,
            text=sample.text[sample.sent_text : visible],
            token_ids=new_ids,
            logprobs=(
                None
                if req.params.logprobs is None
                else [token_logprobs(t, req.params.logprobs) for t in new_ids]
            ),
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
        )
        sample.sent_tokens = len(sample.token_ids)
        sample.sent_text = max(sample.sent_text, visible)
        return out

    def _abort_output(self, req: _Request, now: float) -> RequestOutput:
        req.metrics.finished_time = now
        outs = [
            CompletionOutput(index=x.index, finish_reason="abort")
            for x in req.samples
            if x.finish_reason is None
        ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_ids,
            outputs=outs,
            finished=True,
            metrics=req.metrics,
        )


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(0.01)


class LiveServer:
    """A server started by `running_server`, whose event loop runs on a thread of its own."""

    def __init__(self, handle: ServerHandle, loop: asyncio.AbstractEventLoop) -> None:
        self.handle = handle
        self.loop = loop
        self.target = f"127.0.0.1:{handle.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Runs a coroutine on the server's event loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        self.run(self.handle.stop(grace))


@contextlib.contextmanager
def running_server(
    engine: Any, *, wait_serving: bool = True, **options: Any
) -> Iterator[LiveServer]:
    """Serves `engine` on a free loopback port; always stops the server and its loop on exit."""
    from serving.client import Client
    from serving.server import start_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
    thread.start()
    live = None
    try:
        coro = start_server(engine, host="127.0.0.1", port=0, **options)
        live = LiveServer(asyncio.run_coroutine_threadsafe(coro, loop).result(10), loop)
        if wait_serving:
            with Client(live.target, timeout=5) as client:
                client.wait_until_serving(10)
        yield live
    finally:
        if live is not None:
            warmup_event = getattr(engine, "warmup_event", None)
            if warmup_event is not None:
                warmup_event.set()
            live.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fake_engine [--step-delay S] serve [serve options]`: the real CLI path
    (`serving.cli.run_serve`) with a FakeEngine built from the engine options."""
    from serving.cli import add_subcommands, run_serve

    parser = argparse.ArgumentParser(prog="python -m tests.fake_engine")
    parser.add_argument("--step-delay", type=float, default=0.0)
    add_subcommands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)

    def factory(options: argparse.Namespace) -> FakeEngine:
        given = {k: v for k, v in vars(options).items() if v is not None}
        return FakeEngine(
            step_delay=args.step_delay,
            **{
                k: given[k]
                for k in ("max_model_len", "page_size", "num_pages", "max_num_seqs")
                if k in given
            },
        )

    return run_serve(args, engine_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
