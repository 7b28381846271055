"""`Tokenizer`: text <-> token ids, special tokens and chat templates for every model we serve.

Owns loading a tokenizer from a Hugging Face model directory (`tokenizer.json`, or a sentencepiece
`tokenizer.model`, plus the JSON side files), from the metadata embedded in a GGUF file, and writing
one back out as a Hugging Face directory. Whatever the source, the tokenizer is held as a
`tokenizers.Tokenizer` built so that encode/decode give what `transformers` gives for the same
files; the chat template is rendered the way `transformers` renders it (sandboxed Jinja,
`trim_blocks`/`lstrip_blocks`, `raise_exception`, `tojson`, `strftime_now`).

Pure Python (no `jax` import): the server, the scheduler and the CLI use it without a device.
Bad input raises `ValueError` (or `FileNotFoundError`) naming the offending file or field.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

__all__ = ["CHAT_ROLES", "Tokenizer"]

CHAT_ROLES = ("system", "user", "assistant", "tool")

SPIECE_UNDERLINE = "\u2581"

# llama.cpp token types (`tokenizer.ggml.token_type`); sentencepiece's ModelProto uses the same
# numbering for its piece types.
_TYPE_UNKNOWN = 2
_TYPE_CONTROL = 3
_TYPE_USER_DEFINED = 4

# sentencepiece `TrainerSpec.model_type`.
_SPM_UNIGRAM = 1
_SPM_BPE = 2

# Pre-tokenizer split patterns for byte-level BPE vocabularies, keyed by GGUF `tokenizer.ggml.pre`.
# These are the split regexes the vocabularies were trained with (tiktoken-style). `pre` names not
# listed fall back to GPT-2's byte-level regex, as transformers does for them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


# --------------------------------------------------------------------------------------------
# Building backends


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges_from_scores(pieces: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored sentencepiece-style vocabulary.

    Sentencepiece BPE (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
    concatenation is the best-scoring piece. A ranked merge list reproduces that: every split of a
    piece into two pieces becomes a merge, ranked by the joined piece's score (best first), then
    longer left and right halves first, then vocabulary order -- the order transformers uses, so
    ties break the same way.
    """
    index = {piece: i for i, piece in enumerate(pieces)}
    score_of = dict(zip(pieces, scores, strict=True))
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, score in score_of.items():
        splits = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in index and piece[k:] in index
        ]
        splits.sort(key=lambda lr: (index[lr[0]], index[lr[1]]))
        for left, right in splits:
            ranked.append((-score, -len(left), -len(right), len(ranked), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _metaspace_decoder(byte_fallback: bool, strip_prefix: bool) -> decoders.Decoder:
    steps: list[decoders.Decoder] = [decoders.Replace(SPIECE_UNDERLINE, " ")]
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if strip_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _prepend_scheme(add_prefix_space: bool, legacy: bool) -> str:
    # transformers' rule: legacy tokenizers put the "▁" before every chunk of text (also after
    # special tokens), non-legacy ones only before the first.
    if not add_prefix_space:
        return "never"
    return "always" if legacy else "first"


def _sentencepiece_bpe(
    pieces: Sequence[str],
    scores: Sequence[float],
    merges: list[tuple[str, str]] | None,
    *,
    byte_fallback: bool,
    unk_token: str | None,
    prepend_scheme: str,
) -> _Backend:
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if merges is None:
        merges = _merges_from_scores(pieces, scores)
    backend = _Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=byte_fallback,
            dropout=None,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_UNDERLINE, prepend_scheme=prepend_scheme, split=False
    )
    backend.decoder = _metaspace_decoder(byte_fallback, prepend_scheme != "never")
    return backend


def _add_typed_tokens(backend: _Backend, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Register control tokens as special and user-defined tokens as plain added tokens.

    Both must match whole in text (llama.cpp and sentencepiece match them before splitting),
    so they become `AddedToken`s; their ids stay those of the vocabulary.
    """
    control, user = [], []
    for token, kind in zip(tokens, types, strict=True):
        if kind == _TYPE_CONTROL:
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _TYPE_USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _parse_merges(merges: Sequence[str], source: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(
                f"{source}: tokenizer.ggml.merges[{i}] must be two tokens separated by one space, "
                f"got {merge!r}"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[str],
    types: Sequence[int] | None,
    pre: str | None,
    source: str,
) -> _Backend:
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    added = {i for i, t in enumerate(types or ()) if t in (_TYPE_CONTROL, _TYPE_USER_DEFINED)}
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # Control and user-defined tokens (e.g. "<｜end▁of▁sentence｜>") are stored as raw text
        # and matched whole as added tokens. A plain token outside the byte alphabet was written
        # raw by its converter and is respelled into the alphabet, where BPE can produce it.
        # (transformers respells the added ones too and then drops them as mislabelled.)
        if i not in added and not set(token) <= letters:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[token] = i
    backend = _Backend(
        models.BPE(
            vocab=vocab,
            merges=_parse_merges(merges, source),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _GGUF_PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    if types is not None:
        _add_typed_tokens(backend, tokens, types)
    return backend


def _vocab_merges_backend(d: Path, config: Mapping[str, Any]) -> _Backend:
    """GPT-2-style files (`vocab.json` + `merges.txt`, no `tokenizer.json`): byte-level BPE."""
    vocab_file, merges_file = d / "vocab.json", d / "merges.txt"
    vocab = _read_json(vocab_file)
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{vocab_file}: id of {token!r} must be a non-negative int, got {i!r}")
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    merges = []
    for n, line in enumerate(lines, start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_file}:{n}: expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, dropout=None))
    add_prefix = bool(config.get("add_prefix_space", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    added_file = d / "added_tokens.json"
    added = _read_json(added_file)
    for token, i in sorted(added.items(), key=lambda kv: kv[1]):
        if i != backend.get_vocab_size(with_added_tokens=True) and backend.token_to_id(token) != i:
            raise ValueError(f"{added_file}: {token!r} has id {i}, not the next free id")
        backend.add_tokens([AddedToken(token, normalized=False)])
    return backend


def _sentencepiece_backend(
    model_file: Path, config: Mapping[str, Any]
) -> tuple[_Backend, dict[str, str]]:
    """A `tokenizers.Tokenizer` equivalent to a sentencepiece `tokenizer.model`, and the special
    tokens the model itself names (its trainer spec's bos/eos/unk/pad ids)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise ValueError(f"{model_file}: not a sentencepiece model ({e})") from e
    if not proto.pieces:
        raise ValueError(f"{model_file}: sentencepiece model has no pieces")
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    byte_fallback = trainer.byte_fallback
    unk = next((p for p, t in zip(pieces, types, strict=True) if t == _TYPE_UNKNOWN), None)
    add_prefix = bool(config.get("add_prefix_space", norm.add_dummy_prefix))
    scheme = _prepend_scheme(add_prefix, bool(config.get("legacy", False)))

    if trainer.model_type == _SPM_BPE:
        backend = _sentencepiece_bpe(
            pieces,
            scores,
            None,
            byte_fallback=byte_fallback,
            unk_token=unk,
            prepend_scheme=scheme,
        )
    elif trainer.model_type == _SPM_UNIGRAM:
        backend = _Backend(
            models.Unigram(
                list(zip(pieces, scores, strict=True)),
                unk_id=trainer.unk_id if unk is not None else None,
                byte_fallback=byte_fallback,
            )
        )
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_UNDERLINE,
            prepend_scheme=scheme,
            split=trainer.split_by_whitespace,
        )
        backend.decoder = _metaspace_decoder(byte_fallback, scheme != "never")
    else:
        raise ValueError(
            f"{model_file}: sentencepiece model_type {trainer.model_type} is not supported "
            f"(supported: {_SPM_UNIGRAM} unigram, {_SPM_BPE} bpe)"
        )

    # The model's own normalisation: its precompiled character map (NFKC-style rules), then
    # sentencepiece's whitespace folding. Sentencepiece trims the whole text; a normalizer only
    # sees the text between added tokens, so trimming on the right drops whitespace just before
    # an added token too (as transformers' converter does). Leading whitespace needs no trim:
    # after folding it is one space, which becomes the dummy-prefix "▁" anyway.
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
        steps.append(normalizers.Strip(left=False, right=True))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    _add_typed_tokens(backend, pieces, types)
    named = {
        name: pieces[i]
        for name, i in zip(
            _SPECIAL_NAMES,
            (trainer.bos_id, trainer.eos_id, trainer.unk_id, trainer.pad_id),
            strict=True,
        )
        if 0 <= i < len(pieces)
    }
    return backend, named


# --------------------------------------------------------------------------------------------
# Chat templates


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: training templates mark assistant text with it;
    for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: invalid Jinja at line {e.lineno}: {e.message}") from e


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages: must be a non-empty list of message dicts")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}]: must be a dict, got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"messages[{i}].role: missing")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, "
                f"got {message['role']!r}"
            )
        if "content" not in message:
            raise ValueError(f"messages[{i}].content: missing")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"messages[{i}].content: must be a string, got {type(message['content']).__name__}"
            )
        # Like transformers: templates test for a key's presence, so a None value is dropped.
        checked.append({k: v for k, v in message.items() if v is not None})
    return checked


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise ValueError("tools: must be a list of JSON-schema dicts")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}]: must be a JSON-schema dict, got {type(tool).__name__}")
    return [dict(tool) for tool in tools]


