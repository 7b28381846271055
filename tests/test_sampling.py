"""The on-device sampler against straightforward NumPy versions of each rule."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.sampling import RowSpec, SamplingBatch, sample
from jaxserve.sampling_params import SamplingParams


def run(logits: np.ndarray, rows: list[RowSpec]) -> dict[str, np.ndarray]:
    batch, flags = SamplingBatch.build(rows, len(rows))
    out = sample(
        np.asarray(logits, np.float32), np.arange(len(rows), dtype=np.int32), batch, **flags
    )
    return {k: np.asarray(v) for k, v in out.items()}


def allowed_set(logits: np.ndarray, top_k: int, top_p: float, min_p: float, temp: float) -> set:
    """Which tokens may be drawn: NumPy statement of the top-k → top-p → min-p rules."""
    x = logits / temp
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, bool)
    k = top_k or len(x)
    keep[order[:k]] = True
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    mass = 0.0
    for t in order:
        if not keep[t]:
            continue
        if mass >= top_p:
            keep[t] = False
        mass += p[t]
    probs = np.exp(np.where(keep, x, -np.inf) - x[keep].max())
    probs /= probs.sum()
    keep &= probs >= min_p * probs.max()
    return set(np.flatnonzero(keep).tolist())


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    out = run(logits, [RowSpec(temperature=0.0, want_logprobs=True)] * 3)
    np.testing.assert_array_equal(out["tokens"], logits.argmax(-1))
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(out["logprob"], lsm[np.arange(3), out["tokens"]], atol=1e-5)
    np.testing.assert_array_equal(out["top_ids"][:, :5], np.argsort(-lsm, axis=-1)[:, :5])
    # Without logprobs wanted, only the tokens: no log-softmax pass over the vocabulary.
    plain = run(logits, [RowSpec(temperature=0.0)] * 3)
    assert set(plain) == {"tokens"}
    np.testing.assert_array_equal(plain["tokens"], out["tokens"])


@pytest.mark.parametrize(
    "top_k,top_p,min_p,temp",
    [(5, 1.0, 0.0, 1.0), (0, 0.6, 0.0, 0.7), (0, 1.0, 0.2, 1.3), (8, 0.8, 0.05, 0.5)],
)
def test_draws_stay_inside_the_filtered_set_and_cover_it(top_k, top_p, min_p, temp):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=40).astype(np.float32)
    allowed = allowed_set(logits, top_k, top_p, min_p, temp)
    rows = [
        RowSpec(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=7, step=i)
        for i in range(400)
    ]
    drawn = set(run(np.tile(logits, (400, 1)), rows)["tokens"].tolist())
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 2)


def test_temperature_sampling_matches_softmax_frequencies():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rows = [RowSpec(temperature=1.0, seed=3, step=i) for i in range(4000)]
    toks = run(np.tile(logits, (4000, 1)), rows)["tokens"]
    freq = np.bincount(toks, minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_seed_and_step_determine_the_draw_whatever_the_batch():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 30)).astype(np.float32)
    spec = RowSpec(temperature=1.0, seed=42, step=3)
    alone = run(logits[:1], [spec])["tokens"][0]
    others = [RowSpec(temperature=1.0, seed=s, step=0) for s in range(4)]
    assert run(logits, [spec, *others])["tokens"][0] == alone
    assert (
        run(logits[[0, 1]], [others[0], spec])["tokens"][1] == run(logits[[1]], [spec])["tokens"][0]
    )


def test_penalties_and_banned_ids_match_numpy():
    rng = np.random.default_rng(4)
    v = 20
    logits = rng.normal(scale=3.0, size=v).astype(np.float32)
    spec = RowSpec(
        temperature=0.0,
        repetition_penalty=1.5,
        presence_penalty=0.7,
        frequency_penalty=0.4,
        prompt_ids=(1, 2, 3),
        output_ids=(3, 4, 4, 5),
        banned_ids=(int(np.argmax(logits)),),
    )
    x = logits.copy()
    for t in {1, 2, 3, 4, 5}:
        x[t] = x[t] / 1.5 if x[t] > 0 else x[t] * 1.5
    counts = np.bincount([3, 4, 4, 5], minlength=v)
    x = x - 0.4 * counts - 0.7 * (counts > 0)
    x[int(np.argmax(logits))] = -np.inf
    assert run(logits[None], [spec])["tokens"][0] == int(np.argmax(x))


def test_sampling_params_validation_names_the_field():
    for kwargs, field in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            SamplingParams(**kwargs)
