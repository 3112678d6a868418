"""
Evaluation: bits per byte, greedy samples, the chat benchmarks with ChatCORE, and a measure of
how a chat model talks.

Used by train.py (during training) and train_all.py (its eval phase); imports gpt (autocast),
chat (the chat template), data (the validation rows), tasks (the benchmarks as conversations),
sampler (the one sampler, calculator included), sandbox (HumanEval's programs run there), report
(intervals) and cli (progress lines). Returns plain numbers, lists and dicts, which eval.json can
hold.

Design:
- bits per byte, not loss per token, is the headline number: a loss per token depends on the
  tokenizer (a bigger vocabulary packs more bytes into a token), bits per byte does not. Every
  target is scored, <|bos|> included; special tokens count 0 bytes, so the cost of predicting
  where a document ends is charged to its bytes. The val rows are the pinned shard, in order
- samples and the benchmarks' answers are greedy (temperature 0, no penalty): the same weights
  always write the same text, so two checkpoints differ only because their weights do
- multiple choice (ARC, MMLU) is nanochat's: one forward pass over the question, and at the
  position after <|assistant_start|> only the logits of the choice letters are compared. One
  question per pass (no padded batch), so a result never depends on its neighbours
- GSM8K, HumanEval and SpellingBee are generated through sampler.generate (which runs the
  calculator); GSM8K and SpellingBee compare the number after "####", HumanEval runs the prompt,
  the model's code and the tests in sandbox.run_program
- a capped eval takes the first N examples of nanochat's fixed shuffle (tasks.load_task, seed
  42), not of the file: a fixed random sample, the same on every machine, rank and run
- a problem that does not fit the context is a failure counted as too_long, never dropped:
  multiple choice needs its prompt to fit, a generated task its prompt plus its reference answer
  (a model answering the way it was taught could not finish otherwise)
- results are counts, which torchrun's ranks sum (merge_counts); chat_summary turns the sums
  into accuracies, 95% Wilson intervals and ChatCORE once. ChatCORE is nanochat HEAD's: the mean
  over ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval of (acc - b) / (1 - b), b = 0.25 for
  the three multiple-choice tasks and 0 for the generated ones. SpellingBee stands beside it
  (nanochat OLD averaged it in, which lifted ChatCORE from about 0.09 to 0.27)
- the chat-quality measure answers QUALITY_PROMPTS at the chat defaults (SampleConfig: temperature
  0.6, top-k 50, frequency penalty 0.5, 256 tokens; prompt i uses seed i; the summary names them)
  and counts answers that end by themselves, repeated 4-grams, and answers caught in a training
  template nobody asked for; plus bits per byte of the assistant's tokens on SmolTalk's test split

Left out on purpose:
- pass@k (nanochat's num_samples > 1): one greedy answer per problem
- nanochat excludes the nats of special-token targets from bpb; we keep them (see above)

References:
- nanochat loss_eval.py, chat_eval.py, tasks/: https://github.com/karpathy/nanochat
- bits per byte as a tokenizer-free measure (The Pile, section 5): https://arxiv.org/abs/2101.00027
- GSM8K: https://arxiv.org/abs/2110.14168; HumanEval: https://arxiv.org/abs/2107.03374
"""
import dataclasses
import math
import re

import numpy as np
import torch

from chat import render_conversation, render_for_completion
from cli import Progress
from data import val_rows
from gpt import autocast
from report import wilson_interval
from sampler import SampleConfig, generate, stream_text
from sandbox import run_program
from tasks import load_task, spelling_bee, spelling_words

# nanochat base_train.py's prompts for the base model: facts, a little reasoning, a list, arithmetic
BASE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                "The planets of the solar system are:", "My favorite color is",
                "If 5*x + 3 = 13, then x is"]
# questions for the chat models: small talk, a fact, an explanation, the calculator tool
CHAT_PROMPTS = ["Tell me a joke.", "What is the capital of France?", "Why is the sky blue?",
                "What is 12 + 30?"]
