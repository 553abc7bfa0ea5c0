"""Perplexity by the standard protocol: tokenize once, non-overlapping windows, mean token NLL, exp.

Every window is scored on its own (no context carried across windows); window i predicts its tokens
1..L-1 from the ones before them, so each window contributes L-1 predictions. Tokens after the last
whole window are dropped, as in the GPTQ/SparseGPT evaluation code, and the report says how many.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from secateurs.errors import SecateursError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token negative log-likelihood, nats
    windows: int
    seqlen: int
    tokens_evaluated: int  # tokens fed to the model (windows x seqlen)
    tokens_predicted: int  # tokens whose NLL enters the mean
    tokens_dropped: int  # tail shorter than one window
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_evaluated / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second}


def max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_seqlen(model, seqlen: int) -> None:
    limit = max_context(model)
    if seqlen < 2:
        raise SecateursError(f"seqlen must be at least 2 (got {seqlen})")
    if limit is not None and seqlen > limit:
        raise SecateursError(f"seqlen {seqlen} is above the model's maximum context of {limit} tokens")


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on a 1-D tensor of token ids."""
    check_seqlen(model, seqlen)
    if max_tokens is not None and max_tokens < 0:  # a negative slice would silently cut from the end
        raise SecateursError(f"max_tokens must not be negative (got {max_tokens})")
    if batch_size < 1:
        raise SecateursError(f"batch_size must be at least 1 (got {batch_size})")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    windows = token_ids.numel() // seqlen
    if windows == 0:
        raise SecateursError(f"the text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    batches = token_ids[: windows * seqlen].view(windows, seqlen)
    device = next(model.parameters()).device
    total_nll = 0.0
    started = time.perf_counter()
    bar = tqdm(total=windows, desc="perplexity", unit="window", disable=not progress)
    for first in range(0, windows, batch_size):
        inputs = batches[first : first + batch_size].to(device)
        logits = model(inputs, use_cache=False).logits.float()
        total_nll += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1), reduction="sum"
        ).item()
        bar.update(inputs.shape[0])
    bar.close()
    predicted = windows * (seqlen - 1)
    nll = total_nll / predicted
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        windows=windows,
        seqlen=seqlen,
        tokens_evaluated=windows * seqlen,
        tokens_predicted=predicted,
        tokens_dropped=token_ids.numel() - windows * seqlen,
        seconds=time.perf_counter() - started,
    )
