"""Zero-shot tasks scored by log-likelihood, as lm-evaluation-harness (0.4.x) defines them.

Templates (lm_eval/tasks/*, target delimiter " " between context and choice):
  hellaswag      "{activity_label}: {ctx_a} {ctx_b.capitalize()}", both sides cleaned by lm-eval's
                 `preprocess` (" [title]" -> ". ", bracketed WikiHow artifacts dropped, double spaces)
  piqa           "Question: {goal}\\nAnswer:"        choices sol1, sol2
  arc_easy/_challenge "Question: {question}\\nAnswer:" choices the answer texts
  boolq          "{passage}\\nQuestion: {question}?\\nAnswer:"  choices "no", "yes"
  winogrande     partial scoring: two contexts (the sentence up to the blank, each option filled in),
                 one continuation (the rest of the sentence), the more likely context wins
  lambada        the passage without its last space-separated word; continuation " " + that word;
                 acc = every token of the word is the greedy choice, ppl = exp(-mean word log-likelihood)
acc picks the choice of highest log-likelihood; acc_norm divides each by the choice's length in
characters (lm-eval's `len(choice)`, without the delimiter; its byte-normalized variant is another
metric), and exists only where lm-eval's task lists it (hellaswag, piqa, arc). The standard error is
lm-eval's `mean_stderr`: the sample standard deviation of the per-example scores over sqrt(n).

Tokenization follows lm-eval's causal path: trailing whitespace of the context moves to the
continuation, context+continuation is encoded whole (the tokenizer's default special tokens), and the
continuation is what follows the context's own encoding. An over-long input loses tokens from the start
of its context, as lm-eval truncates.

Scoring: every distinct context is run once, right-padded in a batch with its KV cache kept; then every
continuation of the batch runs on a copy of its context's cache, with explicit positions and the
context padding masked out, so padding never reaches a score. Models with sliding-window attention
score whole sequences instead (the cache of a window layer drops keys). Only the positions that predict
continuation tokens go through the output head.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from secateurs.data.tasks import load_docs, select_indices
from secateurs.errors import SecateursError

TASKS = ("lambada", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq")
NORMALIZED = {"hellaswag", "piqa", "arc_easy", "arc_challenge"}  # tasks whose lm-eval metrics include acc_norm
HEAD_CHUNK = 1024  # positions per output-head matmul (bounds the [positions, vocab] logits)


@dataclass(frozen=True)
class Prompt:
    """One document as lm-eval's requests: (context, continuation) pairs, one per choice."""

    requests: list[tuple[str, str]]
    gold: int
    choices: list[str] | None  # the strings whose lengths normalize acc_norm (None: no acc_norm)


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag utils.preprocess: brackets are WikiHow artifacts
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _choices(context: str, choices: list[str], gold: int, normalized: bool) -> Prompt:
    return Prompt([(context, " " + choice) for choice in choices], gold, choices if normalized else None)


def prompt(task: str, doc: dict) -> Prompt:
    """The requests lm-eval makes for one document of `task`."""
    if task == "lambada":
        words = doc["text"].split(" ")
        return Prompt([(" ".join(words[:-1]), " " + words[-1])], 0, None)
    if task == "hellaswag":
        context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        return _choices(context, [_hellaswag_clean(end) for end in doc["endings"]], int(doc["label"]), True)
    if task == "piqa":
        return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]), True)
    if task in ("arc_easy", "arc_challenge"):
        gold = doc["choices"]["label"].index(doc["answerKey"])
        return _choices(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), gold, True)
    if task == "boolq":
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return _choices(context, ["no", "yes"], int(doc["answer"]), False)
    if task == "winogrande":
        blank = doc["sentence"].index("_")
        rest = " " + doc["sentence"][blank + 1 :].strip()
        contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
        return Prompt([(context, rest) for context in contexts], {"1": 0, "2": 1}[doc["answer"]], None)
    raise SecateursError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def parse_tasks(spec: str | list[str]) -> list[str]:
    """Task names from "a,b,c" (or a list); "all" is every task. Unknown names are one error."""
    names = [name.strip() for name in (spec.split(",") if isinstance(spec, str) else spec) if name.strip()]
    names = list(TASKS) if names == ["all"] else names
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise SecateursError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


