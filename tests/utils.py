"""Test helpers: run a model over whole sequences through the paged cache, with no engine."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import CausalLM, init_kv_cache
from pallas_kernels.attention import AttentionMetadata


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, state, tokens, positions, kv, meta):
    model = nnx.merge(graphdef, state)
    h, _ = model(tokens, positions, kv, meta)
    return model.logits(h)


def full_forward(model: CausalLM, seqs: list[list[int]], page_size: int = 4) -> list[np.ndarray]:
    """Logits [len(seq), vocab] for each sequence, all prefilled together in one step."""
    cfg = model.cfg
    pages_per_seq = [math.ceil(len(s) / page_size) for s in seqs]
    p = max(pages_per_seq)
    num_pages = 1 + sum(pages_per_seq)
    tables = np.zeros((len(seqs), p), np.int32)
    slots, tokens, positions, cu = [], [], [], [0]
    nxt = 1
    for i, s in enumerate(seqs):
        tables[i, : pages_per_seq[i]] = np.arange(nxt, nxt + pages_per_seq[i])
        nxt += pages_per_seq[i]
        for pos, tok in enumerate(s):
            slots.append(tables[i, pos // page_size] * page_size + pos % page_size)
            tokens.append(tok)
            positions.append(pos)
        cu.append(cu[-1] + len(s))
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray([len(s) for s in seqs], jnp.int32),
        cu_q_lens=jnp.asarray(cu, jnp.int32),
    )
    kv = init_kv_cache(cfg, num_pages, page_size, model.embed_tokens.dtype)
    graphdef, state = nnx.split(model)
    logits = np.asarray(
        _forward_logits(
            graphdef,
            state,
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            kv,
            meta,
        )
    )
    return [logits[cu[i] : cu[i + 1]] for i in range(len(seqs))]
