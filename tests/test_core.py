"""
Tests of core.py: CORE prompts, scored spans, scoring with a model whose answers we control,
centered accuracy and CORE, the rank split, cropping, the bundle loader and the tokenizer table.
"""
import os
import random
import tempfile
import unittest
import zipfile
from core import (TASK_TYPES, core_lines, core_summary, crop_left, evaluate_core, evaluate_example,
                 fewshot_indices, load_core_tasks, parse_core_yaml, read_bundle_file,
                 render_prompts, scored_spans, span_scores, tokenizer_eval, tokenizer_samples)

import torch

from bpe import Tokenizer
from gpt import GPTConfig
from report import CORE_NOTE
from tests.fixtures import MIRROR, byte_gpt, prepared_run_dir, quiet, write_bundle

BYTES = Tokenizer([])  # byte-level: one token per byte, so token positions are easy to count
CPU = torch.device("cpu")


class BigramModel(torch.nn.Module):
    """Fake GPT whose logits at a position depend only on the token there: table[id] (V,)."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (V, V)
        # the smallest config a KVCache accepts; the fake never reads what the cache holds
        self.config = GPTConfig(seq_len=64, vocab_size=len(table), n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=2)

    def forward(self, ids, kv_cache=None, last_only=False):
        if kv_cache is not None:
            kv_cache.pos += ids.shape[1]
        return self.table[ids[:, -1:] if last_only else ids]  # (B, T or 1, V)


def bigram(pairs: dict) -> BigramModel:
    """A BigramModel over the byte tokenizer's ids; pairs {(prev, next char): logit}, others 0."""
    table = torch.zeros(BYTES.vocab_size, BYTES.vocab_size)  # (V, V)
    for (prev, nxt), logit in pairs.items():
        table[BYTES.bos_id if prev == "<bos>" else ord(prev), ord(nxt)] = logit
    return BigramModel(table)


def test_core_render_prompts_known_strings():
    """Each task type renders the hand-written prompt: answered shots, blank lines, delimiter."""
    shots = [{"query": "F1?", "choices": ["w", "x"], "gold": 1},
             {"query": "F2?", "choices": ["v"], "gold": 0}]
    item = {"query": "Q?", "choices": ["a", "b"]}
    got = render_prompts("multiple_choice", item, "\nAnswer: ", shots)
    assert got == ["F1?\nAnswer: x\n\nF2?\nAnswer: v\n\nQ?\nAnswer: a",
                   "F1?\nAnswer: x\n\nF2?\nAnswer: v\n\nQ?\nAnswer: b"], f"multiple choice: {got}"
    shots = [{"context_options": ["He ran", "She ran"], "continuation": "home.", "gold": 1}]
    item = {"context_options": ["A", "B"], "continuation": "fell."}
    got = render_prompts("schema", item, " ", shots)
    assert got == ["She ran home.\n\nA fell.", "She ran home.\n\nB fell."], f"schema: {got}"
    shots = [{"context": " S1 \n", "continuation": "one"}]
    item = {"context": "ctx  ", "continuation": " cont"}
    got = render_prompts("language_modeling", item, "\nAnswer: ", shots)
    assert got == ["S1\nAnswer: one\n\nctx\nAnswer:", "S1\nAnswer: one\n\nctx\nAnswer:  cont"], \
        f"LM (contexts trimmed, the prompt without the continuation stripped): {got}"
    got = render_prompts("multiple_choice", {"query": "Q", "choices": ["a"]}, " ", [])
    assert got == ["Q a"], f"0-shot: {got}"


def test_core_fewshot_indices_exclude_the_example():
    """Shots are nanochat's Random(1234 + idx) sample of the other examples, never the example."""
    for n, idx in [(20, i) for i in range(20)] + [(1000, 0), (1000, 517), (1000, 999)]:
        got = fewshot_indices(idx, n, 10)
        expected = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], 10)
        assert got == expected and idx not in got, f"idx {idx} of {n}: {got}; seed or pool is off"
    assert sorted(fewshot_indices(0, 4, 10)) == [1, 2, 3], "below k+1 examples: all the others"


