"""The offline `LLM` API (vLLM's conventions): batch generation and chat over `LLMEngine`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from jaxserve.llm_engine import LLMEngine
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Load a model once, then `generate` / `chat` over any number of prompts.

    `model=None` serves the embedded default (SmolLM2-135M-Instruct); a converted directory is
    loaded as is; a Hugging Face directory or a `.gguf` file is converted on the fly into the cache.
    `tensor_parallel_size` x `expert_parallel_size` devices share one model too big for one.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        dtype: str | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        **engine_kwargs,
    ):
        self.engine = LLMEngine.from_pretrained(
            model,
            page_size=page_size,
            num_pages=num_pages,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=enable_prefix_caching,
            tensor_parallel_size=tensor_parallel_size,
            expert_parallel_size=expert_parallel_size,
            **engine_kwargs,
        )
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        self = cls.__new__(cls)
        self.engine = engine
        self._ids = itertools.count()
        return self

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (with the generation prompt) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(c, add_generation_prompt=True),
                add_special_tokens=False,
            )
            for c in convs
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 2)
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    merged = _merge(final.get(delta.request_id), delta)
                    final[delta.request_id] = merged
                    if merged.finished:
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        finally:
            bar.close()
        return [final[rid] for rid in ids]


def _merge(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta output into the accumulated one."""
    if acc is None:
        acc = RequestOutput(
            request_id=delta.request_id,
            prompt=delta.prompt,
            prompt_token_ids=delta.prompt_token_ids,
            outputs=[],
            metrics=delta.metrics,
        )
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        cur = by_index.get(c.index)
        if cur is None:
            cur = by_index[c.index] = CompletionOutput(
                index=c.index, logprobs=[] if c.logprobs is not None else None
            )
        cur.text += c.text
        cur.token_ids = cur.token_ids + c.token_ids
        if c.logprobs is not None:
            cur.logprobs = (cur.logprobs or []) + c.logprobs
        cur.finish_reason = c.finish_reason or cur.finish_reason
        cur.stop_reason = c.stop_reason if c.stop_reason is not None else cur.stop_reason
        if c.cumulative_logprob is not None:
            cur.cumulative_logprob = c.cumulative_logprob
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    acc.metrics = delta.metrics
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    return acc
