"""The one trainer every training method shares: sparse fine-tuning with distillation, gradual
pruning (through a step callback) and quantization-aware recovery (through fake-quant weights).

AdamW with warmup and linear/cosine decay, gradient accumulation and clipping, optional bf16
autocast and gradient checkpointing; the teacher runs without gradients. Data is one token stream
packed into windows of `seqlen` (language modelling), or any object with the same interface (e.g.
training.classification.ClassificationData: labelled texts for an encoder), visited in a seeded
order per epoch, so the data position is a single integer; the data object also owns the loss. Checkpoints (every `checkpoint_every` steps, atomically) hold the weights, the
optimizer moments, the masks, the RNG states, the data position and the loss history; resuming from
one continues bit-identically to a run that was never interrupted (same threads, same device).
Under torchrun (a process group initialized by the caller, gloo on CPU or NCCL on GPU) each process
takes its slice of every global micro-batch and the gradients are averaged before each step: equal
to one process with the whole batch to float tolerance, for every loss (the losses' denominators,
SquareHead's teacher power among them, are shared between the processes). Rank 0 writes the checkpoints and the curve.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.errors import SecateursError
from secateurs.io import atomic_directory, replace_atomically, write_safetensors, write_text
from secateurs.training.losses import LossWeights, Share, combined_loss
from secateurs.training.masks import MaskSet
from secateurs.training.schedules import LR_SCHEDULES, lr_factor

CHECKPOINT_DIR = "checkpoint"
LOSS_CSV, LOSS_PNG = "loss.csv", "loss.png"
PARTS = ("loss", "ce", "kl", "squarehead")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "linear"  # constant | linear | cosine (after warmup)
    steps: int | None = None  # optimizer steps; or
    tokens: int | None = None  # a token budget, rounded up to whole steps
    batch_size: int = 4  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seqlen: int = 512
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool = False  # autocast student and teacher to bfloat16 (weights and optimizer stay float32)
    gradient_checkpointing: bool = False
    losses: LossWeights = field(default_factory=LossWeights)
    checkpoint_every: int = 0  # steps; 0: only at the end
    log_every: int = 1

    def tokens_per_step(self, world: int = 1) -> int:
        """Tokens of one optimizer step over `world` data-parallel processes."""
        return self.batch_size * self.grad_accum * self.seqlen * world

    def total_steps(self, world: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / self.tokens_per_step(world))

    def validate(self) -> None:
        if not self.lr > 0:
            raise SecateursError(f"the learning rate must be > 0 (got {self.lr})")
        if (self.steps is None) == (self.tokens is None):
            raise SecateursError("give the training length as steps or as tokens (exactly one)")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            raise SecateursError(f"the training length must be positive (steps={self.steps}, tokens={self.tokens})")
        for name in ("batch_size", "grad_accum", "seqlen", "log_every"):
            if getattr(self, name) < 1:
                raise SecateursError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.seqlen < 2:
            raise SecateursError(f"seqlen must be at least 2 (got {self.seqlen})")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or not self.weight_decay >= 0:
            raise SecateursError("warmup_steps, checkpoint_every and weight_decay must not be negative")
        if self.schedule not in LR_SCHEDULES:
            raise SecateursError(f"unknown learning-rate schedule {self.schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise SecateursError(f"max_grad_norm must be > 0 or None (got {self.max_grad_norm})")

    def as_dict(self) -> dict:
        return asdict(self)


class PackedWindows:
    """A token stream cut into windows of `seqlen`; epoch e visits them in the order of a
    permutation seeded by (seed, e). The position (windows consumed) is all the state there is.

    The trainer's data interface: `batch(position, size)`, `check(model, teacher)` and
    `loss(weights, model, teacher, batch, autocast) -> (loss, parts)`."""

    def __init__(self, token_ids: torch.Tensor, seqlen: int, seed: int = 0):
        token_ids = torch.as_tensor(token_ids).flatten().to(torch.long)
        count = token_ids.numel() // seqlen
        if count == 0:
            raise SecateursError(f"the training text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
        self.windows = token_ids[: count * seqlen].view(count, seqlen)
        self.seed = seed
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.windows.shape[0]

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self), generator=generator))
        return self._order[1]

    def indices(self, position: int, size: int) -> list[int]:
        """Which examples positions position .. position + size - 1 of the endless seeded sequence are."""
        return [int(self.order(index // len(self))[index % len(self)]) for index in range(position, position + size)]

    def batch(self, position: int, size: int) -> torch.Tensor:
        """Windows position .. position + size - 1 of the endless seeded sequence: [size, seqlen]."""
        return self.windows[self.indices(position, size)]

    def check(self, model: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is not None and vocab_size(teacher) != vocab_size(model):
            raise SecateursError(f"the teacher's vocabulary has {vocab_size(teacher)} tokens, the model's "
                                 f"{vocab_size(model)}: they must share one tokenizer")
        if int(self.windows.min()) < 0 or int(self.windows.max()) >= vocab_size(model):
            raise SecateursError(f"the training token ids fall outside the model's vocabulary of {vocab_size(model)}")

    def loss(self, weights: LossWeights, model: nn.Module, teacher: nn.Module | None, inputs: torch.Tensor, autocast,
             share: Share | None = None):
        hidden = weights.squarehead > 0
        teacher_out = None
        if teacher is not None and weights.needs_teacher:
            # SquareHead without KL needs the teacher's hidden states only: its base model skips the
            # LM head (a fifth of a small model's FLOPs) and the [batch, seqlen, vocab] logits
            runner = teacher if weights.kl > 0 else getattr(teacher, "base_model", teacher)
            with torch.no_grad(), autocast():
                teacher_out = runner(inputs, output_hidden_states=hidden, use_cache=False)
        with autocast():
            student_out = model(inputs, output_hidden_states=hidden, use_cache=False)
        return combined_loss(weights, student_out, inputs, None, teacher_out, share)


@dataclass
class TrainResult:
    steps: int
    tokens: int  # trained on in this whole run, resumed parts included
    seconds: float  # wall time of this process's part
    tokens_per_s: float  # this process's part
    history: list[dict]
    sparsity: dict | None  # MaskSet.check() at the end

    def as_dict(self) -> dict:
        return asdict(self)


def to_device(batch, device: torch.device):
    """A batch (a tensor or a dict of tensors) on `device`."""
    if isinstance(batch, dict):
        return {key: value.to(device) for key, value in batch.items()}
    return batch.to(device)


def cpu_has_amx() -> bool:
    """Whether the CPU lists AMX tiles, on which oneDNN multiplies bf16 matrices in hardware. Without
    them bf16 autocast measured slower than float32 (0.56x on AVX512-BF16 alone; 1.86x with AMX:
    benchmarks/results/train_speed.md). Unknown (no /proc/cpuinfo) counts as yes: no warning."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True


