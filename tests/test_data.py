"""
Tests of data.py: downloads against a local HTTP server (retries, cut bodies, clear errors),
the token cache, and the pretraining, midtraining and SFT batch streams.
"""
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import data
import tasks
from bpe import Tokenizer
from chat import render_conversation
from tests.fixtures import FileServer, quiet


DATA_DOCS = ["the cat sat on the mat. " * 3,
             "a dog ran far away, then came back!",
             "tiny doc",
             "we spell words " * 5]


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


def _data_no_tmp(root):
    return [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns if n.endswith(".tmp")]


def test_data_download_retries_500_and_cut_body():
    """500, a body cut short, a half file, then a timeout: the download still ends identical, with
    no .tmp."""
    body = _data_parquet_bytes(200)
    url = "https://example.org/d/shard.parquet"
    server = FileServer({"example.org/d/shard.parquet": body})
    server.plan["example.org/d/shard.parquet"] = ["500", "cut", "half", "slow"]
    try:
        with tempfile.TemporaryDirectory() as root:
            with quiet():
                dest = data.fetch(url, data.url_to_path(root, url), mirror=server.url, timeout=0.2,
                                  backoff_s=0)
            assert open(dest, "rb").read() == body, \
                "downloaded file differs from the source: retry or check is broken"
            assert len(server.hits) == 5, \
                f"expected 5 requests (500, cut, half, slow, ok), got {server.hits}"
            assert not _data_no_tmp(root), "a .tmp file was left behind after retries"
    finally:
        server.close()


def test_data_download_gives_up_with_clear_error():
    """A URL that keeps failing raises ConnectionError with a next step, leaving neither the file
    nor a .tmp."""
    server = FileServer({"example.org/x.parquet": _data_parquet_bytes()})
    server.plan["example.org/x.parquet"] = ["500"] * 3
    try:
        with tempfile.TemporaryDirectory() as root:
            dest = os.path.join(root, "x.parquet")
            try:
                with quiet():
                    data.fetch("https://example.org/x.parquet", dest, mirror=server.url,
                               max_attempts=3, backoff_s=0)
                raise AssertionError("fetch succeeded although every attempt got HTTP 500")
            except ConnectionError as e:
                assert "x.parquet" in str(e) and "complete mirror" in str(e), \
                    f"error does not say what to do next: {e}"
            assert not os.path.exists(dest) and not _data_no_tmp(root), \
                "failed download left a file behind"
            try:  # a 404 is not retried
                data.fetch("https://example.org/missing.json", dest, mirror=server.url, backoff_s=0)
                raise AssertionError("a 404 counted as a download")
            except ConnectionError:
                assert server.hits.count("example.org/missing.json") == 1, "a 404 was retried"
            try:  # without a mirror the hint is the network or --mirror (port 9 refuses at once)
                data.fetch("http://127.0.0.1:9/x.json", os.path.join(root, "y.json"),
                           max_attempts=1)
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
        with quiet():
            data.fetch("https://example.org/s.parquet", dest, mirror=mirror, backoff_s=0)
        assert open(dest, "rb").read() == body, \
            "a truncated file on disk was trusted instead of refetched"


