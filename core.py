"""
CORE, DCLM's in-context benchmark of a base model, and the tokenizer's bytes per token.

Used by train_all.py's eval phase on the base model (the mid and SFT models get evals.py's chat
evals instead); imports gpt (the precision context), data (the run dir's rows and shards),
report (the note printed with every CORE number) and cli (progress lines). Returns plain dicts
of counts and accuracies, which eval.json stores and report.py prints.

Design:
- the tasks are the ones the bundle's core.yaml lists, rendered as nanochat renders them: k
  few-shot examples, each "context, delimiter, answer" and a blank line, then the question; the
  shots are drawn with random.Random(1234 + idx) from the other examples of the (shuffled,
  capped) task, so every prompt is the same on every machine, rank and run
- each example is scored on its own: the tokens its choices share (shots and question) go
  through the model once into a KV cache, then its choices, stacked and right-padded, in one
  forward pass on top; so a result depends on nothing but the example (not on which others
  shared a batch or a process), and the shared tokens are not recomputed per choice (nanochat
  forwards every choice whole; the losses agree up to float rounding, a test checks it)
- the scored tokens: multiple choice scores each choice after the common token prefix of all
  choices; schema scores the common suffix (the same continuation after different contexts);
  language modelling scores the continuation. Choices are ranked by MEAN loss over their
  tokens, so a long answer is not punished for its length; an LM example is right only when
  greedy decoding reproduces every continuation token
- centered accuracy (acc - b) / (1 - b), with b the random-guess accuracy, puts guessing at 0 and
  a perfect score at 1, so 2-choice and 10-choice tasks can be averaged: CORE is their mean
- the model is trained at seq_len tokens but its rotary tables reach 10 x seq_len (gpt.py), and
  a prompt up to that length is scored as it is (as nanochat does); a longer one is cropped from
  the left, keeping the scored tokens, and counted
- under torchrun rank r takes examples i with i % world_size == r and returns counts, not
  accuracies: counts can be summed over ranks, and core_summary turns the sums into CORE once
- the bundle is read straight from the zip; core.yaml is read by a small parser of the flat YAML
  it uses, so PyYAML is not needed

Left out on purpose:
- the 4 tasks the offline mirror's bundle lacks (hellaswag zero- and 10-shot, squad, coqa): an
  18-task CORE is not comparable to nanochat's 22-task figure, and every print says so
- nanochat's comparison with GPT-2's and GPT-4's tokenizers (tiktoken is not a dependency)

References:
- DCLM, which defines CORE (appendix): https://arxiv.org/abs/2406.11794
- nanochat core_eval.py, base_eval.py, tok_eval.py: https://github.com/karpathy/nanochat
"""
import csv
import io
import json
import math
import os
import random
import time
import zipfile

import torch
import torch.nn.functional as F

from cli import Progress
from data import read_texts, shard_paths, task_rows
from gpt import KVCache, autocast
from report import CORE_NOTE, wilson_interval

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # nanochat base_eval.py: shuffle each task once, then cap it
FEWSHOT_SEED = 1234  # nanochat core_eval.py: example idx draws its shots with Random(1234 + idx)
# A short non-English text for the tokenizer table, written for tinychat (German, Spanish,
# Russian, Chinese, Korean): the pretraining text is English, so these should pack fewer bytes
# into a token than English does.
NON_ENGLISH_TEXT = """\
Der kleine Hund lief über die Brücke, weil es draußen regnete und er nach Hause wollte.
El tren salió tarde de la estación, pero llegamos a tiempo para la cena con mis abuelos.
Вечером мы сидели у окна, пили горячий чай и говорили о книгах, которые прочитали летом.
今天早上我在公园里看到很多人跑步，天气很好，空气也很新鲜。
오늘은 친구와 함께 도서관에 가서 새로운 책을 몇 권 빌렸습니다.
"""


# --- the bundle: core.yaml, eval_meta_data.csv and the task files ---