def test_core_scored_spans():
    """MC scores after the common prefix, schema the common suffix, LM the continuation."""
    rows, starts, ends = scored_spans("multiple_choice", [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]])
    assert (starts, ends) == ([2, 2, 2], [4, 5, 3]), f"multiple choice: {starts}, {ends}"
    rows, starts, ends = scored_spans("multiple_choice", [[1, 2], [1, 2, 3]])
    assert starts == [1, 1], "a choice that prefixes another still scores its last token"
    rows, starts, ends = scored_spans("schema", [[1, 8, 5, 6], [1, 9, 9, 5, 6]])
    assert (starts, ends) == ([2, 3], [4, 5]), f"schema: {starts}, {ends}"
    rows, starts, ends = scored_spans("language_modeling", [[1, 2, 3], [1, 2, 3, 4, 5]])
    assert (rows, starts, ends) == ([[1, 2, 3, 4, 5]], [3], [5]), "LM scores only the continuation"


def test_core_mc_picks_lowest_mean_loss_after_common_prefix():
    """Multiple choice: mean (not summed) loss over the tokens after the common prefix decides."""
    # choices " a" and " bc" after "Q": prefix [bos, Q, ' '], spans [a] and [b, c].
    # l(a|' ') ~ 5.1, l(b|' ') ~ 0.1, l(c|b) = ln 265 ~ 5.6: the mean picks " bc" (2.8 < 5.1),
    # a sum would pick " a" (5.1 < 5.7)
    model = bigram({(" ", "b"): 8.0, (" ", "a"): 3.0})
    task = {"type": "multiple_choice", "num_fewshot": 0, "delimiter": " ",
            "examples": [{"query": "Q", "choices": ["a", "bc"], "gold": 1}]}
    assert evaluate_example(model, BYTES, task, 0, 100, CPU, "fp32") == (True, False), \
        "the answer with the lowest MEAN loss over its own tokens must win"
    task["examples"][0]["gold"] = 0
    got = evaluate_example(model, BYTES, task, 0, 100, CPU, "fp32")
    assert got == (False, False), f"with gold 0 the same pick is wrong: {got}"


def test_core_schema_scores_only_the_common_suffix():
    """Schema: the context tokens' own losses are ignored, only the shared continuation counts."""
    # <bos> -> B is likely (would favour B if the context were scored), but "A" -> " " is likelier
    model = bigram({("<bos>", "B"): 9.0, ("A", " "): 9.0})
    task = {"type": "schema", "num_fewshot": 0, "delimiter": " ",
            "examples": [{"context_options": ["A", "B"], "continuation": "end", "gold": 0}]}
    assert evaluate_example(model, BYTES, task, 0, 100, CPU, "fp32")[0], \
        "schema must score the continuation after each context, not the context itself"


def test_core_lm_needs_greedy_exact_match():
    """LM: right only when the argmax at every continuation position is the continuation token."""
    pairs = {("x", " "): 5.0, (" ", "y"): 5.0, ("y", "z"): 5.0}
    task = {"type": "language_modeling", "num_fewshot": 0, "delimiter": " ",
            "examples": [{"context": "x", "continuation": "yz"}]}
    assert evaluate_example(bigram(pairs), BYTES, task, 0, 100, CPU, "fp32")[0], \
        "greedy decoding reproduces ' yz', so the example is right"
    wrong = bigram({**pairs, ("y", "q"): 6.0})  # after "y" the model now prefers "q"
    assert not evaluate_example(wrong, BYTES, task, 0, 100, CPU, "fp32")[0], \
        "one wrong greedy token must fail the example"


