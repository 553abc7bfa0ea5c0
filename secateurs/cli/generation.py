"""The commands that run a model: generate (streamed text on the C++ decode path) and dev bench-decode."""

from __future__ import annotations

import argparse
import json
import os
import sys

from secateurs.cli.output import load_model_for_running, positive, say
from secateurs.errors import SecateursError


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

    if args.threads is not None:
        torch.set_num_threads(positive("--threads", args.threads))
    loaded = load_model_for_running(args.model, getattr(args, "vq_integer", False))
    return loaded, torch.get_num_threads()


def cmd_generate(args) -> None:
    import time

    import torch

    from secateurs.runtime.decode import DecodeModel, DecodeUnsupported
    from secateurs.structure import eos_token_ids

    max_new = positive("--max-new-tokens", args.max_new_tokens)
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

    prompt_tokens = positive("--prompt-tokens", args.prompt_tokens)
    new_tokens = positive("--new-tokens", args.new_tokens)
    repeat = positive("--repeat", args.repeat)
    thread_counts = [positive("--threads", t) for t in args.threads]
    loaded, _ = _load_for_generation(argparse.Namespace(model=args.model, threads=None, vq_integer=args.vq_integer))
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


