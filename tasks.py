"""
The task datasets of midtraining, SFT and the chat evals, each as a list of conversations.

Used by train_all.py (midtrain_conversations, sft_conversations, with_text_replay) and evals.py
(ARC, MMLU, GSM8K, HumanEval, SpellingBee); imports data.py, whose download phase fetched the
parquet files.
A conversation is the dict that chat.render_conversation takes,
{"messages": [{"role", "content"}, ...]}, plus the keys an eval needs.

Design:
- every dataset is a plain list, shuffled once with np.random.default_rng(42).permutation, which
  is how nanochat HEAD reproduces datasets.Dataset.shuffle(seed=42): slicing [:n] gives its rows
- multiple choice (MMLU, ARC) uses nanochat's prompt: each choice is followed by "=" and its
  letter with no space, so the answer token "A" is the very token seen in the prompt
- GSM8K's calculator annotations <<48/2=24>> become a python part "48/2" and a python_output part
  "24": the model learns to call the tool, and the sampler (sampler.py) pastes in the result
- a mixture is a concatenation shuffled with random.Random(42); listing a dataset twice trains it
  twice per epoch (nanochat's TaskMixture semantics, without the index bookkeeping)
- midtraining also replays pretraining text (with_text_replay): every third micro-batch comes from
  the pretraining stream (its documents and, with use_chats, its chats), so learning to chat does
  not erase what the base model knew about English
- SpellingBee / SimpleSpelling examples are drawn from random.Random(index) for train and
  Random(-(index+1)) for test, as nanochat, so the two splits never share a draw

Left out on purpose:
- nanochat's word list (dwyl words_alpha.txt, 370K words) is not in the offline mirror: the
  spelling tasks use the most frequent lowercase words of the first pretraining shard instead
- nanochat's identity_conversations.jsonl (1K chats written by an LLM) is not in the mirror either:
  identity_conversations() builds a few dozen from fixed question/answer pairs about tinychat
- SpellingBee keeps 10 of nanochat's 50 question templates

References:
- MMLU: https://arxiv.org/abs/2009.03300
- ARC: https://arxiv.org/abs/1803.05457
- GSM8K: https://arxiv.org/abs/2110.14168
- HumanEval: https://arxiv.org/abs/2107.03374
- SmolTalk (SmolLM2): https://arxiv.org/abs/2502.02737
"""
import random
import re
from collections import Counter

import numpy as np

from data import TASKS, read_texts, shard_paths, task_rows


def multiple_choice(question: str, choices: list, letters: list, answer: str, **extra) -> dict:
    """A conversation asking question with lettered choices; the assistant's reply is the letter."""
    # NOTE: "- {choice}={letter}" with no space: " A" and "A" are different tokens,
    # and the reply is "A"
    prompt = (f"Multiple Choice question: {question}\n"
              + "".join(f"- {c}={l}\n" for l, c in zip(letters, choices))
              + "\nRespond only with the letter of the correct answer.")
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}],
            "letters": list(letters), "answer": answer, **extra}


def gsm8k_parts(solution: str) -> list:
    """GSM8K answer text -> assistant parts, each <<expr=result>> as a python + python_output pair.

    "Half of 48 is <<48/2=24>>24.\\n#### 24" -> text "Half of 48 is ", python "48/2",
    python_output "24", text "24.\\n#### 24" (the dataset repeats the result after the >>).
    """
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, result = piece[2:-2].rsplit("=", 1) if "=" in piece else (piece[2:-2], "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def to_conversation(name: str, row: dict) -> dict:
    """A parquet row of TASKS[name] -> a conversation (extra keys: what evals.py checks against)."""
    if name.startswith("smoltalk"):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    if name.startswith("mmlu"):  # choices: 4 strings, answer: their index
        return multiple_choice(row["question"], row["choices"], list("ABCD"), "ABCD"[row["answer"]],
                               subject=row["subject"])
    if name.startswith("arc"):  # choices: {"text", "label"}; a few rows use labels "1".."4"
        choices = row["choices"]
        return multiple_choice(row["question"], choices["text"], choices["label"], row["answerKey"])
    if name.startswith("gsm8k"):
        answer = row["answer"].split("####")[-1].strip().replace(",", "")
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}],
                "answer": answer}
    # HumanEval: the prompt is a function's signature and docstring, the reply the whole function
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant",
                          "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
            "prompt": row["prompt"], "entry_point": row["entry_point"], "test": row["test"]}


