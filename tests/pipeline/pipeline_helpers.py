"""Tiny saved models and CLI runs for the pipeline tests (no downloads)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import load_file

VOCAB = 100
TINY = dict(vocab_size=VOCAB, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         tie_word_embeddings=False, **TINY)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **TINY)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB)),
}


def tokenizer():
    """Word-level: "[UNK]" is 0, "w1".."w99" are 1..99."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def save_tiny(folder: Path, arch: str = "llama", dtype=torch.float32, seed: int = 0, shard_size: str = "24KB") -> Path:
    """A tiny model saved in several safetensors shards with an index, with its tokenizer."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]().to(dtype).eval()
    model.save_pretrained(folder, max_shard_size=shard_size)
    tokenizer().save_pretrained(folder)
    return folder


def word_text(count: int, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(1, VOCAB, (count,), generator=generator).tolist())


def calibration(samples: int = 6, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def assert_identical(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name]), name


def cli_subprocess(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """`secateurs ARGS` in a fresh single-threaded interpreter, after running `prelude`."""
    code = f"import sys\n{prelude}\nfrom secateurs.cli import main\nsys.exit(main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"SECATEURS_THREADS": "1"})


def compress_in_process_group(rank: int, world_size: int, rendezvous: str, model_dir: str, output: str, recipe) -> None:
    """One torchrun-like process (gloo, file rendezvous) of a streamed compression."""
    import torch.distributed as dist

    from secateurs.pipeline.job import CompressionJob

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        CompressionJob(model_dir, output, stream=True).run(recipe, calibration(), hessian_dtype=torch.float64, progress=False)
    finally:
        dist.destroy_process_group()
