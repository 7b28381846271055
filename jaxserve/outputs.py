"""Result types returned by the engine and the offline `LLM` API (vLLM's names).

`LLMEngine.step()` returns `RequestOutput`s whose `CompletionOutput`s carry *deltas*: the token ids,
text and logprobs produced since the previous output of that request. `LLM.generate` accumulates
the deltas into whole outputs; the gRPC server streams them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One dict per position: {token_id: logprob}, holding the chosen/actual token and the top-k.
Logprobs = list[dict[int, float]]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Logprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # matched stop string or stop token id
    # Sum of the generated tokens' logprobs; set by beam search, whose outputs are ranked by it.
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: RequestMetrics | None = None

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0