# chat eval -> (tasks.py dataset, "choice" or "generate", accuracy of random guessing). ARC has
# a few 3- and 5-choice questions; nanochat uses 0.25 for both ARC tasks all the same
CHAT_TASKS = {
    "ARC-Easy": ("arc-easy-test", "choice", 0.25),
    "ARC-Challenge": ("arc-challenge-test", "choice", 0.25),
    "MMLU": ("mmlu-test", "choice", 0.25),
    "GSM8K": ("gsm8k-test", "generate", 0.0),
    "HumanEval": ("humaneval", "generate", 0.0),
    "SpellingBee": ("", "generate", 0.0),  # made by tasks.spelling_bee, not downloaded
}
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")  # nanochat HEAD
SPELLING_BEE_SIZE = 256  # nanochat OLD chat_eval.py: SpellingBee(size=256, split="test")
# the final answer of GSM8K and SpellingBee: nanochat's pattern, from GSM8K's own grader
ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
CODE_BLOCK_RE = re.compile(r"```(?:python)?[ \t]*\n(.*?)\n```", re.DOTALL)  # a fenced code block

# Everyday prompts for the chat-quality measure: small talk, questions, requests. None asks for
# spelling, counting or arithmetic, so any answer in those templates is one nobody asked for.
QUALITY_PROMPTS = [
    "Hi! How are you today?",
    "Tell me a joke.",
    "What is the capital of France?",
    "Why is the sky blue?",
    "Can you recommend a good book to read?",
    "What should I cook for dinner tonight?",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "What is your favorite season, and why?",
    "Give me some tips for sleeping better.",
    "What does a computer programmer do?",
    "Explain what a volcano is to a child.",
    "I feel a bit tired today. Any advice?",
    "What are some fun things to do on a rainy day?",
    "Who was William Shakespeare?",
    "How can I learn a new language?",
    "Describe a beautiful place in nature.",
    "What is the difference between a cat and a dog?",
    "Can you help me write an email to thank a friend?",
    "What is the internet?",
    "Why do people like music?",
    "Tell me something interesting about the moon.",
    "How do plants grow?",
    "What makes a good friend?",
]
# The fixed phrases of tasks.py's training templates. SpellingBee's answer ("Let me spell it out
# first", "3:a hit! count=1", "Python gives us 2") and SimpleSpelling's ("apple:a,p,p,l,e");
# GSM8K's final "#### 42"; a bare choice letter, the answer of ARC and MMLU. A calculator call
# (<|python_start|>) is a template too; template_of looks for that token.
TEMPLATES = {
    "spelling": re.compile(r"spell it out|hit! count=|double check this using Python|Python gives"
                           r" us|\b[a-z]+:[a-z](,[a-z])+\b"),
    "gsm8k": re.compile(r"####"),
    "choice letter": re.compile(r"\A\s*[A-E]\s*\Z"),
}


# --- bits per byte and samples ---

def val_tensor(run_dir: str, T: int, max_rows=None) -> torch.Tensor:
    """The first max_rows (None = all) validation rows as int64 (N, T+1): documents, each after its
    <|bos|>, back to back and cut into rows; row[:-1] are the inputs and row[1:] the targets."""
    # np.asarray copies only the rows asked for out of the memory-mapped token cache
    return torch.from_numpy(np.asarray(val_rows(run_dir, T)[:max_rows], dtype=np.int64))  # (N, T+1)


@torch.inference_mode()
def evaluate_bpb(model, rows: torch.Tensor, token_bytes: torch.Tensor, device, precision: str,
                 batch_size: int = 8) -> tuple:
    """(bits per byte, nats per token) of model on rows (N, T+1); token_bytes (V,) is each id's
    UTF-8 length (0 for special tokens), e.g. torch.tensor(tok.token_byte_lengths())."""
    # bpb = (sum of target nats) / (ln 2 * sum of target bytes): nats -> bits is a division by ln 2,
    # e.g. a 2-byte token predicted with p = 1/4 costs ln 4 = 1.386 nats = 2 bits: 1 bit per byte
    nats, num_bytes = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size].to(device)  # (B, T+1)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        with autocast(device, precision):
            loss = model(x, y, loss_reduction="none")  # (B, T) nats per target
        nats += loss.float().sum().item()
        num_bytes += token_bytes[y.cpu()].sum().item()  # (B, T) byte lengths, summed
    num_tokens = rows.shape[0] * (rows.shape[1] - 1)
    return nats / (math.log(2) * num_bytes), nats / num_tokens