def load_task(run_dir: str, name: str) -> list:
    """All conversations of TASKS[name], in nanochat's shuffled order (seed 42)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {sorted(TASKS)}")
    rows = task_rows(run_dir, name)
    return [to_conversation(name, rows[i])
            for i in np.random.default_rng(42).permutation(len(rows))]


def task_mixture(datasets: list, seed: int = 42) -> list:
    """Concatenate conversation lists and shuffle them; list one twice to see it twice per epoch."""
    mixed = [conversation for dataset in datasets for conversation in dataset]
    random.Random(seed).shuffle(mixed)
    return mixed


# --- synthetic tasks: spelling ---

def spelling_words(run_dir: str, max_words: int = 10_000) -> list:
    """The max_words most frequent lowercase words (3-12 letters) of the first train shard."""
    counts = Counter()
    for text in read_texts(shard_paths(run_dir, "train")[0]):
        counts.update(re.findall(r"\b[a-z]{3,12}\b", text))
    return [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]]


# 10 question templates in the spirit of nanochat's 50 (several languages, so the skill transfers)
SPELLING_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter}s are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does the letter {letter} appear in {word}",
    "In the word {word}, how many {letter} are there",
    "What is the count of {letter} in {word}",
    "Tell me how many {letter} there are in {word}",
    "¿Cuántas {letter} hay en {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie viele {letter} sind in {word}",
]


def _draw(index: int, split: str) -> random.Random:
    return random.Random(index if split == "train" else -(index + 1))


def spelling_bee(words: list, size: int, split: str = "train") -> list:
    """size conversations 'how many r in strawberry': spell out, count, check with a python call."""
    conversations = []
    for index in range(size):
        rng = _draw(index, split)
        word = rng.choice(words)
        # 90% a letter of the word, 10% any letter (so "zero" is an answer it sees), as nanochat
        letter = (rng.choice(word) if rng.random() < 0.9
                  else rng.choice("abcdefghijklmnopqrstuvwxyz"))
        quote_l, quote_w = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = rng.choice(SPELLING_TEMPLATES).format(letter=quote_l + letter + quote_l,
                                                         word=quote_w + word + quote_w)
        question = ((question.lower() if rng.random() < 0.3 else question)
                    + ("?" if rng.random() < 0.5 else ""))
        count, lines = 0, []
        for i, char in enumerate(word, 1):
            count += char == letter
            lines.append(f"{i}:{char}" + (f" hit! count={count}" if char == letter else ""))
        manual = (f"We are asked to count the letter '{letter}' in the word '{word}'. "
                  "Let me spell it out first.\n\n"
                  f"{word}:{','.join(word)}\n\n" + "\n".join(lines) + f"\n\nThis gives us {count}.")
        parts = [{"type": "text", "text": manual},
                 {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text",
                  "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"}]
        conversations.append({"messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": parts}],
                              "answer": str(count)})
    return conversations


def simple_spelling(words: list, size: int, split: str = "train") -> list:
    """size conversations 'Spell the word: apple' -> 'apple:a,p,p,l,e' (tokens hide the letters)."""
    conversations = []
    for index in range(size):
        word = _draw(index, split).choice(words)
        conversations.append({"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                                           {"role": "assistant",
                                            "content": f"{word}:{','.join(word)}"}]})
    return conversations


# --- synthetic tasks: identity ---

IDENTITY_QA = [
    ("Who are you?", "I am tinychat, a small chat model trained from scratch as part of a course "
                     "on how chat models are made."),
    ("What is your name?", "My name is tinychat."),
    ("Who made you?", "I was trained by the person who ran tinychat's training script, with code "
                      "that rebuilds Andrej Karpathy's nanochat in a few small Python files."),
    ("How big are you?", "I am tiny: thousands of times smaller than the big chat models, so I "
                         "often get things wrong."),
    ("Can I trust your answers?", "Not much. I am a small model made for learning, so please "
                                  "check anything important elsewhere."),
    ("What can you do?", "I can chat a little, answer simple questions, do arithmetic with a "
                         "calculator tool and spell words letter by letter."),
    ("How were you trained?", "First I read a lot of plain text, then conversations and multiple "
                              "choice questions, and finally curated chats. It all ran on an "
                              "ordinary computer in about an hour."),
    ("Are you ChatGPT?", "No, I am tinychat, a much smaller model trained from scratch. I am the "
                         "same kind of model, a Transformer that predicts the next token, but not "
                         "related to ChatGPT."),
    ("Do you have feelings?", "No. I am a program that predicts the next piece of text."),
    ("What languages do you speak?", "Mostly English, because almost all of my training text "
                                     "was English."),
    ("Where do you run?", "On the computer that runs me. I need no internet connection."),
    ("Are you open source?", "Yes. My code is a small Python project built on numpy, PyTorch "
                             "and pyarrow."),
]
GREETINGS = ["Hi!", "Hello", "hey there", "Good morning!", "Hi, how are you?"]


def identity_conversations() -> list:
    """A few dozen deterministic chats about tinychat: each question three ways, plus greetings."""
    rng, conversations = random.Random(42), []
    for question, answer in IDENTITY_QA:
        for asked in (question, question.lower(), question.rstrip("?").lower()):
            conversations.append({"messages": [{"role": "user", "content": asked},
                                               {"role": "assistant", "content": answer}]})
        greeting = rng.choice(GREETINGS)  # and once after a greeting, as a two-turn chat
        conversations.append({"messages": [
            {"role": "user", "content": greeting},
            {"role": "assistant",
             "content": "Hello! I am tinychat, a tiny chat model. How can I help?"},
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return conversations


# --- short chats: what a small model can learn to finish ---

# the end of a sentence: . ! or ? after a lowercase letter, a closing bracket or quote, then a
# space or newline; not "3.5" nor the "1." of a numbered list
SENTENCE_END = re.compile(r"(?<=[a-z)\"'])[.!?](?=\s)")


def first_exchange(conversation: dict, max_chars: int):
    """The first question and its answer, at most max_chars together, or None.

    An answer too long is cut after its last sentence that fits, so it still ends in a full stop
    (and, once rendered, in <|assistant_end|>): a model shown whole answers learns to stop. None
    when the question alone takes over half of max_chars, or the last sentence that fits ends
    within the first quarter of the room left (a cut there would keep almost nothing), or either
    message holds a ``` code block (prose only: a model this small cannot learn code, and a cut
    block never ends).
    """
    question = conversation["messages"][0]["content"]
    answer = conversation["messages"][1]["content"]
    if len(question) > max_chars // 2 or "```" in question + answer:
        return None
    room = max_chars - len(question)
    if len(answer) > room:
        # room + 1: the space after a full stop at answer[room - 1] must be seen to match
        ends = [m.end() for m in SENTENCE_END.finditer(answer, 0, room + 1)]
        if not ends or ends[-1] < room // 4:
            return None
        answer = answer[:ends[-1]]
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer.strip()}]}


