"""Data parallel (gloo, 2 processes) equals one process with the same global batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from secateurs.training.masks import masks_from_zeros
from secateurs.training.trainer import Trainer
from training_helpers import DDP_LOSSES, ddp_case, ddp_worker, tiny_llama, tokens


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("case", sorted(DDP_LOSSES))
def test_two_processes_equal_one_with_the_global_batch(tmp_path, case):
    """Every loss, SquareHead included (its teacher power and the token counts are shared between the
    processes, so each process's loss is its part of the global batch's), and padded encoder batches."""
    out = tmp_path / "ddp.safetensors"
    mp.spawn(ddp_worker, args=(2, free_port(), str(out), case), nprocs=2, join=True)
    student, data, config, teacher = ddp_case(case, batch_size=2)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    Trainer(student, data, config, teacher=teacher, masks=masks_from_zeros(student), progress=False).train()
    parallel = load_file(out)
    for name, p in student.named_parameters():
        assert torch.allclose(parallel[name], p, rtol=1e-4, atol=1e-6), name
    assert any(not torch.equal(before[name], p) for name, p in student.named_parameters())


def test_the_finetune_command_under_torchrun_is_data_parallel(tmp_path):
    """`torchrun -m secateurs.cli finetune`: two processes (torchrun's environment variables), each its
    slice of every batch, write one model equal to a single process with the global batch."""
    import os
    import subprocess
    import sys

    from secateurs.formats import save_compressed
    from secateurs.pipeline.engine import compress_model
    from training_helpers import text_file, word_tokenizer

    student = tiny_llama()
    report = compress_model(student, [{"sparsegpt": {"sparsity": 0.5}}], tokens(256, seed=5).view(8, 32), progress=False)
    save_compressed(student, report.storage_plan(), tmp_path / "sparse", word_tokenizer())
    text = text_file(tmp_path / "text.txt")

    def command(output, batch):
        return [sys.executable, "-m", "secateurs.cli", "-q", "finetune", "--model", str(tmp_path / "sparse"),
                "--output", str(output), "--data", str(text), "--loss", "ce", "--steps", "3", "--batch", str(batch),
                "--seqlen", "16", "--lr", "3e-3"]

    port = free_port()
    ranks = [subprocess.Popen(command(tmp_path / "parallel", 1), stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                                "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    for process in ranks:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    single = subprocess.run(command(tmp_path / "single", 2), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    parallel, alone = (load_file(tmp_path / name / "model.safetensors") for name in ("parallel", "single"))
    assert parallel.keys() == alone.keys()
    for name in alone:
        assert torch.allclose(parallel[name].float(), alone[name].float(), rtol=1e-4, atol=1e-6), name
    history = (tmp_path / "parallel.training" / "loss.csv").read_text().splitlines()
    assert len(history) == 4 and history[-1].split(",")[1] == str(3 * 2 * 16)  # 3 steps of the global batch