def complete(model, tok, ids: list, config: SampleConfig, precision: str = "fp32") -> list:
    """The token ids the model writes after the prompt ids, the stop token included if any."""
    # generate yields (tokens, masks) per step with one entry per row; one row is asked for here.
    # The calculator's forced tokens are part of the answer, as the model reads them back
    steps = generate(model, tok, ids, **dataclasses.asdict(config), precision=precision)
    return [tokens[0] for tokens, _ in steps]


def text_of(tok, ids: list) -> str:
    """The text of token ids; special tokens (the stop token, tool markers) have none."""
    return "".join(stream_text(tok, ids))


def user_turn(text: str) -> dict:
    """A conversation of one user message, ready for render_for_completion."""
    return {"messages": [{"role": "user", "content": text}]}


def greedy_config(max_tokens: int) -> SampleConfig:
    """The settings of every scored or sampled-for-the-log answer: greedy, no penalty."""
    return SampleConfig(temperature=0.0, max_tokens=max_tokens, frequency_penalty=0.0)


def sample(model, tok, is_chat: bool, max_tokens: int, precision: str = "fp32") -> list:
    """Greedy [(prompt, text)]: continuations of BASE_PROMPTS, or answers to CHAT_PROMPTS."""
    greedy = greedy_config(max_tokens)
    out = []
    for prompt in CHAT_PROMPTS if is_chat else BASE_PROMPTS:
        # a chat model gets the prompt as a user turn and answers after <|assistant_start|>; a base
        # model has never seen that format, so it simply continues the text after <|bos|>
        ids = (render_for_completion(tok, user_turn(prompt)) if is_chat
               else [tok.bos_id] + tok.encode(prompt))
        out.append((prompt, text_of(tok, complete(model, tok, ids, greedy, precision))))
    return out


# --- the chat benchmarks: answers and how they are checked ---

def load_chat_tasks(run_dir: str, caps: dict) -> dict:
    """{name: conversations} for each CHAT_TASKS name in caps: the first caps[name] (0 = all) in
    nanochat's fixed order (tasks.load_task's seed-42 shuffle). SpellingBee is generated: its
    first caps[name] test questions (0 = SPELLING_BEE_SIZE)."""
    # NOTE: not the file's first rows: MMLU's test file is sorted by subject, so its first 200
    # rows are all abstract algebra. The shuffled order mixes every subject into any prefix.
    tasks = {}
    for name, cap in caps.items():
        if name not in CHAT_TASKS:
            raise ValueError(f"unknown chat eval {name!r}; the chat evals are {list(CHAT_TASKS)}")
        if name == "SpellingBee":
            tasks[name] = spelling_bee(spelling_words(run_dir), cap or SPELLING_BEE_SIZE, "test")
        else:
            tasks[name] = load_task(run_dir, CHAT_TASKS[name][0])[:cap or None]
    return tasks


@torch.inference_mode()
def pick_letter(model, tok, conversation: dict, precision: str = "fp32"):
    """The choice letter the model ranks first for a multiple-choice conversation (tasks.py's,
    with "letters"), or None when the prompt does not fit the model's context."""
    # the prompt ends in <|assistant_start|>, so the last position predicts the reply's first
    # token; a model trained on seq_len tokens is only asked about prompts that fit in them
    ids = render_for_completion(tok, conversation)
    if len(ids) > model.config.seq_len:
        return None
    letters = conversation["letters"]  # "ABCD"; some ARC questions use "1234" or five letters
    letter_ids = [tok.encode(letter) for letter in letters]
    assert all(len(i) == 1 for i in letter_ids), f"a choice letter is not 1 token: {letter_ids}"
    device = next(model.parameters()).device
    with autocast(device, precision):
        logits = model(torch.tensor([ids], device=device))  # (1, T, V)
    # The next token is the answer. Among the letters only: with logits "Z" 5.0, "B" 2.0, "A" 1.0
    # the choice is "B", although "Z" is likelier. Ties go to the first letter.
    return letters[logits[0, -1, [i[0] for i in letter_ids]].argmax().item()]