def short_chats(conversations: list, max_chars: int) -> list:
    """first_exchange of each conversation, the ones that give None left out."""
    exchanges = (first_exchange(c, max_chars) for c in conversations)
    return [c for c in exchanges if c is not None]


# --- the mixtures of midtraining and SFT ---

CHAT_CHARS = 1000  # question + answer of a short chat, at most: about 250 tokens, half a row
# SFT's chats are shorter still: what SFT sees is how the model answers, and shorter answers end.
# Measured on the --cpu run's base (72 answers, spelling then at a third of its weight): 600
# characters ended 89% of the answers against 72% with 1,000 (README, the chat mixtures)
SFT_CHAT_CHARS = 600


def midtrain_conversations(run_dir: str, split: str = "train") -> list:
    """The midtraining mixture, shuffled; split "train" or "val".

    nanochat's tasks (mid_train.py OLD) at weights measured for the --cpu preset (README, the
    chat sweep): SmolTalk as short prose chats (short_chats, 1,000 characters) twice, where
    nanochat has whole conversations once; all of MMLU's auxiliary train set; GSM8K's first
    1,000 problems; identity twice; SimpleSpelling 1,000 and SpellingBee 500 (nanochat: 200,000
    and 80,000 beside 460K SmolTalk rows). Spelling and GSM8K are fixed formats, easy to
    memorize: at nanochat's weights their templates answered everyday questions ("What is the
    capital of France?" -> "We are asked to count the letter 'i' ..."). GSM8K is halved, as
    the model cannot solve it: with it halved and SFT's shorter chats, templates took 2 of 72
    small-talk answers instead of 6. Spelling keeps this weight: at a third of it the SFT model
    answered 0 of 100 SpellingBee questions, at this weight 11 (README, the chat mixtures).
    """
    if split == "val":  # SmolTalk test, MMLU test[:5200], GSM8K test[:420], as nanochat
        return task_mixture([load_task(run_dir, "smoltalk-test"),
                             load_task(run_dir, "mmlu-test")[:5200],
                             load_task(run_dir, "gsm8k-test")[:420]])
    words = spelling_words(run_dir)
    chats = short_chats(load_task(run_dir, "smoltalk-train"), CHAT_CHARS)
    identity = identity_conversations()
    return task_mixture([chats, chats, load_task(run_dir, "mmlu-aux"),
                         load_task(run_dir, "gsm8k-train")[:1000], identity, identity,
                         simple_spelling(words, 1000), spelling_bee(words, 500)])


