"""
Every tinychat test, plus the tiny runner that executes them.

Tests are plain `def test_<module>_<property>():` functions with bare asserts, grouped by layer
(bpe, gpt, optim, data, serve, evals, train_all). They are hermetic: CPU only, no network, tiny
data made inside the test, temp directories, fixed seeds. Checks that read ../shared/mirror skip
cleanly where it is absent.

Usage:
    python test_all.py            # every test
    python test_all.py bpe        # only tests whose name contains "bpe"
    pytest test_all.py            # also works; nothing requires it
"""
import contextlib
import dataclasses
import functools
import http.server
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import unittest
import zipfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import data
import tasks
import tinychat
import train_all
from bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, render_conversation, render_for_completion
from evals import evaluate_bpb
from gpt import (GPT, GPTConfig, KVCache, autocast, config_from_depth, load_checkpoint, load_optim_state, pick_precision,
                 save_checkpoint)
from optim import AdamW, Muon, make_optimizers
from sampler import SampleConfig, generate, stream_text, use_calculator


# --- bpe ---


BPE_CORPUS = [
    "The cat sat on the mat. The cat's hat is flat! 1234567 cats, 89 hats.\n\n",
    "aaaa aaaaaaa aa bbbb abab abababab ____ snake_case __init__ ",
    "naïve café 你好世界 🌍🙂 e\u0301 \t\t  \n\r\n  tabs\tand\x00control\x1fchars ",
]


def bpe_slow_merges(texts, num_merges):
    """Oracle: textbook BPE on every chunk, recounting all pairs each step (minbpe style)."""
    words = Counter()
    for text in texts:
        words.update(tuple(chunk.encode("utf-8")) for chunk in re.findall(SPLIT_PATTERN, text))
    merges = []
    for i in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))   # most frequent, ties to smallest pair
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, j = [], 0
            while j < len(word):
                if word[j:j + 2] == best:
                    out.append(256 + i)
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def bpe_tiny_tokenizer(num_merges=60):
    return Tokenizer.train(BPE_CORPUS * 3, 256 + num_merges + len(SPECIAL_TOKENS))


def test_bpe_merges_match_slow_oracle():
    """The numpy BPE learns exactly the oracle's merges, with ties, runs like 'aaaa' and random texts."""
    rng = random.Random(0)
    cases = [(BPE_CORPUS, 80), (["aaaaaaaaaaa aaa aaaa"], 10), (["ab ba " * 5 + "cd dc " * 5], 8)]
    for _ in range(25):
        alphabet = rng.choice(["ab", "aab ", "xyz \n", "the cat 123 ", "é😀中 a"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))) for _ in range(3)]
        cases.append((texts, rng.randint(1, 40)))
    for texts, num_merges in cases:
        fast = Tokenizer.train(texts, 256 + num_merges + len(SPECIAL_TOKENS)).merges
        slow = bpe_slow_merges(texts, num_merges)
        assert fast == slow, f"merges differ from the oracle on {texts!r}: incremental pair counts or tie order broken\n{fast}\n{slow}"


def test_bpe_known_answer():
    """'aaabdaaabac' with 3 merges encodes to [258, 100, 258, 97, 99] (the Wikipedia BPE example)."""
    tok = Tokenizer.train(["aaabdaaabac"], 256 + 3 + len(SPECIAL_TOKENS))
    assert tok.merges == [(97, 97), (97, 98), (256, 257)], f"wrong merges {tok.merges}"
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99], f"wrong ids {tok.encode('aaabdaaabac')}"


def test_bpe_encode_applies_merges_in_rank_order():
    """encode equals applying each merge, in order, to every chunk of the text."""
    tok = bpe_tiny_tokenizer()
    for text in BPE_CORPUS + ["cats sat flat, abababa!"]:
        expected = []
        for chunk in re.findall(SPLIT_PATTERN, text):
            ids = list(chunk.encode("utf-8"))
            for rank, (a, b) in enumerate(tok.merges):
                out, j = [], 0
                while j < len(ids):
                    if ids[j:j + 2] == [a, b]:
                        out.append(256 + rank)
                        j += 2
                    else:
                        out.append(ids[j])
                        j += 1
                ids = out
            expected += ids
        assert tok.encode(text) == expected, f"encode of {text!r} is not merge-by-rank: encode_chunk broken"


def test_bpe_round_trips():
    """decode(encode(s)) == s for emoji, CJK, combining marks, whitespace, controls, '' and random Unicode."""
    tok = bpe_tiny_tokenizer()
    rng = random.Random(1)
    texts = ["", " ", "\n\n\n", "  \t \r\n x  ", "🙂👍🏽 家族 👨‍👩‍👧", "你好世界 🌍", "e\u0301\u0308 a\u20dd",
             "\x00\x01\x7f\x1c\x1d", "<|bos|> <|assistant_end|>", "m² ½ Ⅻ ① 12345"]
    for _ in range(2000):
        top = rng.choice([0x80, 0x800, 0x10000, 0x110000])
        chars = [chr(rng.randrange(top)) for _ in range(rng.randint(0, 12))]
        texts.append("".join(c for c in chars if not 0xD800 <= ord(c) < 0xE000))  # no lone surrogates
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, f"round trip failed for {text!r}: split or byte fallback lost text"


def test_bpe_specials_only_from_ids():
    """'<|bos|>' in text encodes as ordinary text; special ids follow the merges in nanochat's order."""
    tok = bpe_tiny_tokenizer(num_merges=40)
    assert tok.vocab_size == 256 + 40 + 9, f"vocab_size {tok.vocab_size} must count bytes, merges and specials"
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(296, 305)), "special ids out of order"
    assert tok.bos_id == 296 and tok.bos_id not in tok.encode("<|bos|>"), "special text became a special token"
    assert tok.decode([tok.bos_id]) == "<|bos|>" and tok.token_bytes(tok.bos_id) == b""
    for bad in ([-1], [tok.vocab_size], [97, -3]):  # -1 used to decode as the last merge's bytes
        try:
            tok.decode(bad)
            raise AssertionError(f"decode({bad}) must raise ValueError, not wrap around")
        except ValueError as e:
            assert str(tok.vocab_size) in str(e), f"the error should give the valid range: {e}"
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (305,) and lengths[296:].sum() == 0 and lengths[97] == 1
    assert all(lengths[i] == len(tok.token_bytes(i)) for i in range(296)), "token_byte_lengths != token_bytes"
    try:
        tok.special_id("<|system|>")
        raise AssertionError("an unknown special token name must raise ValueError")
    except ValueError:
        pass


def test_bpe_save_load():
    """save then load gives the same merges, ids and fingerprint; missing or foreign files say what to run."""
    tok = bpe_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.bin")
        tok.save(path)
        loaded = Tokenizer.load(path)
        assert loaded.merges == tok.merges and loaded.fingerprint() == tok.fingerprint(), "save/load lost merges"
        assert loaded.encode(BPE_CORPUS[2]) == tok.encode(BPE_CORPUS[2])
        assert not os.path.exists(path + ".tmp"), "save must os.replace its .tmp file"
        assert bpe_tiny_tokenizer(59).fingerprint() != tok.fingerprint(), "fingerprint ignores the merges"
        with open(path, "w") as f:
            f.write("version 0\n")
        for bad_path, error in [(path, ValueError), (path + ".missing", FileNotFoundError)]:
            try:
                Tokenizer.load(bad_path)
                raise AssertionError(f"loading {bad_path} must raise {error.__name__}")
            except error as e:
                assert "train_all.py" in str(e), f"the error must say what to run: {e}"