def final_answer(text: str):
    """The number after the first '#### ', commas removed: '#### -1,200' -> '-1200'; None if none.

    Compared as text, as nanochat and GSM8K's grader do ('10.0' is not '10'). Deviation: a full
    stop right after the number is dropped ('#### 18.' -> '18'), where nanochat keeps '18.'.
    """
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "").rstrip(".") if match else None


def extract_code(completion: str) -> str:
    """The first ```python fenced block of a completion, else all of it, without the blank lines
    around it; indentation is kept, so a bare function body stays a body."""
    match = CODE_BLOCK_RE.search(completion)
    code = match.group(1) if match else completion
    return code.rstrip().lstrip("\n")


def humaneval_program(conversation: dict, completion: str) -> str:
    """The program a HumanEval answer is judged by: the prompt, the model's code, the task's tests
    and check(entry_point); it exits 0 exactly when the tests pass."""
    # The model is taught (SFT) to answer with the whole function, its signature included: that
    # def replaces the prompt's. A bare body continues the prompt's def instead. Deviation:
    # nanochat puts only the prompt's import lines first, so a bare body fails there.
    return (f"{conversation['prompt']}\n{extract_code(completion)}\n\n"
            f"{conversation['test']}\ncheck({conversation['entry_point']})\n")


def is_solved(name: str, conversation: dict, text: str) -> bool:
    """Whether the generated text solves a GSM8K, HumanEval or SpellingBee conversation."""
    if name == "HumanEval":
        return run_program(humaneval_program(conversation, text))["passed"]
    # the reference is the last part of the assistant's message, which ends "#### <number>"
    # (GSM8K's solution and tasks.spelling_bee's answer alike); "#### 18" and "#### 18.0" differ
    reference = conversation["messages"][-1]["content"][-1]["text"]
    return final_answer(text) is not None and final_answer(text) == final_answer(reference)


def evaluate_chat(model, tok, tasks: dict, precision: str = "fp32", max_tokens: int = 256,
                  rank: int = 0, world_size: int = 1) -> dict:
    """{name: {"correct", "total", "too_long"}} over this rank's share of each task (tasks from
    load_chat_tasks): examples i with i % world_size == rank. Sum the counts of all ranks
    (merge_counts), then call chat_summary once. Generated answers get at most max_tokens tokens
    (and the context). Rank 0 prints progress lines."""
    greedy = greedy_config(max_tokens)
    counts = {}
    for name, conversations in tasks.items():
        mine = range(rank, len(conversations), world_size)
        progress = Progress(f"chat eval {name}", len(mine), "examples") if rank == 0 else None
        c = counts[name] = {"correct": 0, "total": 0, "too_long": 0}
        for done, i in enumerate(mine, 1):
            conversation = conversations[i]
            if CHAT_TASKS[name][1] == "choice":
                letter = pick_letter(model, tok, conversation, precision)
                is_long = letter is None
                is_correct = letter == conversation["answer"]
            else:
                # fits = prompt + reference answer + <|assistant_end|> within seq_len. With the
                # --cpu tokenizer (8,192 ids) and 256 tokens of context, 71% of GSM8K's test
                # problems fit, and 24% of HumanEval's, whose reference repeats the prompt
                full, _ = render_conversation(tok, conversation, max_tokens=None)
                is_long = len(full) > model.config.seq_len
                ids = render_for_completion(tok, conversation)
                is_correct = not is_long and is_solved(name, conversation, text_of(
                    tok, complete(model, tok, ids, greedy, precision)))
            c["total"] += 1
            c["too_long"] += int(is_long)
            c["correct"] += int(is_correct)
            if progress:
                progress.update(done, is_final=done == len(mine))
    return counts


