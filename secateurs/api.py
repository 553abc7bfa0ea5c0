"""The Python front door: `oneshot` compresses a model (into a directory, or in place), `load` and
`load_any` open whatever a path holds. The command line calls these; they reach every feature it has.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateurs.data.corpus import AUSTEN_CALIBRATION, calibration_from
from secateurs.denoisers import build_denoiser, load_denoiser
from secateurs.errors import SecateursError
from secateurs.eval.classifier import ClassifierEvaluation, evaluate_texts
from secateurs.formats import SavedModel, decompress
from secateurs.formats import load as load_compressed
from secateurs.formats.module_file import read_compressed_module, save_compressed_module
from secateurs.io import read_safetensors
from secateurs.models import (
    LoadedModel,
    context_length,
    hf_step,
    is_compressed_directory,
    is_sequence_classifier,
    load_classifier,
    load_model,
)
from secateurs.onnx_graph import write_onnx_with_weights
from secateurs.pipeline.distributed import check_device, init_from_environment
from secateurs.pipeline.engine import CompressionReport, compress_model
from secateurs.pipeline.job import CompressionJob, open_model
from secateurs.pipeline.layerwise import LayerwiseReport, compress_layerwise
from secateurs.recipe import ProgressiveRecipe, load_recipe


@dataclass
class OneshotResult:
    report: CompressionReport | None  # None when a resume only finished the rename of a complete run
    output_dir: Path | None
    model: nn.Module | None  # compressed in memory (None for a streamed run)


def oneshot(model, recipe="sparsegpt-50", calibration=AUSTEN_CALIBRATION, output_dir=None, *,
            save_compressed: bool = True, dtype=None, stream: bool = False, resume: bool = False,
            overwrite: bool = False, offload_activations: bool = False, device: str | None = None,
            true_sequential: bool | None = None, samples: int = 128, seqlen: int = 2048, seed: int = 0,
            tokenizer=None, progress: bool = True, chunk_size: int | None = None,
            summary: dict | None = None) -> OneshotResult:
    """Compress `model` with `recipe` (a preset name, a YAML path, a list/dict, a Recipe; llm-compressor
    modifier names too) in one shot.

    model: an embedded name, a model directory, a .gguf file, a hub id, or a loaded PreTrainedModel
        (compressed in place; pass its `tokenizer` unless calibration is token ids).
    calibration: token ids [samples, seqlen] (or 1-D, then windowed), a text or text spec
        (`austen-calib`, a .txt/.jsonl file or directory, `hf:<dataset>`), a list of texts, or a
        dataset with a 'text' column; `samples` windows of `seqlen` tokens are drawn with `seed`.
    output_dir: where to write the model (a transformers directory, in the compressed formats unless
        `save_compressed=False`, in `dtype`: default the dtype the model was stored in); None keeps
        the result in memory only. `resume` continues a run killed in `<output_dir>.partial/`;
        `stream` reads one block at a time from the shards (larger-than-memory models);
        `offload_activations` keeps the calibration activations on disk. Under torchrun every process
        calls this; the work is shared and the main process writes.
    """
    recipe = load_recipe(recipe)
    if isinstance(recipe, ProgressiveRecipe):
        if stream or offload_activations:
            raise SecateursError("a recipe with finetune stages runs in memory: stream and offload_activations do not apply")
        check_device(device)
        loaded = LoadedModel(model, tokenizer, "<in memory>") if isinstance(model, nn.Module) else load_any(model)
        ids = _calibration(lambda: loaded.tokenizer, loaded.model, calibration, samples, seqlen, seed)
        return _progressive(loaded, recipe, ids, output_dir, save_compressed, overwrite, resume, device, progress)
    if output_dir is None:
        if stream or resume or offload_activations:
            raise SecateursError("stream, resume and offload_activations need an output_dir")
        check_device(device)
        if isinstance(model, nn.Module):
            loaded = LoadedModel(model, tokenizer, "<in memory>")
        else:
            loaded = load_any(model)
        ids = _calibration(lambda: loaded.tokenizer, loaded.model, calibration, samples, seqlen, seed)
        report = compress_model(loaded.model, recipe, ids, device=device, true_sequential=true_sequential,
                                progress=progress, chunk_size=chunk_size)
        return OneshotResult(report, None, loaded.model)
    device = init_from_environment(device)
    with CompressionJob(model, output_dir, overwrite=overwrite, resume=resume, stream=stream,
                        offload_activations=offload_activations, compressed=save_compressed, dtype=dtype,
                        device=device, tokenizer=tokenizer) as job:
        if job.finished:
            job.run(recipe, torch.zeros(1, 1, dtype=torch.long))
            return OneshotResult(None, Path(output_dir), None)
        ids = _calibration(lambda: job.tokenizer, job.model, calibration, samples, seqlen, seed)
        record = {"model": model if isinstance(model, (str, os.PathLike)) else type(model).__name__,
                  "calibration_data": calibration if isinstance(calibration, str) and len(calibration) < 200 else
                  type(calibration).__name__, "seed": seed} | (summary or {})
        report = job.run(recipe, ids, {k: str(v) if isinstance(v, os.PathLike) else v for k, v in record.items()},
                         true_sequential=true_sequential, progress=progress, chunk_size=chunk_size)
        return OneshotResult(report, Path(output_dir), None if stream else job.model)


def _progressive(loaded: LoadedModel, recipe: ProgressiveRecipe, ids: torch.Tensor, output_dir, save_compressed: bool,
                 overwrite: bool, resume: bool, device: str | None, progress: bool) -> OneshotResult:
    """Each phase compressed by the engine on the current weights (recalibrated), then fine-tuned
    with its zeros held and the original model as the teacher; the result written at the end.
    Training checkpoints go to `<output_dir>.training/` (resume continues them; the compression
    phases are deterministic and run again)."""
    import copy

    from secateurs.data.corpus import load_text, tokenize
    from secateurs.formats import StoragePlan
    from secateurs.formats import save_compressed as write_compressed
    from secateurs.models import save_model
    from secateurs.training.losses import LossWeights
    from secateurs.training.progressive import progressive_prune
    from secateurs.training.trainer import TrainConfig

    output = None if output_dir is None else Path(output_dir)
    if output is not None and output.exists() and not (overwrite or resume):
        raise SecateursError(f"output {output} exists (pass overwrite=True / --overwrite to replace it)")
    stages = [finetune for _, finetune in recipe.phases if finetune is not None]
    if len({stage.data for stage in stages}) > 1:
        raise SecateursError("the finetune stages of one recipe train on one text: give them the same data")
    configs = [None if f is None else TrainConfig(
        lr=f.lr, weight_decay=f.weight_decay, warmup_steps=f.warmup, schedule=f.schedule, steps=f.steps, tokens=f.tokens,
        batch_size=f.batch, grad_accum=f.grad_accum, seqlen=f.seqlen, seed=f.seed,
        losses=LossWeights.named(f.loss, f.temperature)) for _, f in recipe.phases]
    token_ids = tokenize(loaded.tokenizer, load_text(stages[0].data))
    teacher = copy.deepcopy(loaded.model).eval() if any(c is not None and c.losses.needs_teacher for c in configs) else None
    results = progressive_prune(loaded.model, _compress_on(device), [r for r, _ in recipe.phases], ids, token_ids, configs,
                                teacher=teacher, progress=progress, resume=resume,
                                output_dir=None if output is None else output.with_name(output.name + ".training"))
    report = results[-1].compression
    if output is not None:
        plan = StoragePlan()
        for result in results:  # zeros and N:M from every phase, grids from the quantization phase
            stage_plan = result.compression.storage_plan()
            plan.nm |= stage_plan.nm
            plan.grids |= stage_plan.grids
            plan.vq |= stage_plan.vq
            plan.act_order |= stage_plan.act_order
        if save_compressed:
            write_compressed(loaded.model, plan, output, loaded.tokenizer, store_dtype=loaded.stored_dtype)
        else:
            save_model(loaded.model, loaded.tokenizer, output)
    return OneshotResult(report, output, loaded.model)


def _compress_on(device):
    def compress(model, recipe, calibration, progress=True):
        return compress_model(model, recipe, calibration, device=device, progress=progress)

    return compress


def _calibration(tokenizer_of, model, calibration, samples, seqlen, seed) -> torch.Tensor:
    """Token ids for the engine, checked against the model's context before any work;
    `tokenizer_of()` is asked only when the calibration is text (a streamed model loads it then)."""
    limit = context_length(model.config)
    if limit is not None and seqlen > limit and not isinstance(calibration, torch.Tensor):
        raise SecateursError(f"seqlen {seqlen} exceeds the model's context of {limit} positions")
    if isinstance(calibration, torch.Tensor) and calibration.ndim == 2:
        return calibration_from(None, calibration, samples, seqlen, seed)
    tokenizer = tokenizer_of()
    if tokenizer is None:
        raise SecateursError("calibration given as text needs the model's tokenizer (pass tokenizer=...)")
    return calibration_from(tokenizer, calibration, samples, seqlen, seed)


def load_any(spec, verify: bool | None = None) -> LoadedModel:
    """A model with its tokenizer from an embedded name, a directory (compressed or plain), a .gguf
    file or a hub id; compressed layers become secateurs.runtime modules."""
    path = _compressed_directory(spec)
    if path is not None:
        return LoadedModel(load_compressed(path, verify).eval(), _tokenizer(path), str(path))
    return load_model(spec, verify=verify)


def load(path, verify: bool | None = None) -> nn.Module:
    """A model directory as a model: a compressed one with secateurs.runtime modules for its
    compressed layers (every tensor validated), a plain one as transformers loads it. Checksums
    written beside the shards are verified first (`verify=False` or SECATEURS_VERIFY=0 skips)."""
    compressed = _compressed_directory(path)
    if compressed is not None:
        return load_compressed(compressed, verify).eval()
    return load_model(path, verify=verify).model


# --- sequence classifiers ------------------------------------------------------------------------

CLASSIFIER_ENGINES = ("secateurs", "torch")


def score_classifier(model, data, *, engine: str = "secateurs", seqlen: int | None = None, batch_size: int = 32,
                     progress: bool = True, int8_activations: bool = False) -> ClassifierEvaluation:
    """Accuracy, macro-F1 and sequences/s of a sequence classifier directory (compressed, as
    prune-encoder writes it, or plain) on labelled texts: "fine-foods" (its test split),
    "fine-foods:train", `hf:<dataset>[:split]` (default test), or a csv / jsonl / parquet file with
    text,label columns (labels mapped to the model's classes by name, or taken as class ids when
    they are integers); texts padded or truncated to `seqlen` tokens (None: 128, or the model's
    context where shorter).

    engine "secateurs": compressed layers on secateurs' kernels, attention and the fused feed-forward
    activation through runtime.encoder.accelerate_encoder (with int8_activations, its int8 layers
    also quantize their inputs to int8 per token); "torch": transformers' eager model with the
    weights decompressed, the baseline to compare with."""
    from secateurs.data.reviews import labelled_texts

    if engine not in CLASSIFIER_ENGINES:
        raise SecateursError(f"engine must be one of {', '.join(CLASSIFIER_ENGINES)}, got {engine!r}")
    if not is_sequence_classifier(model):
        raise SecateursError(f"{model}: not a sequence classifier directory (its config.json names no "
                             "*ForSequenceClassification architecture)")
    if batch_size < 1:
        raise SecateursError(f"need batch size >= 1, got {batch_size}")
    if int8_activations and engine != "secateurs":
        raise SecateursError("int8 activations run on secateurs' kernels: use engine secateurs")
    texts = labelled_texts(data, "test")
    path = _compressed_directory(model)
    if engine == "secateurs" and path is not None:
        classifier, tokenizer = load_compressed(path).eval(), _tokenizer(path)
    elif path is not None:  # the baseline runs plain nn.Linear layers: the directory decompressed, bit-exact
        with tempfile.TemporaryDirectory(prefix="secateurs-dense-") as scratch:
            loaded = load_classifier(decompress(path, Path(scratch) / "dense"))
        classifier, tokenizer = loaded.model, loaded.tokenizer
    else:
        loaded = load_classifier(model)
        classifier, tokenizer = loaded.model, loaded.tokenizer
    texts = texts.for_model(classifier.config.id2label)
    if engine == "secateurs":
        from secateurs.runtime.encoder import accelerate_encoder

        classifier = accelerate_encoder(classifier, int8_activations=int8_activations)
    return evaluate_texts(classifier, tokenizer, texts, seqlen, batch_size, progress)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    from secateurs.models import quiet_loading

    with quiet_loading():
        return hf_step(str(path), "no usable tokenizer", lambda: AutoTokenizer.from_pretrained(path))


def _compressed_directory(spec) -> Path | None:
    """`spec` as a path when it names a compressed directory (models.load_model takes the rest)."""
    path = Path(str(spec)).expanduser()
    return path if path.is_dir() and is_compressed_directory(path) else None


# --- diffusion denoisers -------------------------------------------------------------------------------

@dataclass
class DenoiserResult:
    report: LayerwiseReport
    output_dir: Path | None
    model: nn.Module  # compressed in memory
    saved: SavedModel | None


def compress_denoiser(model, recipe, calibration, output_dir=None, *, groups: int = 4, min_weights: int = 0,
                      patches_per_call: int | None = None, tune_steps: int = 0, tune_lr: float = 1e-4,
                      resume: bool = False, overwrite: bool = False, onnx: bool | None = None,
                      progress: bool = True) -> DenoiserResult:
    """Compress a diffusion denoiser's Linear and Conv2d layers with `recipe` (gptq, rtn, vq, sparsegpt,
    wanda, magnitude stages; presets such as "vq-3x8" or "gptq-w4g128"), layer by layer
    (pipeline/layerwise.py).

    model: a diffusers model directory (UNet2DModel, UNet2DConditionModel, ...), a .onnx file, or an
        nn.Module. calibration: the model's inputs, a list of (args, kwargs) calls, or a safetensors
        file of tensors named `<call>.<input>` (`0.sample`, `0.timestep`, `0.encoder_hidden_states`,
        ...; for ONNX the graph's input names), recorded along real sampling trajectories.
    output_dir: a compressed module directory (formats/module_file.py); for an ONNX model it also
        holds `model.onnx`, the graph with the dequantized weights, which onnxruntime runs (`onnx`
        False skips it). A killed run continues from `<output_dir>.partial/` with `resume`.
    """
    loaded = load_denoiser(model)
    calls = calibration if isinstance(calibration, (list, tuple)) else calibration_calls(calibration, loaded.input_names)
    output = Path(output_dir) if output_dir is not None else None
    work = None
    if output is not None:
        if output.exists() and not (overwrite or resume):
            raise SecateursError(f"{output} exists (pass overwrite=True / --overwrite to replace it)")
        work = output.with_name(output.name + ".partial")
        if work.exists() and not resume:
            raise SecateursError(f"{work} holds an interrupted run: pass resume=True / --resume to continue it, "
                                 f"or remove it")
    report = compress_layerwise(loaded.module, load_recipe(recipe), calls, groups=groups, min_weights=min_weights,
                                patches_per_call=patches_per_call, work_dir=work, progress=progress,
                                tune_steps=tune_steps, tune_lr=tune_lr)
    saved = None
    if output is not None:
        write_onnx = loaded.description["kind"] == "onnx" and onnx is not False
        extra = (lambda folder: write_onnx_with_weights(loaded.description["source"], loaded.module,
                                                        folder / "model.onnx")) if write_onnx else None
        saved = save_compressed_module(loaded.module, report.plan, output, loaded.description, extra)
        shutil.rmtree(work, ignore_errors=True)
    return DenoiserResult(report, output, loaded.module, saved)


def load_compressed_denoiser(path, verify: bool | None = None) -> nn.Module:
    """A directory written by compress_denoiser as the model it describes, its compressed layers
    decoded to their exact dequantized weights."""
    description, state, _ = read_compressed_module(path, verify)
    module = build_denoiser(description)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SecateursError(f"{path}: its tensors do not fit the model it describes "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval()


def calibration_calls(path, input_names: tuple[str, ...]) -> list[tuple[tuple, dict]]:
    """The calls of a calibration file: tensors `<call>.<input>`, one keyword argument each."""
    tensors = read_safetensors(Path(path))
    calls: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, _, argument = name.partition(".")
        if not index.isdigit() or not argument:
            raise SecateursError(f"{path}: tensor {name!r} is not named <call>.<input> (e.g. 0.sample)")
        if input_names and argument not in input_names:
            raise SecateursError(f"{path}: tensor {name!r}: the model takes no input {argument!r} "
                                 f"(it takes {', '.join(input_names)})")
        calls.setdefault(int(index), {})[argument] = tensor
    if not calls:
        raise SecateursError(f"{path}: holds no calibration tensors")
    return [((), calls[index]) for index in sorted(calls)]


__all__ = ["DenoiserResult", "OneshotResult", "calibration_calls", "compress_denoiser", "load", "load_any",
           "load_compressed_denoiser", "oneshot", "open_model"]