def test_core_span_scores_match_one_full_forward():
    """Prefix once through the KV cache + stacked tails give nanochat's one-pass losses (oracle)."""
    model = byte_gpt(seed=1)
    bos = BYTES.bos_id
    mc = [[bos] + BYTES.encode("Q: 2+2?\nA: four"), [bos] + BYTES.encode("Q: 2+2?\nA: five!")]
    schema = [[bos] + BYTES.encode("A cat sat."), [bos] + BYTES.encode("The dog sat.")]
    lm = [[bos] + BYTES.encode("ctx:"), [bos] + BYTES.encode("ctx: cont")]
    cases = [scored_spans("multiple_choice", mc), scored_spans("schema", schema),
             scored_spans("language_modeling", lm), ([[bos, 97, 98], [bos, 99]], [1, 1], [3, 2])]
    assert cases[0][1] == [13, 13] and cases[1][1] == [6, 8], "spans of the cases moved"
    for rows, starts, ends in cases:
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), bos)  # (B, T) the oracle: every row whole, one pass
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        with torch.no_grad():
            logits = model(ids)  # (B, T, V)
        expected = [torch.nn.functional.cross_entropy(logits[i, s - 1:e - 1], ids[i, s:e]).item()
                    for i, (s, e) in enumerate(zip(starts, ends))]
        greedy = [bool(torch.equal(logits[i, s - 1:e - 1].argmax(-1), ids[i, s:e]))
                  for i, (s, e) in enumerate(zip(starts, ends))]
        for pad_id in (bos, 0, 98):
            losses, is_greedy = span_scores(model, rows, starts, ends, pad_id, CPU, "fp32")
            error = max(abs(a - b) for a, b in zip(losses, expected))
            assert error < 1e-4 and is_greedy == greedy, \
                f"rows {rows}: got {losses} {is_greedy}, one pass gives {expected} {greedy} " \
                "(the shared prefix, its cache copy or the column offset is off, or padding leaks)"


def test_core_crop_left_keeps_scored_tokens():
    """Rows longer than the context lose their first tokens; the span moves and stays intact."""
    rows, starts, ends, is_cropped = crop_left([[1, 2, 3, 4, 5, 6], [1, 2, 3]], [4, 1], [6, 3], 4)
    assert (rows, starts, ends) == ([[3, 4, 5, 6], [1, 2, 3]], [2, 1], [4, 3]) and is_cropped, \
        f"got {rows}, {starts}, {ends}"
    assert not crop_left([[1, 2, 3]], [1], [3], 3)[3], "a row that fits is not cropped"


def test_core_summary_known_values():
    """Centered accuracy (acc - b)/(1 - b), CORE as their mean and its 95% interval, on
    hand-computed numbers."""
    counts = {"a": {"correct": 8, "total": 10, "cropped": 1},
              "b": {"correct": 1, "total": 4, "cropped": 0}}
    s = core_summary(counts, {"a": 0.5, "b": 0.25})
    centered = [s["tasks"][k]["centered"] for k in "ab"]
    assert abs(centered[0] - 0.6) < 1e-9 and abs(centered[1]) < 1e-9, f"centered {centered}"
    assert abs(s["core"] - 0.3) < 1e-9 and s["num_tasks"] == 2 and s["num_examples"] == 14, s
    # variance (0.8 * 0.2 / 10 / 0.5**2 + 0.25 * 0.75 / 4 / 0.75**2) / 2**2 = 0.0368333
    half = 1.96 * 0.0368333 ** 0.5  # 0.3762
    assert all(abs(a - b) < 1e-4 for a, b in zip(s["interval"], (0.3 - half, 0.3 + half))), s
    lines = core_lines(s)
    assert "2 tasks" in lines[-1] and CORE_NOTE in lines[-1], "CORE must say what it averages"
    assert "8/10" in lines[0] and "cropped 1" in lines[0], f"per-task line: {lines[0]}"