def merge_counts(parts: list) -> dict:
    """Counts of several ranks summed key by key (numbers added, lists concatenated and sorted):
    merge_counts([{"a": {"n": 1}, "l": [[1, "x"]]}, {"a": {"n": 2}, "l": [[0, "y"]]}])
    -> {"a": {"n": 3}, "l": [[0, "y"], [1, "x"]]}."""
    # Under torchrun: parts = [None] * world_size; torch.distributed.all_gather_object(parts,
    # counts); merge_counts(parts). Lists hold [index, ...] rows, so sorting restores their order.
    first = parts[0]
    if isinstance(first, dict):
        return {key: merge_counts([part[key] for part in parts]) for key in first}
    if isinstance(first, list):
        return sorted(item for part in parts for item in part)
    return sum(parts)


def chat_summary(counts: dict) -> dict:
    """Summed counts -> {"tasks": {name: counts + "accuracy", "interval" (95% Wilson),
    "centered"}, "ChatCORE": the mean centered accuracy of CHATCORE_TASKS, or None unless all of
    them are in counts}."""
    tasks = {}
    for name, c in counts.items():
        accuracy = c["correct"] / c["total"] if c["total"] else 0.0
        baseline = CHAT_TASKS[name][2]
        # centered: 0 = random guessing, 1 = every answer right, so tasks of 4 choices and free
        # answers can be averaged; e.g. 40% on ARC -> (0.40 - 0.25) / 0.75 = 0.2
        interval = list(wilson_interval(c["correct"], c["total"]))
        tasks[name] = {**c, "accuracy": accuracy, "interval": interval,
                       "centered": (accuracy - baseline) / (1 - baseline)}
    chatcore = None
    if all(name in tasks for name in CHATCORE_TASKS):
        chatcore = sum(tasks[name]["centered"] for name in CHATCORE_TASKS) / len(CHATCORE_TASKS)
    return {"tasks": tasks, "ChatCORE": chatcore}


def chat_lines(summary: dict) -> list:
    """One printable line per task and one for ChatCORE."""
    lines = []
    for name, t in summary["tasks"].items():
        low, high = t["interval"]
        lines.append(f"chat eval | {name:<13} | {t['correct']:>5,}/{t['total']:<5,} | "
                     f"acc {t['accuracy']:.3f} [{low:.2f}, {high:.2f}] | "
                     f"centered {t['centered']:+.3f} | too long {t['too_long']:,}")
    chatcore = summary["ChatCORE"]
    if chatcore is None:
        lines.append("chat eval | ChatCORE - (it needs all of " + ", ".join(CHATCORE_TASKS) + ")")
    else:
        lines.append(f"chat eval | ChatCORE {chatcore:.4f} = mean centered accuracy of "
                     + ", ".join(CHATCORE_TASKS))
    return lines


# --- how the chat model talks ---

def template_of(tok, ids: list, text: str):
    """The name of the training template an answer (its ids and text) falls into, or None."""
    # the text first: SpellingBee's answers call python too ("Let me double check this using
    # Python"), and a call alone is GSM8K's calculator. The call is seen in ids, not text:
    # special tokens have no text (text_of drops them)
    found = next((name for name, pattern in TEMPLATES.items() if pattern.search(text)), None)
    if found is None and tok.special_id("<|python_start|>") in ids:
        return "calculator"
    return found


def answer_counts(tok, ids: list) -> dict:
    """Counts of one answer, given as the token ids generate wrote (stop token included):
    {"answers": 1, "ended", "ngrams", "repeats", "templated"}."""
    # ended: the model closed its turn itself. An answer cut by max_tokens or by the context, or
    # one that ran into <|bos|> (a new document, a base model's habit), did not end
    is_ended = bool(ids) and ids[-1] == tok.special_id("<|assistant_end|>")
    body = ids[:-1] if is_ended else ids
    # Repeated 4-grams: an answer of n tokens has g = n - 3 windows of 4 consecutive ids, d of
    # them distinct, so g - d repeat an earlier window; e.g. ids 7 8 7 8 7 8 -> windows 7878,
    # 8787, 7878: g 3, d 2, 1 repeat. The share is pooled over answers, sum(g - d) / sum(g), so a
    # long looping answer weighs more than a short one.
    grams = [tuple(body[i:i + 4]) for i in range(len(body) - 3)]
    is_templated = template_of(tok, body, text_of(tok, body)) is not None
    return {"answers": 1, "ended": int(is_ended), "ngrams": len(grams),
            "repeats": len(grams) - len(set(grams)), "templated": int(is_templated)}