def test_data_mirror_dir_and_server_give_same_task_files():
    """The listing API works from a mirror folder (directory -> index.json) and from a mirror server
    alike."""
    listing = "huggingface.co/api/datasets/openai/gsm8k/parquet/main/train"
    shard_url = f"https://{listing}/0.parquet"
    table = pa.table({"question": ["What is 2+3?"], "answer": ["2+3=<<2+3=5>>5\n#### 5"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    files = {f"{listing}/index.json": json.dumps([shard_url]).encode(),
             f"{listing}/0.parquet": sink.getvalue().to_pybytes()}
    server = FileServer(files)
    try:
        with tempfile.TemporaryDirectory() as root:
            for rel, body in files.items():
                os.makedirs(os.path.dirname(os.path.join(root, "m", rel)), exist_ok=True)
                open(os.path.join(root, "m", rel), "wb").write(body)
            for name, mirror in (("dir", os.path.join(root, "m")), ("server", server.url)):
                paths = data.fetch_task(os.path.join(root, name), "gsm8k-train", mirror,
                                        backoff_s=0)
                assert [open(p, "rb").read() for p in paths] == [files[f"{listing}/0.parquet"]], \
                    f"{name} mirror: wrong files"
                convs = tasks.load_task(os.path.join(root, name), "gsm8k-train")
                assert convs[0]["answer"] == "5", \
                    f"{name} mirror: GSM8K answer not parsed: {convs[0]}"
            # a listing that is not JSON gets an error that names the URL
            server.files[f"{listing}/index.json"] = b"<html>rate limited</html>"
            try:
                with quiet():
                    data.fetch_task(os.path.join(root, "bad"), "gsm8k-train", server.url,
                                    backoff_s=0)
                raise AssertionError("a non-JSON listing was accepted")
            except ValueError as e:
                assert "JSON" in str(e) and "gsm8k" in str(e), \
                    f"unclear error for a non-JSON listing: {e}"
    finally:
        server.close()


def test_data_bad_shards_get_clear_errors():
    """A parquet without a text column, or with no rows, raises ValueError naming the file."""
    with tempfile.TemporaryDirectory() as root:
        for name, table in (("notext.parquet", pa.table({"body": ["x"]})),
                            ("empty.parquet", pa.table({"text": pa.array([], pa.string())}))):
            path = os.path.join(root, name)
            pq.write_table(table, path)
            try:
                data.read_texts(path)
                raise AssertionError(f"{name} was read without complaint")
            except ValueError as e:
                assert name in str(e), f"error does not name the file: {e}"


def test_data_token_cache_roundtrip_and_rebuild():
    """The cache holds [bos] + encode(doc) per document, is reused as is, and is rebuilt for a new
    tokenizer."""
    tok = _data_tokenizer()
    with tempfile.TemporaryDirectory() as root:
        _data_run_dir(root)
        with quiet():
            meta = data.build_token_cache(root, tok)
        tokens = np.array(data.load_tokens(root, "val"))
        docs = data.read_texts(data.shard_paths(root, "val")[0])
        expected = [t for d in docs for t in [tok.bos_id] + tok.encode(d)]
        assert tokens.tolist() == expected, \
            "val.bin is not the BOS-prefixed concatenation of the encoded docs"
        assert meta["dtype"] == "uint16" and meta["tokens"]["val"] == len(expected), \
            f"bad meta {meta}"
        stamp = os.path.getmtime(os.path.join(root, "tokens", "train.bin"))
        assert data.build_token_cache(root, tok) == meta, "an up-to-date cache was not reused"
        assert os.path.getmtime(os.path.join(root, "tokens", "train.bin")) == stamp, \
            "an up-to-date cache was rebuilt"
        tok2 = _data_tokenizer(280)
        with quiet():
            meta2 = data.build_token_cache(root, tok2)
        assert meta2["fingerprint"] == tok2.fingerprint() != meta["fingerprint"], \
            "a new tokenizer did not rebuild the cache"
        assert (np.array(data.load_tokens(root, "val")).tolist()
                == [t for d in docs for t in [tok2.bos_id] + tok2.encode(d)])


def test_data_token_cache_with_chats():
    """use_chats appends each SmolTalk train conversation to train.bin as SFT renders it (chat
    tokens, <|bos|> first, a long one not cut at 2,048 tokens); the shards' tokens and val.bin stay
    as they were; switching chats off rebuilds the cache."""
    tok = _data_tokenizer()
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"},
                           {"role": "assistant", "content": f"hello {i}! " * (1 + 400 * (i == 3))}]}
             for i in range(9)]
    with tempfile.TemporaryDirectory() as root:
        _data_run_dir(root, num_train=1)
        listing = data.url_to_path(root, data.LISTING_URL.format(*data.TASKS["smoltalk-train"]))
        os.makedirs(listing)
        pq.write_table(pa.table({"messages": [c["messages"] for c in chats]}),
                       os.path.join(listing, "0.parquet"))
        with open(os.path.join(listing, "manifest.json"), "w") as f:
            json.dump({"files": [os.path.relpath(os.path.join(listing, "0.parquet"), root)]}, f)
        with quiet():
            plain = data.build_token_cache(root, tok)
            shards = np.array(data.load_tokens(root, "train")).tolist()
            meta = data.build_token_cache(root, tok, use_chats=True)
        train = np.array(data.load_tokens(root, "train")).tolist()
        rendered = [render_conversation(tok, chat, max_tokens=None)[0] for chat in chats]
        assert len(rendered[3]) > 2048, "the long chat is too short to test the cut"
        assert train == shards + [t for ids in rendered for t in ids], \
            "train.bin is not the shards' tokens followed by the rendered chats"
        assert meta["docs"]["train"] == plain["docs"]["train"] + len(chats), meta["docs"]
        assert meta["tokens"]["val"] == plain["tokens"]["val"], "the chats reached val.bin"
        with quiet():
            again = data.build_token_cache(root, tok)
        assert again["tokens"]["train"] == plain["tokens"]["train"], \
            "switching chats off did not rebuild the cache"


