"""
Tests of evals.py: bits per byte on a known answer, the letter restriction of multiple choice,
GSM8K answers, HumanEval programs (run in the sandbox), too-long problems, ChatCORE's known
values, the rank split, and the chat-quality counts on hand-made answers.
"""
import math

import torch

from bpe import Tokenizer
from chat import render_for_completion
from evals import (answer_counts, assistant_nats, chat_summary, evaluate_bpb, evaluate_chat,
                   evaluate_quality, final_answer, humaneval_program, merge_counts, pick_letter,
                   quality_summary, template_of)
from gpt import GPT, GPTConfig
from sandbox import run_program
from tasks import multiple_choice, spelling_bee, to_conversation
from tests.fixtures import ScriptedModel, quiet

TOK = Tokenizer([])  # 256 bytes + 9 specials: every ordinary token is exactly one byte
HUMANEVAL_ROW = {"prompt": 'def add(a, b):\n    """Return a + b."""\n', "entry_point": "add",
                 "canonical_solution": "    return a + b\n",
                 "test": "def check(f):\n    assert f(2, 3) == 5\n"}


class FixedLogits(torch.nn.Module):
    """Fake GPT whose logits at every position are `logits` (V,); records each input's shape."""

    def __init__(self, logits, seq_len=256):
        super().__init__()
        self.config = GPTConfig(seq_len=seq_len, vocab_size=len(logits), n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=2)
        self.logits = torch.nn.Parameter(logits)
        self.fed = []

    def forward(self, ids):
        self.fed.append(tuple(ids.shape))
        return self.logits.expand(*ids.shape, -1)  # (B, T, V)


def gsm8k(question, solution):
    """A GSM8K conversation as tasks.py builds it from a parquet row."""
    return to_conversation("gsm8k", {"question": question, "answer": solution})


def scripted(text, seq_len=64):
    """A ScriptedModel that answers `text` then <|assistant_end|>, whatever it is asked."""
    config = GPTConfig(seq_len=seq_len, vocab_size=TOK.vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=2)
    return ScriptedModel(config, TOK.encode(text) + [TOK.special_id("<|assistant_end|>")])


def chat_counts(*args, **kwargs):
    """evaluate_chat without its progress lines."""
    with quiet():
        return evaluate_chat(*args, **kwargs)


def tiny_gpt(seq_len=256, is_random=True):
    """A 1-layer GPT over the byte tokenizer; 256 tokens of context fit a multiple-choice prompt.
    A fresh GPT has zero output layers (uniform logits); is_random fills them, so text varies."""
    torch.manual_seed(0)
    config = GPTConfig(seq_len=seq_len, vocab_size=TOK.vocab_size, n_layer=1, n_head=2,
                       n_kv_head=2, n_embd=32)
    model = GPT(config)
    for p in model.parameters():
        if is_random and p.dim() == 2 and not p.any():
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_evals_bpb_known_answer():
    """A fresh GPT (zero lm_head: uniform logits) on 1-byte tokens scores log2(V) bits per byte."""
    model = tiny_gpt(seq_len=16, is_random=False)
    rows = torch.randint(0, 256, (5, 17))  # (N, T+1) byte ids only
    token_bytes = torch.tensor(TOK.token_byte_lengths())
    bpb, nats = evaluate_bpb(model, rows, token_bytes, torch.device("cpu"), "fp32", batch_size=2)
    V = TOK.vocab_size
    assert abs(nats - math.log(V)) < 1e-4, f"{nats} nats/token, expected ln {V}: loss/init broken"
    assert abs(bpb - math.log2(V)) < 1e-4, f"bpb {bpb}, expected log2 {V}: byte counting broken"


def test_evals_letter_restriction():
    """Multiple choice picks the likeliest of the choice letters, in one forward pass at batch 1."""
    logits = torch.zeros(TOK.vocab_size)
    for char, value in {"Z": 9.0, "x": 8.0, "C": 3.0, "A": 2.0}.items():
        logits[TOK.encode(char)[0]] = value
    model = FixedLogits(logits)
    question = multiple_choice("Which?", ["one", "two", "three", "four"], list("ABCD"), "C")
    assert pick_letter(model, TOK, question) == "C", "the letter must come from the choices only"
    prompt = render_for_completion(TOK, question)
    assert model.fed == [(1, len(prompt))], f"fed {model.fed}: want one pass over the whole prompt"
    three = multiple_choice("Which?", ["one", "two"], list("AB"), "A")
    assert pick_letter(model, TOK, three) == "A", "letters outside the question must not count"
    long = multiple_choice("Why? " * 60, ["a", "b"], list("AB"), "A")
    assert pick_letter(model, TOK, long) is None, "a prompt over seq_len must be reported too long"
    counts = chat_counts(model, TOK, {"ARC-Easy": [question, long, three]})
    assert counts == {"ARC-Easy": {"correct": 2, "total": 3, "too_long": 1}}, \
        f"{counts}: a too-long question must stay in the total as a failure"


