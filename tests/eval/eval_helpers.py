"""Tiny models and tokenizers for the task-evaluation tests, built in-process (no downloads)."""

import torch


def byte_bpe(texts, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts` (any text encodes; no special token is added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    # larger logits than the default init, so choices differ by more than float noise
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@torch.no_grad()
def brute_force(model, tokenizer, context: str, continuation: str):
    """One example alone, the whole sequence through model(...).logits: (log-likelihood, greedy)."""
    from secateurs.eval.tasks import encode_pair

    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    logprobs = model(ids).logits[0].float().log_softmax(-1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    ll = sum(logprobs[p, t].item() for p, t in zip(positions, cont))
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, cont))
    return ll, greedy


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Question: what does a fox eat?\nAnswer: mice and berries. "
    "She said, \"hello there.\" Élodie paid 12 euros for the café au lait; the [title] bracketed remains. "
    "A man is sitting on a roof. He starts pulling up roofing on a roof. Is the sky blue? yes no. "
) * 4
