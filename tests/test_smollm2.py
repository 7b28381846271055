"""The real embedded default model (SmolLM2-135M-Instruct from its Q4_1 GGUF) end to end."""

from __future__ import annotations

import json

import pytest

from jaxserve import SamplingParams
from jaxserve.llm import LLM
from jaxserve.sampling import RowSpec
from tests.conftest import FIXTURES

REFERENCE = json.loads((FIXTURES / "smollm2" / "greedy.json").read_text())


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    """Decodes in multi-step runs of 4 once prompts are in, as on a GPU: greedy runs of the
    batch sizes below are compiled up front."""
    llm = LLM(
        smollm2_path,
        max_num_seqs=8,
        max_model_len=256,
        num_pages=160,
        dtype="float32",
        decode_steps=4,
    )
    engine = llm.engine.engine
    for rows in (3, 4):
        for context in (64, 256):
            engine.decode_run_ready(rows, context, [RowSpec(temperature=0.0)])
    engine.finish_compiles()
    return llm


def test_chat_template_renders_like_transformers(llm):
    for case in REFERENCE["prompts"]:
        text = llm.tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True)
        assert text == case["prompt_text"]
        assert llm.tokenizer.encode(text, add_special_tokens=False) == case["prompt_token_ids"]


def test_greedy_chat_equals_transformers(llm):
    params = SamplingParams(temperature=0.0, max_tokens=REFERENCE["max_new_tokens"])
    outs = llm.chat([case["messages"] for case in REFERENCE["prompts"]], params)
    for case, out in zip(REFERENCE["prompts"], outs, strict=True):
        comp = out.outputs[0]
        assert out.prompt_token_ids == case["prompt_token_ids"]
        assert comp.token_ids == case["output_token_ids"]
        assert comp.text == case["output_text"]
        assert comp.finish_reason == ("stop" if case["stopped_on_eos"] else "length")
    assert llm.engine.stats()["decode_runs_total"] > 0


def test_stop_strings_cut_the_text(llm):
    case = REFERENCE["prompts"][0]  # "The capital of France is Paris."
    outs = llm.chat(
        [case["messages"]] * 3,
        [
            SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris"]),
            SamplingParams(
                temperature=0.0, max_tokens=24, stop=["Paris"], include_stop_str_in_output=True
            ),
            SamplingParams(temperature=0.0, max_tokens=24, stop=["nowhere", "of Fr"]),
        ],
    )
    texts = [o.outputs[0].text for o in outs]
    assert texts == ["The capital of France is ", "The capital of France is Paris", "The capital "]
    assert [o.outputs[0].stop_reason for o in outs] == ["Paris", "Paris", "of Fr"]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    stats = llm.engine.stats()
    assert stats["kv_used_tokens"] == 0 and stats["decode_runs_total"] > 0


def test_text_prompt_and_sampled_generation(llm):
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.8, seed=1, max_tokens=8))
    again = llm.generate("Once upon a time", SamplingParams(temperature=0.8, seed=1, max_tokens=8))
    assert out[0].outputs[0].token_ids == again[0].outputs[0].token_ids
    assert out[0].prompt_token_ids == llm.tokenizer.encode("Once upon a time")
    assert len(out[0].outputs[0].token_ids) == 8
