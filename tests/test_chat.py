"""
Tests of chat.py: the chat template's masks (what the model learns to write), the completion
prompt, and bad conversations refused with a clear ValueError.
"""
from chat import render_conversation, render_for_completion

from bpe import Tokenizer
from tests.fixtures import bpe_tiny_tokenizer


def test_chat_template_masks():
    """Only assistant text, python calls and <|assistant_end|> are supervised; system merges into
    user."""
    tok = bpe_tiny_tokenizer()
    sid = tok.special_id
    parts = [{"type": "text", "text": "cats "}, {"type": "python", "text": "1+1"},
             {"type": "python_output", "text": "2"}, {"type": "text", "text": "sat"}]
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": parts}]}
    ids, mask = render_conversation(tok, conv)
    expected = ([tok.bos_id, sid("<|user_start|>")] + tok.encode("Be brief.\n\nhi")
                + [sid("<|user_end|>"), sid("<|assistant_start|>")]
                + tok.encode("cats ") + [sid("<|python_start|>")] + tok.encode("1+1")
                + [sid("<|python_end|>")]
                + [sid("<|output_start|>")] + tok.encode("2") + [sid("<|output_end|>")]
                + tok.encode("sat") + [sid("<|assistant_end|>")])
    assert ids == expected, \
        "rendered ids differ from nanochat's layout (system merge or part tokens)"
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised == (tok.encode("cats ") + [sid("<|python_start|>")] + tok.encode("1+1")
                          + [sid("<|python_end|>")]
                          + tok.encode("sat") + [sid("<|assistant_end|>")]), \
        "mask must cover exactly what the assistant writes"
    short_ids, short_mask = render_conversation(tok, conv, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7], \
        "max_tokens must truncate ids and mask together"
    prompt = render_for_completion(tok, conv)
    assert prompt == ids[:ids.index(sid("<|assistant_start|>")) + 1], \
        "completion prompt must drop the answer and end in assistant_start"


def test_chat_rejects_bad_conversations():
    """Empty, non-alternating or badly typed conversations raise ValueError naming the problem."""
    tok = bpe_tiny_tokenizer(num_merges=5)
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    bad = [{}, {"messages": []}, {"messages": [bot]}, {"messages": [user, user]},
           {"messages": [{"role": "system", "content": "s"}, bot]},
           {"messages": [{"role": "user", "content": 3}]},
           {"messages": [user, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}]
    for conv in bad:
        try:
            render_conversation(tok, conv)
            raise AssertionError(f"{conv} must raise ValueError")
        except ValueError as e:
            assert "message" in str(e) or "conversation" in str(e), f"unhelpful error: {e}"
    try:
        Tokenizer.train(["abc"], 100)
        raise AssertionError("vocab_size below 265 must raise ValueError")
    except ValueError:
        pass
