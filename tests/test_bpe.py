"""
Tests of bpe.py: merges against a slow pure-Python oracle, the known answer, encode, round trips,
special tokens, save/load and the split pattern.
"""
import os
import random
import re
import tempfile
from collections import Counter

from bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from tests.fixtures import BPE_CORPUS, ROOT, bpe_tiny_tokenizer


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


def test_bpe_merges_match_slow_oracle():
    """The numpy BPE learns exactly the oracle's merges, with ties, runs like 'aaaa' and random
    texts."""
    rng = random.Random(0)
    cases = [(BPE_CORPUS, 80), (["aaaaaaaaaaa aaa aaaa"], 10), (["ab ba " * 5 + "cd dc " * 5], 8)]
    for _ in range(25):
        alphabet = rng.choice(["ab", "aab ", "xyz \n", "the cat 123 ", "é😀中 a"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
                 for _ in range(3)]
        cases.append((texts, rng.randint(1, 40)))
    for texts, num_merges in cases:
        fast = Tokenizer.train(texts, 256 + num_merges + len(SPECIAL_TOKENS)).merges
        slow = bpe_slow_merges(texts, num_merges)
        assert fast == slow, (f"merges differ from the oracle on {texts!r}: "
                              f"incremental pair counts or tie order broken\n{fast}\n{slow}")


def test_bpe_known_answer():
    """'aaabdaaabac' with 3 merges encodes to [258, 100, 258, 97, 99] (the Wikipedia BPE
    example)."""
    tok = Tokenizer.train(["aaabdaaabac"], 256 + 3 + len(SPECIAL_TOKENS))
    assert tok.merges == [(97, 97), (97, 98), (256, 257)], f"wrong merges {tok.merges}"
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99], \
        f"wrong ids {tok.encode('aaabdaaabac')}"


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
        assert tok.encode(text) == expected, \
            f"encode of {text!r} is not merge-by-rank: encode_chunk broken"


def test_bpe_round_trips():
    """decode(encode(s)) == s for emoji, CJK, combining marks, whitespace, controls, '' and random
    Unicode."""
    tok = bpe_tiny_tokenizer()
    rng = random.Random(1)
    texts = ["", " ", "\n\n\n", "  \t \r\n x  ", "🙂👍🏽 家族 👨‍👩‍👧", "你好世界 🌍", "e\u0301\u0308 a\u20dd",
             "\x00\x01\x7f\x1c\x1d", "<|bos|> <|assistant_end|>", "m² ½ Ⅻ ① 12345"]
    for _ in range(2000):
        top = rng.choice([0x80, 0x800, 0x10000, 0x110000])
        chars = [chr(rng.randrange(top)) for _ in range(rng.randint(0, 12))]
        # no lone surrogates
        texts.append("".join(c for c in chars if not 0xD800 <= ord(c) < 0xE000))
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, \
            f"round trip failed for {text!r}: split or byte fallback lost text"


def test_bpe_specials_only_from_ids():
    """'<|bos|>' in text encodes as ordinary text; special ids follow the merges in nanochat's
    order."""
    tok = bpe_tiny_tokenizer(num_merges=40)
    assert tok.vocab_size == 256 + 40 + 9, \
        f"vocab_size {tok.vocab_size} must count bytes, merges and specials"
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(296, 305)), \
        "special ids out of order"
    assert tok.bos_id == 296 and tok.bos_id not in tok.encode("<|bos|>"), \
        "special text became a special token"
    assert tok.decode([tok.bos_id]) == "<|bos|>" and tok.token_bytes(tok.bos_id) == b""
    for bad in ([-1], [tok.vocab_size], [97, -3]):  # -1 used to decode as the last merge's bytes
        try:
            tok.decode(bad)
            raise AssertionError(f"decode({bad}) must raise ValueError, not wrap around")
        except ValueError as e:
            assert str(tok.vocab_size) in str(e), f"the error should give the valid range: {e}"
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (305,) and lengths[296:].sum() == 0 and lengths[97] == 1
    assert all(lengths[i] == len(tok.token_bytes(i)) for i in range(296)), \
        "token_byte_lengths != token_bytes"
    try:
        tok.special_id("<|system|>")
        raise AssertionError("an unknown special token name must raise ValueError")
    except ValueError:
        pass


def test_bpe_save_load():
    """save then load gives the same merges, ids and fingerprint; missing or foreign files say what
    to run."""
    tok = bpe_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.bin")
        tok.save(path)
        loaded = Tokenizer.load(path)
        assert loaded.merges == tok.merges and loaded.fingerprint() == tok.fingerprint(), \
            "save/load lost merges"
        assert loaded.encode(BPE_CORPUS[2]) == tok.encode(BPE_CORPUS[2])
        assert not os.path.exists(path + ".tmp"), "save must os.replace its .tmp file"
        assert bpe_tiny_tokenizer(59).fingerprint() != tok.fingerprint(), \
            "fingerprint ignores the merges"
        with open(path, "w") as f:
            f.write("version 0\n")
        for bad_path, error in [(path, ValueError), (path + ".missing", FileNotFoundError)]:
            try:
                Tokenizer.load(bad_path)
                raise AssertionError(f"loading {bad_path} must raise {error.__name__}")
            except error as e:
                assert "train_all.py" in str(e), f"the error must say what to run: {e}"


def test_bpe_split_pattern_matches_gpt4_style():
    """SPLIT_PATTERN cuts text like nanochat's \\p{L}/\\p{N} pattern (expected chunks from the
    regex module)."""
    cases = {
        "Hello world's 12345 apples!!\n\n  x": ["Hello", " world", "'s", " ", "12", "34", "5",
                                               " apples", "!!\n\n", " ", " x"],
        "snake_case __init__ m² ½ café": ["snake", "_case", " __", "init", "__", " m", "²", " ",
                                          "½", " café"],
        "I'LL don't  \t\n end": ["I", "'LL", " don", "'t", "  \t\n", " end"],
    }
    for text, chunks in cases.items():
        assert re.findall(SPLIT_PATTERN, text) == chunks, \
            f"split of {text!r} drifted from nanochat's pattern"


def test_bpe_source_compiles_without_warnings():
    """bpe.py compiles with warnings as errors: no invalid escape such as \\w in a non-raw
    docstring."""
    import warnings
    path = os.path.join(ROOT, "bpe.py")
    with open(path, encoding="utf-8") as f, warnings.catch_warnings():
        # invalid escapes warn on 3.11 and are SyntaxWarnings from 3.12
        warnings.simplefilter("error")
        compile(f.read(), path, "exec")  # raises SyntaxError naming the line if a warning fires
