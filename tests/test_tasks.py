"""
Tests of tasks.py: GSM8K calculator parts, the synthetic spelling and identity data, the mixture,
the text replay, and (where ../shared/mirror exists) the real task files turned into
conversations.
"""
import json
import os
import tempfile
import unittest

import torch

import data
import tasks
from tests.fixtures import MIRROR


def test_tasks_gsm8k_parts():
    """<<expr=result>> becomes a python part and a python_output part, the text around kept."""
    parts = tasks.gsm8k_parts("Half is <<48/2=24>>24.\nNo eq <<7>>!\n#### 24")
    assert parts == [{"type": "text", "text": "Half is "},
                     {"type": "python", "text": "48/2"},
                     {"type": "python_output", "text": "24"},
                     {"type": "text", "text": "24.\nNo eq "},
                     {"type": "python", "text": "7"},
                     {"type": "python_output", "text": ""},
                     {"type": "text", "text": "!\n#### 24"}], f"GSM8K parts wrong: {parts}"


def test_tasks_synthetic_data_is_deterministic():
    """Spelling and identity data repeat exactly; train and test draws differ; the mixture
    oversamples listed twice."""
    words = ["strawberry", "apple", "banana", "kiwi"]
    bee = tasks.spelling_bee(words, 20)
    assert bee == tasks.spelling_bee(words, 20) and bee != tasks.spelling_bee(words, 20, "test"), \
        "spelling draws not seeded"
    for c in bee:
        parts = c["messages"][1]["content"]
        word, letter = parts[2]["text"][1:-1].split("'.count('")
        assert str(word.count(letter.rstrip("')"))) == c["answer"] == parts[3]["text"], \
            f"wrong count in {parts[2]}"
    assert tasks.simple_spelling(["kiwi"], 1)[0]["messages"][1]["content"] == "kiwi:k,i,w,i"
    assert tasks.identity_conversations() == tasks.identity_conversations(), \
        "identity conversations not deterministic"
    a, b = [{"k": "a"}] * 3, [{"k": "b"}] * 2
    mixed = tasks.task_mixture([a, b, b])
    assert (len(mixed) == 7 and sum(m["k"] == "b" for m in mixed) == 4
            and mixed == tasks.task_mixture([a, b, b]))
    mc = tasks.multiple_choice("2+2?", ["3", "4"], ["A", "B"], "B")["messages"][0]["content"]
    assert mc == ("Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n\n"
                  "Respond only with the letter of the correct answer."), mc


def test_tasks_mirror_integration():
    """The shared mirror's task files load through the listing API into conversations (skips without
    the mirror)."""
    if not os.path.isdir(MIRROR):
        raise unittest.SkipTest("no ../shared/mirror here")
    with tempfile.TemporaryDirectory() as root:
        for name in ("humaneval", "arc-challenge-test"):
            data.fetch_task(root, name, MIRROR)
        he, arc = tasks.load_task(root, "humaneval"), tasks.load_task(root, "arc-challenge-test")
        assert len(he) == 164 and "check" in he[0]["test"], "HumanEval rows not converted"
        assert len(arc) == 1172 and all(c["answer"] in c["letters"] for c in arc), \
            "ARC answers not among the letters"


def test_tasks_first_exchange_ends_at_a_sentence():
    """A long answer is cut after its last whole sentence that fits (not after "3.5" or "1."),
    a short one is kept, a question over half the room or a code block drops the chat, later turns
    go."""
    answer = "It is 3.5 km away. Walk north.\n1. Then turn left! Finally you see it."
    chat = {"messages": [{"role": "user", "content": "Where?"},
                         {"role": "assistant", "content": answer},
                         {"role": "user", "content": "Thanks"},
                         {"role": "assistant", "content": "You are welcome."}]}
    whole = tasks.first_exchange(chat, 1000)["messages"]
    assert [m["content"] for m in whole] == ["Where?", answer], f"a fitting answer changed: {whole}"
    cut = tasks.first_exchange(chat, 6 + 45)["messages"][1]["content"]
    assert cut == "It is 3.5 km away. Walk north.", f"cut in the wrong place: {cut!r}"
    assert tasks.first_exchange(chat, 10) is None, "a question over half the room was kept"
    assert tasks.short_chats([chat, chat], 10) == [], "short_chats kept a chat that gave None"
    code = {"messages": [{"role": "user", "content": "Code?"},
                         {"role": "assistant", "content": "Here:\n```\nprint(1)\n```"}]}
    assert tasks.first_exchange(code, 1000) is None, "a chat with a code block was kept"


def test_tasks_text_replay_interleaves_and_resumes():
    """Every third micro-batch comes from the text stream, each stream keeps its own order, and a
    state passed back (through JSON, as checkpoints store it) continues exactly."""
    def stream(first):  # a batch stream whose batches count up from `first`; state = next count
        def batches(state):
            n = first if state is None else state
            while True:
                yield torch.full((1, 2), n), torch.full((1, 2), n + 1), n + 1
                n += 1
        return batches

    def firsts(batches, n):  # the first token of each of the next n micro-batches
        return [int(x[0, 0]) for _, (x, _, _) in zip(range(n), batches)]

    chat, text = stream(0), stream(1000)
    got = firsts(tasks.with_text_replay(chat, text, 3), 9)
    assert got == [0, 1, 1000, 2, 3, 1001, 4, 5, 1002], f"not every third from text: {got}"
    replay = tasks.with_text_replay(chat, text, 3)
    for _ in range(5):
        *_, state = next(replay)
    state = json.loads(json.dumps(state))  # after 5 micro-batches
    resumed = firsts(tasks.with_text_replay(chat, text, 3, state), 4)
    assert resumed == got[5:], f"resume went astray: {resumed} instead of {got[5:]}"
    no_text = firsts(tasks.with_text_replay(chat, text, 0), 4)
    assert no_text == [0, 1, 2, 3], f"text_every 0 still mixed in text: {no_text}"
