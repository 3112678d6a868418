"""
Tests of sampler.py: greedy KV-cache sampling against a naive recompute loop, seeds, limits, the
calculator tool (state machine, answers, refusals) and UTF-8-safe streaming.
"""
import os
import tempfile

import torch

from bpe import SPECIAL_TOKENS, Tokenizer
from cli import pick_precision
from gpt import GPTConfig, autocast, save_checkpoint
from sampler import SampleConfig, generate, load_model, stop_at, stream_text, use_calculator
from tests.fixtures import ScriptedModel, byte_gpt


def _rows(model, tok, ids, **kwargs):
    """Run generate() to the end; returns per-row token lists and mask lists (None slots
    dropped)."""
    num_samples = kwargs.get("num_samples", 1)
    tokens, masks = [[] for _ in range(num_samples)], [[] for _ in range(num_samples)]
    for step_tokens, step_masks in generate(model, tok, ids, **kwargs):
        for i, (t, m) in enumerate(zip(step_tokens, step_masks)):
            if t is not None:
                tokens[i].append(t)
                masks[i].append(m)
    return tokens, masks


def test_sampler_greedy_matches_naive_recompute():
    """At temperature 0, the KV-cache sampler picks the same tokens as recomputing the whole
    sequence each step."""
    tok, model = Tokenizer([]), byte_gpt()
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
    tokens, masks = _rows(model, tok, prompt, max_tokens=30, temperature=0.0, seed=123,
                          precision=precision)
    assert tokens[0] == expected, (f"cached greedy {tokens[0]} != naive {expected}: KV cache "
                                   "positions or prefill broken")
    assert len(set(expected)) > 1, (f"greedy output is constant {expected}: the test model is "
                                    "degenerate")
    assert masks[0] == [1] * len(expected), f"masks {masks[0]}: sampled tokens must have mask 1"


def test_sampler_seed_reproducible():
    """The same seed gives the same sample; different seeds give different samples."""
    tok, model = Tokenizer([]), byte_gpt()
    prompt = tok.encode("Hello")
    a, _ = _rows(model, tok, prompt, max_tokens=20, temperature=1.0, seed=1)
    b, _ = _rows(model, tok, prompt, max_tokens=20, temperature=1.0, seed=1)
    c, _ = _rows(model, tok, prompt, max_tokens=20, temperature=1.0, seed=2)
    assert a == b, (f"seed 1 gave {a} then {b}: the torch.Generator is not the only source of "
                    "randomness")
    assert a != c, f"seeds 1 and 2 both gave {a}: the seed does not reach the sampler"


def test_sampler_first_token_differs_across_rows():
    """With num_samples rows, each row samples its own first token (nanochat OLD broadcast one)."""
    tok, model = Tokenizer([]), byte_gpt(is_trained_like=False)  # uniform logits over 265 tokens
    tokens, _ = _rows(model, tok, tok.encode("Hi"), max_tokens=1, temperature=1.0, seed=0,
                      num_samples=16)
    firsts = [row[0] for row in tokens]
    assert len(set(firsts)) > 1, (f"all 16 rows began with {firsts[0]}: the first token is "
                                  "broadcast, not sampled per row")


def test_sampler_max_tokens_and_context_respected():
    """No row gets more than max_tokens, the answer stops at the context, and a too-long prompt
    gets a clear error."""
    tok, model = Tokenizer([]), byte_gpt(is_trained_like=False)
    tokens, _ = _rows(model, tok, tok.encode("Hi"), max_tokens=7, temperature=1.0, num_samples=3)
    assert all(1 <= len(row) <= 7 for row in tokens), (f"row lengths {[len(r) for r in tokens]} "
                                                       "exceed max_tokens 7")
    prompt = [65] * (model.config.seq_len - 3)
    tokens, _ = _rows(model, tok, prompt, max_tokens=100, temperature=0.0)
    assert len(tokens[0]) <= 3, (f"{len(tokens[0])} new tokens after a {len(prompt)}-token prompt "
                                 "overflow the 64-token context")
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
            assert "at least" in str(e), (f"the error for prompt {ids}, max_tokens {max_tokens} "
                                          f"should say what is needed: {e}")
        else:
            raise AssertionError(f"prompt {ids} with max_tokens {max_tokens} was accepted")
    try:
        SampleConfig(temperature=-1.0)
    except ValueError:
        pass
    else:
        raise AssertionError("SampleConfig accepted temperature -1")


