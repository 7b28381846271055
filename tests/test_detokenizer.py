"""Tests for `serving.detokenizer`: incremental text deltas, UTF-8 safety and stop strings."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.tokenizer import Tokenizer
from serving.detokenizer import DetokenizerDelta, IncrementalDetokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
# Byte-level BPE (SmolLM2), sentencepiece BPE with byte fallback, sentencepiece unigram.
TOKENIZERS = ["hf_smollm2", "spm_tiny", "spm_unigram"]
TRICKY = [
    case["text"]
    for case in json.loads((FIXTURES / "hf_smollm2.json").read_text(encoding="utf-8"))["cases"]
]


@functools.cache
def _tok(name: str) -> Tokenizer:
    return Tokenizer.from_dir(FIXTURES / name)


def _run(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int] = (1,)
) -> tuple[list[DetokenizerDelta], DetokenizerDelta | None]:
    """Feed `ids` in chunks of the given sizes (cycled) until stopped; flush if not stopped."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = chunks[k % len(chunks)]
        deltas.append(detok.add(ids[i : i + n]))
        i, k = i + n, k + 1
        if deltas[-1].stopped:
            return deltas, None
    return deltas, detok.flush()


def _text(deltas: list[DetokenizerDelta], final: DetokenizerDelta | None) -> str:
    return "".join(d.text for d in deltas) + (final.text if final else "")


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_token_by_token_equals_full_decode(name: str, skip_special_tokens: bool) -> None:
    tok = _tok(name)
    for text in TRICKY:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip_special_tokens)
        deltas, final = _run(detok, ids)
        assert _text(deltas, None) == tok.decode(ids, skip_special_tokens), text
        assert final is not None and final.text == "" and not final.stopped
        assert not any("\ufffd" in d.text for d in deltas), text
        assert detok.finished and detok.stop_reason is None