# ---- tokenization and scoring ----

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's causal models split them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    return head, whole[len(head) :]


def max_length(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 2048


def _truncate(context: list[int], continuation: list[int], limit: int) -> list[int]:
    # lm-eval feeds (context + continuation)[-(limit + 1):][:-1]: the context loses its first tokens
    excess = len(context) + len(continuation) - 1 - limit
    if excess >= len(context):
        raise SecateursError(f"a continuation of {len(continuation)} tokens does not fit the model's {limit} positions")
    return context[max(excess, 0) :]


def _uses_sliding_window(model) -> bool:
    return getattr(model.config, "sliding_window", None) is not None and getattr(model.config, "use_sliding_window", True)


def _token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and whether it is the argmax, from final hidden states [P, D]."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    logprobs, greedy = [], []
    for first in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[first : first + HEAD_CHUNK]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        chunk_targets = targets[first : first + HEAD_CHUNK]
        logprobs.append(logits.log_softmax(-1).gather(1, chunk_targets[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == chunk_targets)
    return torch.cat(logprobs), torch.cat(greedy)


def _padded(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _gather_scores(model, hidden, rows, cols, targets, owners, scores) -> None:
    """Add the log-probabilities at hidden[rows, cols] of `targets` into scores[owner] (sum, all-greedy)."""
    if not rows:
        return
    device = hidden.device
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logprobs, greedy = _token_logprobs(model, picked, torch.tensor(targets, device=device))
    for owner, logprob, is_greedy in zip(owners, logprobs.tolist(), greedy.tolist()):
        scores[owner][0] += logprob
        scores[owner][1] = scores[owner][1] and is_greedy


def _score_shared(model, batch, contexts, members, requests, scores, device) -> int:
    """One batch of distinct contexts, then all their continuations on copies of the KV cache."""
    decoder = model.get_decoder()
    ids, mask = _padded([contexts[c] for c in batch], device)
    lengths = mask.sum(1)
    out = decoder(input_ids=ids, attention_mask=mask, use_cache=True)
    slot = {c: row for row, c in enumerate(batch)}
    mine = [r for c in batch for r in members[c]]
    # the last context position predicts every continuation's first token
    _gather_scores(model, out.last_hidden_state, [slot[requests[r][0]] for r in mine],
                   [int(lengths[slot[requests[r][0]]]) - 1 for r in mine], [requests[r][1][0] for r in mine], mine, scores)
    longer = [r for r in mine if len(requests[r][1]) > 1]
    fed = int(lengths.sum())
    if longer:
        owners = torch.tensor([slot[requests[r][0]] for r in longer], device=device)
        cache = out.past_key_values
        cache.batch_select_indices(owners)
        tail_ids, tail_mask = _padded([requests[r][1][:-1] for r in longer], device)
        positions = lengths[owners][:, None] + torch.arange(tail_ids.shape[1], device=device)[None]
        tail = decoder(input_ids=tail_ids, attention_mask=torch.cat([mask[owners], tail_mask], 1),
                       position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        rows, cols, targets, who = [], [], [], []
        for row, r in enumerate(longer):
            continuation = requests[r][1]
            rows += [row] * (len(continuation) - 1)
            cols += list(range(len(continuation) - 1))
            targets += continuation[1:]
            who += [r] * (len(continuation) - 1)
        _gather_scores(model, tail, rows, cols, targets, who, scores)
        fed += int(tail_mask.sum())
    return fed


def _score_whole(model, batch, contexts, requests, scores, device) -> int:
    """Whole (context + continuation)[:-1] sequences, one per request, right-padded."""
    sequences = [contexts[requests[r][0]] + requests[r][1][:-1] for r in batch]
    ids, mask = _padded(sequences, device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    rows, cols, targets, who = [], [], [], []
    for row, r in enumerate(batch):
        start = len(contexts[requests[r][0]]) - 1
        continuation = requests[r][1]
        rows += [row] * len(continuation)
        cols += list(range(start, start + len(continuation)))
        targets += continuation
        who += [r] * len(continuation)
    _gather_scores(model, hidden, rows, cols, targets, who, scores)
    return int(mask.sum())


def _batches(lengths: list[int], batch_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped longest first, each group's rows x longest length within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and len(groups[-1]) < max_rows and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= batch_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@torch.no_grad()
def score_requests(model, tokenizer, pairs: list[tuple[str, str]], batch_tokens: int = 1024, max_rows: int = 64,
                   share_contexts: bool | None = None, progress: bool = True, desc: str = "scoring"):
    """Log-likelihood of each continuation given its context, and whether it is the greedy decoding.

    Returns ([(loglikelihood, is_greedy)], tokens fed through the model)."""
    if share_contexts is None:
        share_contexts = not _uses_sliding_window(model)
    limit = max_length(model)
    device = next(model.parameters()).device
    contexts: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    requests: list[tuple[int, list[int]]] = []
    for context, continuation in pairs:
        ctx_ids, cont_ids = encode_pair(tokenizer, context, continuation)
        if not cont_ids:
            raise SecateursError(f"continuation {continuation!r} encodes to no tokens")
        key = tuple(_truncate(ctx_ids, cont_ids, limit))
        if key not in index:
            index[key] = len(contexts)
            contexts.append(list(key))
        requests.append((index[key], cont_ids))
    scores = [[0.0, True] for _ in requests]
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress)
    fed = 0
    if share_contexts:
        # the cache is copied once per continuation: a context costs (its length + the longest
        # continuation) for each of its continuations. Ordering by that cost and a budget of about
        # 1024 padded tokens keeps padding to 2-55% of the tokens fed on the seven tasks with
        # SmolLM2's tokenizer (4096: 9-90%); on the CPU, batches that size lose no speed.
        members: list[list[int]] = [[] for _ in contexts]
        for r, (c, _) in enumerate(requests):
            members[c].append(r)
        cost = [len(members[c]) * (len(contexts[c]) + max(len(requests[r][1]) for r in members[c]))
                for c in range(len(contexts))]
        for batch in _batches(cost, batch_tokens, max_rows):
            fed += _score_shared(model, batch, contexts, members, requests, scores, device)
            bar.update(sum(len(members[c]) for c in batch))
    else:
        lengths = [len(contexts[c]) + len(cont) - 1 for c, cont in requests]
        for batch in _batches(lengths, batch_tokens, max_rows):
            fed += _score_whole(model, batch, contexts, requests, scores, device)
            bar.update(len(batch))
    bar.close()
    return [(float(ll), bool(greedy)) for ll, greedy in scores], fed


# ---- metrics ----

def mean_stderr(values: list[float]) -> float | None:
    """lm-eval's standard error of a mean: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    ppl: float | None = None  # LAMBADA: exp(-mean log-likelihood of the final word)
    subset: int | None = None
    limit: int | None = None
    seconds: float = 0.0
    tokens: int = 0  # tokens fed through the model
    examples: list[dict] = field(default_factory=list, repr=False)  # per document: index, gold, pred, ...

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def as_row(self, model: str, variant: str, engine: str = "secateurs") -> dict:
        """The row of benchmarks/results/tasks.json (without the per-example detail)."""
        row = {"model": model, "variant": variant, "engine": engine, "task": self.task, "acc": self.acc,
               "acc_norm": self.acc_norm, "stderr": self.stderr, "acc_norm_stderr": self.acc_norm_stderr,
               "n": self.n, "subset": self.subset}
        if self.ppl is not None:
            row["ppl"] = self.ppl
        if self.limit is not None:
            row["limit"] = self.limit
        return row | {"seconds": self.seconds, "tokens": self.tokens}

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of ties, as numpy's argmax


def metrics(task: str, prompts: list[Prompt], scores: list[list[tuple[float, bool]]], indices: list[int]) -> TaskResult:
    """acc / acc_norm (or LAMBADA's acc / ppl) from the scores of every document's requests."""
    examples, correct, correct_norm = [], [], []
    for doc_index, item, doc_scores in zip(indices, prompts, scores):
        lls = [ll for ll, _ in doc_scores]
        if task == "lambada":
            correct.append(float(doc_scores[0][1]))
            examples.append({"index": doc_index, "ll": lls[0], "greedy": doc_scores[0][1]})
            continue
        pred = _argmax(lls)
        example = {"index": doc_index, "gold": item.gold, "pred": pred, "lls": lls}
        correct.append(float(pred == item.gold))
        if item.choices is not None:
            example["pred_norm"] = _argmax([ll / len(choice) for ll, choice in zip(lls, item.choices)])
            correct_norm.append(float(example["pred_norm"] == item.gold))
        examples.append(example)
    result = TaskResult(task, len(correct), sum(correct) / len(correct), mean_stderr(correct), examples=examples)
    if correct_norm:
        result.acc_norm, result.acc_norm_stderr = sum(correct_norm) / len(correct_norm), mean_stderr(correct_norm)
    if task == "lambada":
        result.ppl = math.exp(-sum(e["ll"] for e in examples) / len(examples))
    return result


def evaluate_task(model, tokenizer, task: str, limit: int | None = None, subset: int | None = None,
                  docs: list[dict] | None = None, progress: bool = True, **scoring) -> TaskResult:
    """Score one task: every document, the seeded `subset`, and/or the first `limit` of them.

    `docs` replaces the packaged data (tests); `scoring` goes to score_requests."""
    task = parse_tasks([task])[0]
    docs = load_docs(task) if docs is None else docs
    indices = select_indices(len(docs), limit=limit, subset=subset)
    prompts = [prompt(task, docs[i]) for i in indices]
    pairs = [pair for item in prompts for pair in item.requests]
    started = time.perf_counter()
    flat, fed = score_requests(model, tokenizer, pairs, progress=progress, desc=task, **scoring)
    seconds = time.perf_counter() - started
    scores, first = [], 0
    for item in prompts:
        scores.append(flat[first : first + len(item.requests)])
        first += len(item.requests)
    result = metrics(task, prompts, scores, indices)
    result.subset, result.limit, result.seconds, result.tokens = subset, limit, seconds, fed
    return result


def evaluate(model, tokenizer, tasks: str | list[str], limit: int | None = None, subset: int | None = None,
             progress: bool = True, **scoring) -> list[TaskResult]:
    """Evaluate several tasks (names checked, and the selection validated, before any scoring)."""
    names = parse_tasks(tasks)
    select_indices(1, limit=limit, subset=subset)
    return [evaluate_task(model, tokenizer, name, limit=limit, subset=subset, progress=progress, **scoring)
            for name in names]


def mean_accuracy(results: list[TaskResult]) -> float:
    """The mean of `acc` over tasks (LAMBADA's is its last-word accuracy)."""
    return sum(result.acc for result in results) / len(results)


def format_table(results: list[TaskResult]) -> str:
    """A plain-text table of results (acc ± stderr, acc_norm, LAMBADA's ppl) and their mean acc."""
    lines = [f"{'task':<14} {'n':>6} {'acc':>15} {'acc_norm':>15} {'ppl':>9} {'tok/s':>7}"]
    for r in results:
        acc = f"{100 * r.acc:.2f} ± {100 * (r.stderr or 0):.2f}"
        norm = "—" if r.acc_norm is None else f"{100 * r.acc_norm:.2f} ± {100 * (r.acc_norm_stderr or 0):.2f}"
        ppl = "—" if r.ppl is None else f"{r.ppl:.2f}"
        lines.append(f"{r.task:<14} {r.n:>6} {acc:>15} {norm:>15} {ppl:>9} {r.tokens_per_second:>7.0f}")
    if len(results) > 1:
        lines.append(f"{'mean acc':<14} {'':>6} {100 * mean_accuracy(results):>15.2f}")
    return "\n".join(lines)
