"""The commands that compress, evaluate, fine-tune and report: compress, eval, decompress,
finetune, report, demo, dev prepare."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from secateurs.cli.output import VERBOSITY, load_model_for_running, say
from secateurs.errors import SecateursError


def cmd_prepare(args) -> None:
    from secateurs.models import DEFAULT_MODEL, EMBEDDED, materialize_embedded

    for name in EMBEDDED if args.all else [DEFAULT_MODEL]:
        print(f"model {name}: {materialize_embedded(name)}")
    from secateurs.runtime import build

    try:
        print(f"kernels: {build.build()}")
    except build.BuildError as exc:
        if os.environ.get("CI") == "true":
            raise SecateursError(f"kernels: {exc}") from None
        print(f"kernels: not built, the slower pure-torch fallback will run ({exc})", file=sys.stderr)


def cmd_eval(args) -> None:
    from secateurs.data.corpus import load_text, tokenize
    from secateurs.eval.perplexity import check_seqlen, perplexity
    from secateurs.models import is_sequence_classifier

    if is_sequence_classifier(args.model):
        return _eval_classifier(args)
    if args.data is not None and str(args.data).partition(":")[0] == "fine-foods":
        raise SecateursError(f"{args.data} is labelled data for a sequence classifier; {args.model} is not one")
    classifier_only = [flag for flag, value in (("--batch", args.batch), ("--engine", args.engine),
                                                ("--int8-activations", args.int8_activations or None)) if value is not None]
    if classifier_only:
        raise SecateursError(f"{', '.join(classifier_only)}: for sequence classifiers; {args.model} is not one")
    if args.tasks is not None:
        return _eval_tasks(args)
    if args.limit is not None or args.subset is not None:
        raise SecateursError("--limit and --subset select task documents: use them with --tasks")
    args.data = args.data or "austen-eval"
    args.seqlen = 512 if args.seqlen is None else args.seqlen
    loaded = load_model_for_running(args.model, args.vq_integer)
    check_seqlen(loaded.model, args.seqlen)
    ids = tokenize(loaded.tokenizer, load_text(args.data))
    result = perplexity(loaded.model, ids, args.seqlen, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data} | result.as_dict(), indent=2))
    else:
        print(f"perplexity {result.ppl:.3f} on {args.data}: {result.windows} windows x {result.seqlen} tokens "
              f"({result.tokens_evaluated} evaluated, {result.tokens_dropped} dropped), "
              f"{result.seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s")


def _eval_classifier(args) -> None:
    """Accuracy, macro-F1 and sequences/s of a sequence classifier (secateurs.api.score_classifier)."""
    import torch

    from secateurs.api import score_classifier

    language_only = [flag for flag, value in (("--tasks", args.tasks), ("--limit", args.limit), ("--subset", args.subset),
                                              ("--max-tokens", args.max_tokens), ("--vq-integer", args.vq_integer)) if value]
    if language_only:
        raise SecateursError(f"{', '.join(language_only)}: for language models; {args.model} is a sequence classifier")
    if args.data is None:
        raise SecateursError("a classifier needs --data: fine-foods (test split), fine-foods:train, hf:<dataset>[:split], "
                             "or a csv/jsonl/parquet with text,label columns")
    engine = args.engine or "secateurs"
    result = score_classifier(args.model, args.data, engine=engine, seqlen=args.seqlen,
                              batch_size=32 if args.batch is None else args.batch, progress=not VERBOSITY["quiet"],
                              int8_activations=args.int8_activations)
    threads = torch.get_num_threads()
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "engine": engine, "threads": threads,
                          "int8_activations": args.int8_activations}
                         | result.as_dict(), indent=2))
    else:
        score = result.score
        print(f"accuracy {100 * score.accuracy:.2f}%, macro-F1 {100 * score.macro_f1:.2f} on {args.data} ({score.n} texts); "
              f"{result.sequences_per_second:.1f} sequences/s ({engine}, batch {result.batch_size}, "
              f"{result.seqlen} tokens, {threads} threads)")


def _eval_tasks(args) -> None:
    """Zero-shot multiple-choice tasks and LAMBADA (secateurs.eval.tasks), names and data checked first."""
    from secateurs.data.tasks import load_docs, select_indices
    from secateurs.eval.tasks import evaluate, format_table, mean_accuracy, parse_tasks

    names = parse_tasks(args.tasks)
    select_indices(1, limit=args.limit, subset=args.subset)
    for name in names:
        load_docs(name)  # a task whose data is missing fails before the model loads
    loaded = load_model_for_running(args.model, args.vq_integer)
    results = evaluate(loaded.model, loaded.tokenizer, names, limit=args.limit, subset=args.subset,
                       progress=not VERBOSITY["quiet"])
    if args.json:
        rows = [result.as_row(str(args.model), Path(str(args.model)).name) for result in results]
        print(json.dumps({"model": args.model, "mean_acc": mean_accuracy(results), "tasks": rows}, indent=2))
    else:
        print(format_table(results))


def cmd_finetune(args) -> None:
    """Sparse fine-tuning with the zeros held (secateurs.training), every input checked first."""
    from secateurs.pipeline.distributed import check_device, init_from_environment
    from secateurs.training.finetune import finetune
    from secateurs.training.losses import LossWeights
    from secateurs.training.trainer import TrainConfig

    if (args.steps is None) == (args.tokens is None):
        raise SecateursError("give the training length as --steps or as --tokens (exactly one)")
    losses = LossWeights.named(args.loss, args.temperature)
    explicit = {name: getattr(args, name) for name in ("ce", "kl", "squarehead") if getattr(args, name) is not None}
    if explicit:
        losses = LossWeights(**(losses.as_dict() | explicit))
    if losses.needs_teacher and args.teacher is None:
        raise SecateursError(f"--loss {args.loss} distils from a teacher: pass --teacher (the dense model)")
    config = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
                         steps=args.steps, tokens=args.tokens, batch_size=args.batch, grad_accum=args.grad_accum,
                         seqlen=args.seqlen, max_grad_norm=args.clip, seed=args.seed, bf16=args.bf16,
                         gradient_checkpointing=args.gradient_checkpointing, losses=losses,
                         checkpoint_every=args.checkpoint_every)
    check_device(args.device)
    device = init_from_environment(args.device)  # torchrun: data parallel, each process its slice of a batch
    result = finetune(args.model, args.output, config, teacher=args.teacher, data=args.data, qat=args.qat,
                      dense=args.dense, resume=args.resume, device=device or "cpu",
                      progress=not VERBOSITY["quiet"])
    trained = result.training
    print(f"fine-tuned {args.model}: {trained.steps} steps, {trained.tokens} tokens, {trained.tokens_per_s:.0f} tokens/s, "
          f"sparsity {trained.sparsity.get('sparsity', 0.0):.3f}; wrote {args.output} (loss curve and checkpoints in "
          f"{result.training_dir})")


def cmd_prune_encoder(args) -> None:
    from secateurs.training.encoder import prune_encoder

    if args.shared_rows is not None and args.block != 1:
        raise SecateursError("--block and --shared-rows are two block shapes: give one")
    result = prune_encoder(args.model, args.data, args.output, sparsity=args.sparsity, method=args.method,
                           epochs=args.epochs, seqlen=args.seqlen, batch_size=args.batch, lr=args.lr,
                           hardness=args.hardness, temperature=args.temperature, prune_every=args.prune_every,
                           grads=args.grads, teacher_epochs=args.teacher_epochs, unit=args.shared_rows or args.block,
                           across_rows=args.shared_rows is not None, int8=args.int8, qat_epochs=args.qat_epochs,
                           seed=args.seed, resume=args.resume,
                           progress=not VERBOSITY["quiet"])
    print(f"pruned {args.model} to {result.sparsity:.3f} ({args.method}): held-out accuracy "
          f"{100 * result.pruned.accuracy:.1f}% (teacher {100 * result.teacher.accuracy:.1f}%, n = {result.pruned.n}); "
          f"wrote {result.output}")


def cmd_compress_denoiser(args) -> None:
    from secateurs.api import compress_denoiser
    from secateurs.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # a bad recipe fails before the model loads
    result = compress_denoiser(args.model, recipe, args.calibration, args.output, groups=args.groups,
                               min_weights=args.min_weights, patches_per_call=args.patches, tune_steps=args.tune_steps,
                               tune_lr=args.tune_lr, resume=args.resume, overwrite=args.overwrite,
                               progress=not VERBOSITY["quiet"])
    report, saved = result.report, result.saved
    compressed = sum(size for name, size in saved.bytes_by_format.items() if name != "dense")
    weights = sum(result.model.get_submodule(name).weight.numel() for name in report.layers)
    print(f"compressed {len(report.layers)} layers ({weights:,} weights) in {report.seconds:.0f} s: "
          f"{8 * compressed / weights:.2f} bits per weight; {len(report.skipped)} left as they were; "
          f"wrote {saved.path} ({saved.file_bytes / 2**20:.1f} MiB)")
    if report.tuning:
        print(f"codebook tuning: relative output error {report.tuning['error_before']:.4g} -> "
              f"{report.tuning['error_after']:.4g}")


def cmd_report(args) -> None:
    from secateurs.eval.report import write_report

    print(f"wrote {write_report(args.results, args.output)}")


def cmd_compress(args) -> None:
    from secateurs.api import oneshot
    from secateurs.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # a bad recipe fails before the model loads
    result = oneshot(args.model, recipe, args.calib, args.output, save_compressed=not args.dense, dtype=args.dtype,
                     stream=args.stream, resume=args.resume, overwrite=args.overwrite,
                     offload_activations=args.offload_activations, device=args.device,
                     true_sequential=args.true_sequential or None, samples=args.samples, seqlen=args.seqlen,
                     seed=args.seed, progress=not VERBOSITY["quiet"])
    if result.report is None:
        print(f"finished the interrupted final step of the run: wrote {args.output}")
        return
    if not _is_main_process():  # under torchrun, one process reports
        return
    totals = result.report.as_dict()["totals"]
    print(f"compressed {totals['layers']} layers with {recipe.name} in {totals['seconds']:.1f} s "
          f"(sparsity {totals['sparsity']:.3f}); wrote {args.output}")
    if not args.dense:
        _describe_compressed(Path(args.output))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _describe_compressed(output: Path) -> None:
    """The formats and bytes on disk (from config.json: the tensors are not read again), and once,
    where compressed-tensors cannot read the result."""
    from secateurs.formats import compressed_tensors_problem, read_layout

    _, specs = read_layout(output)
    formats = sorted({spec.format for spec in specs.values()})
    size = sum(path.stat().st_size for path in output.glob("*.safetensors"))
    print(f"compressed formats: {', '.join(formats) or 'none (every layer is smallest dense)'}; {size / 2**20:.1f} MiB on disk")
    problem = compressed_tensors_problem(specs)
    if problem:
        say(f"secateurs: note: no compressed-tensors config written: {problem}")


def cmd_decompress(args) -> None:
    from secateurs.formats import decompress

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise SecateursError(f"output {output} exists (pass --overwrite to replace it)")
    decompress(args.model, output)
    print(f"wrote the dense model {output}")


def cmd_demo(args) -> None:
    from secateurs.demo import run_demo

    run_demo(args)