def test_emoji_bytes_are_held_until_the_character_is_complete() -> None:
    spm = _tok("spm_tiny")
    ids = spm.encode("a😀b", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(ids)[1:5] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    deltas, _ = _run(IncrementalDetokenizer(spm, []), ids)
    assert [d.text for d in deltas] == ["a", "", "", "", "😀", "b"]

    bpe = _tok("hf_smollm2")
    ids = bpe.encode("a😀b")
    assert len(ids) == 5  # the emoji is three byte-level pieces
    deltas, _ = _run(IncrementalDetokenizer(bpe, []), ids)
    assert [d.text for d in deltas] == ["a", "", "", "😀", "b"]


def test_flush_drops_an_incomplete_character_at_the_end() -> None:
    bpe = _tok("hf_smollm2")
    ids = bpe.encode(" 😀")
    assert bpe.convert_ids_to_tokens(ids)[0].startswith("Ġ")  # the space shares a piece
    detok = IncrementalDetokenizer(bpe, [])
    assert detok.add(ids[:1]).text == ""
    assert detok.flush() == DetokenizerDelta(" ")
    assert detok.flush() == DetokenizerDelta("")
    with pytest.raises(RuntimeError, match="finished"):
        detok.add(ids[1:])

    spm = _tok("spm_tiny")
    detok = IncrementalDetokenizer(spm, [])
    deltas, final = _run(detok, spm.encode("a😀", add_special_tokens=False)[:-1])
    assert _text(deltas, final) == "a" and final == DetokenizerDelta("")


def test_prompt_context() -> None:
    spm = _tok("spm_tiny")
    prompt = spm.encode("Question: hi?\nAnswer:")
    out = spm.encode("Hello world", add_special_tokens=False)
    deltas, final = _run(IncrementalDetokenizer(spm, prompt), out)
    # After a prompt the first word keeps its space: the text continues the prompt.
    assert _text(deltas, final) == " Hello world"
    assert spm.decode(prompt + out)[len(spm.decode(prompt)) :] == " Hello world"
    assert spm.decode(out) == "Hello world"

    bpe = _tok("hf_smollm2")
    chat = bpe.apply_chat_template([{"role": "user", "content": "hi 😀"}], tokenize=True)
    out = bpe.encode("Hi there 👋!")
    for skip in (True, False):
        deltas, final = _run(IncrementalDetokenizer(bpe, chat, skip_special_tokens=skip), out)
        assert _text(deltas, final) == bpe.decode(out, skip)

    # A context window that would start inside a character is shortened ...
    emojis = bpe.encode("👨👩")
    assert bpe.decode(emojis[-5:]).startswith("\ufffd")
    deltas, final = _run(IncrementalDetokenizer(bpe, emojis), bpe.encode("!"))
    assert _text(deltas, final) == "!"
    # ... and a prompt ending inside one gives no context: the output decodes on its own.
    partial = bpe.encode("a😀")
    deltas, final = _run(IncrementalDetokenizer(bpe, partial[:-1]), partial[-1:] + bpe.encode("b"))
    assert _text(deltas, final) == bpe.decode(partial[-1:] + bpe.encode("b"))


SENTENCE = "Hello world, the END is near."


def _stop_run(
    stop: list[str], include: bool = False, chunks: Sequence[int] = (1,), text: str = SENTENCE
) -> tuple[list[DetokenizerDelta], DetokenizerDelta | None]:
    bpe = _tok("hf_smollm2")
    detok = IncrementalDetokenizer(bpe, [], stop=stop, include_stop_str_in_output=include)
    return _run(detok, bpe.encode(text), chunks)


def test_stop_string_inside_one_token() -> None:
    deltas, final = _stop_run(["orl"])
    # The "o" ending "Hello" could start "orl", so it waits for the next token.
    assert [d.text for d in deltas] == ["Hell", "o w"]
    assert deltas[-1] == DetokenizerDelta("o w", stopped=True, stop_reason="orl")
    assert final is None
    deltas, _ = _stop_run(["orl"], include=True)
    assert deltas[-1] == DetokenizerDelta(" worl", stopped=True, stop_reason="orl")


def test_stop_string_spanning_tokens_is_held_then_cut() -> None:
    deltas, _ = _stop_run(["lo wo"])
    # "lo" could start the stop string, so it is held back until " world" decides it.
    assert [d.text for d in deltas] == ["Hel", ""]
    assert deltas[-1].stopped and deltas[-1].stop_reason == "lo wo"
    deltas, _ = _stop_run(["lo wo"], include=True)
    assert _text(deltas, None) == "Hello wo"


def test_partial_stop_string_released_when_not_matched() -> None:
    deltas, final = _stop_run(["world peace"])
    assert [d.text for d in deltas[:3]] == ["Hello", " ", "world,"]
    assert not any(d.stopped for d in deltas) and final == DetokenizerDelta("")
    assert _text(deltas, final) == SENTENCE
    # Held at the very end: flush returns it.
    deltas, final = _stop_run(["world peace"], text="Hello world")
    assert [d.text for d in deltas] == ["Hello", " "]
    assert final == DetokenizerDelta("world")


def test_several_stop_strings_first_completed_wins() -> None:
    deltas, _ = _stop_run(["world", "lo"])
    assert _text(deltas, None) == "Hel" and deltas[-1].stop_reason == "lo"
    deltas, _ = _stop_run(["world", "o world"], chunks=[3])
    assert _text(deltas, None) == "Hell" and deltas[-1].stop_reason == "o world"
    # All in one step: "llo wor" starts first but "o w" completes first, as in a token-by-token
    # stream, so the result does not depend on how many tokens a step brings.
    deltas, _ = _stop_run(["llo wor", "o w"], chunks=[100])
    assert _text(deltas, None) == "Hell" and deltas[-1].stop_reason == "o w"
    deltas, _ = _stop_run(["near", "END", "the"], include=True)
    assert _text(deltas, None) == "Hello world, the" and deltas[-1].stop_reason == "the"


def test_text_after_stop_is_dropped_and_detokenizer_finishes() -> None:
    bpe = _tok("hf_smollm2")
    detok = IncrementalDetokenizer(bpe, [], stop=["END"])
    delta = detok.add(bpe.encode(SENTENCE))
    assert delta == DetokenizerDelta("Hello world, the ", stopped=True, stop_reason="END")
    assert detok.finished and detok.stop_reason == "END"
    assert detok.flush() == DetokenizerDelta("", stopped=True, stop_reason="END")
    with pytest.raises(RuntimeError, match="finished"):
        detok.add([1])


def test_stop_strings_only_match_output_and_decoded_text() -> None:
    bpe = _tok("hf_smollm2")
    prompt = bpe.encode("Say END.")
    deltas, final = _run(IncrementalDetokenizer(bpe, prompt, stop=["END"]), bpe.encode(" ok"))
    assert _text(deltas, final) == " ok" and not final.stopped

    ids = bpe.encode("hi<|im_end|>more")
    skipped = IncrementalDetokenizer(bpe, [], stop=["<|im_end|>"])
    deltas, final = _run(skipped, ids)
    assert _text(deltas, final) == "himore" and not final.stopped
    kept = IncrementalDetokenizer(bpe, [], skip_special_tokens=False, stop=["<|im_end|>"])
    deltas, _ = _run(kept, ids)
    assert _text(deltas, None) == "hi" and deltas[-1].stop_reason == "<|im_end|>"


def test_stop_string_made_of_multibyte_characters() -> None:
    spm = _tok("spm_tiny")
    detok = IncrementalDetokenizer(spm, [], stop=["😀b"])
    deltas, _ = _run(detok, spm.encode("a 😀😀b c", add_special_tokens=False))
    assert _text(deltas, None) == "a 😀" and deltas[-1].stop_reason == "😀b"


def test_stop_validation() -> None:
    with pytest.raises(ValueError, match="^stop: stop strings must be non-empty"):
        IncrementalDetokenizer(_tok("spm_tiny"), [], stop=["ok", ""])
    deltas, _ = _stop_run("END")  # type: ignore[arg-type]
    assert _text(deltas, None) == "Hello world, the "


FRAGMENTS = [
    "😀",
    "👨\u200d👩\u200d👧",
    "🇺🇸🇯🇵",
    "e\u0301",
    "中文",
    "한국어",
    "  ",
    "\n",
    "\t",
    " ",
    "<|im_start|>",
    "<s>",
    "</s>",
    "\u2581",
    "x",
    "42",
]
CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
TEXTS = st.lists(
    st.one_of(st.text(CHARS, max_size=8), st.sampled_from(FRAGMENTS)),
    max_size=12,
).map("".join)
CHUNKS = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=6)
PROMPTS = st.sampled_from(["", "Q: hi\nA:", "中文 ", "<|im_start|>assistant\n", "😀"])