def test_bpe_split_pattern_matches_gpt4_style():
    """SPLIT_PATTERN cuts text like nanochat's \\p{L}/\\p{N} pattern (expected chunks from the regex module)."""
    cases = {
        "Hello world's 12345 apples!!\n\n  x": ["Hello", " world", "'s", " ", "12", "34", "5", " apples", "!!\n\n", " ", " x"],
        "snake_case __init__ m² ½ café": ["snake", "_case", " __", "init", "__", " m", "²", " ", "½", " café"],
        "I'LL don't  \t\n end": ["I", "'LL", " don", "'t", "  \t\n", " end"],
    }
    for text, chunks in cases.items():
        assert re.findall(SPLIT_PATTERN, text) == chunks, f"split of {text!r} drifted from nanochat's pattern"


def test_bpe_chat_template_masks():
    """Only assistant text, python calls and <|assistant_end|> are supervised; system merges into user."""
    tok = bpe_tiny_tokenizer()
    sid = tok.special_id
    parts = [{"type": "text", "text": "cats "}, {"type": "python", "text": "1+1"},
             {"type": "python_output", "text": "2"}, {"type": "text", "text": "sat"}]
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": parts}]}
    ids, mask = render_conversation(tok, conv)
    expected = ([tok.bos_id, sid("<|user_start|>")] + tok.encode("Be brief.\n\nhi") + [sid("<|user_end|>"), sid("<|assistant_start|>")]
                + tok.encode("cats ") + [sid("<|python_start|>")] + tok.encode("1+1") + [sid("<|python_end|>")]
                + [sid("<|output_start|>")] + tok.encode("2") + [sid("<|output_end|>")] + tok.encode("sat") + [sid("<|assistant_end|>")])
    assert ids == expected, "rendered ids differ from nanochat's layout (system merge or part tokens)"
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised == (tok.encode("cats ") + [sid("<|python_start|>")] + tok.encode("1+1") + [sid("<|python_end|>")]
                          + tok.encode("sat") + [sid("<|assistant_end|>")]), "mask must cover exactly what the assistant writes"
    short_ids, short_mask = render_conversation(tok, conv, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7], "max_tokens must truncate ids and mask together"
    prompt = render_for_completion(tok, conv)
    assert prompt == ids[:ids.index(sid("<|assistant_start|>")) + 1], "completion prompt must drop the answer and end in assistant_start"


def test_bpe_chat_template_rejects_bad_conversations():
    """Empty, non-alternating or badly typed conversations raise ValueError naming the problem."""
    tok = bpe_tiny_tokenizer(num_merges=5)
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    bad = [{}, {"messages": []}, {"messages": [bot]}, {"messages": [user, user]},
           {"messages": [{"role": "system", "content": "s"}, bot]}, {"messages": [{"role": "user", "content": 3}]},
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


def test_bpe_source_compiles_without_warnings():
    """bpe.py compiles with warnings as errors: no invalid escape such as \\w in a non-raw docstring."""
    import warnings
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe.py")
    with open(path, encoding="utf-8") as f, warnings.catch_warnings():
        warnings.simplefilter("error")   # invalid escapes warn on 3.11 and are SyntaxWarnings from 3.12
        compile(f.read(), path, "exec")  # raises SyntaxError naming the line if a warning fires

# --- gpt ---


def tiny_gpt(seed=0, n_kv_head=2, **kw):
    """A 2-layer GPT small enough for a test, with random (not zero) output layers so logits vary."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**dict(seq_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32), **kw})
    model = GPT(cfg)
    with torch.no_grad():  # zero-init lm_head/c_proj would make every logit 0 and hide cache bugs
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_gpt_param_count():
    """nanochat's d4 shape at vocab 65,536 has exactly 36,700,160 parameters."""
    with torch.device("meta"):  # shapes only, no memory or init time
        model = GPT(GPTConfig(seq_len=1024, vocab_size=65536, n_layer=4, n_head=2, n_kv_head=2, n_embd=256))
    n = model.num_params()
    assert n == 36_700_160, f"got {n:,} params: a layer has a bias, a tied or extra weight, or a wrong width"


def test_gpt_config_from_depth_never_crashes():
    """Every depth 1..32 with head_dim 32/64/128 gives a valid config with C a multiple of head_dim."""
    for head_dim in (32, 64, 128):
        for depth in range(1, 33):
            cfg = config_from_depth(depth, vocab_size=100, seq_len=64, head_dim=head_dim)
            assert cfg.n_embd % head_dim == 0 and cfg.n_embd >= 64 * depth, f"depth {depth}, hd {head_dim}: {cfg}"
    cfg = config_from_depth(6, vocab_size=32768, seq_len=512, head_dim=64)
    assert (cfg.n_embd, cfg.n_head) == (384, 6), f"nanochat's CPU shape should be C=384, H=6, got {cfg}"


def test_gpt_kv_cache_matches_full_forward():
    """Prefill, a chunk and one-token decodes through the KV cache give the logits of one full forward."""
    for n_kv_head in (4, 2):  # plain multi-head and grouped-query attention
        model = tiny_gpt(n_kv_head=n_kv_head)
        ids = torch.randint(0, 64, (2, 12))  # (B, T)
        with torch.no_grad():
            full = model(ids)  # (B, T, V)
            cache = KVCache(2, model.config, max_len=16)
            parts = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 5), (5, 9), (9, 10), (10, 11), (11, 12))]
        cached = torch.cat(parts, dim=1)  # (B, T, V)
        err = (cached - full).abs().max().item()
        assert err < 1e-4, f"Hkv={n_kv_head}: cached logits differ by {err}: check the mask cases in attend() or cache.pos"
        assert cache.pos == 12, f"cache.pos is {cache.pos} after 12 tokens: forward must advance it once per call"


def test_gpt_loss_ignores_minus_one():
    """Targets of -1 count for nothing: mean over the rest, and 0 nats in the per-token loss."""
    model = tiny_gpt()
    ids = torch.randint(0, 64, (2, 8))  # (B, T)
    y = torch.randint(0, 64, (2, 8))  # (B, T)
    y[0, :3] = -1
    with torch.no_grad():
        per_token = model(ids, y, loss_reduction="none")  # (B, T)
        mean, total = model(ids, y), model(ids, y, loss_reduction="sum")
    assert per_token.shape == (2, 8) and per_token[0, :3].eq(0).all(), "ignored targets must give 0 nats"
    assert abs(total.item() - per_token.sum().item()) < 1e-3, "sum reduction disagrees with the per-token losses"
    assert abs(mean.item() - total.item() / 13) < 1e-5, "mean must divide by the 13 counted targets, not by 16"


