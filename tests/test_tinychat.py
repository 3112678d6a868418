"""
Tests of tinychat.py: one-shot and interactive chat against a tiny saved model.
"""
import io
import os
import sys
import tempfile

import torch

import tinychat
from bpe import Tokenizer
from gpt import GPT, config_from_depth, save_checkpoint
from tests.fixtures import WORDS, run_quiet


def test_tinychat_one_shot_and_interactive():
    """tinychat answers one prompt, then chats through stdin (/clear, /quit), printing no special
    tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_quiet(tinychat.main, ["--run-dir", tmp, "hi"])
            raise AssertionError("no model, yet tinychat did not stop")
        except FileNotFoundError as e:
            assert "python train_all.py" in str(e), \
                f"the no-model message should say what to run: {e}"
        tok = Tokenizer.train([" ".join(WORDS)] * 20, 300)
        tok.save(os.path.join(tmp, "tokenizer.bin"))
        torch.manual_seed(0)
        model = GPT(config_from_depth(1, tok.vocab_size, 128, head_dim=16))
        save_checkpoint(os.path.join(tmp, "sft"), model, {})
        out = run_quiet(tinychat.main, ["--run-dir", tmp, "--max-tokens", "8", "hello there"])
        assert out.strip() and "<|" not in out, \
            f"one-shot printed nothing or a special token: {out!r}"
        stdin, sys.stdin = sys.stdin, io.StringIO("hello\n/clear\nthe cat\n/quit\nnever read\n")
        try:
            out = run_quiet(tinychat.main, ["--run-dir", tmp, "--max-tokens", "8", "-t", "0"])
        finally:
            sys.stdin = stdin
        assert out.count("tinychat> ") == 2 and "(conversation cleared)" in out, \
            f"interactive loop wrong:\n{out}"
        assert "<|" not in out, f"a special token reached the screen: {out!r}"
