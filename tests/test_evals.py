"""
Tests of evals.py: bits per byte on a known answer.
"""
import math

import torch

from bpe import Tokenizer
from evals import evaluate_bpb
from gpt import GPT, GPTConfig


def test_evals_bpb_known_answer():
    """A fresh GPT (zero lm_head: uniform logits) on 1-byte tokens scores log2(V) bits per byte."""
    tok = Tokenizer([])  # 256 bytes + 9 specials: every ordinary token is exactly one byte
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)).eval()
    rows = torch.randint(0, 256, (5, 17))  # (N, T+1) byte ids only
    token_bytes = torch.tensor(tok.token_byte_lengths())
    with torch.no_grad():
        bpb, nats = evaluate_bpb(model, rows, token_bytes, torch.device("cpu"), "fp32", batch_size=2)
    assert abs(nats - math.log(tok.vocab_size)) < 1e-4, f"{nats} nats/token, expected ln {tok.vocab_size}: loss or init broken"
    assert abs(bpb - math.log2(tok.vocab_size)) < 1e-4, f"bpb {bpb}, expected log2 {tok.vocab_size}: byte counting broken"
