"""Tiny models, tokenizers and texts for the foundation tests, built in-process (no downloads)."""

import torch

VOCAB = 100
MAX_POSITIONS = 64


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    """Word-level: "[UNK]" is 0, "<s>" is 1 (added as BOS by the post-processor), "w2".."w99" are 2..99."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")


def word_text(count: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(2, VOCAB, (count,), generator=gen).tolist())
