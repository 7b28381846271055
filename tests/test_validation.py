"""Unit tests of `serving.validation`: wire sampling options, prompt checks and server limits."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxserve.sampling_params import SamplingParams
from serving.proto import generation_pb2 as pb
from serving.validation import (
    Limits,
    RequestError,
    check_chat_messages,
    check_context_length,
    check_prompt_text,
    check_request_id,
    check_stop_token_ids,
    check_token_ids,
    sampling_params_from_wire,
)

LIMITS = Limits()


def field_of(fn, *args, **kwargs) -> str:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    assert str(info.value) == f"{info.value.field}: {info.value.message}"
    return info.value.field


def test_the_wire_message_carries_every_sampling_field() -> None:
    public = {f.name for f in dataclasses.fields(SamplingParams) if not f.name.startswith("_")}
    assert public == set(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def test_unset_fields_take_the_dataclass_defaults() -> None:
    assert sampling_params_from_wire(None, LIMITS) == SamplingParams()
    assert sampling_params_from_wire(pb.SamplingParams(), LIMITS) == SamplingParams()


def test_set_fields_override_defaults_even_when_zero() -> None:
    wire = pb.SamplingParams(
        n=2,
        temperature=0.0,
        top_p=0.5,
        top_k=-1,
        min_p=0.0,
        repetition_penalty=1.5,
        presence_penalty=-0.5,
        frequency_penalty=0.25,
        seed=0,
        stop=["a", "bc"],
        stop_token_ids=[7],
        include_stop_str_in_output=True,
        ignore_eos=True,
        max_tokens=3,
        min_tokens=1,
        logprobs=0,
        prompt_logprobs=2,
        skip_special_tokens=False,
    )
    assert sampling_params_from_wire(wire, LIMITS) == SamplingParams(
        n=2,
        temperature=0.0,
        top_p=0.5,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.5,
        presence_penalty=-0.5,
        frequency_penalty=0.25,
        seed=0,
        stop=["a", "bc"],
        stop_token_ids=[7],
        include_stop_str_in_output=True,
        ignore_eos=True,
        max_tokens=3,
        min_tokens=1,
        logprobs=0,
        prompt_logprobs=2,
        skip_special_tokens=False,
    )


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        (pb.SamplingParams(n=0), "n"),
        (pb.SamplingParams(temperature=-0.1), "temperature"),
        (pb.SamplingParams(temperature=math.inf), "temperature"),
        (pb.SamplingParams(top_p=0.0), "top_p"),
        (pb.SamplingParams(top_p=math.nan), "top_p"),
        (pb.SamplingParams(top_k=-3), "top_k"),
        (pb.SamplingParams(min_p=-0.1), "min_p"),
        (pb.SamplingParams(repetition_penalty=2.5), "repetition_penalty"),
        (pb.SamplingParams(presence_penalty=-2.5), "presence_penalty"),
        (pb.SamplingParams(frequency_penalty=-math.inf), "frequency_penalty"),
        (pb.SamplingParams(seed=2**63), "seed"),
        (pb.SamplingParams(max_tokens=-1), "max_tokens"),
        (pb.SamplingParams(min_tokens=-1), "min_tokens"),
        (pb.SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        (pb.SamplingParams(logprobs=-1), "logprobs"),
        (pb.SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
        (pb.SamplingParams(stop=[""]), "stop"),
        (pb.SamplingParams(stop_token_ids=[-4]), "stop_token_ids"),
        (pb.SamplingParams(stop_token_ids=list(range(65))), "stop_token_ids"),
        (pb.SamplingParams(best_of=3), "best_of"),
        (pb.SamplingParams(length_penalty=2.0), "length_penalty"),
        (pb.SamplingParams(early_stopping=True), "early_stopping"),
        (pb.SamplingParams(use_beam_search=True), "temperature"),
        (pb.SamplingParams(use_beam_search=True, temperature=0, best_of=9), "best_of"),
        (pb.SamplingParams(use_beam_search=True, temperature=0, n=3, best_of=2), "best_of"),
        (
            pb.SamplingParams(use_beam_search=True, temperature=0, length_penalty=math.nan),
            "length_penalty",
        ),
    ],
)
def test_invalid_sampling_names_the_field(wire: pb.SamplingParams, field: str) -> None:
    assert field_of(sampling_params_from_wire, wire, LIMITS) == field


def test_beam_search_fields_map_to_the_dataclass() -> None:
    wire = pb.SamplingParams(
        use_beam_search=True,
        temperature=0.0,
        n=2,
        best_of=4,
        length_penalty=0.0,
        early_stopping=True,
    )
    params = sampling_params_from_wire(wire, LIMITS)
    assert params == SamplingParams(
        use_beam_search=True,
        temperature=0.0,
        n=2,
        best_of=4,
        length_penalty=0.0,
        early_stopping=True,
    )
    assert params.beam_width == 4
    # best_of unset: the width is n.
    wire = pb.SamplingParams(use_beam_search=True, temperature=0.0, n=3)
    assert sampling_params_from_wire(wire, LIMITS).beam_width == 3


def test_server_limits_can_be_tighter_than_the_dataclass() -> None:
    limits = Limits(max_n=2, max_logprobs=3, max_stop_strings=1, max_stop_string_len=2)
    assert field_of(sampling_params_from_wire, pb.SamplingParams(n=3), limits) == "n"
    assert field_of(sampling_params_from_wire, pb.SamplingParams(logprobs=4), limits) == "logprobs"
    wire = pb.SamplingParams(prompt_logprobs=4)
    assert field_of(sampling_params_from_wire, wire, limits) == "prompt_logprobs"
    assert field_of(sampling_params_from_wire, pb.SamplingParams(stop=["a", "b"]), limits) == "stop"
    assert field_of(sampling_params_from_wire, pb.SamplingParams(stop=["abc"]), limits) == "stop"
    ok = pb.SamplingParams(n=2, logprobs=3, prompt_logprobs=3, stop=["ab"])
    assert sampling_params_from_wire(ok, limits).stop == ["ab"]


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_temperature_is_accepted_or_blamed_on_temperature(value: float) -> None:
    wire = pb.SamplingParams(temperature=value)
    if math.isfinite(value) and value >= 0:
        assert sampling_params_from_wire(wire, LIMITS).temperature == value
    else:
        assert field_of(sampling_params_from_wire, wire, LIMITS) == "temperature"


def test_request_error_from_value_error() -> None:
    e = RequestError.from_value_error(ValueError("top_p: must be in (0, 1]"), "sampling")
    assert (e.field, e.message) == ("top_p", "must be in (0, 1]")
    e = RequestError.from_value_error(ValueError("something broke: badly"), "sampling")
    assert (e.field, e.message) == ("sampling", "something broke: badly")


def test_request_id() -> None:
    check_request_id("req-1_A.b:c", LIMITS)
    check_request_id("x" * 128, LIMITS)
    for bad in ("x" * 129, "a b", "tab\t", "é", "line\n"):
        assert field_of(check_request_id, bad, LIMITS) == "request_id"


def test_prompt_text_counts_utf8_bytes() -> None:
    limits = Limits(max_prompt_bytes=6)
    check_prompt_text("ééé", limits)
    assert field_of(check_prompt_text, "éééé", limits) == "text"
    assert field_of(check_prompt_text, "", limits, "prompt.text") == "prompt.text"


class Msg:
    def __init__(self, role: str, content: str) -> None:
        self.role, self.content = role, content


def test_chat_messages() -> None:
    assert check_chat_messages([Msg("system", "s"), Msg("user", "u")], LIMITS) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
    ]
    assert field_of(check_chat_messages, [], LIMITS) == "chat.messages"
    bad_role = [Msg("user", "u"), Msg("robot", "r")]
    assert field_of(check_chat_messages, bad_role, LIMITS) == "chat.messages[1].role"
    limits = Limits(max_messages=2, max_message_bytes=3, max_prompt_bytes=5)
    assert field_of(check_chat_messages, [Msg("user", "a")] * 3, limits) == "chat.messages"
    assert (
        field_of(check_chat_messages, [Msg("user", "abcd")], limits) == "chat.messages[0].content"
    )
    total = [Msg("user", "abc"), Msg("assistant", "abc")]
    assert field_of(check_chat_messages, total, limits) == "chat.messages"
    only_users = Limits(chat_roles=frozenset({"user"}))
    assert (
        field_of(check_chat_messages, [Msg("system", "s")], only_users) == "chat.messages[0].role"
    )


def test_token_ids_must_be_in_the_vocabulary() -> None:
    check_token_ids([0, 9], 10)
    assert field_of(check_token_ids, [], 10) == "token_ids"
    with pytest.raises(
        RequestError, match=r"id 10 at position 1 is outside the vocabulary \[0, 10\)"
    ):
        check_token_ids([3, 10], 10, "token_ids.ids")
    assert field_of(check_token_ids, [-1], 10, "ids") == "ids"


def test_stop_token_ids_must_be_in_the_vocabulary() -> None:
    check_stop_token_ids(SamplingParams(stop_token_ids=[9]), 10)
    assert (
        field_of(check_stop_token_ids, SamplingParams(stop_token_ids=[10]), 10) == "stop_token_ids"
    )


def test_context_length() -> None:
    check_context_length(6, SamplingParams(max_tokens=4), 10)  # exactly fills the context
    check_context_length(9, SamplingParams(max_tokens=None), 10)
    assert field_of(check_context_length, 10, SamplingParams(max_tokens=None), 10) == "prompt"
    with pytest.raises(RequestError, match="at most 4 fits"):
        check_context_length(6, SamplingParams(max_tokens=5), 10)