def test_evals_final_answer_extraction():
    """The number after '####': commas dropped, negatives kept, a missing answer is wrong."""
    cases = {"so #### 1,200": "1200", "#### -7": "-7", "#### 0.5 then #### 9": "0.5",
             "#### 18.": "18", "the answer is 42": None, "####42": None}
    for text, expected in cases.items():
        got = final_answer(text)
        assert got == expected, f"{text!r} -> {got!r}, not {expected!r}"
    problem = gsm8k("Pay?", "Half of 48 is <<48/2=24>>24.\n#### 1,024")
    counts = chat_counts(scripted("It is #### 1024"), TOK, {"GSM8K": [problem]})
    assert counts["GSM8K"]["correct"] == 1, f"'#### 1024' must match '#### 1,024': {counts}"
    counts = chat_counts(scripted("It is 1024"), TOK, {"GSM8K": [problem]})
    assert counts["GSM8K"]["correct"] == 0, "an answer without '####' must count as wrong"


def test_evals_humaneval_program_assembly():
    """Prompt + the model's code + tests + check(entry_point): whole functions and bodies pass."""
    problem = to_conversation("humaneval", HUMANEVAL_ROW)
    whole = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    expected = (HUMANEVAL_ROW["prompt"] + "\ndef add(a, b):\n    return a + b\n\n"
                + HUMANEVAL_ROW["test"] + "\ncheck(add)\n")
    assert humaneval_program(problem, whole) == expected, "code block not extracted as expected"
    for completion in (whole, "\n    return a + b\n", "def add(a, b):\n    return b + a"):
        result = run_program(humaneval_program(problem, completion))
        assert result["passed"], f"{completion!r} should pass: {result['reason']}"
    wrong = run_program(humaneval_program(problem, "def add(a, b):\n    return a - b"))
    assert not wrong["passed"] and "AssertionError" in wrong["reason"], wrong["reason"]
    model = scripted("def add(a, b):\n    return a + b\n", seq_len=256)
    counts = chat_counts(model, TOK, {"HumanEval": [problem]})
    assert counts["HumanEval"]["correct"] == 1, f"a right generated answer failed: {counts}"


def test_evals_chatcore_known_values():
    """Centered accuracies and ChatCORE from summed counts; SpellingBee stays out of ChatCORE."""
    counts = {"ARC-Easy": (50, 100), "ARC-Challenge": (25, 100), "MMLU": (100, 100),
              "GSM8K": (1, 10), "HumanEval": (0, 10), "SpellingBee": (9, 10)}
    counts = {name: {"correct": c, "total": n, "too_long": 0} for name, (c, n) in counts.items()}
    summary = chat_summary(counts)
    centered = {name: round(t["centered"], 4) for name, t in summary["tasks"].items()}
    assert centered == {"ARC-Easy": 0.3333, "ARC-Challenge": 0.0, "MMLU": 1.0, "GSM8K": 0.1,
                        "HumanEval": 0.0, "SpellingBee": 0.9}, f"centered accuracies {centered}"
    expected = (1 / 3 + 0 + 1 + 0.1 + 0) / 5
    assert abs(summary["ChatCORE"] - expected) < 1e-9, f"ChatCORE {summary['ChatCORE']}"
    low, high = summary["tasks"]["ARC-Easy"]["interval"]
    assert low < 0.5 < high, "every accuracy needs its 95% interval"
    del counts["HumanEval"]
    assert chat_summary(counts)["ChatCORE"] is None, "ChatCORE needs all five of its tasks"


def test_evals_generated_too_long_counts_as_failure():
    """A generated problem whose prompt and reference answer overflow the context is too long."""
    short = gsm8k("1+1?", "It is <<1+1=2>>2.\n#### 2")
    long = gsm8k("Sum " * 20 + "?", "It is <<1+1=2>>2.\n#### 2")  # 80 characters of question
    counts = chat_counts(scripted("#### 2"), TOK, {"GSM8K": [short, long]})
    assert counts == {"GSM8K": {"correct": 1, "total": 2, "too_long": 1}}, f"{counts}"