def read_bundle_file(bundle: str, name: str) -> str:
    """Text of eval_bundle/<name> from the bundle: eval_bundle.zip, or the folder it unzips to."""
    if not os.path.exists(bundle):
        raise FileNotFoundError(f"no eval bundle at {bundle}; "
                                "run 'python train_all.py --only download'")
    if os.path.isdir(bundle):
        with open(os.path.join(bundle, name), encoding="utf-8") as f:
            return f.read()
    with zipfile.ZipFile(bundle) as z:
        return z.read(f"eval_bundle/{name}").decode("utf-8")


def _yaml_value(text: str):
    """One core.yaml scalar: "double quoted" (JSON escapes), [list], int, bool or bare word."""
    if text.startswith(('"', "[")):
        return json.loads(text)  # "\nAnswer: " and [10] read the same in JSON and YAML
    if text.lstrip("-").isdigit():
        return int(text)
    return {"true": True, "false": False}.get(text, text)


def parse_core_yaml(text: str) -> list:
    """core.yaml's icl_tasks as a list of dicts; only the flat subset of YAML that file uses."""
    # The file is "icl_tasks:" and then flat mappings, each opened by a "-" line:
    #   -
    #     label: arc_easy
    #     continuation_delimiter: "\nAnswer: "
    tasks = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "icl_tasks:":
            continue
        if line.startswith("-"):
            tasks.append({})
            line = line[1:].strip()
            if not line:
                continue
        key, sep, value = line.partition(":")
        if not sep or not tasks:
            raise ValueError(f"core.yaml: cannot read {line!r}; the bundle is damaged, delete it "
                             "and rerun 'python train_all.py --only download'")
        tasks[-1][key.strip()] = _yaml_value(value.strip())
    return tasks


def load_core_tasks(bundle: str, max_per_task: int = 0) -> list:
    """Every task core.yaml lists: [{"label", "type", "num_fewshot", "delimiter", "baseline",
    "examples"}], examples shuffled with Random(1337) and cut to max_per_task (0 = all);
    baseline is the random-guess accuracy as a fraction (the CSV has percent)."""
    # One JSON object per line, by task type:
    #   multiple_choice   {"query": "Q?", "choices": ["a", "b", ...], "gold": 1}
    #   schema            {"context_options": ["The cup ...", "The jug ..."], "continuation":
    #                      "was full.", "gold": 0}   (winograd: which context fits the ending)
    #   language_modeling {"context": "Q?", "continuation": "Paris"}   (the answer to produce)
    baselines = {}
    for row in csv.DictReader(io.StringIO(read_bundle_file(bundle, "eval_meta_data.csv"))):
        # NOTE: the CSV has percent: 25 means a 4-way guess, so divide by 100
        baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100
    tasks = []
    for spec in parse_core_yaml(read_bundle_file(bundle, "core.yaml")):
        label = spec["label"]
        if spec["icl_task_type"] not in TASK_TYPES or label not in baselines:
            raise ValueError(f"core.yaml task {label!r} ({spec['icl_task_type']}) has no baseline "
                             f"in eval_meta_data.csv or an unknown type; known types: {TASK_TYPES}")
        text = read_bundle_file(bundle, f"eval_data/{spec['dataset_uri']}")
        examples = [json.loads(line) for line in text.splitlines() if line.strip()]
        # NOTE: shuffle before capping, and draw shots from the capped list, as nanochat does: a
        # different order would give other shots and other numbers than nanochat's
        random.Random(SHUFFLE_SEED).shuffle(examples)
        tasks.append({"label": label, "type": spec["icl_task_type"],
                      "num_fewshot": spec["num_fewshot"][0],
                      "delimiter": spec.get("continuation_delimiter", " "),
                      "baseline": baselines[label], "examples": examples[:max_per_task or None]})
    return tasks


# --- prompts and the tokens they score ---