def _expected(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool) -> str:
    """The output's text as a continuation of the prompt. `flush` drops trailing U+FFFD: at the
    end of a generation it cannot tell a broken character from an incomplete one."""
    text = tok.decode(prompt + ids, skip)[len(tok.decode(prompt, skip)) :]
    return text.rstrip("\ufffd")


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    name=st.sampled_from(TOKENIZERS),
    text=TEXTS,
    prompt=PROMPTS,
    chunks=CHUNKS,
    skip=st.booleans(),
)
def test_random_chunking_concatenates_to_decode(
    name: str, text: str, prompt: str, chunks: list[int], skip: bool
) -> None:
    tok = _tok(name)
    ids, prompt_ids = tok.encode(text), tok.encode(prompt) if prompt else []
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas, final = _run(detok, ids, chunks)
    expected = _expected(tok, prompt_ids, ids, skip)
    assert _text(deltas, final) == expected
    if not prompt_ids:
        assert expected == tok.decode(ids, skip).rstrip("\ufffd")
    if "\ufffd" not in expected:
        assert not any("\ufffd" in d.text for d in deltas)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    name=st.sampled_from(TOKENIZERS),
    text=TEXTS,
    chunks=CHUNKS,
    include=st.booleans(),
    data=st.data(),
)
def test_random_stop_strings_cut_at_the_first_completed(
    name: str, text: str, chunks: list[int], include: bool, data: st.DataObject
) -> None:
    tok = _tok(name)
    ids = tok.encode(text)
    full = _expected(tok, [], ids, True)
    # Stop strings from the text's own characters, so that they match often.
    letters = st.sampled_from(sorted(set(full)) or ["x"])
    stops = data.draw(st.lists(st.text(letters, min_size=1, max_size=4), min_size=1, max_size=3))
    detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
    deltas, final = _run(detok, ids, chunks)
    found = [(at + len(s), at, s) for s in stops if (at := full.find(s)) >= 0]
    if not found:
        assert _text(deltas, final) == full and final is not None and not final.stopped
        return
    end, start, stop = min(found)
    assert _text(deltas, final) == full[: end if include else start]
    assert final is None and deltas[-1].stopped and deltas[-1].stop_reason == stop
    if not include:
        assert not any(s in d.text for d in deltas for s in stops)
        # No delta ends inside a stop string that the following text completes.
        emitted = 0
        for d in deltas:
            emitted += len(d.text)
            straddling = [full.find(s, max(0, emitted - len(s) + 1)) for s in stops]
            assert not any(0 <= at < emitted for at in straddling)


def test_importing_tokenizer_and_detokenizer_does_not_import_jax() -> None:
    code = "import sys, serving.detokenizer, jaxserve.tokenizer; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