def sft_conversations(run_dir: str, split: str = "train") -> list:
    """The SFT mixture, shuffled; split "train" or "val" (SmolTalk test).

    nanochat's tasks (chat_sft.py OLD) at measured weights: ARC-Easy 800 and ARC-Challenge 400
    (nanochat: all, 3.4K), GSM8K 300 (7.5K), every short prose chat up to 600 characters (4.6K
    of the mirror's 9.3K SmolTalk rows; nanochat 10K rows), identity four times, SimpleSpelling
    and SpellingBee 150 each (nanochat: 300 each). SFT rows are whole conversations, so what it
    sees most is what the model learns to say: here, plain short answers.
    """
    if split == "val":
        return load_task(run_dir, "smoltalk-test")
    words = spelling_words(run_dir)
    chats = short_chats(load_task(run_dir, "smoltalk-train"), SFT_CHAT_CHARS)
    identity = identity_conversations()
    return task_mixture([load_task(run_dir, "arc-easy-train")[:800],
                         load_task(run_dir, "arc-challenge-train")[:400],
                         load_task(run_dir, "gsm8k-train")[:300],
                         chats, identity, identity, identity, identity,
                         simple_spelling(words, 150), spelling_bee(words, 150)])


def with_text_replay(chat_batches, text_batches, text_every: int, state=None):
    """Yield (x, y, state) forever: the micro-batches of chat_batches, except that every
    text_every-th one comes from text_batches (pretraining text) instead; 0 = never.

    Both arguments are functions state -> batch generator (midtrain_batches, pretrain_batches with
    their other arguments bound). state = {"i", "chat", "text"}: micro-batches yielded so far and
    each stream's own state; passing it back resumes exactly.
    """
    # Replay: a model trained on chats alone overwrites what pretraining taught it about prose.
    # Measured on the --cpu run's base (335 midtraining + 302 SFT steps): with every third
    # micro-batch pretraining text, midtraining left the val bpb at 1.23 instead of 1.89, and the
    # SFT model's bpb on SmolTalk's answers fell from 1.37 to 1.28 (README, the chat mixtures)
    state = state or {"i": 0, "chat": None, "text": None}
    i, states = state["i"], {"chat": state["chat"], "text": state["text"]}
    streams = {"chat": chat_batches(states["chat"]), "text": text_batches(states["text"])}
    while True:
        kind = "text" if text_every and i % text_every == text_every - 1 else "chat"
        x, y, states[kind] = next(streams[kind])
        i += 1
        yield x, y, {"i": i, **states}