def test_data_pretrain_batches_invariants_and_resume():
    """Batches are int64 (B, T) with y = x shifted, BOS at every doc start, and a restored state
    replays exactly."""
    tok = _data_tokenizer()
    with tempfile.TemporaryDirectory() as root:
        _data_run_dir(root)
        with quiet():
            data.build_token_cache(root, tok)
        stream = np.array(data.load_tokens(root, "train"))
        B, T = 3, 16
        gen = data.pretrain_batches(root, "train", B, T, seed=7)
        batches = [next(gen) for _ in range(40)]  # several epochs: the toy cache has ~15 steps
        x, y, _ = batches[0]
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64, \
            f"bad batch {x.shape} {x.dtype}"
        for x, y, _ in batches:
            assert torch.equal(x[:, 1:], y[:, :-1]), "y is not x shifted by one"
            for row_x, row_y in zip(x.tolist(), y.tolist()):
                window = row_x + row_y[-1:]
                assert any(stream[i:i + T + 1].tolist() == window
                           for i in range(0, len(stream) - T, T)), \
                    "a row is not a window of the token stream starting at a multiple of T"
        assert batches[-1][2]["epoch"] >= 1, "the generator never wrapped to a second epoch"
        # BOS sits exactly at document starts: one per document, the stream starts with it
        assert (stream[0] == tok.bos_id
                and (stream == tok.bos_id).sum() == sum(len(data.read_texts(p))
                                                        for p in data.shard_paths(root, "train")))
        for k in (0, 5, 17):  # resume after batch k, across an epoch boundary too
            resumed = data.pretrain_batches(root, "train", B, T, seed=7,
                                            state=json.loads(json.dumps(batches[k][2])))
            for want in batches[k + 1:k + 4]:
                got = next(resumed)
                assert torch.equal(got[0], want[0]) and got[2] == want[2], \
                    f"resuming after batch {k} gave another batch"
        # val rows: every token of the val cache in order, rows of T+1
        rows = data.val_rows(root, T)
        val = np.array(data.load_tokens(root, "val"))
        assert (rows.shape[1] == T + 1 and rows.reshape(-1).tolist() == val[:rows.size].tolist()
                and len(val) - rows.size <= T)
        assert rows[0, 0] == tok.bos_id, \
            "the first val row does not start with the first document's <|bos|>"


