"""Tiny models and data for the training tests (no downloads)."""

import copy

import torch
import transformers as tf

from secateurs.algorithms.magnitude import magnitude_mask
from secateurs.structure import get_weight, set_weight
from secateurs.training.masks import block_linear_layers

VOCAB = 64


def tiny_llama(seed: int = 0, vocab: int = VOCAB, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                            tie_word_embeddings=False)
    return tf.LlamaForCausalLM(config).eval()


def pruned(model, sparsity: float = 0.5, nm: tuple[int, int] | None = None):
    """A magnitude-pruned deep copy (every block linear layer; N:M where given)."""
    model = copy.deepcopy(model)
    for module in block_linear_layers(model).values():
        weight = get_weight(module)
        n, m = nm or (0, 0)
        set_weight(module, weight * magnitude_mask(weight, sparsity, n=n, m=m))
    return model


def tokens(count: int = 2000, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """A learnable stream: a noisy repeating pattern."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.arange(count) % 13 * 3 % vocab
    noise = torch.randint(0, vocab, (count,), generator=generator)
    return torch.where(torch.rand(count, generator=generator) < 0.1, noise, base)
