"""Request validation for the gRPC front end: wire messages to `SamplingParams`, prompt checks, limits.

Pure Python (no grpc, no jax): every check raises `RequestError`, whose text is
"<field>: <message>", and the server turns it into `INVALID_ARGUMENT` with that text as details.
`SamplingParams`' own validation is reused, so a field's rule lives in one place; this module only
adds what the dataclass cannot know (server limits, vocabulary, context length, byte sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from jaxserve.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    SamplingParams,
)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


class RequestError(ValueError):
    """A client mistake in one named field of a request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @classmethod
    def from_value_error(cls, error: ValueError, default_field: str) -> RequestError:
        """Wraps a ValueError whose text follows the "<field>: <message>" convention."""
        field, sep, message = str(error).partition(": ")
        if not sep or " " in field:
            return cls(default_field, str(error))
        return cls(field, message)


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on request sizes; the defaults suit a public endpoint."""

    max_prompt_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 20
    max_messages: int = 512
    max_request_id_len: int = 128
    max_n: int = MAX_N
    max_logprobs: int = MAX_LOGPROBS
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_string_len: int = MAX_STOP_STRING_LEN
    chat_roles: frozenset[str] = CHAT_ROLES


class _ChatMessage(Protocol):
    role: str
    content: str


class _WireSampling(Protocol):
    """The fields of the `SamplingParams` proto message that are read here."""

    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    include_stop_str_in_output: bool
    ignore_eos: bool
    min_tokens: int
    use_beam_search: bool
    early_stopping: bool

    def HasField(self, name: str) -> bool: ...


# Wire fields with proto3 presence: unset means "the dataclass default", so they are copied only
# when present.
_OPTIONAL_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
    "logprobs",
    "prompt_logprobs",
    "skip_special_tokens",
    "detokenize",
    "best_of",
    "length_penalty",
)
_FLOAT_FIELDS = frozenset(
    {
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "length_penalty",
    }
)


def sampling_params_from_wire(wire: _WireSampling | None, limits: Limits) -> SamplingParams:
    """Builds validated `SamplingParams` from the proto message (None: all defaults)."""
    if wire is None:
        return SamplingParams()
    kwargs: dict[str, object] = {}
    for name in _OPTIONAL_FIELDS:
        if wire.HasField(name):
            value = getattr(wire, name)
            if name in _FLOAT_FIELDS and not math.isfinite(value):
                raise RequestError(name, f"must be a finite number, got {value!r}")
            kwargs[name] = value
    stop = list(wire.stop)
    if len(stop) > limits.max_stop_strings:
        raise RequestError(
            "stop", f"at most {limits.max_stop_strings} stop strings, got {len(stop)}"
        )
    for s in stop:
        if len(s) > limits.max_stop_string_len:
            raise RequestError(
                "stop", f"a stop string is at most {limits.max_stop_string_len} characters long"
            )
    try:
        params = SamplingParams(
            stop=stop,
            stop_token_ids=list(wire.stop_token_ids),
            include_stop_str_in_output=wire.include_stop_str_in_output,
            ignore_eos=wire.ignore_eos,
            min_tokens=wire.min_tokens,
            use_beam_search=wire.use_beam_search,
            early_stopping=wire.early_stopping,
            **kwargs,
        )
    except ValueError as e:
        raise RequestError.from_value_error(e, "sampling") from None
    if params.n > limits.max_n:
        raise RequestError("n", f"at most {limits.max_n} on this server, got {params.n}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > limits.max_logprobs:
            raise RequestError(name, f"at most {limits.max_logprobs} on this server, got {value}")
    return params


def check_request_id(request_id: str, limits: Limits) -> None:
    """Client-chosen ids end up in logs and metrics: short printable ASCII only."""
    if len(request_id) > limits.max_request_id_len:
        raise RequestError(
            "request_id", f"at most {limits.max_request_id_len} characters, got {len(request_id)}"
        )
    if not all(" " < c <= "~" for c in request_id):
        raise RequestError("request_id", "only printable ASCII without spaces is allowed")


def check_prompt_text(text: str, limits: Limits, field: str = "text") -> None:
    if not text:
        raise RequestError(field, "the prompt must not be empty")
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_prompt_bytes:
        raise RequestError(field, f"at most {limits.max_prompt_bytes} bytes, got {size}")


def check_chat_messages(messages: Sequence[_ChatMessage], limits: Limits) -> list[dict[str, str]]:
    """Checks roles and sizes; returns the messages in the tokenizer's chat-template format."""
    if not messages:
        raise RequestError("chat.messages", "at least one message is required")
    if len(messages) > limits.max_messages:
        raise RequestError(
            "chat.messages", f"at most {limits.max_messages} messages, got {len(messages)}"
        )
    total = 0
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if m.role not in limits.chat_roles:
            allowed = ", ".join(sorted(limits.chat_roles))
            raise RequestError(
                f"chat.messages[{i}].role", f"unknown role {m.role!r} (allowed: {allowed})"
            )
        size = len(m.content.encode("utf-8", errors="surrogatepass"))
        if size > limits.max_message_bytes:
            raise RequestError(
                f"chat.messages[{i}].content",
                f"at most {limits.max_message_bytes} bytes, got {size}",
            )
        total += size
        out.append({"role": m.role, "content": m.content})
    if total > limits.max_prompt_bytes:
        raise RequestError(
            "chat.messages", f"at most {limits.max_prompt_bytes} bytes in all, got {total}"
        )
    return out


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str = "token_ids") -> None:
    if not ids:
        raise RequestError(field, "the prompt must not be empty")
    for pos, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise RequestError(
                field, f"id {t} at position {pos} is outside the vocabulary [0, {vocab_size})"
            )


def check_stop_token_ids(params: SamplingParams, vocab_size: int) -> None:
    for t in params.stop_token_ids or ():
        if t >= vocab_size:
            raise RequestError(
                "stop_token_ids", f"id {t} is outside the vocabulary [0, {vocab_size})"
            )


def check_context_length(
    num_prompt_tokens: int, params: SamplingParams, max_model_len: int
) -> None:
    """The prompt must leave room for at least one token, and for max_tokens when it is set."""
    if num_prompt_tokens >= max_model_len:
        raise RequestError(
            "prompt",
            f"{num_prompt_tokens} tokens leave no room to generate within "
            f"max_model_len {max_model_len}",
        )
    if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > max_model_len:
        raise RequestError(
            "max_tokens",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"max_model_len {max_model_len}; at most {max_model_len - num_prompt_tokens} fits",
        )
