"""Timing one greedy generation, the same way for the C++ decode path and transformers' generate.

Both take a prompt of real text (the evaluation novel: the numbers measure speed, not quality), run
it as one prefill, then decode `new_tokens` greedily with no early stop. Callers warm up and take
medians over repeated calls; `secateurs bench-decode` and benchmarks/decode.py do.
"""

from __future__ import annotations

import time

import torch

from secateurs.errors import SecateursError


def bench_prompt(tokenizer, count: int) -> list[int]:
    """The first `count` tokens of Persuasion (repeated if the tokenizer is that coarse)."""
    from secateurs.data.corpus import load_text

    text = load_text("austen-eval")[: 16 * count + 1000]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise SecateursError("the tokenizer encodes the benchmark text to no tokens")
    return (ids * (count // len(ids) + 1))[:count]


def time_decode_path(decoder, prompt: list[int], new_tokens: int) -> dict:
    """One generate() of a secateurs DecodeModel: tokens/s and the per-token split of its stats."""
    decoder.generate(prompt, new_tokens, eos=None)
    return decoder.stats.as_dict()


@torch.no_grad()
def time_hf_generate(model, prompt: list[int], new_tokens: int) -> dict:
    """One prefill forward, then one `model.generate` of exactly new_tokens tokens; the decode time
    is generate's time less its own prefill (measured by the first forward)."""
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    begin = time.perf_counter()
    model(ids, attention_mask=mask, use_cache=True)
    prefill = time.perf_counter() - begin
    begin = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    total = time.perf_counter() - begin
    return {"prefill_tokens_per_second": len(prompt) / prefill,
            "decode_tokens_per_second": (new_tokens - 1) / max(total - prefill, 1e-9)}
