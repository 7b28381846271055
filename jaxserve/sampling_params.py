"""`SamplingParams`: every per-request generation option, validated once on construction.

Owns the user-facing sampling knobs (vLLM's names and defaults) and their validation. Pure Python:
no `jax` import, so the server and scheduler can use it without a device. Invalid values raise
`ValueError` whose message starts with the field name, which the gRPC layer turns into
`INVALID_ARGUMENT`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 64
MAX_BEAM_WIDTH = 8


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request.

    `temperature == 0` means greedy. `top_k == 0` (or -1) disables top-k; `top_p == 1` disables
    top-p; `min_p == 0` disables min-p. `logprobs=k` returns the chosen token's logprob plus the
    top-k; `prompt_logprobs=k` does the same for every prompt position after the first.

    `use_beam_search` (vLLM's classic beam search, see `jaxserve.beam_search`) keeps
    `best_of` beams (default n, at most MAX_BEAM_WIDTH) and returns the n best, scored with
    `length_penalty`; `early_stopping` ends the search as soon as `best_of` beams are finished.
    It is deterministic: temperature 0, no top-k/top-p/min-p, penalties, min_tokens or stop
    strings.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (no text, no stop strings), e.g. benchmarks
    use_beam_search: bool = False
    best_of: int | None = None  # beam width; None: n
    length_penalty: float = 1.0
    early_stopping: bool = False
    _frozen_stop: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids else []
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"{name}: {msg}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not self.temperature >= 0.0:
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            bad(
                "top_k",
                f"must be 0 (disabled), -1 (disabled) or a positive integer, got {self.top_k!r}",
            )
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty!r}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty!r}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", f"must be a non-negative integer below 2**63, got {self.seed!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_LEN:
                bad("stop", f"a stop string is at most {MAX_STOP_STRING_LEN} characters long")
        if self.stop and not self.detokenize:
            bad("stop", "stop strings need detokenize=True")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad(
                "stop_token_ids",
                f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
            )
        for t in self.stop_token_ids:
            if not is_int(t) or t < 0:
                bad("stop_token_ids", f"ids must be non-negative integers, got {t!r}")
        self._validate_beam_search(bad, is_int)

    def _validate_beam_search(
        self, bad: Callable[[str, str], None], is_int: Callable[[object], bool]
    ) -> None:
        for name in ("use_beam_search", "early_stopping"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be a boolean, got {getattr(self, name)!r}")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            bad("best_of", f"must be an integer >= n ({self.n}), got {self.best_of!r}")
        if not isinstance(self.length_penalty, int | float) or not math.isfinite(
            self.length_penalty
        ):
            bad("length_penalty", f"must be a finite number, got {self.length_penalty!r}")
        if not self.use_beam_search:
            # Best-of-n random sampling is not implemented: best_of only sizes beam searches.
            if self.best_of is not None and self.best_of != self.n:
                bad("best_of", "only supported with use_beam_search")
            if self.length_penalty != 1.0:
                bad("length_penalty", "only used with use_beam_search")
            if self.early_stopping:
                bad("early_stopping", "only used with use_beam_search")
            return
        if self.beam_width > MAX_BEAM_WIDTH:
            field = "n" if self.best_of is None else "best_of"
            bad(field, f"the beam width is at most {MAX_BEAM_WIDTH}, got {self.beam_width}")
        # Beam search ranks raw logprobs; options that reshape or filter them do not apply.
        for name, default in (
            ("temperature", 0.0),
            ("top_p", 1.0),
            ("top_k", 0),
            ("min_p", 0.0),
            ("repetition_penalty", 1.0),
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
            ("min_tokens", 0),
        ):
            if getattr(self, name) != default:
                bad(name, f"must be {default} with use_beam_search, got {getattr(self, name)!r}")
        if self.stop:
            bad("stop", "stop strings are not supported with use_beam_search")

    @property
    def beam_width(self) -> int:
        """Beams a beam search keeps: best_of, or n when unset."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)
