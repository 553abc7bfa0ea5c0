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


def word_tokenizer(vocab: int = VOCAB):
    """Word-level: "[UNK]" is 0, "t1".."t{vocab-1}" are 1..vocab-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"t{i}": i for i in range(1, vocab)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def save_model_dir(model, folder):
    """A plain model directory (safetensors) with the word tokenizer."""
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def text_file(path, count: int = 1500):
    path.write_text(" ".join(f"t{max(1, i)}" for i in tokens(count).tolist()))
    return path


DDP_CONFIG = dict(steps=4, lr=3e-3, seqlen=16, grad_accum=2, weight_decay=0.1)
DDP_LOSSES = {"ce+kl": (1, 1, 0), "ce+squarehead": (1, 0, 1), "encoder-kl+squarehead": (0, 1, 1)}


def ddp_case(case: str, batch_size: int):
    """What a data-parallel test trains, in every process alike: (student, data, config, teacher).
    "encoder-..." is a tiny BERT classifier on padded reviews of random lengths (no dropout, so that
    processes and one process draw the same computation); the others a pruned tiny Llama on tokens."""
    from secateurs.training.classification import ClassificationData
    from secateurs.training.losses import LossWeights
    from secateurs.training.trainer import TrainConfig

    config = TrainConfig(batch_size=batch_size, losses=LossWeights(*DDP_LOSSES[case], temperature=2.0), **DDP_CONFIG)
    if not case.startswith("encoder"):
        teacher = tiny_llama()
        return pruned(teacher, 0.5), tokens(), config, teacher
    torch.manual_seed(0)
    teacher = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (24, 16), generator=generator)
    mask = (torch.arange(16)[None] < torch.randint(3, 17, (24, 1), generator=generator)).long()
    data = ClassificationData(ids * mask, mask, torch.randint(0, 3, (24,), generator=generator))
    return pruned(teacher, 0.5), data, config, teacher


def ddp_worker(rank: int, world: int, port: int, out: str, case: str) -> None:
    """One torchrun-like process (gloo): fine-tune `case` (ddp_case), rank 0 saves the weights."""
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    from secateurs.training.masks import masks_from_zeros
    from secateurs.training.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        student, data, config, teacher = ddp_case(case, batch_size=1)
        Trainer(student, data, config, teacher=teacher, masks=masks_from_zeros(student), progress=False).train()
        if rank == 0:
            save_file({n: p.detach().contiguous() for n, p in student.named_parameters()}, out)
        dist.barrier()  # neither process closes the group while the other still uses it
    finally:
        dist.destroy_process_group()