def _data_conversation(user, assistant):
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def test_data_sft_row_lengths_come_in_few_shapes():
    """SFT rows are padded to a multiple of data.SFT_ROW_MULTIPLE (at most seq_len): each new row
    length is a torch.compile recompile, and past 8 of them it runs eagerly."""
    tok = _data_tokenizer()
    convs = [_data_conversation("hi " * n, "ok " * n) for n in range(1, 60, 3)]
    batches = data.sft_batches(tok, convs, 2, 200)
    lengths = {next(batches)[0].shape[1] for _ in range(len(convs))}
    assert lengths <= {128, 200}, f"SFT row lengths not rounded up (or over seq_len): {lengths}"
    assert lengths == {128, 200}, f"expected short rows at 128 and long ones cut at 200: {lengths}"


def test_data_sft_masks_truncation_and_no_nan():
    """SFT rows train only assistant tokens, fit seq_len, skip conversations with nothing to train,
    and never make NaN."""
    tok = _data_tokenizer()
    convs = [_data_conversation("hi", "the cat sat"), _data_conversation("tiny doc " * 40, "a dog"),
             _data_conversation("we spell", "words " * 60)]
    T = 24
    x, y, state = next(data.sft_batches(tok, convs, 2, T))
    assert x.shape == y.shape and x.shape[1] <= T, f"SFT rows longer than seq_len: {x.shape}"
    ids, mask = render_conversation(tok, convs[0])
    assert x[0, :len(ids) - 1].tolist() == ids[:-1], "row 0 is not the rendered conversation"
    assert y[0, :len(ids) - 1].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])], \
        "y is not masked by the assistant mask"
    assert ((y[0, len(ids) - 1:] == -1).all()
            and (x[0, len(ids) - 1:] == tok.special_id("<|assistant_end|>")).all()), "bad padding"
    assert state == {"epoch": 1, "cursor": 0}, \
        f"conversation 1 (assistant cut off) should be skipped: {state}"
    assert x[1, :4].tolist() == render_conversation(tok, convs[2])[0][:4], \
        "row 1 should be conversation 2"
    assert (y[1] != -1).any() and x.shape[1] == T, \
        "the long conversation was not cut to fit the row"
    x1, y1, _ = next(data.sft_batches(tok, convs, 1, T))  # batch size 1 still trains something
    assert x1.shape[0] == 1 and (y1 != -1).any(), "an SFT batch of one row has no trained target"
    try:
        next(data.sft_batches(tok, [convs[1]], 2, T))
        raise AssertionError("conversations with nothing to train were not reported")
    except ValueError as e:
        assert "seq_len" in str(e), f"unclear error: {e}"
    # the loss rule callers use: sum over targets / max(1, count) stays finite for an
    # all-masked batch
    from gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=T, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=32))
    y_masked = torch.full_like(y, -1)
    loss = model(x, y_masked, loss_reduction="sum") / max(1, int((y_masked != -1).sum()))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all()
                                        for p in model.parameters() if p.grad is not None), \
        "an all-masked micro-batch produced NaN: divide the summed loss by max(1, count)"


def test_data_midtrain_stream_trains_every_token_and_resumes():
    """Midtrain rows are the rendered conversations back to back, no target masked, and a state
    resumes exactly."""
    tok = _data_tokenizer()
    convs = [_data_conversation(f"q{i}", DATA_DOCS[i % 4]) for i in range(5)]
    stream = [t for c in convs for t in render_conversation(tok, c)[0]]
    B, T = 2, 8
    gen = data.midtrain_batches(tok, convs, B, T)
    batches = [next(gen) for _ in range(12)]
    flat_x = torch.cat([x.reshape(-1) for x, _, _ in batches]).tolist()
    assert flat_x[:len(stream)] == stream, "midtrain x is not the rendered stream in order"
    assert all((y != -1).all() and torch.equal(x[:, 1:], y[:, :-1]) for x, y, _ in batches), \
        "midtrain masked a target"
    assert batches[-1][2]["epoch"] >= 1, "midtrain did not wrap into a second epoch"
    resumed = data.midtrain_batches(tok, convs, B, T, state=json.loads(json.dumps(batches[4][2])))
    assert all(torch.equal(next(resumed)[1], b[1]) for b in batches[5:9]), \
        "a restored midtrain state gave other batches"