@torch.inference_mode()
def assistant_nats(model, tok, conversation: dict, token_bytes: torch.Tensor,
                   precision: str = "fp32") -> tuple:
    """(nats, bytes) of the assistant's tokens of one conversation, cut to the model's context."""
    ids, mask = render_conversation(tok, conversation, max_tokens=model.config.seq_len + 1)
    device = next(model.parameters()).device
    row = torch.tensor([ids], device=device)  # (1, T+1)
    with autocast(device, precision):
        loss = model(row[:, :-1], row[:, 1:], loss_reduction="none")  # (1, T)
    # only the targets the assistant writes count (mask 1): its text, tool calls, <|assistant_end|>
    scored = torch.tensor([mask[1:]], device=device, dtype=torch.bool)  # (1, T)
    num_bytes = token_bytes[row[:, 1:][scored].cpu()].sum().item()  # (S,) lengths, summed
    return loss.float()[scored].sum().item(), num_bytes


def evaluate_quality(model, tok, smoltalk: list, precision: str = "fp32", rank: int = 0,
                     world_size: int = 1, prompts: list = QUALITY_PROMPTS,
                     config: SampleConfig = SampleConfig()) -> dict:
    """This rank's share (i % world_size == rank) of the chat-quality counts: the prompts
    answered at `config`, the chat defaults unless given (prompt i with seed i), and the assistant
    tokens of the smoltalk conversations (e.g. tasks.load_task(run_dir, "smoltalk-test")[:200]).
    Returns {"answers", "ended", "ngrams", "repeats", "templated", "nats", "bytes", "samples":
    [[i, prompt, answer, template or ""]]}; sum the ranks with merge_counts, then call
    quality_summary."""
    counts = {"answers": 0, "ended": 0, "ngrams": 0, "repeats": 0, "templated": 0, "nats": 0.0,
              "bytes": 0, "samples": []}
    # sampled at `config`, not greedy: by default the settings tinychat.py and the web page use,
    # which is how a user meets the model; greedy decoding exaggerates loops. A seed per prompt
    # keeps it repeatable
    for i in range(rank, len(prompts), world_size):
        ids = complete(model, tok, render_for_completion(tok, user_turn(prompts[i])),
                       dataclasses.replace(config, seed=i), precision)
        for key, value in answer_counts(tok, ids).items():
            counts[key] += value
        text = text_of(tok, ids)
        counts["samples"].append([i, prompts[i], text, template_of(tok, ids, text) or ""])
    # bits per byte of what the assistant writes in real conversations: the same measure as the
    # val bpb, but on chat replies, which midtraining and SFT are meant to improve
    token_bytes = torch.tensor(tok.token_byte_lengths())  # (V,)
    for i in range(rank, len(smoltalk), world_size):
        nats, num_bytes = assistant_nats(model, tok, smoltalk[i], token_bytes, precision)
        counts["nats"] += nats
        counts["bytes"] += num_bytes
    return counts


def quality_summary(counts: dict, config: SampleConfig = SampleConfig()) -> dict:
    """Summed counts -> {"prompts", "ended_share" (answers ending with <|assistant_end|>),
    "repeat_share" (of token 4-grams), "template_share", "smoltalk_bpb", "samples"}, and the
    settings `config` the answers were sampled at (evaluate_quality's)."""
    # every share is of answers, except repeats: a share of all the answers' 4-grams pooled
    # (answer_counts); max(.., 1) keeps a rank with no prompts from dividing by zero
    answers = max(counts["answers"], 1)
    return {"prompts": counts["answers"], "ended_share": counts["ended"] / answers,
            "repeat_share": counts["repeats"] / max(counts["ngrams"], 1),
            "template_share": counts["templated"] / answers,
            "smoltalk_bpb": counts["nats"] / (math.log(2) * max(counts["bytes"], 1)),
            "temperature": config.temperature, "top_k": config.top_k,
            "frequency_penalty": config.frequency_penalty, "samples": counts["samples"]}