def fewshot_indices(idx: int, num_examples: int, k: int) -> list:
    """Indices of the k shots of example idx, drawn from the others by Random(1234 + idx)."""
    if k == 0:
        return []
    # nanochat samples from the list of the other indices, [0, .., idx-1, idx+1, ..]. Its j-th
    # entry is j + (j >= idx), so sampling positions from range(n - 1) and mapping them gives the
    # very same shots without building an n-long list per example (20,321 in bigbench_qa_wikidata)
    # NOTE: never the example itself. A task capped below k + 1 examples has fewer shots to give:
    # all of them (nanochat would crash)
    rng = random.Random(FEWSHOT_SEED + idx)
    positions = rng.sample(range(num_examples - 1), min(k, num_examples - 1))
    return [j + (j >= idx) for j in positions]


def render_prompts(task_type: str, item: dict, delimiter: str, shots: list) -> list:
    """The prompts of one example, as nanochat's templates render them:
    multiple_choice: one per choice, "{query}{delimiter}{choice}" after the shots;
    schema: one per context option, "{option}{delimiter}{continuation}" after the shots;
    language_modeling: [prompt without the continuation (stripped), prompt with it].
    Each shot is its own example with the right answer filled in, then a blank line."""
    # nanochat renders these with jinja2 templates; the f-strings below build the same strings.
    # 2 shots, delimiter "\nAnswer: ", multiple choice, the prompt of choice "a":
    #   "F1?\nAnswer: x\n\nF2?\nAnswer: v\n\nQ?\nAnswer: a"
    # The shots show the model the format (and that an answer follows the delimiter); a base
    # model has never been told it is taking a test.
    if task_type == "multiple_choice":
        head = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n"
                       for s in shots)
        return [f"{head}{option}{delimiter}{item['continuation']}"
                for option in item["context_options"]]
    assert task_type == "language_modeling", f"unknown task type {task_type!r}"
    # contexts are stripped (some end in stray whitespace), and so is the prompt without the
    # continuation: "Q?\nAnswer: " -> "Q?\nAnswer:", whose tokens then prefix those of
    # "Q?\nAnswer: Paris" (" Paris" is one pre-split chunk, the space belongs to the word)
    head = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def common_length(seqs: list, from_end: bool = False) -> int:
    """Length of the longest common prefix (or suffix, from_end) of the token lists in seqs."""
    # [1, 2, 3, 4] and [1, 2, 5]: prefix 2 ([1, 2]); [7, 5, 6] and [8, 9, 5, 6]: suffix 2
    n = 0
    while n < min(map(len, seqs)) and len({s[-1 - n] if from_end else s[n] for s in seqs}) == 1:
        n += 1
    return n


def scored_spans(task_type: str, seqs: list) -> tuple:
    """(rows, starts, ends): the token rows to forward, and in row i the scored tokens
    rows[i][starts[i]:ends[i]]; seqs are the prompts' tokens, each starting with <|bos|>."""
    # e.g. choices [bos, Q, ?, " yes"] and [bos, Q, ?, " no", "pe"]: common prefix 3, so the spans
    # are [" yes"] and [" no", "pe"], each compared by its mean loss. Tokens every choice shares
    # (the question, or a leading " the" of every answer) say nothing about which one is right
    # and would only dilute the means.
    ends = [len(s) for s in seqs]
    if task_type == "multiple_choice":
        # NOTE: at most len - 1, so a choice that is a prefix of another still scores one token
        # (deviation: nanochat would average an empty span, a NaN)
        start = min(common_length(seqs), min(ends) - 1)
        return seqs, [start] * len(seqs), ends
    if task_type == "schema":
        # <|bos|> starts every row, so the suffix never covers a whole row unless two are equal
        suffix = min(common_length(seqs, from_end=True), min(ends) - 1)
        return seqs, [e - suffix for e in ends], ends
    without, with_ = seqs
    assert with_[:len(without)] == without and len(without) < len(with_), \
        "the tokens of the LM prompt without its continuation must prefix those with it"
    return [with_], [len(without)], [len(with_)]


