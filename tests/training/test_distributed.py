"""Data parallel (gloo, 2 processes) equals one process with the same global batch."""

import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from secateurs.training.losses import LossWeights
from secateurs.training.masks import masks_from_zeros
from secateurs.training.trainer import TrainConfig, Trainer
from training_helpers import DDP_CONFIG, ddp_worker, pruned, tiny_llama, tokens


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_equal_one_with_the_global_batch(tmp_path):
    out = tmp_path / "ddp.safetensors"
    mp.spawn(ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    teacher = tiny_llama()
    student = pruned(teacher, 0.5)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    config = TrainConfig(batch_size=2, losses=LossWeights(ce=1, kl=1, squarehead=0), **DDP_CONFIG)
    Trainer(student, tokens(), config, teacher=teacher, masks=masks_from_zeros(student), progress=False).train()
    parallel = load_file(out)
    for name, p in student.named_parameters():
        assert torch.allclose(parallel[name], p, rtol=1e-4, atol=1e-6), name
    assert any(not torch.equal(before[name], p) for name, p in student.named_parameters())