# --------------------------------------------------------------------------------------------
# Reading config files


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, where: str) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: must be a string or a dict with 'content', got {value!r}")


def _token_ids(value: Any, where: str) -> list[int]:
    """An `eos_token_id`-style entry: an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(
                f"{where}: must be a non-negative int or a list of them, got {value!r}"
            )
    return list(values)


def _chat_templates(value: Any, where: str) -> str | dict[str, str] | None:
    """A `chat_template` entry: one template, or a list of named ones ({"name", "template"})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for i, entry in enumerate(value):
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ValueError(f"{where}[{i}]: must be a dict with string 'name' and 'template'")
            named[entry["name"]] = entry["template"]
        return named
    raise ValueError(f"{where}: must be a string or a list of named templates, got {value!r}")


# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A model's tokenizer: encode/decode, special tokens, and its chat template.

    Build one with `from_dir`, `from_gguf` or `load`. The constructor takes (and modifies) a ready
    `tokenizers.Tokenizer` plus the special tokens by text; it registers those as special tokens
    and, when `add_bos_token`/`add_eos_token` are given (or the backend has no post-processor),
    makes `encode(..., add_special_tokens=True)` add them. `extra_eos_token_ids` are more ids
    that end generation besides the EOS token's own.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._backend = backend
        named = zip(_SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token), strict=True)
        self._special_tokens = {name: token for name, token in named if token is not None}
        # Named special tokens must match whole in text and be dropped by
        # decode(skip_special_tokens=True); one missing from the vocabulary gets the next id.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t in self._special_tokens.values()
                if t not in known
            ]
        )
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

        eos_ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for i in extra_eos_token_ids:
            if backend.id_to_token(i) is None:
                raise ValueError(f"eos_token_ids: id {i} is outside the vocabulary")
            if i not in eos_ids:
                eos_ids.append(i)
        self._eos_token_ids = eos_ids
        if chat_template is not None and not isinstance(chat_template, str):
            chat_template = dict(chat_template)
        self._chat_template: str | dict[str, str] | None = chat_template
        self._clean_up = clean_up_tokenization_spaces
        self._all_special_ids = sorted(
            {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
            | {self.token_to_id(t) for t in self._special_tokens.values()}
        )

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self._special_tokens.get("bos_token"), self._special_tokens.get("eos_token")
        single, specials = ["$A:0"], []
        if add_bos and bos is not None:
            single.insert(0, f"{bos}:0")
            specials.append((bos, self.token_to_id(bos)))
        if add_eos and eos is not None:
            single.append(f"{eos}:0")
            specials.append((eos, self.token_to_id(eos)))
        pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
        self._backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=specials
        )

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """`from_dir` for a directory, `from_gguf` for a `.gguf` file."""
        p = Path(path)
        if p.is_dir():
            return cls.from_dir(p)
        if p.is_file() and p.suffix == ".gguf":
            return cls.from_gguf(p)
        raise FileNotFoundError(f"{p}: not a tokenizer directory or a .gguf file")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face model directory's tokenizer.

        Reads `tokenizer.json` (else the sentencepiece `tokenizer.model`, else GPT-2's `vocab.json`
        + `merges.txt` + `added_tokens.json`), `tokenizer_config.json`,
        `special_tokens_map.json`, `chat_template.jinja`/`chat_template.json` (in that order of
        precedence over the config's `chat_template`), `generation_config.json` (every
        `eos_token_id` is an EOS id) and `config.json` (fallback bos/eos ids).

        A `tokenizer.model` is converted the way transformers' `LlamaTokenizer` converts it
        ("▁" prefix only at the start unless the config says `legacy: true`; BOS added unless
        `add_bos_token: false`), keeping the model's own normaliser; the model's bos/eos/unk/pad
        pieces are the defaults for the special tokens.
        """
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a directory")
        config_file = d / "tokenizer_config.json"
        config = _read_json(config_file)
        special_map = _read_json(d / "special_tokens_map.json")
        gen_file, model_file = d / "generation_config.json", d / "config.json"
        gen_config, model_config = _read_json(gen_file), _read_json(model_file)

        if (d / "tokenizer.json").is_file():
            try:
                backend = _Backend.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # the Rust loader raises a bare Exception
                raise ValueError(f"{d / 'tokenizer.json'}: cannot load ({e})") from e
            default_add_bos, model_specials = None, {}
        elif (d / "tokenizer.model").is_file():
            backend, model_specials = _sentencepiece_backend(d / "tokenizer.model", config)
            # Sentencepiece models (Llama, Mistral, ...) start every sequence with BOS unless
            # their config says otherwise.
            default_add_bos = True
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            backend, default_add_bos, model_specials = _vocab_merges_backend(d, config), None, {}
        else:
            raise FileNotFoundError(
                f"{d}: no tokenizer.json, tokenizer.model or vocab.json + merges.txt"
            )

        _add_configured_tokens(backend, config, config_file)
        tokens: dict[str, str | None] = {}
        for name in _SPECIAL_NAMES:
            value = config.get(name, special_map.get(name, model_specials.get(name)))
            tokens[name] = _token_text(value, f"{config_file}: {name}")
        extra_specials = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = config.get(key, special_map.get(key)) or []
            if not isinstance(value, Mapping | list):
                raise ValueError(f"{config_file}: {key} must be a list or an object")
            entries = value.values() if isinstance(value, Mapping) else value
            extra_specials += [_token_text(v, f"{config_file}: {key}") for v in entries]
        if extra_specials:
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in extra_specials if t]
            )

        def fallback_token(key: str) -> str | None:
            for file, data in ((gen_file, gen_config), (model_file, model_config)):
                ids = _token_ids(data.get(key), f"{file}: {key}")
                if ids:
                    token = backend.id_to_token(ids[0])
                    if token is None:
                        raise ValueError(f"{file}: {key} {ids[0]} is outside the vocabulary")
                    return token
            return None

        if tokens["bos_token"] is None:
            tokens["bos_token"] = fallback_token("bos_token_id")
        if tokens["eos_token"] is None:
            tokens["eos_token"] = fallback_token("eos_token_id")
        # Every EOS id of the generation config (else of the model config) ends generation.
        extra_eos = _token_ids(gen_config.get("eos_token_id"), f"{gen_file}: eos_token_id")
        eos_file = gen_file
        if not extra_eos:
            eos_file = model_file
            extra_eos = _token_ids(model_config.get("eos_token_id"), f"{model_file}: eos_token_id")
        for i in extra_eos:
            if backend.id_to_token(i) is None:
                raise ValueError(f"{eos_file}: eos_token_id {i} is outside the vocabulary")

        template: str | dict[str, str] | None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif (d / "chat_template.json").is_file():
            template_file = d / "chat_template.json"
            template = _chat_templates(
                _read_json(template_file).get("chat_template"), f"{template_file}: chat_template"
            )
        else:
            template = _chat_templates(config.get("chat_template"), f"{config_file}: chat_template")

        def flag(key: str, default: bool | None) -> bool | None:
            value = config.get(key, default)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{config_file}: {key} must be true or false, got {value!r}")
            return value

        return cls(
            backend,
            **tokens,
            extra_eos_token_ids=extra_eos,
            add_bos_token=flag("add_bos_token", default_add_bos),
            add_eos_token=flag("add_eos_token", None),
            chat_template=template,
            clean_up_tokenization_spaces=bool(flag("clean_up_tokenization_spaces", False)),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.*` metadata.

        Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE, pre-tokenizer from
        `tokenizer.ggml.pre`) and "llama" (sentencepiece-style BPE from the scores, with the "▁"
        marker and byte fallback). `tokenizer.ggml.eot_token_id`/`eom_token_id`, when present,
        are EOS ids too (llama.cpp ends generation on them).

        Results equal transformers' for the same file, except where transformers drops
        information: control/user-defined tokens written outside the byte alphabet stay whole
        tokens here, and `tokenizer.ggml.add_space_prefix = false` is honoured.
        """
        from gguf import GGUFReader

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        try:
            fields = GGUFReader(str(p), "r").fields
        except Exception as e:  # the reader raises ValueError/struct.error/... on a bad file
            raise ValueError(f"{p}: not a readable GGUF file ({e})") from e

        def get(key: str) -> Any:
            field = fields.get(key)
            if field is None:
                return None
            try:
                return field.contents()
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}: metadata {key} is not valid UTF-8") from e

        def require(key: str) -> Any:
            value = get(key)
            if value is None:
                raise ValueError(f"{p}: metadata {key} is missing")
            return value

        kind = require("tokenizer.ggml.model")
        tokens = require("tokenizer.ggml.tokens")
        types = get("tokenizer.ggml.token_type")
        if types is not None and len(types) != len(tokens):
            raise ValueError(
                f"{p}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        source = str(p)
        if kind == "gpt2":
            backend = _byte_level_bpe(
                tokens, require("tokenizer.ggml.merges"), types, get("tokenizer.ggml.pre"), source
            )
            default_add_bos = False
        elif kind == "llama":
            scores = require("tokenizer.ggml.scores")
            if len(scores) != len(tokens):
                raise ValueError(
                    f"{p}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens"
                )
            add_prefix = get("tokenizer.ggml.add_space_prefix")
            merges = get("tokenizer.ggml.merges")
            backend = _sentencepiece_bpe(
                tokens,
                scores,
                None if merges is None else _parse_merges(merges, source),
                byte_fallback=True,
                unk_token=None,
                prepend_scheme=_prepend_scheme(add_prefix is not False, legacy=False),
            )
            if types is not None:
                _add_typed_tokens(backend, tokens, types)
            # llama.cpp adds BOS for sentencepiece vocabularies unless the file says otherwise.
            default_add_bos = True
        else:
            raise ValueError(
                f"{p}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)"
            )

        def id_of(key: str) -> int | None:
            i = get(key)
            if i is not None and (not isinstance(i, int) or not 0 <= i < len(tokens)):
                raise ValueError(f"{p}: {key} {i!r} is outside the vocabulary ({len(tokens)})")
            return i

        def token_of(key: str) -> str | None:
            # The backend's spelling, which may differ from the file's (respelled tokens).
            i = id_of(key)
            return None if i is None else backend.id_to_token(i)

        end_ids = (id_of("tokenizer.ggml.eot_token_id"), id_of("tokenizer.ggml.eom_token_id"))
        extra_eos = [i for i in end_ids if i is not None]
        named: dict[str, str] = {}
        main_template = get("tokenizer.chat_template")
        if main_template is not None:
            named["default"] = main_template
        prefix = "tokenizer.chat_template."
        for key in fields:
            if key.startswith(prefix):
                named[key[len(prefix) :]] = get(key)
        template: str | dict[str, str] | None = (
            main_template if set(named) <= {"default"} else named
        )
        add_bos = get("tokenizer.ggml.add_bos_token")
        add_eos = get("tokenizer.ggml.add_eos_token")
        return cls(
            backend,
            bos_token=token_of("tokenizer.ggml.bos_token_id"),
            eos_token=token_of("tokenizer.ggml.eos_token_id"),
            unk_token=token_of("tokenizer.ggml.unknown_token_id"),
            pad_token=token_of("tokenizer.ggml.padding_token_id"),
            extra_eos_token_ids=extra_eos,
            add_bos_token=default_add_bos if add_bos is None else bool(add_bos),
            add_eos_token=bool(add_eos),
            chat_template=template,
        )

    def save(self, path: str | Path) -> None:
        """Write this tokenizer as a Hugging Face tokenizer directory that `from_dir` reloads.

        Writes `tokenizer.json`, `tokenizer_config.json` and, for a single chat template,
        `chat_template.jinja`. When there are several EOS ids, `eos_token_id` in
        `generation_config.json` is set to all of them (other keys of an existing file are kept).
        """
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(d / "tokenizer.json"), pretty=False)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens,
            "clean_up_tokenization_spaces": self._clean_up,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(self._backend.get_added_tokens_decoder().items())
            },
        }
        if self._add_bos_token is not None:
            config["add_bos_token"] = self._add_bos_token
        if self._add_eos_token is not None:
            config["add_eos_token"] = self._add_eos_token
        if isinstance(self._chat_template, str):
            (d / "chat_template.jinja").write_text(self._chat_template, encoding="utf-8")
        elif self._chat_template is not None:
            config["chat_template"] = [
                {"name": name, "template": t} for name, t in self._chat_template.items()
            ]
        (d / "tokenizer_config.json").write_text(
            json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        if len(self._eos_token_ids) > 1:
            gen_file = d / "generation_config.json"
            gen_config = _read_json(gen_file)
            gen_config["eos_token_id"] = list(self._eos_token_ids)
            gen_file.write_text(json.dumps(gen_config, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it (e.g. "<|im_start|>") becomes that token.

        `add_special_tokens` adds the model's BOS/EOS as its tokenizer config asks.
        """
        if not isinstance(text, str):
            raise ValueError(f"text: must be a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids past the vocabulary (padded embedding rows) decode to nothing."""
        checked = []
        for i in ids:
            i = int(i)
            if i < 0:
                raise ValueError(f"ids: token ids must be non-negative, got {i}")
            checked.append(i)
        text = self._backend.decode(checked, skip_special_tokens=skip_special_tokens)
        if self._clean_up and not isinstance(self._backend.model, models.BPE):
            # transformers applies this clean-up to WordPiece/Unigram output only: on BPE it
            # would delete real spaces before punctuation.
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token_id: {token_id} is outside the vocabulary ({self.vocab_size})")
        return token

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---------------------------------------------------------------------------- properties

    @property
    def backend(self) -> _Backend:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _id_of(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS id; `eos_token_ids` lists every id that ends generation."""
        return self._id_of("eos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of("unk_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Every id `decode(..., skip_special_tokens=True)` drops, plus the named special tokens."""
        return list(self._all_special_ids)

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The chat template, or named templates ({"default": ..., "tool_use": ...}), or None."""
        if isinstance(self._chat_template, dict):
            return dict(self._chat_template)
        return self._chat_template

    # -------------------------------------------------------------------------- chat template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template (text, or its ids if `tokenize`).

        Every message is a dict with `role` in `CHAT_ROLES` and string `content` (other keys pass
        through to the template). The template sees `messages`, `tools`, `documents`,
        `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...) and `kwargs`.
        Token ids are those of the rendered text without extra BOS/EOS: the template writes them.
        Raises `ValueError` for invalid messages, a model without a chat template, or a template
        that calls `raise_exception`.
        """
        checked = _check_messages(messages)
        tool_list = _check_tools(tools)
        source = self._template_for(tool_list is not None)
        template = _compile_template(source)
        variables = {**self._special_tokens, **kwargs}
        variables.setdefault("documents", None)
        try:
            text = template.render(
                messages=checked,
                tools=tool_list,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat_template: {e.message or e}") from e
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    def _template_for(self, with_tools: bool) -> str:
        template = self._chat_template
        if template is None:
            raise ValueError(
                "chat_template: this model has no chat template; pass a plain prompt instead"
            )
        if isinstance(template, str):
            return template
        if with_tools and "tool_use" in template:
            return template["tool_use"]
        if "default" not in template:
            raise ValueError(
                f"chat_template: no 'default' template among the named ones ({', '.join(template)})"
            )
        return template["default"]


# transformers' `clean_up_tokenization`: undo the spaces WordPiece-era decoders put before
# punctuation and contractions.
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _add_configured_tokens(backend: _Backend, config: Mapping[str, Any], config_file: Path) -> None:
    """Add the `added_tokens_decoder` entries of tokenizer_config.json that the backend lacks.

    Each must either already be that id in the vocabulary or be the next free id: `tokenizers`
    numbers added tokens consecutively, so a gap cannot be represented.
    """
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, Mapping):
        raise ValueError(f"{config_file}: added_tokens_decoder must be an object")
    present = backend.get_added_tokens_decoder()
    for key in sorted(entries, key=lambda k: int(k) if str(k).isdigit() else -1):
        where = f"{config_file}: added_tokens_decoder[{key!r}]"
        if not str(key).isdigit():
            raise ValueError(f"{where}: key must be a token id")
        i, entry = int(key), entries[key]
        content = _token_text(entry, where)
        if content is None:
            raise ValueError(f"{where}: missing content")
        if i in present and present[i].content == content:
            continue
        existing = backend.token_to_id(content)
        if existing is not None and existing != i:
            raise ValueError(f"{where}: {content!r} is already token {existing}")
        if existing is None and i != backend.get_vocab_size(with_added_tokens=True):
            raise ValueError(
                f"{where}: id {i} is not the next free id "
                f"({backend.get_vocab_size(with_added_tokens=True)})"
            )
        flags = entry if isinstance(entry, Mapping) else {}
        special = bool(flags.get("special", False))
        token = AddedToken(
            content,
            special=special,
            normalized=bool(flags.get("normalized", not special)),
            lstrip=bool(flags.get("lstrip", False)),
            rstrip=bool(flags.get("rstrip", False)),
            single_word=bool(flags.get("single_word", False)),
        )
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