def crop_left(rows: list, starts: list, ends: list, max_len: int) -> tuple:
    """(rows, starts, ends, is_cropped): rows longer than max_len lose their first tokens, the
    spans shift with them; the scored tokens and the one before them are always kept."""
    # max_len 4, row [1, 2, 3, 4, 5, 6] scoring [4, 6): cut 2 -> [3, 4, 5, 6] scoring [2, 4).
    # What is lost is the start of the few-shot block, the part the answer depends on least.
    # NOTE: the rotary table ends at max_len, so GPT.forward would refuse a longer row anyway
    out = ([], [], [])
    for row, start, end in zip(rows, starts, ends):
        cut = max(0, len(row) - max_len)
        assert start - cut >= 1, f"{end - start} scored tokens do not fit a {max_len}-token context"
        for column, value in zip(out, (row[cut:], start - cut, end - cut)):
            column.append(value)
    return *out, any(len(row) > max_len for row in rows)


# --- scoring ---

@torch.inference_mode()
def span_scores(model, rows: list, starts: list, ends: list, pad_id: int, device,
                precision: str) -> tuple:
    """([mean loss], [is_greedy]) of each row's scored tokens rows[i][starts[i]:ends[i]]: their
    mean cross entropy in nats, and whether greedy decoding reproduces every one of them.

    Plan: 1) the tokens all rows share, up to the one before the first scored token, go through
    the model once, into a KV cache copied to every row; 2) the rest of every row, stacked and
    right-padded, goes through in one forward pass on top of that cache; 3) the logits at
    position t predict token t + 1, so tokens [s, e) are scored by the logits at [s-1, e-1).
    """
    # Step 1 is what makes CORE affordable on a CPU: in a 10-shot multiple-choice prompt the
    # shots and the question are nearly every token, and all choices share them, so they are
    # computed once instead of once per choice (measured: 2-4x fewer CPU seconds per example on
    # arc_easy, boolq and bigbench_language_identification). The sampler's prefill does the same.
    # Causal attention makes it exact: a shared token never sees the tokens that differ.
    B, T = len(rows), max(map(len, rows))
    P = min(common_length(rows), min(starts) - 1)  # shared tokens that are not scored
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # of keys and values
    cache = KVCache(B, model.config, T, device, dtype)
    # 1) the shared prefix, once (B = 1); <|bos|> alone when nothing else is shared
    if P > 0:
        prefix = KVCache(1, model.config, T, device, dtype)
        with autocast(device, precision):
            # only its keys and values are wanted: last_only skips the logits of P - 1 tokens
            model(torch.tensor([rows[0][:P]], dtype=torch.long, device=device), kv_cache=prefix,
                  last_only=True)
        cache.k.copy_(prefix.k.expand_as(cache.k))  # row 0 to every row, (L, B, Hkv, T, D)
        cache.v.copy_(prefix.v.expand_as(cache.v))  # (L, B, Hkv, T, D)
        cache.pos = P
    # 2) the rows' own tokens in one pass; B = the example's choices (multiple choice, schema)
    # or its one prompt (LM). Padding comes after every scored token and attention is causal,
    # so it changes nothing that is scored.
    ids = torch.full((B, T - P), pad_id, dtype=torch.long)  # (B, T-P) right-padded
    for i, row in enumerate(rows):
        ids[i, :len(row) - P] = torch.tensor(row[P:])
    ids = ids.to(device)
    with autocast(device, precision):
        logits = model(ids, kv_cache=cache)  # (B, T-P, V); column j is position P + j
    # 3) the loss of a token is -log softmax(logits)[token] (cross entropy, in nats); the mean
    # over a span lets answers of 1 and 5 tokens compete fairly
    losses, is_greedy = [], []
    for i, (s, e) in enumerate(zip(starts, ends)):
        scoring = logits[i, s - 1 - P:e - 1 - P]  # (e-s, V)
        targets = ids[i, s - P:e - P]  # (e-s,)
        losses.append(F.cross_entropy(scoring, targets).item())
        is_greedy.append(bool(torch.equal(scoring.argmax(-1), targets)))
    return losses, is_greedy