def vocab_size(model: nn.Module) -> int:
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.shape[0]
    return int(model.config.vocab_size)


class Trainer:
    """Train `model` on `data` (1-D token ids, or a data object such as ClassificationData) with
    `config`; `teacher` for KL/SquareHead, `masks` to keep pruned weights at zero, `output_dir` for
    checkpoints and the loss curve. `on_step(trainer, step)` runs after every optimizer step (gradual
    pruning tightens the masks there)."""

    def __init__(self, model: nn.Module, data, config: TrainConfig, teacher: nn.Module | None = None,
                 masks: MaskSet | None = None, output_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 progress: bool = True, on_step=None, description: str = "finetune"):
        config.validate()
        self.device = torch.device(device)
        if config.losses.needs_teacher and teacher is None:
            raise SecateursError("the KL and SquareHead losses need a teacher model")
        if config.bf16 and self.device.type == "cpu" and not torch.backends.mkldnn.is_available():
            raise SecateursError("bf16 autocast on this CPU needs oneDNN (torch.backends.mkldnn)")
        if config.bf16 and self.device.type == "cpu" and not cpu_has_amx():
            warnings.warn("bf16 autocast on a CPU without AMX tiles runs slower than float32 here "
                          "(measured 0.56x); it pays on CPUs with AMX (1.86x)", stacklevel=2)
        self.data = data if hasattr(data, "loss") else PackedWindows(data, config.seqlen, config.seed)
        self.data.check(model, teacher)
        self.model, self.teacher, self.masks, self.config = model, teacher, masks, config
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.progress, self.on_step, self.description = progress, on_step, description
        self.step, self.position, self.history = 0, 0, []
        # torchrun data parallel: each process takes its slice of every global micro-batch, gradients
        # are averaged before the step, so all processes take the same step (rank 0 writes).
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.total_steps, self.tokens_per_step = config.total_steps(self.world), config.tokens_per_step(self.world)
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval()  # run under no_grad; its own flags are left as they are
        if masks is not None:
            masks.to(self.device)
            masks.apply()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    # ---- checkpoints ----

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.output_dir / CHECKPOINT_DIR if self.output_dir is not None else None

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def save_checkpoint(self) -> Path:
        if self.masks is not None:
            self.masks.check()
        with atomic_directory(self.checkpoint_dir) as staging:
            write_safetensors(staging / "model.safetensors",
                              {name: p.detach().cpu().contiguous() for name, p in self._trainable()})
            state = {}
            for index, (_, p) in enumerate(self._trainable()):
                for key, value in self.optimizer.state.get(p, {}).items():
                    state[f"{index}.{key}"] = value.detach().cpu().contiguous()
            state["rng.cpu"] = torch.get_rng_state()
            if self.device.type == "cuda":
                state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            if self.masks is not None:
                state |= {f"mask.{name}": keep.cpu().to(torch.uint8) for name, keep in self.masks.keep.items()}
            write_safetensors(staging / "state.safetensors", state)
            (staging / "state.json").write_text(json.dumps({
                "step": self.step, "position": self.position, "history": self.history,
                "config": self.config.as_dict(), "total_steps": self.total_steps, "world": self.world}, indent=1))
        return self.checkpoint_dir

    def resume(self) -> bool:
        """Load the checkpoint in output_dir if there is one (False if none)."""
        from safetensors.torch import load_file

        folder = self.checkpoint_dir
        if folder is None or not (folder / "state.json").is_file():
            return False
        meta = json.loads((folder / "state.json").read_text())
        volatile = ("checkpoint_every", "log_every")  # may change between the parts of a run
        ours = {k: v for k, v in json.loads(json.dumps(self.config.as_dict())).items() if k not in volatile}
        if ours != {k: v for k, v in meta["config"].items() if k not in volatile}:
            raise SecateursError(f"{folder}: the checkpoint was written with another training configuration")
        weights = load_file(folder / "model.safetensors")
        state = load_file(folder / "state.safetensors")
        trainable = self._trainable()
        if sorted(weights) != sorted(name for name, _ in trainable):
            raise SecateursError(f"{folder}: the checkpoint holds other parameters than this model")
        optimizer_state = {}
        with torch.no_grad():
            for index, (name, p) in enumerate(trainable):
                p.copy_(weights[name])
                entries = {key.split(".", 1)[1]: value for key, value in state.items() if key.split(".", 1)[0] == str(index)}
                if entries:
                    optimizer_state[index] = {key: value.to(self.device) if key != "step" else value
                                              for key, value in entries.items()}
        self.optimizer.load_state_dict({"state": optimizer_state,
                                        "param_groups": self.optimizer.state_dict()["param_groups"]})
        torch.set_rng_state(state["rng.cpu"])
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], self.device)
        if self.masks is not None:
            for name in self.masks.keep:
                self.masks.set(name, state[f"mask.{name}"].to(torch.bool).to(self.device))
            self.masks.check()
        self.step, self.position, self.history = meta["step"], meta["position"], meta["history"]
        return True

    # ---- the loop ----

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _micro_step(self, inputs) -> dict[str, float]:
        share = self._mean_over_processes if self.distributed else None
        loss, parts = self.data.loss(self.config.losses, self.model, self.teacher, inputs, self.autocast, share)
        (loss / self.config.grad_accum).backward()
        return parts

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """`value`'s mean over the processes (the losses' shared denominators)."""
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value / self.world

    def _average(self, sums: dict[str, float]) -> dict[str, float]:
        """Average the gradients and the logged loss parts over the processes."""
        for p in self.model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(keys, values)}

    def train(self, resume: bool = False) -> TrainResult:
        """Run to the configured length; with `resume`, continue from output_dir's checkpoint."""
        config = self.config
        if resume:
            self.resume()
        total = self.total_steps
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        started, start_step = time.perf_counter(), self.step
        bar = tqdm(total=total, initial=self.step, desc=self.description, unit="step",
                   disable=not self.progress or self.rank != 0)
        try:
            while self.step < total:
                factor = lr_factor(self.step, total, config.warmup_steps, config.schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = config.lr * factor
                self.optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for _ in range(config.grad_accum):
                    first = self.position + self.rank * config.batch_size
                    inputs = to_device(self.data.batch(first, config.batch_size), self.device)
                    self.position += config.batch_size * self.world
                    for key, value in self._micro_step(inputs).items():
                        sums[key] = sums.get(key, 0.0) + value / config.grad_accum
                if self.distributed:
                    sums = self._average(sums)
                if self.masks is not None:
                    self.masks.zero_gradients()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                self.optimizer.step()
                if self.masks is not None:
                    self.masks.zero_moments(self.optimizer)
                    self.masks.apply()
                self.step += 1
                if self.on_step is not None:
                    self.on_step(self, self.step)
                elapsed = time.perf_counter() - started
                rate = (self.step - start_step) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
                if self.step % config.log_every == 0 or self.step == total:
                    self.history.append({"step": self.step, "tokens": self.step * self.tokens_per_step,
                                         "lr": config.lr * factor} | {k: sums[k] for k in PARTS if k in sums})
                bar.set_postfix({k: f"{v:.4g}" for k, v in sums.items()} | {"tok/s": f"{rate:.0f}"}, refresh=False)
                bar.update(1)
                if self.output_dir is not None and (
                        self.step == total or (config.checkpoint_every and self.step % config.checkpoint_every == 0)):
                    if self.rank == 0:
                        self.save_checkpoint()
                        self.write_curve()
                    if self.distributed:
                        torch.distributed.barrier()
        finally:
            bar.close()
            if config.gradient_checkpointing:
                self.model.gradient_checkpointing_disable()
            self.model.eval()
        seconds = time.perf_counter() - started
        done = (self.step - start_step) * self.tokens_per_step
        return TrainResult(self.step, self.step * self.tokens_per_step, seconds, done / seconds if seconds > 0 else 0.0,
                           self.history, self.masks.check() if self.masks is not None else None)

    # ---- the loss curve ----

    def write_curve(self) -> None:
        """loss.csv and loss.png beside the checkpoint (the PNG only where matplotlib is installed)."""
        if self.output_dir is None or not self.history:
            return
        columns = ["step", "tokens", "lr"] + [k for k in PARTS if k in self.history[0]]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.output_dir / LOSS_CSV, buffer.getvalue())
        plot_history(self.history, self.output_dir / LOSS_PNG, self.description)


def plot_history(history: list[dict], path: Path, title: str = "") -> bool:
    """One panel per loss part against tokens; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    parts = [k for k in PARTS if k in history[0]]
    figure, axes = plt.subplots(1, len(parts), figsize=(4 * len(parts), 3), squeeze=False)
    tokens = [row["tokens"] for row in history]
    for axis, part in zip(axes[0], parts):
        axis.plot(tokens, [row[part] for row in history])
        axis.set_title(part)
        axis.set_xlabel("tokens")
    figure.suptitle(title)
    figure.tight_layout()
    replace_atomically(path, lambda staging: figure.savefig(staging, format="png", dpi=80))
    plt.close(figure)
    return True