def test_evals_rank_split_gives_the_same_counts():
    """Two ranks' counts sum to one process's, and the same model evaluated twice agrees."""
    questions = [multiple_choice(f"q{i}?", list("wxyz"), list("ABCD"), "ABCD"[i % 4])
                 for i in range(5)]
    problems = [gsm8k(f"{i}+1?", f"It is <<{i}+1={i + 1}>>{i + 1}.\n#### {i + 1}")
                for i in range(3)]
    tasks = {"ARC-Easy": questions, "MMLU": questions[::-1], "GSM8K": problems,
             "HumanEval": [to_conversation("humaneval", HUMANEVAL_ROW)],
             "SpellingBee": spelling_bee(["cat", "dog"], 2, "test")}
    model = tiny_gpt()
    whole = chat_counts(model, TOK, tasks, max_tokens=8)
    split = merge_counts([chat_counts(model, TOK, tasks, max_tokens=8, rank=r, world_size=2)
                          for r in range(2)])
    assert split == whole, f"1 process {whole} != 2 ranks summed {split}"
    assert chat_counts(model, TOK, tasks, max_tokens=8) == whole, "evaluating twice differs"
    assert {n: c["total"] for n, c in whole.items()} == {n: len(v) for n, v in tasks.items()}
    assert whole["ARC-Easy"]["too_long"] == 0 and whole["GSM8K"]["too_long"] == 0, f"{whole}"
    prompts = ["Hello!", "How are you?", "Tell me a joke."]
    short = tiny_gpt(seq_len=64)  # answers end at the context: a few dozen tokens each
    one = evaluate_quality(short, TOK, problems, prompts=prompts)
    two = merge_counts([evaluate_quality(short, TOK, problems, rank=r, world_size=2,
                                         prompts=prompts) for r in range(2)])
    assert one["samples"] == two["samples"] and one["ngrams"] == two["ngrams"], "quality differs"
    assert abs(one["nats"] - two["nats"]) < 1e-3 and one["bytes"] == two["bytes"], "bpb differs"


def test_evals_quality_counts_on_hand_made_answers():
    """Ending share, pooled repeated 4-grams and template detection on answers written by hand."""
    end = TOK.special_id("<|assistant_end|>")
    loop = TOK.encode("abababab")  # 8 tokens: 5 windows, 2 distinct -> 3 repeats
    fresh = TOK.encode("abcdefg") + [end]  # 4 windows, none repeated; ended
    counts = merge_counts([answer_counts(TOK, loop), answer_counts(TOK, fresh)])
    assert (counts["ngrams"], counts["repeats"], counts["ended"]) == (9, 3, 1), f"{counts}"
    templated = {"We are asked to count the letter 'r'. Let me spell it out first.": "spelling",
                 "apple:a,p,p,l,e": "spelling", "So she pays 5.\n#### 5": "gsm8k",
                 " B": "choice letter",
                 "The sky is blue because of the way air scatters light.": None}
    for text, expected in templated.items():
        assert template_of(TOK, TOK.encode(text), text) == expected, f"{text!r} is not {expected}"
    call = [TOK.special_id("<|python_start|>")] + TOK.encode("2+2")
    assert template_of(TOK, call, "2+2") == "calculator", "a calculator call is a template too"
    # SpellingBee checks its count with a python call too: the text says which template it is
    check = "Let me double check this using Python:\n\n'friend'.count('e')1"
    ids = TOK.encode(check[:40]) + call[:1] + TOK.encode(check[40:])
    assert template_of(TOK, ids, check) == "spelling", "SpellingBee's check named a calculator call"
    summary = quality_summary({**counts, "templated": 1, "nats": 2 * math.log(2), "bytes": 4,
                               "samples": []})
    shares = (summary["ended_share"], summary["repeat_share"], summary["template_share"])
    assert shares == (0.5, 1 / 3, 0.5), f"ended, repeated, templated shares {shares}"
    assert abs(summary["smoltalk_bpb"] - 0.5) < 1e-12, f"bpb {summary['smoltalk_bpb']}"


def test_evals_assistant_bpb_scores_only_the_assistant():
    """A uniform model scores ln V on each assistant token (the end too), bytes only on its text."""
    model = tiny_gpt(seq_len=32, is_random=False)  # zero lm_head: uniform logits
    chat = {"messages": [{"role": "user", "content": "hi there"},
                         {"role": "assistant", "content": "yo"}]}
    nats, num_bytes = assistant_nats(model, TOK, chat, torch.tensor(TOK.token_byte_lengths()))
    assert num_bytes == 2, f"{num_bytes} bytes: only 'yo' is the assistant's text"
    expected = 3 * math.log(TOK.vocab_size)  # y, o, <|assistant_end|>
    assert abs(nats - expected) < 1e-3, f"{nats} nats: want the 3 assistant tokens at ln V each"