def test_gpt_checkpoint_round_trip():
    """save_checkpoint then load_checkpoint gives identical logits, the meta back, and the optimizer state."""
    model = tiny_gpt()
    ids = torch.randint(0, 64, (1, 10))  # (1, T)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, {"step": 7, "val_bpb": 1.5}, optim_state={"lr": [0.1], "m": torch.ones(3)})
        loaded, meta = load_checkpoint(d, torch.device("cpu"))
        optim_state = load_optim_state(d)
        assert not [f for f in os.listdir(d) if f.endswith(".tmp")], "a .tmp file was left behind"
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids)), "loaded model gives different logits: state_dict incomplete?"
    assert meta["step"] == 7 and meta["config"]["n_embd"] == 32, f"meta not round-tripped: {meta}"
    assert torch.equal(optim_state["m"], torch.ones(3)), "optimizer state not round-tripped"


def test_gpt_truncated_checkpoint_clear_error():
    """A truncated model.pt or a missing checkpoint gets an error naming the file and what to run."""
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, tiny_gpt(), {"step": 0})
        path = os.path.join(d, "model.pt")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        try:
            load_checkpoint(d, torch.device("cpu"))
            raise AssertionError("loading a truncated model.pt did not raise")
        except ValueError as e:
            assert "model.pt" in str(e) and "train_all.py" in str(e), f"unhelpful message: {e}"
        try:
            load_checkpoint(os.path.join(d, "nope"), torch.device("cpu"))
            raise AssertionError("loading a missing checkpoint did not raise")
        except FileNotFoundError as e:
            assert "nope" in str(e) and "train_all.py" in str(e), f"unhelpful message: {e}"


# --- optim ---


def test_optim_adamw_matches_torch():
    """Our AdamW equals torch.optim.AdamW (decoupled weight decay, bias correction) within 1e-6 over 10 steps."""
    torch.manual_seed(0)
    w = [torch.randn(16, 8), torch.randn(8)]
    ours = [t.clone().requires_grad_() for t in w]
    ref = [t.clone().requires_grad_() for t in w]
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt, ref_opt = AdamW(ours, **kw), torch.optim.AdamW(ref, **kw, foreach=False)
    for _ in range(10):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    err = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    assert err < 1e-6, f"AdamW drifts from torch by {err}: check bias correction, eps placement or weight decay"


def test_optim_muon_update_nearly_orthogonal():
    """Muon's first update of a wide and a tall matrix has all singular values near 1 (times its lr scale)."""
    torch.manual_seed(0)
    for rows, cols in ((32, 64), (64, 32)):
        p = torch.zeros(rows, cols, requires_grad=True)
        p.grad = torch.randn(rows, cols) * torch.logspace(-1, 0, cols)  # columns scaled 0.1..1 on purpose
        Muon([p], lr=0.1).step()
        scale = 0.1 * max(1.0, rows / cols) ** 0.5
        s = torch.linalg.svdvals(p.detach() / scale)  # (min(rows, cols),)
        assert 0.7 < s.min() and s.max() < 1.3, \
            f"{rows}x{cols}: singular values {s.min():.3f}..{s.max():.3f}, not ~1: Newton-Schulz or lr scale broken"


def test_optim_tiny_gpt_overfits_one_batch():
    """make_optimizers drives a tiny GPT's loss on one batch from ln(64)=4.16 to below 0.1 within 40 steps."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    opts = make_optimizers(model)
    assert all("initial_lr" in g for o in opts for g in o.param_groups), "every group needs initial_lr for schedules"
    ids = torch.randint(0, 64, (4, 17))  # (B, T+1)
    for step in range(40):
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after 40 steps: the model or the optimizers do not learn"


# --- data ---


DATA_DOCS = ["the cat sat on the mat. " * 3, "a dog ran far away, then came back!", "tiny doc", "we spell words " * 5]


def _data_tokenizer(vocab_size=300):
    return Tokenizer.train(DATA_DOCS * 4, vocab_size)


def _data_parquet_bytes(rows=20, column="text"):
    """A small parquet file in memory: `rows` documents in one column."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({column: [DATA_DOCS[i % 4] + str(i) for i in range(rows)]}), sink)
    return sink.getvalue().to_pybytes()