def test_sampler_top_p_keeps_the_nucleus():
    """top_p samples only the fewest likeliest tokens whose mass reaches top_p; top_p 1 changes
    nothing."""
    tok = Tokenizer([])
    config = GPTConfig(seq_len=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=4)
    model = ScriptedModel(config, [0])
    logits = torch.full((tok.vocab_size,), float("-inf"))
    logits[:4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()  # bytes 0..3 with these probabilities
    model.forward = lambda ids, kv_cache, last_only: logits.expand(ids.shape[0], 1, -1)  # (B, 1, V)
    for top_p, nucleus in ((0.7, {0, 1}), (0.85, {0, 1, 2}), (0.0, {0}), (1.0, {0, 1, 2, 3})):
        tokens, _ = _rows(model, tok, [tok.bos_id], max_tokens=1, temperature=1.0, top_p=top_p,
                          num_samples=2000)
        drawn = {row[0] for row in tokens}
        assert drawn == nucleus, (
            f"top_p {top_p} drew {sorted(drawn)}, want exactly {sorted(nucleus)}: "
            "the nucleus cut is off")
    plain, _ = _rows(byte_gpt(), tok, tok.encode("Hi"), max_tokens=20, temperature=1.0, seed=3)
    with_p, _ = _rows(byte_gpt(), tok, tok.encode("Hi"), max_tokens=20, temperature=1.0, seed=3,
                      top_p=1.0)
    assert plain == with_p, "top_p 1 changed the sample: it must leave the distribution alone"
    try:
        SampleConfig(top_p=1.5)
        raise AssertionError("SampleConfig accepted top_p 1.5")
    except ValueError as e:
        assert "top_p" in str(e), f"the error should name top_p: {e}"


def test_sampler_penalties_lower_what_was_written():
    """frequency_penalty lowers a token's logit per time it was written, presence_penalty once;
    0 changes nothing; out-of-range values are refused."""
    tok = Tokenizer([])
    config = GPTConfig(seq_len=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=4)
    model = ScriptedModel(config, [0])
    logits = torch.zeros(tok.vocab_size)  # (V,) "a" at 1.5, every other token at 0
    logits[ord("a")] = 1.5
    model.forward = lambda ids, kv_cache, last_only: logits.expand(ids.shape[0], 1, -1)  # (B, 1, V)
    def greedy(**penalties):
        tokens, _ = _rows(model, tok, [tok.bos_id], max_tokens=6, temperature=0.0, **penalties)
        return bytes(tokens[0])
    assert greedy() == b"aaaaaa", "without penalties the likeliest token wins every step"
    # frequency 0.5: "a" scores 1.5, 1.0, 0.5, then 0, a tie that the first zero (byte 0) wins;
    # byte 0 then scores -0.5 and byte 1 wins, and so on
    assert greedy(frequency_penalty=0.5) == b"aaa\x00\x01\x02", greedy(frequency_penalty=0.5)
    # presence 2 > 1.5: a written token falls below every unwritten one at once; presence 1 lowers
    # "a" to 0.5 however often it was written (a per-count penalty would let byte 0 win by step 3)
    assert greedy(presence_penalty=2.0) == b"a\x00\x01\x02\x03\x04", greedy(presence_penalty=2.0)
    assert greedy(presence_penalty=1.0) == b"aaaaaa", greedy(presence_penalty=1.0)
    for name in ("frequency_penalty", "presence_penalty"):
        try:
            SampleConfig(**{name: 2.5})
            raise AssertionError(f"SampleConfig accepted {name} 2.5")
        except ValueError as e:
            assert name in str(e), f"the error should name {name}: {e}"


def test_sampler_generator_leaves_caller_autograd_alone():
    """Between two steps of generate(), the caller's code runs with autograd on and no inference
    mode."""
    tok, model = Tokenizer([]), byte_gpt(is_trained_like=False)
    steps = generate(model, tok, tok.encode("Hi"), max_tokens=3, temperature=1.0)
    next(steps)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled(), (
        "generate() leaked no_grad/inference_mode into the caller: use the decorator, "
        "not a `with` across yields")
    steps.close()


def test_sampler_calculator_tool_state_machine():
    """<|python_start|> expr <|python_end|> makes the sampler force <|output_start|> result
    <|output_end|> with mask 0, fed back one per step."""
    tok = Tokenizer([])  # no merges: ids 0..255 are bytes, then the 9 specials
    sp = {name: tok.special_id(name) for name in SPECIAL_TOKENS}
    config = GPTConfig(seq_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=8)
    for expr, result in [("6*7", "42"), ("x.y", None)]:
        # the model writes the tool call, then (after any forced answer) ends its turn
        call = [sp["<|python_start|>"], *tok.encode(expr), sp["<|python_end|>"]]
        forced = [] if result is None else [sp["<|output_start|>"], *tok.encode(result),
                                            sp["<|output_end|>"]]
        model = ScriptedModel(config, call + [0] * len(forced) + [sp["<|assistant_end|>"]])
        tokens, masks = _rows(model, tok, tok.encode("q"), max_tokens=30, temperature=0.0)
        expected = call + forced + [sp["<|assistant_end|>"]]
        assert tokens[0] == expected, (f"{expr}: got {tokens[0]}, expected {expected}: tool state "
                                       "machine broken")
        assert masks[0] == [1] * len(call) + [0] * len(forced) + [1], (
            f"{expr}: masks {masks[0]}: forced tokens need mask 0")
        fed = [column[0] for column in model.fed[1:]]  # after the prefill, one token per step
        assert fed == expected[:-1], (f"{expr}: model was fed {fed}; forced tokens must go back in "
                                      "one per step")


def test_sampler_calculator_answers():
    """The calculator computes allowed arithmetic and str.count, strips commas, and prints results
    as GSM8K does."""
    cases = {
        "1+2": "3",
        "1,200 * 3": "3600",
        "48/2": "24",
        "0.1+0.2": "0.3",
        "-(3-5)*2": "4",
        "7//2": "3",
        "7 % 3": "1",
        "10/4": "2.5",
        "'strawberry'.count('r')": "3",
        "((2))": "2",
        "+30+46": "76",
    }
    for expr, want in cases.items():
        got = use_calculator(expr)
        assert got == want, f"use_calculator({expr!r}) = {got!r}, expected {want!r}"


def test_sampler_calculator_refusals_never_raise():
    """Anything outside the allow-list returns None without raising: code, names, attributes,
    huge numbers or strings."""
    hostile = [
        "__import__('os').system('id')",
        "().__class__.__bases__",
        "''.__class__",
        "open('x')",
        "x",
        "9**9**9",
        "2**10",
        "'a'*10**9",
        "'a'*1000",
        "(lambda: 1)()",
        "[i for i in range(9)]",
        "import os",
        "1/0",
        "5 % 0",
        "1e999",
        "9" * 40,
        "99999999999*99999999999",
        "True+1",
        "'abc'.upper()",
        "'a'.count('a', 0)",
        "('a').count(x)",
        "(" * 300 + "1" + ")" * 300,
        "1 if 1 else 2",
        "\x00",
        "",
        "'" + "a" * 1000 + "'.count('a')",
        "'0' and signal or ', foo'.count('a')",
    ]
    for expr in hostile:
        got = use_calculator(expr)
        assert got is None, f"use_calculator({expr[:40]!r}) returned {got!r}; it must refuse"


def test_sampler_stream_text_whole_characters():
    """stream_text emits only whole UTF-8 characters (emoji and CJK split across tokens) and drops
    special tokens."""
    # merges that make tokens straddling characters: "hé😀世" is 68 C3 | A9 F0 9F | 98 80 E4 | B8 96
    tok = Tokenizer([(0x68, 0xC3), (0xA9, 0xF0), (257, 0x9F),
                     (0x98, 0x80), (259, 0xE4), (0xB8, 0x96)])
    ids = [256, 258, 260, tok.special_id("<|python_start|>"), 261]
    out = list(stream_text(tok, iter(ids)))
    assert out == ["h", "é", "😀", "世"], (f"streamed {out}: text must be cut only between whole "
                                            "characters")
    out = list(stream_text(tok, iter(Tokenizer([]).encode("世😀"))))  # no merges: one byte per token
    assert out == ["世", "😀"], f"byte-by-byte stream gave {out}: text released mid-character"
    assert list(stream_text(tok, iter([0xE4]))) == ["\ufffd"], (
        "an unfinished character at the end must become U+FFFD")


def test_sampler_stop_at_cuts_split_stop_strings():
    """stop_at ends the text before the first stop string, even one split across pieces."""
    def pieces(*texts):
        yield from texts
    cases = [
        (["a#", "#b"], ["##"], ["a"]),
        (["##x"], ["##"], []),
        (["ab", "c"], ["xy"], ["ab", "c"]),
        (["a#"], ["##"], ["a", "#"]),
        (["hello world"], ["world", "lo"], ["hel"]),
        (["ab"], [], ["ab"]),
    ]
    for texts, stops, want in cases:
        got = list(stop_at(pieces(*texts), stops))
        assert got == want, (f"stop_at({texts}, {stops}) gave {got}, want {want}: "
                             "held-back tail wrong")
    source = pieces("x", "END", "never")
    assert list(stop_at(source, ["END"])) == ["x"], "text after the stop string came through"
    assert source.gi_frame is None, "stop_at did not close its source, so generate() would run on"


def test_sampler_load_model_picks_newest_phase():
    """load_model takes sft, else mid, else base; an explicit phase that is missing names the
    command to run."""
    tok = Tokenizer([])
    with tempfile.TemporaryDirectory() as run_dir:
        tok.save(os.path.join(run_dir, "tokenizer.bin"))
        for phase, folder in (("base", "base"), ("mid", "mid")):
            save_checkpoint(os.path.join(run_dir, folder), byte_gpt(), {})
            assert load_model(run_dir, None, "cpu")[2] == phase, (f"the newest model is {phase}, "
                                                                   "not picked")
        try:
            load_model(run_dir, "sft", "cpu")
            raise AssertionError("a missing sft model was not reported")
        except FileNotFoundError as e:
            assert "python train_all.py" in str(e), f"the message should say what to run: {e}"
