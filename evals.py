"""
Evaluation: bits per byte on the pinned validation shard, and greedy samples of every model.

Used by train_all.py (during training and in its eval phase); imports gpt (precision), bpe (the
chat template), data (the validation rows) and sampler (the one sampler). Returns plain numbers,
lists and dicts, so the report can print them and report.json can hold them.

Design:
- bits per byte, not loss per token, is the headline number: a loss per token depends on the
  tokenizer (a bigger vocabulary packs more bytes into a token), bits per byte does not, so
  models with different vocabularies can be compared on the same text
- every target of every row is scored, <|bos|> included; special tokens count 0 bytes, so the
  cost of predicting where a document ends is charged to the document's bytes
- the validation rows are the whole pinned val shard in order (data.val_rows), never shuffled,
  so two runs see the very same tokens and their numbers are comparable
- samples go through sampler.generate at temperature 0 (greedy): the same model always writes
  the same text, so samples from two checkpoints differ only because the weights do

Left out on purpose:
- CORE (DCLM's 22 in-context tasks) and the chat evals (ARC, MMLU, GSM8K, HumanEval, ChatCORE):
  they come next and take their data from tasks.py and the eval bundle data.py downloads
- nanochat excludes the nats of special-token targets from bpb; we keep them (see above)

References:
- nanochat loss_eval.py (bits per byte): https://github.com/karpathy/nanochat
- bits per byte as a tokenizer-free measure (The Pile, §5): https://arxiv.org/abs/2101.00027
"""
import math

import numpy as np
import torch

from bpe import render_for_completion
from data import val_rows
from gpt import autocast
from sampler import generate, stream_text

# nanochat base_train.py's prompts for the base model: facts, a little reasoning, a list, arithmetic
BASE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]
# questions for the chat models: small talk, a fact, an explanation, the calculator tool
CHAT_PROMPTS = ["Tell me a joke.", "What is the capital of France?", "Why is the sky blue?", "What is 12 + 30?"]


def val_tensor(run_dir: str, T: int, max_rows=None) -> torch.Tensor:
    """The first max_rows (None = all) validation rows as int64 (N, T+1): documents, each after its
    <|bos|>, back to back and cut into rows; row[:-1] are the inputs and row[1:] the targets."""
    # np.asarray copies only the rows asked for out of the memory-mapped token cache
    return torch.from_numpy(np.asarray(val_rows(run_dir, T)[:max_rows], dtype=np.int64))  # (N, T+1)


@torch.inference_mode()
def evaluate_bpb(model, rows: torch.Tensor, token_bytes: torch.Tensor, device, precision: str,
                 batch_size: int = 8) -> tuple:
    """(bits per byte, nats per token) of model on rows (N, T+1); token_bytes (V,) is each id's UTF-8
    length (0 for special tokens), e.g. torch.tensor(tok.token_byte_lengths())."""
    # bpb = (sum of target nats) / (ln 2 * sum of target bytes): nats -> bits is a division by ln 2,
    # e.g. a 2-byte token predicted with p = 1/4 costs ln 4 = 1.386 nats = 2 bits, i.e. 1 bit per byte
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


def sample(model, tok, is_chat: bool, max_tokens: int, precision: str = "fp32") -> list:
    """Greedy [(prompt, text)]: continuations of BASE_PROMPTS, or answers to CHAT_PROMPTS (is_chat)."""
    out = []
    for prompt in CHAT_PROMPTS if is_chat else BASE_PROMPTS:
        # a chat model gets the prompt as a user turn and answers after <|assistant_start|>; a base
        # model has never seen that format, so it simply continues the text after <|bos|>
        ids = (render_for_completion(tok, {"messages": [{"role": "user", "content": prompt}]}) if is_chat
               else [tok.bos_id] + tok.encode(prompt))
        tokens = (row[0] for row, _ in generate(model, tok, ids, max_tokens, temperature=0.0,
                                                      precision=precision))
        out.append((prompt, "".join(stream_text(tok, tokens))))  # special tokens have no text
    return out


def evaluate_model(model, tok, run_dir: str, is_chat: bool, device, precision: str, max_tokens: int = 0,
                   sample_tokens: int = 48) -> dict:
    """One model's evaluation: val bpb on the pinned val shard (its first max_tokens tokens; 0 = all)
    and greedy samples; returns {"val_bpb", "val_loss", "val_tokens", "samples"}."""
    T = model.config.seq_len
    rows = val_tensor(run_dir, T, max_tokens // T or None)  # (N, T+1)
    bpb, loss = evaluate_bpb(model, rows, torch.tensor(tok.token_byte_lengths()), device, precision)
    return {"val_bpb": bpb, "val_loss": loss, "val_tokens": rows.shape[0] * T,
            "samples": sample(model, tok, is_chat, sample_tokens, precision)}