def test_core_bundle_loads_shuffles_and_caps():
    """A zip and its unzipped folder load alike: types, delimiters, baselines, shuffle, cap."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(os.path.join(tmp, "eval_bundle.zip"))
        tasks = load_core_tasks(bundle, max_per_task=5)
        with zipfile.ZipFile(bundle) as z:
            z.extractall(tmp)
        folder = load_core_tasks(os.path.join(tmp, "eval_bundle"), 5)
    assert folder == tasks, "the zip and the folder it unzips to must load the same tasks"
    assert [(t["label"], t["type"], t["num_fewshot"], t["delimiter"]) for t in tasks] == [
        ("mc", "multiple_choice", 2, " "), ("sc", "schema", 0, " "),
        ("lm", "language_modeling", 1, "\nA: ")]
    assert abs(tasks[0]["baseline"] - 0.333) < 1e-9, "the CSV's baseline is in percent"
    order = list(range(9))
    random.Random(1337).shuffle(order)
    assert [e["query"] for e in tasks[0]["examples"]] == [f"q{i}?" for i in order[:5]], \
        "examples must be shuffled with Random(1337) and then capped, as nanochat does"


def test_core_same_counts_twice_and_for_any_rank_split():
    """Counts are the same twice and summed over 2 ranks equal 1 rank's; cropped prompts counted."""
    model = byte_gpt(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(os.path.join(tmp, "eval_bundle.zip"))
        with quiet():
            runs = [evaluate_core(model, BYTES, bundle, CPU, "fp32") for _ in range(2)]
            shares = [evaluate_core(model, BYTES, bundle, CPU, "fp32", rank=r, world_size=2)
                      for r in range(2)]
        tasks = load_core_tasks(bundle)
    keys = ("correct", "total", "cropped")
    one = {k: {n: t[n] for n in keys} for k, t in runs[0]["tasks"].items()}
    assert runs[0]["tasks"] == runs[1]["tasks"], "the same model gave different counts twice"
    summed = {k: {n: sum(s["tasks"][k][n] for s in shares) for n in keys} for k in one}
    assert summed == one, f"2 ranks summed {summed} != 1 rank {one}: the split lost examples"
    merged = core_summary(summed, {k: t["baseline"] for k, t in runs[0]["tasks"].items()})
    assert merged["core"] == runs[0]["core"], "core_summary of the summed counts differs"
    # the 800-character LM example (> 640 positions) is cropped where it is asked and where it is
    # the shot of another example
    long = next(i for i, e in enumerate(tasks[2]["examples"]) if len(e["context"]) == 800)
    expected = sum(idx == long or fewshot_indices(idx, 9, 1) == [long] for idx in range(9))
    assert one["lm"]["cropped"] == expected and one["mc"]["cropped"] == 0, \
        f"expected {expected} cropped LM prompts (the long example and where it is the shot): {one}"
    assert runs[0]["num_tasks"] == 3 and runs[0]["num_examples"] == 27, runs[0]


def test_core_tokenizer_eval():
    """Bytes per token: 1.0 for a byte-level tokenizer on any text; every kind of text sampled."""
    got = tokenizer_eval(BYTES, {"ascii": "hello", "korean": "한국"})["texts"]
    assert got["ascii"] == {"bytes": 5, "tokens": 5, "bytes_per_token": 1.0}, got
    assert got["korean"]["bytes"] == 6 and got["korean"]["bytes_per_token"] == 1.0, got
    samples = tokenizer_samples(prepared_run_dir()[2], max_chars=2000)
    assert len(samples) == 5 and all(0 < len(text) <= 2000 for text in samples.values()), \
        {k: len(v) for k, v in samples.items()}


def test_core_mirror_bundle_has_18_tasks():
    """The mirror's bundle: 18 tasks load, render and tokenize; the 22-task yaml parses too."""
    bundle = os.path.join(MIRROR, "karpathy-public.s3.us-west-2.amazonaws.com", "eval_bundle.zip")
    if not os.path.exists(bundle):
        raise unittest.SkipTest("no ../shared/mirror")
    tasks = load_core_tasks(bundle, max_per_task=3)
    labels = [t["label"] for t in tasks]
    assert len(tasks) == 18 and {t["type"] for t in tasks} == set(TASK_TYPES), labels
    for t in tasks:
        prompts = render_prompts(t["type"], t["examples"][0], t["delimiter"], t["examples"][1:])
        scored_spans(t["type"], [[BYTES.bos_id] + BYTES.encode(p) for p in prompts])
    original = parse_core_yaml(read_bundle_file(bundle, "core_original_22tasks.yaml"))
    assert len(original) == 22 and original[0]["label"] == "hellaswag_zeroshot", "the 22-task yaml"
