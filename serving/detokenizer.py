"""Incremental detokenization: the token ids a request generates, a few at a time, become stable
text deltas, cut at the request's stop strings.

Owns `IncrementalDetokenizer` and its result type `DetokenizerDelta`. Pure Python (no `jax`
import); it needs only a tokenizer with `decode(ids, skip_special_tokens=...)`.

Text is produced with the prefix-offset/read-offset technique: each step decodes a short window of
earlier tokens plus the new ones and emits only what the new tokens added. Decoding a window
rather than single tokens keeps tokenizers whose output depends on neighbours right (sentencepiece
turns a leading "▁" into a space except at the very start), and text is held back while it ends
in U+FFFD, i.e. while the last token stops in the middle of a UTF-8 character (byte-fallback
tokens, byte-level BPE pieces of an emoji). The first window reaches a few tokens back into the
prompt, so the output reads as the continuation of the prompt. For byte-level BPE tokenizers, or
without a prompt, the concatenated deltas equal `tokenizer.decode(output_ids)`; for sentencepiece
tokenizers after a prompt they keep the space before the first word, which `decode(output_ids)`
alone would strip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["DetokenizerDelta", "IncrementalDetokenizer"]

# How many prompt tokens the first decode window starts with: enough for any decoder's
# neighbour-dependent rules, few enough that the window stays cheap.
PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT_CHAR = "\ufffd"


class _Decodes(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class DetokenizerDelta:
    """Text that became stable in one `add`/`flush` call.

    `stopped` is set when a stop string matched; `stop_reason` is then that string. `text` never
    contains text past the stop string, and contains the stop string itself only with
    `include_stop_str_in_output`.
    """

    text: str
    stopped: bool = False
    stop_reason: str | None = None


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas and applies stop strings.

    Call `add(new_ids)` with each step's new tokens; call `flush()` when the request ends for
    another reason (length, EOS) to get the text held back for a possible stop string. With
    `include_stop_str_in_output=False` a delta never ends with a partial stop string: the longest
    suffix that could still grow into one is held until it is disambiguated. When several stop
    strings match, the one that completes first in the text wins (then the longest). After a stop
    the detokenizer is finished: text past the stop string is dropped and `add` raises.
    """

    def __init__(
        self,
        tokenizer: _Decodes,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        # A stop string can start at most this many characters before the end of the text seen
        # so far; with include_stop_str_in_output those characters may already be emitted.
        self._tail_len = max((len(s) for s in self._stops), default=0) - 1
        self._stop_prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))

        # The decode window: `_ids[:_read_offset]` decodes to `_prefix_text`, already emitted;
        # the ids after it have not produced stable text yet.
        self._ids, self._prefix_text = self._context(list(prompt_token_ids))
        self._read_offset = len(self._ids)
        self._tail = ""  # last `_tail_len` characters emitted
        self._pending = ""  # decoded, not yet emitted (a possible partial stop string)
        self._finished = False
        self._stop_reason: str | None = None

    @property
    def finished(self) -> bool:
        """True after a stop string matched or after `flush`."""
        return self._finished

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def add(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        """Append newly generated tokens; return the text that became stable."""
        if self._finished:
            raise RuntimeError("add() called on a finished detokenizer (stopped or flushed)")
        pieces = []
        for token_id in new_token_ids:
            self._ids.append(token_id)
            text = self._decode(self._ids)
            if len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT_CHAR):
                pieces.append(text[len(self._prefix_text) :])
                # The tokens just read become the next window's prefix.
                del self._ids[: self._read_offset]
                self._read_offset = len(self._ids)
                self._prefix_text = self._decode(self._ids)
        return self._emit("".join(pieces), final=False)

    def flush(self) -> DetokenizerDelta:
        """Finish: return all text still held back, except an incomplete UTF-8 character at the
        very end (a generation cut off mid-character). Trailing U+FFFD is always taken for one:
        a decoded string cannot tell it from a literal U+FFFD. Later calls return an empty
        delta."""
        if self._finished:
            return DetokenizerDelta("", self._stop_reason is not None, self._stop_reason)
        piece = ""
        if self._read_offset < len(self._ids):
            text = self._decode(self._ids).rstrip(_REPLACEMENT_CHAR)
            piece = text[len(self._prefix_text) :]
        delta = self._emit(piece, final=True)
        self._finished = True
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _context(self, prompt: list[int]) -> tuple[list[int], str]:
        """The prompt tail the first window starts with, and its text.

        It must decode cleanly: a tail starting inside a multi-byte character is shortened (with
        byte fallback, a broken first character garbles the whole run of byte tokens), and a
        prompt that itself ends inside one (ids given directly) gives no context at all, as its
        text would not be a prefix of the text with the output appended.
        """
        tail = prompt[-PROMPT_CONTEXT_TOKENS:]
        while tail:
            text = self._decode(tail)
            if not text.startswith(_REPLACEMENT_CHAR):
                return ([], "") if text.endswith(_REPLACEMENT_CHAR) else (tail, text)
            tail = tail[1:]
        return [], ""

    def _emit(self, new_text: str, final: bool) -> DetokenizerDelta:
        self._pending += new_text
        if not self._stops:
            out, self._pending = self._pending, ""
            return DetokenizerDelta(out)

        # Search the pending text plus the emitted tail, since with include_stop_str_in_output
        # nothing is held back and a stop string can start in text already emitted.
        window = self._tail + self._pending
        match: tuple[int, int, str] | None = None
        for s in self._stops:
            start = window.find(s)
            if start < 0:
                continue
            end = start + len(s)
            if match is None or (end, start) < (match[1], match[0]):
                match = (start, end, s)
        if match is not None:
            start, end, s = match
            cut = end if self._include_stop else start
            out = window[len(self._tail) : max(cut, len(self._tail))]
            self._pending = ""
            self._finished = True
            self._stop_reason = s
            return DetokenizerDelta(out, stopped=True, stop_reason=s)

        hold = 0
        if not final and not self._include_stop:
            for k in range(min(len(self._pending), self._tail_len), 0, -1):
                if self._pending[-k:] in self._stop_prefixes:
                    hold = k
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        if self._tail_len:
            self._tail = (self._tail + out)[-self._tail_len :]
        return DetokenizerDelta(out)