def _data_run_dir(root, num_train=2, rows=20):
    """A run dir holding num_train train shards and the val shard, as download_all leaves them."""
    for i in [*range(num_train), data.VAL_SHARD]:
        path = data.url_to_path(root, data.SHARD_URL.format(i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_data_parquet_bytes(rows + i % 7))
    return root


class _DataServer:
    """A local http.server: files[path] -> bytes, a directory path answers its index.json, and
    plan[path] is a list of "500" / "cut" (Content-Length says full, half is sent) / "half"
    (half the body with a matching Content-Length) / "slow" (answers after 0.5 s) consumed one per
    request before normal answers."""

    def __init__(self, files):
        self.files, self.plan, self.hits = files, {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.lstrip("/")
                outer.hits.append(path)
                body = outer.files.get(path, outer.files.get(path.rstrip("/") + "/index.json"))
                step = outer.plan.get(path, []).pop(0) if outer.plan.get(path) else "ok"
                if step == "slow":
                    time.sleep(0.5)
                if body is None or step == "500":
                    self.send_response(404 if body is None else 500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                sent = body[:len(body) // 2] if step in ("cut", "half") else body
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) if step == "cut" else len(sent)))
                self.end_headers()
                try:
                    self.wfile.write(sent)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out ("slow") and left
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _data_quiet():
    """Swallow the progress and retry lines data.py prints, so the test output stays readable."""
    return contextlib.redirect_stdout(io.StringIO())


def _data_no_tmp(root):
    return [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns if n.endswith(".tmp")]


def test_data_download_retries_500_and_cut_body():
    """500, a body cut short, a half file, then a timeout: the download still ends identical, with no .tmp."""
    body = _data_parquet_bytes(200)
    url = "https://example.org/d/shard.parquet"
    server = _DataServer({"example.org/d/shard.parquet": body})
    server.plan["example.org/d/shard.parquet"] = ["500", "cut", "half", "slow"]
    try:
        with tempfile.TemporaryDirectory() as root:
            with _data_quiet():
                dest = data.fetch(url, data.url_to_path(root, url), mirror=server.url, timeout=0.2, backoff_s=0)
            assert open(dest, "rb").read() == body, "downloaded file differs from the source: retry or check is broken"
            assert len(server.hits) == 5, f"expected 5 requests (500, cut, half, slow, ok), got {server.hits}"
            assert not _data_no_tmp(root), "a .tmp file was left behind after retries"
    finally:
        server.close()


def test_data_download_gives_up_with_clear_error():
    """A URL that keeps failing raises ConnectionError with a next step, leaving neither the file nor a .tmp."""
    server = _DataServer({"example.org/x.parquet": _data_parquet_bytes()})
    server.plan["example.org/x.parquet"] = ["500"] * 3
    try:
        with tempfile.TemporaryDirectory() as root:
            dest = os.path.join(root, "x.parquet")
            try:
                with _data_quiet():
                    data.fetch("https://example.org/x.parquet", dest, mirror=server.url, max_attempts=3, backoff_s=0)
                raise AssertionError("fetch succeeded although every attempt got HTTP 500")
            except ConnectionError as e:
                assert "x.parquet" in str(e) and "complete mirror" in str(e), f"error does not say what to do next: {e}"
            assert not os.path.exists(dest) and not _data_no_tmp(root), "failed download left a file behind"
            try:  # a 404 is not retried
                data.fetch("https://example.org/missing.json", dest, mirror=server.url, backoff_s=0)
                raise AssertionError("a 404 counted as a download")
            except ConnectionError:
                assert server.hits.count("example.org/missing.json") == 1, "a 404 was retried"
            try:  # without a mirror the hint is the network or --mirror (port 9 refuses at once)
                data.fetch("http://127.0.0.1:9/x.json", os.path.join(root, "y.json"), max_attempts=1)
                raise AssertionError("a refused connection counted as a download")
            except ConnectionError as e:
                assert "--mirror" in str(e), f"error does not suggest --mirror: {e}"
    finally:
        server.close()


def test_data_damaged_file_on_disk_is_fetched_again():
    """A parquet file already on disk without its footer fails the check and is downloaded again."""
    body = _data_parquet_bytes(50)
    with tempfile.TemporaryDirectory() as root:
        mirror = os.path.join(root, "mirror")
        os.makedirs(os.path.join(mirror, "example.org"))
        open(os.path.join(mirror, "example.org", "s.parquet"), "wb").write(body)
        dest = os.path.join(root, "run", "s.parquet")
        os.makedirs(os.path.dirname(dest))
        open(dest, "wb").write(body[:len(body) // 2])
        with _data_quiet():
            data.fetch("https://example.org/s.parquet", dest, mirror=mirror, backoff_s=0)
        assert open(dest, "rb").read() == body, "a truncated file on disk was trusted instead of refetched"


def test_data_mirror_dir_and_server_give_same_task_files():
    """The listing API works from a mirror folder (directory -> index.json) and from a mirror server alike."""
    listing = "huggingface.co/api/datasets/openai/gsm8k/parquet/main/train"
    shard_url = f"https://{listing}/0.parquet"
    table = pa.table({"question": ["What is 2+3?"], "answer": ["2+3=<<2+3=5>>5\n#### 5"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    files = {f"{listing}/index.json": json.dumps([shard_url]).encode(), f"{listing}/0.parquet": sink.getvalue().to_pybytes()}
    server = _DataServer(files)
    try:
        with tempfile.TemporaryDirectory() as root:
            for rel, body in files.items():
                os.makedirs(os.path.dirname(os.path.join(root, "m", rel)), exist_ok=True)
                open(os.path.join(root, "m", rel), "wb").write(body)
            for name, mirror in (("dir", os.path.join(root, "m")), ("server", server.url)):
                paths = data.fetch_task(os.path.join(root, name), "gsm8k-train", mirror, backoff_s=0)
                assert [open(p, "rb").read() for p in paths] == [files[f"{listing}/0.parquet"]], f"{name} mirror: wrong files"
                convs = tasks.load_task(os.path.join(root, name), "gsm8k-train")
                assert convs[0]["answer"] == "5", f"{name} mirror: GSM8K answer not parsed: {convs[0]}"
            # a listing that is not JSON gets an error that names the URL
            server.files[f"{listing}/index.json"] = b"<html>rate limited</html>"
            try:
                with _data_quiet():
                    data.fetch_task(os.path.join(root, "bad"), "gsm8k-train", server.url, backoff_s=0)
                raise AssertionError("a non-JSON listing was accepted")
            except ValueError as e:
                assert "JSON" in str(e) and "gsm8k" in str(e), f"unclear error for a non-JSON listing: {e}"
    finally:
        server.close()


def test_data_bad_shards_get_clear_errors():
    """A parquet without a text column, or with no rows, raises ValueError naming the file."""
    with tempfile.TemporaryDirectory() as root:
        for name, table in (("notext.parquet", pa.table({"body": ["x"]})), ("empty.parquet", pa.table({"text": pa.array([], pa.string())}))):
            path = os.path.join(root, name)
            pq.write_table(table, path)
            try:
                data.read_texts(path)
                raise AssertionError(f"{name} was read without complaint")
            except ValueError as e:
                assert name in str(e), f"error does not name the file: {e}"


def test_data_token_cache_roundtrip_and_rebuild():
    """The cache holds [bos] + encode(doc) per document, is reused as is, and is rebuilt for a new tokenizer."""
    tok = _data_tokenizer()
    with tempfile.TemporaryDirectory() as root:
        _data_run_dir(root)
        with _data_quiet():
            meta = data.build_token_cache(root, tok)
        tokens = np.array(data.load_tokens(root, "val"))
        docs = data.read_texts(data.shard_paths(root, "val")[0])
        expected = [t for d in docs for t in [tok.bos_id] + tok.encode(d)]
        assert tokens.tolist() == expected, "val.bin is not the BOS-prefixed concatenation of the encoded docs"
        assert meta["dtype"] == "uint16" and meta["tokens"]["val"] == len(expected), f"bad meta {meta}"
        stamp = os.path.getmtime(os.path.join(root, "tokens", "train.bin"))
        assert data.build_token_cache(root, tok) == meta, "an up-to-date cache was not reused"
        assert os.path.getmtime(os.path.join(root, "tokens", "train.bin")) == stamp, "an up-to-date cache was rebuilt"
        tok2 = _data_tokenizer(280)
        with _data_quiet():
            meta2 = data.build_token_cache(root, tok2)
        assert meta2["fingerprint"] == tok2.fingerprint() != meta["fingerprint"], "a new tokenizer did not rebuild the cache"
        assert np.array(data.load_tokens(root, "val")).tolist() == [t for d in docs for t in [tok2.bos_id] + tok2.encode(d)]


def test_data_pretrain_batches_invariants_and_resume():
    """Batches are int64 (B, T) with y = x shifted, BOS at every doc start, and a restored state replays exactly."""
    tok = _data_tokenizer()
    with tempfile.TemporaryDirectory() as root:
        _data_run_dir(root)
        with _data_quiet():
            data.build_token_cache(root, tok)
        stream = np.array(data.load_tokens(root, "train"))
        B, T = 3, 16
        gen = data.pretrain_batches(root, "train", B, T, seed=7)
        batches = [next(gen) for _ in range(40)]  # several epochs: the toy cache has ~15 steps
        x, y, _ = batches[0]
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64, f"bad batch {x.shape} {x.dtype}"
        for x, y, _ in batches:
            assert torch.equal(x[:, 1:], y[:, :-1]), "y is not x shifted by one"
            for row_x, row_y in zip(x.tolist(), y.tolist()):
                window = row_x + row_y[-1:]
                assert any(stream[i:i + T + 1].tolist() == window for i in range(0, len(stream) - T, T)), \
                    "a row is not a window of the token stream starting at a multiple of T"
        assert batches[-1][2]["epoch"] >= 1, "the generator never wrapped to a second epoch"
        # BOS sits exactly at document starts: one per document, the stream starts with it
        assert stream[0] == tok.bos_id and (stream == tok.bos_id).sum() == sum(len(data.read_texts(p)) for p in data.shard_paths(root, "train"))
        for k in (0, 5, 17):  # resume after batch k, across an epoch boundary too
            resumed = data.pretrain_batches(root, "train", B, T, seed=7, state=json.loads(json.dumps(batches[k][2])))
            for want in batches[k + 1:k + 4]:
                got = next(resumed)
                assert torch.equal(got[0], want[0]) and got[2] == want[2], f"resuming after batch {k} gave another batch"
        # val rows: every token of the val cache in order, rows of T+1
        rows = data.val_rows(root, T)
        val = np.array(data.load_tokens(root, "val"))
        assert rows.shape[1] == T + 1 and rows.reshape(-1).tolist() == val[:rows.size].tolist() and len(val) - rows.size <= T
        assert rows[0, 0] == tok.bos_id, "the first val row does not start with the first document's <|bos|>"


def _data_conversation(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_data_gsm8k_parts():
    """<<expr=result>> becomes a python part and a python_output part, the text around kept."""
    parts = tasks.gsm8k_parts("Half is <<48/2=24>>24.\nNo eq <<7>>!\n#### 24")
    assert parts == [{"type": "text", "text": "Half is "}, {"type": "python", "text": "48/2"},
                     {"type": "python_output", "text": "24"}, {"type": "text", "text": "24.\nNo eq "},
                     {"type": "python", "text": "7"}, {"type": "python_output", "text": ""},
                     {"type": "text", "text": "!\n#### 24"}], f"GSM8K parts wrong: {parts}"


def test_data_sft_masks_truncation_and_no_nan():
    """SFT rows train only assistant tokens, fit seq_len, skip conversations with nothing to train, and never make NaN."""
    tok = _data_tokenizer()
    convs = [_data_conversation("hi", "the cat sat"), _data_conversation("tiny doc " * 40, "a dog"),
             _data_conversation("we spell", "words " * 60)]
    T = 24
    x, y, state = next(data.sft_batches(tok, convs, 2, T))
    assert x.shape == y.shape and x.shape[1] <= T, f"SFT rows longer than seq_len: {x.shape}"
    ids, mask = render_conversation(tok, convs[0])
    assert x[0, :len(ids) - 1].tolist() == ids[:-1], "row 0 is not the rendered conversation"
    assert y[0, :len(ids) - 1].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])], "y is not masked by the assistant mask"
    assert (y[0, len(ids) - 1:] == -1).all() and (x[0, len(ids) - 1:] == tok.special_id("<|assistant_end|>")).all(), "bad padding"
    assert state == {"epoch": 1, "cursor": 0}, f"conversation 1 (assistant cut off) should be skipped: {state}"
    assert x[1, :4].tolist() == render_conversation(tok, convs[2])[0][:4], "row 1 should be conversation 2"
    assert (y[1] != -1).any() and x.shape[1] == T, "the long conversation was not cut to fit the row"
    x1, y1, _ = next(data.sft_batches(tok, convs, 1, T))  # batch size 1 still trains something
    assert x1.shape[0] == 1 and (y1 != -1).any(), "an SFT batch of one row has no trained target"
    try:
        next(data.sft_batches(tok, [convs[1]], 2, T))
        raise AssertionError("conversations with nothing to train were not reported")
    except ValueError as e:
        assert "seq_len" in str(e), f"unclear error: {e}"
    # the loss rule callers use: sum over targets / max(1, count) stays finite for an all-masked batch
    from gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=T, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    y_masked = torch.full_like(y, -1)
    loss = model(x, y_masked, loss_reduction="sum") / max(1, int((y_masked != -1).sum()))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), \
        "an all-masked micro-batch produced NaN: divide the summed loss by max(1, count)"


def test_data_midtrain_stream_trains_every_token_and_resumes():
    """Midtrain rows are the rendered conversations back to back, no target masked, and a state resumes exactly."""
    tok = _data_tokenizer()
    convs = [_data_conversation(f"q{i}", DATA_DOCS[i % 4]) for i in range(5)]
    stream = [t for c in convs for t in render_conversation(tok, c)[0]]
    B, T = 2, 8
    gen = data.midtrain_batches(tok, convs, B, T)
    batches = [next(gen) for _ in range(12)]
    flat_x = torch.cat([x.reshape(-1) for x, _, _ in batches]).tolist()
    assert flat_x[:len(stream)] == stream, "midtrain x is not the rendered stream in order"
    assert all((y != -1).all() and torch.equal(x[:, 1:], y[:, :-1]) for x, y, _ in batches), "midtrain masked a target"
    assert batches[-1][2]["epoch"] >= 1, "midtrain did not wrap into a second epoch"
    resumed = data.midtrain_batches(tok, convs, B, T, state=json.loads(json.dumps(batches[4][2])))
    assert all(torch.equal(next(resumed)[1], b[1]) for b in batches[5:9]), "a restored midtrain state gave other batches"


def test_data_synthetic_tasks_are_deterministic():
    """Spelling and identity data repeat exactly; train and test draws differ; the mixture oversamples listed twice."""
    words = ["strawberry", "apple", "banana", "kiwi"]
    bee = tasks.spelling_bee(words, 20)
    assert bee == tasks.spelling_bee(words, 20) and bee != tasks.spelling_bee(words, 20, "test"), "spelling draws not seeded"
    for c in bee:
        parts = c["messages"][1]["content"]
        word, letter = parts[2]["text"][1:-1].split("'.count('")
        assert str(word.count(letter.rstrip("')"))) == c["answer"] == parts[3]["text"], f"wrong count in {parts[2]}"
    assert tasks.simple_spelling(["kiwi"], 1)[0]["messages"][1]["content"] == "kiwi:k,i,w,i"
    assert tasks.identity_conversations() == tasks.identity_conversations(), "identity conversations not deterministic"
    a, b = [{"k": "a"}] * 3, [{"k": "b"}] * 2
    mixed = tasks.task_mixture([a, b, b])
    assert len(mixed) == 7 and sum(m["k"] == "b" for m in mixed) == 4 and mixed == tasks.task_mixture([a, b, b])
    mc = tasks.multiple_choice("2+2?", ["3", "4"], ["A", "B"], "B")["messages"][0]["content"]
    assert mc == "Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer.", mc


def test_data_mirror_integration():
    """The shared mirror's task files load through the listing API into conversations (skips without the mirror)."""
    mirror = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "mirror")
    if not os.path.isdir(mirror):
        raise unittest.SkipTest("no ../shared/mirror here")
    with tempfile.TemporaryDirectory() as root:
        for name in ("humaneval", "arc-challenge-test"):
            data.fetch_task(root, name, mirror)
        he, arc = tasks.load_task(root, "humaneval"), tasks.load_task(root, "arc-challenge-test")
        assert len(he) == 164 and "check" in he[0]["test"], "HumanEval rows not converted"
        assert len(arc) == 1172 and all(c["answer"] in c["letters"] for c in arc), "ARC answers not among the letters"

# --- serve ---

def _serve_model(seed=0, is_trained_like=True):
    """A tiny GPT over a byte-level tokenizer's 265 ids; random output layers so greedy decoding is not constant."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(seq_len=64, vocab_size=Tokenizer([]).vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    if is_trained_like:  # a fresh GPT has zero lm_head / c_proj, i.e. uniform logits
        for name, p in model.named_parameters():
            if p.dim() == 2 and not p.any():
                torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def _rows(model, tok, ids, **kwargs):
    """Run generate() to the end; returns per-row token lists and mask lists (None slots dropped)."""
    num_samples = kwargs.get("num_samples", 1)
    tokens, masks = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]
    for step_tokens, step_masks in generate(model, tok, ids, **kwargs):
        for i, (t, m) in enumerate(zip(step_tokens, step_masks)):
            if t is not None:
                tokens[i].append(t)
                masks[i].append(m)
    return tokens, masks


def test_serve_greedy_matches_naive_recompute():
    """At temperature 0, the KV-cache sampler picks the same tokens as recomputing the whole sequence each step."""
    tok, model = Tokenizer([]), _serve_model()
    prompt = tok.encode("The cat sat")
    stops = (tok.special_id("<|assistant_end|>"), tok.special_id("<|bos|>"))
    # the oracle: the only naive sampler in the repo; one full forward per new token, argmax
    device = torch.device("cpu")
    ids = list(prompt)
    precision = pick_precision(device)
    with torch.no_grad(), autocast(device, precision):
        for _ in range(30):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] in stops:
                break
    expected = ids[len(prompt):]
    tokens, masks = _rows(model, tok, prompt, max_tokens=30, temperature=0.0, seed=123, precision=precision)
    assert tokens[0] == expected, f"cached greedy {tokens[0]} != naive {expected}: KV cache positions or prefill broken"
    assert len(set(expected)) > 1, f"greedy output is constant {expected}: the test model is degenerate"
    assert masks[0] == [1] * len(expected), f"masks {masks[0]}: sampled tokens must have mask 1"


def test_serve_seed_reproducible():
    """The same seed gives the same sample; different seeds give different samples."""
    tok, model = Tokenizer([]), _serve_model()
    prompt = tok.encode("Hello")
    a, _ = _rows(model, tok, prompt, max_tokens=20, temperature=1.0, seed=1)
    b, _ = _rows(model, tok, prompt, max_tokens=20, temperature=1.0, seed=1)
    c, _ = _rows(model, tok, prompt, max_tokens=20, temperature=1.0, seed=2)
    assert a == b, f"seed 1 gave {a} then {b}: the torch.Generator is not the only source of randomness"
    assert a != c, f"seeds 1 and 2 both gave {a}: the seed does not reach the sampler"


def test_serve_first_token_differs_across_rows():
    """With num_samples rows, each row samples its own first token (nanochat OLD broadcast one)."""
    tok, model = Tokenizer([]), _serve_model(is_trained_like=False)  # uniform logits over 265 tokens
    tokens, _ = _rows(model, tok, tok.encode("Hi"), max_tokens=1, temperature=1.0, seed=0, num_samples=16)
    firsts = [row[0] for row in tokens]
    assert len(set(firsts)) > 1, f"all 16 rows began with {firsts[0]}: the first token is broadcast, not sampled per row"


def test_serve_max_tokens_and_context_respected():
    """No row gets more than max_tokens, the answer stops at the context, and a too-long prompt gets a clear error."""
    tok, model = Tokenizer([]), _serve_model(is_trained_like=False)
    tokens, _ = _rows(model, tok, tok.encode("Hi"), max_tokens=7, temperature=1.0, num_samples=3)
    assert all(1 <= len(row) <= 7 for row in tokens), f"row lengths {[len(r) for r in tokens]} exceed max_tokens 7"
    prompt = [65] * (model.config.seq_len - 3)
    tokens, _ = _rows(model, tok, prompt, max_tokens=100, temperature=0.0)
    assert len(tokens[0]) <= 3, f"{len(tokens[0])} new tokens after a {len(prompt)}-token prompt overflow the 64-token context"
    try:
        next(generate(model, tok, [65] * model.config.seq_len, max_tokens=5))
    except ValueError as e:
        assert "shorten" in str(e), f"the error should say what to do: {e}"
    else:
        raise AssertionError("a prompt filling the whole context was accepted")
    for ids, max_tokens in [([], 5), ([65], 0), ([65], -1)]:
        try:
            next(generate(model, tok, ids, max_tokens=max_tokens))
        except ValueError as e:
            assert "at least" in str(e), f"the error for prompt {ids}, max_tokens {max_tokens} should say what is needed: {e}"
        else:
            raise AssertionError(f"prompt {ids} with max_tokens {max_tokens} was accepted")
    try:
        SampleConfig(temperature=-1.0)
    except ValueError:
        pass
    else:
        raise AssertionError("SampleConfig accepted temperature -1")


def test_serve_generator_leaves_caller_autograd_alone():
    """Between two steps of generate(), the caller's code runs with autograd on and no inference mode."""
    tok, model = Tokenizer([]), _serve_model(is_trained_like=False)
    steps = generate(model, tok, tok.encode("Hi"), max_tokens=3, temperature=1.0)
    next(steps)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled(), \
        "generate() leaked no_grad/inference_mode into the caller: use the decorator, not a `with` across yields"
    steps.close()


class _ScriptedModel(torch.nn.Module):
    """Fake GPT whose call number n puts all probability on script[n]; records what it was fed."""

    def __init__(self, config, script):
        super().__init__()
        self.config, self.script, self.fed = config, script, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so generate() can find the device

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        self.fed.append(ids[:, -1].tolist())
        kv_cache.pos += T
        logits = torch.zeros(B, T, self.config.vocab_size)  # (B, T, V)
        logits[:, -1, self.script[min(len(self.fed) - 1, len(self.script) - 1)]] = 10.0
        return logits


def test_serve_calculator_tool_state_machine():
    """<|python_start|> expr <|python_end|> makes the sampler force <|output_start|> result <|output_end|> with mask 0, fed back one per step."""
    tok = Tokenizer([])  # no merges: ids 0..255 are bytes, then the 9 specials
    sp = {name: tok.special_id(name) for name in SPECIAL_TOKENS}
    config = GPTConfig(seq_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    for expr, result in [("6*7", "42"), ("x.y", None)]:
        # the model writes the tool call, then (after any forced answer) ends its turn
        call = [sp["<|python_start|>"], *tok.encode(expr), sp["<|python_end|>"]]
        forced = [] if result is None else [sp["<|output_start|>"], *tok.encode(result), sp["<|output_end|>"]]
        model = _ScriptedModel(config, call + [0] * len(forced) + [sp["<|assistant_end|>"]])
        tokens, masks = _rows(model, tok, tok.encode("q"), max_tokens=30, temperature=0.0)
        expected = call + forced + [sp["<|assistant_end|>"]]
        assert tokens[0] == expected, f"{expr}: got {tokens[0]}, expected {expected}: tool state machine broken"
        assert masks[0] == [1] * len(call) + [0] * len(forced) + [1], f"{expr}: masks {masks[0]}: forced tokens need mask 0"
        fed = [column[0] for column in model.fed[1:]]  # after the prefill, one token per step
        assert fed == expected[:-1], f"{expr}: model was fed {fed}; forced tokens must go back in one per step"


def test_serve_calculator_answers():
    """The calculator computes allowed arithmetic and str.count, strips commas, and prints results as GSM8K does."""
    cases = {"1+2": "3", "1,200 * 3": "3600", "48/2": "24", "0.1+0.2": "0.3", "-(3-5)*2": "4", "7//2": "3",
             "7 % 3": "1", "10/4": "2.5", "'strawberry'.count('r')": "3", "((2))": "2", "+30+46": "76"}
    for expr, want in cases.items():
        got = use_calculator(expr)
        assert got == want, f"use_calculator({expr!r}) = {got!r}, expected {want!r}"


def test_serve_calculator_refusals_never_raise():
    """Anything outside the allow-list returns None without raising: code, names, attributes, huge numbers or strings."""
    hostile = ["__import__('os').system('id')", "().__class__.__bases__", "''.__class__", "open('x')", "x",
               "9**9**9", "2**10", "'a'*10**9", "'a'*1000", "(lambda: 1)()", "[i for i in range(9)]",
               "import os", "1/0", "5 % 0", "1e999", "9" * 40, "99999999999*99999999999", "True+1",
               "'abc'.upper()", "'a'.count('a', 0)", "('a').count(x)", "(" * 300 + "1" + ")" * 300,
               "1 if 1 else 2", "\x00", "", "'" + "a" * 1000 + "'.count('a')", "'0' and signal or ', foo'.count('a')"]
    for expr in hostile:
        got = use_calculator(expr)
        assert got is None, f"use_calculator({expr[:40]!r}) returned {got!r}; it must refuse"


def test_serve_stream_text_whole_characters():
    """stream_text emits only whole UTF-8 characters (emoji and CJK split across tokens) and drops special tokens."""
    # merges that make tokens straddling characters: "hé😀世" is 68 C3 | A9 F0 9F | 98 80 E4 | B8 96
    tok = Tokenizer([(0x68, 0xC3), (0xA9, 0xF0), (257, 0x9F), (0x98, 0x80), (259, 0xE4), (0xB8, 0x96)])
    ids = [256, 258, 260, tok.special_id("<|python_start|>"), 261]
    out = list(stream_text(tok, iter(ids)))
    assert out == ["h", "é", "😀", "世"], f"streamed {out}: text must be cut only between whole characters"
    out = list(stream_text(tok, iter(Tokenizer([]).encode("世😀"))))  # no merges: one byte per token
    assert out == ["世", "😀"], f"byte-by-byte stream gave {out}: text released mid-character"
    assert list(stream_text(tok, iter([0xE4]))) == ["\ufffd"], "an unfinished character at the end must become U+FFFD"


# --- evals ---

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

# --- train_all ---


TRAIN_ALL_WORDS = "the cat dog sat ran on a mat far away then came back we spell words here is and of to".split()


def _train_all_task_rows(kind, n=12):
    """n short rows in the schema of one TASKS parquet (what the HF listing API serves)."""
    if kind == "smol-smoltalk":
        return [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}!"}],
                 "source": "test"} for i in range(n)]
    if kind == "mmlu":
        return [{"question": f"q{i}?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(n)]
    if kind == "ai2_arc":
        return [{"id": str(i), "question": f"q{i}?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                 "answerKey": "AB"[i % 2]} for i in range(n)]
    if kind == "gsm8k":
        return [{"question": f"{i}+1?", "answer": f"It is <<{i}+1={i + 1}>>{i + 1}.\n#### {i + 1}"} for i in range(n)]
    return [{"task_id": str(i), "prompt": "def f():\n", "canonical_solution": "    return 1\n",
             "test": "assert f() == 1", "entry_point": "f"} for i in range(n)]


def _train_all_mirror(root):
    """A --mirror folder at the real URLs' paths: 1 train + the val shard of synthetic text, every task, a zip."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(TRAIN_ALL_WORDS) for _ in range(rng.randint(20, 80))) + "." for _ in range(300)]
    files = {data.SHARD_URL.format(0): docs[:200], data.SHARD_URL.format(data.VAL_SHARD): docs[200:]}
    for url, texts in files.items():
        path = os.path.join(root, *url.split("://")[1].split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.table({"text": texts}), path)
    for repo, subset, split in data.TASKS.values():
        listing = os.path.join(root, *data.LISTING_URL.format(repo, subset, split).split("://")[1].split("/"))
        os.makedirs(listing, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(_train_all_task_rows(repo.split("/")[1])), os.path.join(listing, "0.parquet"))
        with open(os.path.join(listing, "index.json"), "w") as f:
            json.dump([data.LISTING_URL.format(repo, subset, split) + "/0.parquet"], f)
    bundle = os.path.join(root, *data.EVAL_BUNDLE_URL.split("://")[1].split("/"))
    os.makedirs(os.path.dirname(bundle), exist_ok=True)
    with zipfile.ZipFile(bundle, "w") as z:
        z.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
    return root


def _train_all_argv(run_dir, mirror, steps=3):
    """Flags for the tiniest run: --smoke shrunk further (1-layer GPT, 64-token rows, a few steps)."""
    argv = ["--smoke", "--run-dir", run_dir, "--mirror", mirror, "--vocab-size", "300", "--tokenizer-chars", "50000",
            "--pretrain-depth", "1", "--pretrain-head-dim", "16", "--pretrain-seq-len", "64", "--pretrain-eval-every", "100",
            "--eval-bpb-tokens", "1024", "--eval-sample-tokens", "4"]
    for phase in ("pretrain", "midtrain", "sft"):
        argv += [f"--{phase}-num-steps", str(steps), f"--{phase}-device-batch-size", "2", f"--{phase}-total-batch-tokens",
                 "256", f"--{phase}-eval-tokens", "256"]
    return argv


@functools.lru_cache(maxsize=None)
def _train_all_prepared():
    """(temp dir, mirror, run dir done through the tokenize phase), made once and shared by the tests below."""
    tmp = tempfile.TemporaryDirectory()  # the cache keeps it alive; it is removed when the interpreter exits
    mirror, run_dir = _train_all_mirror(os.path.join(tmp.name, "mirror")), os.path.join(tmp.name, "run")
    for phase in ("download", "tokenizer", "tokenize"):
        _train_all_quiet(train_all.main, _train_all_argv(run_dir, mirror) + ["--only", phase])
    return tmp, mirror, run_dir


def _train_all_quiet(fn, *args):
    """Run fn(*args) with stdout captured; return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def test_train_all_every_phase_writes_its_files():
    """main() on synthetic text runs every phase, writes the expected files, skips them on a rerun and
    stops with what to do when a setting that makes them stale changes."""
    _, mirror, prepared = _train_all_prepared()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, cwd = shutil.copytree(prepared, os.path.join(tmp, "run")), os.getcwd()
        os.chdir(tmp)  # report.md is also copied to the working directory
        try:
            _train_all_quiet(train_all.main, _train_all_argv(run_dir, mirror))
            for name in ("tokenizer.bin", "tokens/train.bin", "base/model.pt", "mid/meta.json", "sft/model.pt",
                         "eval.json", "report.md", "report.json", "loss.svg", "log.txt", os.path.join(tmp, "report.md")):
                assert os.path.exists(os.path.join(run_dir, name)), f"{name} missing: a phase did not write its output"
            assert not [d for d in os.listdir(os.path.join(run_dir, "base")) if d.startswith("resume")], "resume checkpoint left"
            report = json.load(open(os.path.join(run_dir, "report.json")))
            assert set(report["eval"]) == {"pretrain", "midtrain", "sft"}, f"eval.json lacks a model: {report['eval'].keys()}"
            assert "| Metric | BASE | MID | SFT |" in open(os.path.join(run_dir, "report.md")).read(), "summary table missing"
            assert open(os.path.join(run_dir, "loss.svg")).read().startswith("<svg"), "loss.svg is not an SVG"
            again = _train_all_quiet(train_all.main, _train_all_argv(run_dir, mirror))
            assert again.count("skipping") == 5, f"a rerun should skip the 5 finished phases:\n{again}"
            try:
                _train_all_quiet(train_all.main, _train_all_argv(run_dir, mirror) + ["--pretrain-depth", "2"])
                raise AssertionError("a changed --pretrain-depth was not detected")
            except SystemExit as e:
                assert "rm -rf" in str(e) and "base" in str(e) and "pretrain.depth 1 -> 2" in str(e), f"unclear message: {e}"
        finally:
            os.chdir(cwd)


def test_train_all_resume_is_exact():
    """A pretraining run killed mid-way and rerun ends with the same weights as one that never stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        _, mirror, prepared = _train_all_prepared()
        first, second = (shutil.copytree(prepared, os.path.join(tmp, name)) for name in "ab")
        argv = lambda run_dir: _train_all_argv(run_dir, mirror, steps=5) + ["--pretrain-save-every-min", "0"]
        _train_all_quiet(train_all.main, argv(first) + ["--only", "pretrain"])
        real, taken = train_all.pretrain_batches, []

        def dies_after_7_batches(*args, **kwargs):  # 2 micro-batches per step: the "kill" lands inside step 3
            for batch in real(*args, **kwargs):
                if len(taken) == 7:
                    raise KeyboardInterrupt("simulated kill")
                taken.append(1)
                yield batch
        train_all.pretrain_batches = dies_after_7_batches
        try:
            _train_all_quiet(train_all.main, argv(second) + ["--only", "pretrain"])
            raise AssertionError("the simulated kill did not happen")
        except KeyboardInterrupt:
            pass
        finally:
            train_all.pretrain_batches = real
        meta = json.load(open(os.path.join(second, "base", "resume", "meta.json")))
        assert meta["loop"]["step"] == 3, f"the checkpoint before the kill is at step {meta['loop']['step']}, not 3"
        log = _train_all_quiet(train_all.main, argv(second) + ["--only", "pretrain"])
        assert "resuming from" in log and "step 3" in log, f"the rerun did not resume from step 3:\n{log}"
        a = torch.load(os.path.join(first, "base", "model.pt"), weights_only=True)
        b = torch.load(os.path.join(second, "base", "model.pt"), weights_only=True)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6), f"{name} differs after resume: model, optimizer or data state not restored"


def test_train_all_lr_schedule_known_values():
    """nanochat's schedules: base flat then linear to 0 over the last 20%, SFT linear to 0, warmup linear from 0."""
    base = train_all.PretrainConfig(num_steps=100)
    assert [train_all.lr_scale(s, base) for s in (0, 50, 80, 90, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0], "base schedule wrong"
    sft = train_all.SFTConfig(num_steps=10)
    assert [train_all.lr_scale(s, sft) for s in (0, 5, 9)] == [1.0, 0.5, 0.1], "SFT schedule wrong"
    warm = train_all.MidtrainConfig(num_steps=10, warmup_frac=0.2, warmdown_frac=0.2, final_lr_frac=0.5)
    assert [train_all.lr_scale(s, warm) for s in (0, 1, 2, 8, 9)] == [0.5, 1.0, 1.0, 1.0, 0.75], "warmup/final_lr_frac wrong"
    assert [round(train_all.muon_momentum(s), 12) for s in (0, 150, 300, 1000)] == [0.85, 0.9, 0.95, 0.95], \
        "Muon momentum warmup wrong"


def test_train_all_cli_from_dataclasses():
    """Every dataclass field has a typed --flag whose help is the field's comment; flags beat presets beat defaults."""
    parser = train_all.build_parser()
    help_text = " ".join(parser.format_help().split())
    for section, (prefix, cls) in train_all.SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = "--" + "-".join(filter(None, [prefix, f.name])).replace("_", "-")
            assert flag in help_text, f"{flag} missing from --help: the CLI is not generated from {cls.__name__}"
    assert "context length in tokens" in help_text, "field comments are not used as help"
    args = parser.parse_args(["--smoke", "--pretrain-depth", "3", "--sft-lr-frac", "0.5"])
    cfgs = {s: data.config_from_args(args, cls, prefix, train_all.PRESETS["smoke"].get(s))
            for s, (prefix, cls) in train_all.SECTIONS.items()}
    assert cfgs["pretrain"].depth == 3 and isinstance(cfgs["sft"].lr_frac, float), "flag values not parsed or typed"
    assert cfgs["pretrain"].seq_len == train_all.PRESETS["smoke"]["pretrain"]["seq_len"], "preset not applied"
    assert cfgs["midtrain"].matrix_lr == train_all.MidtrainConfig.matrix_lr, "default lost"


def test_train_all_tinychat_one_shot_and_interactive():
    """tinychat answers one prompt, then chats through stdin (/clear, /quit), printing no special tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _train_all_quiet(tinychat.main, ["--run-dir", tmp, "hi"])
            raise AssertionError("no model, yet tinychat did not stop")
        except SystemExit as e:
            assert "python train_all.py" in str(e), f"the no-model message should say what to run: {e}"
        tok = Tokenizer.train([" ".join(TRAIN_ALL_WORDS)] * 20, 300)
        tok.save(os.path.join(tmp, "tokenizer.bin"))
        torch.manual_seed(0)
        model = GPT(config_from_depth(1, tok.vocab_size, 128, head_dim=16))
        save_checkpoint(os.path.join(tmp, "sft"), model, {})
        out = _train_all_quiet(tinychat.main, ["--run-dir", tmp, "--max-tokens", "8", "hello there"])
        assert out.strip() and "<|" not in out, f"one-shot printed nothing or a special token: {out!r}"
        stdin, sys.stdin = sys.stdin, io.StringIO("hello\n/clear\nthe cat\n/quit\nnever read\n")
        try:
            out = _train_all_quiet(tinychat.main, ["--run-dir", tmp, "--max-tokens", "8", "-t", "0"])
        finally:
            sys.stdin = stdin
        assert out.count("tinychat> ") == 2 and "(conversation cleared)" in out, f"interactive loop wrong:\n{out}"
        assert "<|" not in out, f"a special token reached the screen: {out!r}"


# --- runner ---

def main():
    """Run every test_* function (filtered by argv[1]), print PASS/FAIL/SKIP, exit 1 on failure."""
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    # One intra-op thread: the test models are tiny, so thread hand-offs cost more than they save
    # (measured: the serve tests took 3.4 s with one thread, 26 s with two on a busy 2-core machine).
    torch.set_num_threads(1)
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f) and pattern in n]
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            status, note = "PASS", ""
        except unittest.SkipTest as e:
            status, note = "SKIP", f" ({e})"
        except Exception as e:  # the runner reports every failure and goes on
            status, note = "FAIL", f"\n    {type(e).__name__}: {e}"
        counts[status] += 1
        print(f"{status} {name} {time.time() - t0:.2f}s{note}", flush=True)
    skipped = f", {counts['SKIP']} skipped" if counts["SKIP"] else ""
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed{skipped}")
    sys.exit(1 if counts["FAIL"] else 0)


if __name__ == "__main__":
    main()