def evaluate_example(model, tok, task: dict, idx: int, max_len: int, device,
                     precision: str) -> tuple:
    """(is_correct, is_cropped) of example idx of a task from load_core_tasks."""
    examples = task["examples"]
    shots = [examples[i] for i in fewshot_indices(idx, len(examples), task["num_fewshot"])]
    prompts = render_prompts(task["type"], examples[idx], task["delimiter"], shots)
    rows, starts, ends = scored_spans(task["type"], [[tok.bos_id] + tok.encode(p) for p in prompts])
    rows, starts, ends, is_cropped = crop_left(rows, starts, ends, max_len)
    losses, is_greedy = span_scores(model, rows, starts, ends, tok.bos_id, device, precision)
    # LM: right when greedy decoding gives the continuation. Multiple choice and schema: right
    # when the gold row has the lowest mean loss (ties go to the first row, as in nanochat)
    if task["type"] == "language_modeling":
        return is_greedy[0], is_cropped
    return losses.index(min(losses)) == examples[idx]["gold"], is_cropped


# --- CORE over the bundle ---

def core_summary(per_task_counts: dict, baselines: dict) -> dict:
    """{"core", "interval", "num_tasks", "num_examples", "tasks": {label: {"correct", "total",
    "cropped", "accuracy", "centered", "baseline"}}} from counts {label: {"correct", "total",
    "cropped"}} (summed over ranks) and baselines {label: random-guess accuracy as a fraction}.
    "interval" is CORE's 95% interval [low, high] from the tasks' sampling noise."""
    tasks = {}
    for label, c in per_task_counts.items():
        accuracy = c["correct"] / c["total"] if c["total"] else 0.0
        b = baselines[label]
        # centered = (acc - b) / (1 - b): e.g. 4 choices (b = 0.25) and acc 0.40 -> 0.20;
        # guessing -> 0, perfect -> 1, below chance -> negative
        centered = (accuracy - b) / (1 - b)
        tasks[label] = {**c, "accuracy": accuracy, "centered": centered, "baseline": b}
    core = sum(t["centered"] for t in tasks.values()) / max(len(tasks), 1)
    # CORE is a mean of K independent tasks' (acc - b) / (1 - b); a task's accuracy over n
    # examples has variance p (1 - p) / n, so CORE's is sum of p (1 - p) / (n (1 - b)^2) over K^2
    # (normal approximation; a task at 0 or 1 adds nothing, its Wilson interval still shows it)
    variance = sum(t["accuracy"] * (1 - t["accuracy"]) / max(t["total"], 1)
                   / (1 - t["baseline"]) ** 2 for t in tasks.values()) / max(len(tasks), 1) ** 2
    half = 1.96 * math.sqrt(variance)
    return {"core": core, "interval": [core - half, core + half], "num_tasks": len(tasks),
            "num_examples": sum(t["total"] for t in tasks.values()), "tasks": tasks}


def core_lines(summary: dict) -> list:
    """Printable lines of a core_summary: one per task (with its 95% interval), then CORE with
    the number of tasks it averages and CORE_NOTE."""
    lines = []
    for label, t in summary["tasks"].items():
        low, high = wilson_interval(t["correct"], t["total"])
        lines.append(f"core | {label:<32} | {t['correct']:>5,}/{t['total']:<5,} | "
                     f"acc {t['accuracy']:.3f} [{low:.2f}, {high:.2f}] | "
                     f"centered {t['centered']:+.3f} | cropped {t['cropped']}")
    low, high = summary["interval"]
    lines.append(f"core | CORE {summary['core']:.4f} [{low:.4f}, {high:.4f}] = mean centered "
                 f"accuracy of {summary['num_tasks']} tasks, {summary['num_examples']:,} examples | "
                 f"{CORE_NOTE}")
    return lines


