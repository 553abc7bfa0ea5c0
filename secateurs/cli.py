"""The `secateurs` command line. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from secateurs.errors import SecateursError


def _add_model(parser, default=None):
    parser.add_argument("--model", default=default, required=default is None,
                        help="embedded name (smollm2-135m, gemma3-270m), model directory, .gguf file or hub id")


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
    from secateurs.models import load_model

    loaded = load_model(args.model)
    check_seqlen(loaded.model, args.seqlen)
    ids = tokenize(loaded.tokenizer, load_text(args.data))
    result = perplexity(loaded.model, ids, args.seqlen, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data} | result.as_dict(), indent=2))
    else:
        print(f"perplexity {result.ppl:.3f} on {args.data}: {result.windows} windows x {result.seqlen} tokens "
              f"({result.tokens_evaluated} evaluated, {result.tokens_dropped} dropped), "
              f"{result.seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s")


def cmd_compress(args) -> None:
    from secateurs.data.corpus import calibration_windows
    from secateurs.pipeline.distributed import init_from_environment
    from secateurs.pipeline.job import CompressionJob
    from secateurs.recipe import load_recipe

    output = Path(args.output)
    recipe = load_recipe(args.recipe)
    # Scale and reliability (pipeline/job.py): <output>.partial, --resume, --stream, torchrun.
    device = init_from_environment(args.device)
    job = CompressionJob(args.model, output, overwrite=args.overwrite, resume=args.resume, stream=args.stream,
                         offload_activations=args.offload_activations)
    calibration = calibration_windows(job.tokenizer, args.calib, args.samples, args.seqlen, args.seed)
    report = job.run(recipe, calibration, {"model": args.model, "calibration_data": args.calib, "seed": args.seed},
                     device=device, true_sequential=args.true_sequential or None)
    if not job.group.is_main:  # under torchrun, one process reports and writes the compressed formats
        return
    totals = report.as_dict()["totals"]
    print(f"compressed {totals['layers']} layers with {recipe.name} in {totals['seconds']:.1f} s "
          f"(sparsity {totals['sparsity']:.3f}); wrote {output}")
    if args.save_compressed:
        _rewrite_compressed(output, report)


def _rewrite_compressed(output: Path, report) -> None:
    """Replace the dense output by its compressed formats (secateurs/formats), keeping compression.json."""
    from secateurs.formats import save_compressed
    from secateurs.models import load_model

    dense = load_model(output)  # what the job wrote, also after --stream
    saved = save_compressed(dense.model, report, output, dense.tokenizer,
                            extra_files={"compression.json": (output / "compression.json").read_text()})
    sizes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in saved.bytes_by_format.items())
    print(f"compressed formats: {sizes}; {saved.file_bytes / 2**20:.1f} MiB on disk"
          f"{' (compressed-tensors config)' if saved.compressed_tensors else ''}")


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


def _add_calibration(parser, samples: int, seqlen: int) -> None:
    parser.add_argument("--calib", default="austen-calib",
                        help="calibration text (default: the five Austen novels other than Persuasion)")
    parser.add_argument("--samples", type=int, default=samples, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=seqlen, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateurs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="convert the embedded model(s) and build the CPU kernels")
    prepare.add_argument("--all", action="store_true", help="also the second embedded model (Gemma-3-270M)")
    prepare.set_defaults(run=cmd_prepare)

    evaluate = commands.add_parser("eval", help="perplexity of a model on a text")
    _add_model(evaluate, default="smollm2-135m")
    evaluate.add_argument("--data", default="austen-eval",
                          help="austen-eval (Persuasion), austen:<novel>, .txt/.jsonl file or directory, hf:<dataset>")
    evaluate.add_argument("--seqlen", type=int, default=512)
    evaluate.add_argument("--max-tokens", type=int, default=None)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=cmd_eval)

    compress = commands.add_parser("compress", help="one-shot compression with a recipe")
    _add_model(compress, default="smollm2-135m")
    compress.add_argument("--recipe", default="sparsegpt-50", help="preset name or YAML file")
    _add_calibration(compress, samples=128, seqlen=2048)
    compress.add_argument("--output", required=True, help="model directory to write")
    compress.add_argument("--overwrite", action="store_true")
    compress.add_argument("--device", default=None, help="compute device for the block being compressed")
    compress.add_argument("--true-sequential", action="store_true",
                          help="inside a block: q/k/v, then o, then gate/up, then down")
    # Scale and reliability: resumable runs, streamed weights, offloaded activations.
    compress.add_argument("--resume", action="store_true",
                          help="continue the run interrupted in <output>.partial/ (same model, recipe and calibration)")
    compress.add_argument("--stream", action="store_true",
                          help="read each block from the safetensors shards only when it is compressed (larger-than-memory models)")
    compress.add_argument("--offload-activations", action="store_true",
                          help="keep the calibration activations between blocks on disk, in <output>.partial/offload/")
    compress.add_argument("--save-compressed", action="store_true",
                          help="write compressed formats (bitmask, 2:4, packed int) instead of dense weights")
    compress.set_defaults(run=cmd_compress)

    decompress = commands.add_parser("decompress", help="turn a compressed model directory back into a dense one")
    decompress.add_argument("--model", required=True, help="compressed model directory (compress --save-compressed)")
    decompress.add_argument("--output", required=True, help="dense model directory to write")
    decompress.add_argument("--overwrite", action="store_true")
    decompress.set_defaults(run=cmd_decompress)

    demo = commands.add_parser("demo", help="compress the embedded SmolLM2 and compare perplexity on Persuasion")
    demo.add_argument("--recipe", default="sparsegpt-50")
    _add_calibration(demo, samples=32, seqlen=512)
    demo.add_argument("--eval-tokens", type=int, default=8192, help="Persuasion tokens to evaluate (windows of 512)")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if "SECATEURS_THREADS" in os.environ:
            import torch

            threads = os.environ["SECATEURS_THREADS"]
            if not threads.isdigit() or int(threads) < 1:
                raise SecateursError(f"SECATEURS_THREADS must be a positive integer (got {threads!r})")
            torch.set_num_threads(int(threads))
        args.run(args)
    except SecateursError as exc:
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