def evaluate_core(model, tok, bundle: str, device, precision: str, max_per_task: int = 0,
                  rank: int = 0, world_size: int = 1) -> dict:
    """core_summary of the model on every task of the bundle (zip or folder), each capped at
    max_per_task examples (0 = all), plus "seconds". Under torchrun each rank scores examples
    i % world_size == rank and returns the counts of its share: sum the counts over ranks and call
    core_summary once. Rank 0 prints progress lines (its own share, done/total, rate, eta)."""
    t0 = time.time()
    # every rank loads the same shuffled, capped list, so example idx and its shots are the same
    # everywhere; with 2 ranks, rank 0 scores 0, 2, 4, ... and rank 1 scores 1, 3, 5, ...
    tasks = load_core_tasks(bundle, max_per_task)
    max_len = model.cos.size(1)  # the rotary table's length: 10 x seq_len (gpt.py)
    mine = {t["label"]: range(rank, len(t["examples"]), world_size) for t in tasks}
    progress = Progress("core", sum(map(len, mine.values())), "examples") if rank == 0 else None
    done = 0
    counts = {}
    for task in tasks:
        c = counts[task["label"]] = {"correct": 0, "total": 0, "cropped": 0}
        for idx in mine[task["label"]]:
            is_correct, is_cropped = evaluate_example(model, tok, task, idx, max_len, device,
                                                      precision)
            c["correct"] += int(is_correct)
            c["total"] += 1
            c["cropped"] += int(is_cropped)
            done += 1
            if progress:
                progress.update(done)
    if progress:
        progress.update(done, is_final=True)
    summary = core_summary(counts, {t["label"]: t["baseline"] for t in tasks})
    return {**summary, "seconds": time.time() - t0}


# --- the tokenizer's compression ---

def tokenizer_samples(run_dir: str, max_chars: int = 200_000) -> dict:
    """{kind: text} of each kind of text the pipeline meets, each cut to about max_chars: the
    pinned val shard, chat conversations, GSM8K, HumanEval code, and NON_ENGLISH_TEXT."""
    # The tokenizer is trained on pretraining text only; the other kinds show what the later
    # phases pay for that: a chat, a math solution or code that packs fewer bytes into a token
    # fills a context sooner and costs more forward passes per answer.
    def take(texts):
        out, size = [], 0
        for text in texts:
            if size >= max_chars:
                break
            out.append(text)
            size += len(text)
        return "\n".join(out)[:max_chars]
    return {
        "val shard (pretraining text)": take(read_texts(shard_paths(run_dir, "val")[0])),
        "chat (SmolTalk test)": take(m["content"] for row in task_rows(run_dir, "smoltalk-test")
                                     for m in row["messages"]),
        "math (GSM8K test)": take(f"{r['question']}\n{r['answer']}"
                                  for r in task_rows(run_dir, "gsm8k-test")),
        "code (HumanEval)": take(r["prompt"] + r["canonical_solution"]
                                 for r in task_rows(run_dir, "humaneval")),
        "non-English (fixed sample in core.py)": NON_ENGLISH_TEXT,
    }


def tokenizer_eval(tok, samples: dict) -> dict:
    """{"vocab_size", "texts": {kind: {"bytes", "tokens", "bytes_per_token"}}} of tok on samples
    {kind: text}: how many UTF-8 bytes a token carries on each kind (more = better compression)."""
    # bytes per token is nanochat tok_eval's "ratio": 4.5 on English prose means a 1,000-token
    # context holds ~4,500 characters; text the tokenizer rarely saw in training (code, other
    # scripts) falls apart into short tokens, down to ~1 byte each for unseen scripts
    texts = {}
    for kind, text in samples.items():
        num_bytes = len(text.encode("utf-8"))
        num_tokens = len(tok.encode(text))
        texts[kind] = {"bytes": num_bytes, "tokens": num_tokens,
                       "bytes_per_token": num_bytes / max(num_tokens, 1)}
    return {"vocab_size": tok.vocab_size, "texts": texts}
