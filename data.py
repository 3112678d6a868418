"""
Everything the training phases read: verified downloads, the token cache, and the batch streams.

Used by train_all.py (download and tokenize phases, then every training phase), tasks.py (the task
parquet rows it turns into conversations) and evals.py (validation rows); imports chat.py only
for render_conversation and cli.py for its progress lines and usable CPUs. Returns paths, numpy
arrays and int64 torch tensors (B, T) of token ids.

Design:
- one download path for everything: `urllib` streams into `dest.tmp`, the file is checked (a parquet
  footer must parse, a zip's CRCs must match, JSON must load), then `os.replace`d; a file already on
  disk that fails its check is fetched again. `--mirror DIR` reads https://HOST/PATH from
  DIR/HOST/PATH as a file:// URL, `--mirror http://...` asks that server: both go through the same
  code as the web
- the run directory keeps downloads under data/HOST/PATH, so a path tells you the URL it came from
- every shard is tokenized once, by one process per core, into tokens/{train,val}.bin (flat uint16
  when the vocab fits, else uint32), rebuilt only when the tokenizer's fingerprint or the shard list
  changes; training then reads it with np.memmap and never spends a core on tokenizing
- pretraining rows are windows of the token stream (documents concatenated, each starting with
  <|bos|>), visited in a shuffled order per epoch; the state {"epoch", "row"} resumes exactly
- with use_chats (on, except in the gpu preset) SmolTalk's train conversations join the pretraining
  stream with their chat tokens: the mirror's text is documentation, with no everyday English
- chat data: midtraining streams rendered conversations and trains every token (mixed with
  pretraining text by tasks.with_text_replay); SFT puts one conversation per row, cut to fit, and
  trains only the assistant's tokens (tasks.py makes them)

Left out on purpose:
- nanochat HEAD's BOS-aligned best-fit rows: they crop ~35% of tokens at T=2048 and far more at our
  short rows with ~2,000-token documents, and the mirror's text is scarce; we keep OLD's stream
- parallel downloads (nanochat uses 4 processes): the mirror is local and the shards are few
- resuming a cut download with HTTP Range (it restarts from byte 0) and sha256 tables (the real
  shards' hashes are not known offline); the footer and CRC checks catch cut and damaged files
- the real datasets' sizes: SmolTalk, MMLU auxiliary_train and the pretraining text are the mirror's
  stand-ins (see ../shared/mirror/README.md)

References:
- nanochat dataset.py / dataloader.py / tasks/: https://github.com/karpathy/nanochat
- Hugging Face dataset viewer parquet API: https://huggingface.co/docs/dataset-viewer/parquet
"""
import http.client
import json
import multiprocessing
import os
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from chat import render_conversation
from cli import Progress, usable_cpus

# The ClimbMix shards nanochat HEAD trains on; shard_06542 is its pinned validation shard.
SHARD_URL = ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
             "shard_{:05d}.parquet")
VAL_SHARD = 6542
LISTING_URL = "https://huggingface.co/api/datasets/{}/parquet/{}/{}"
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# Task name -> (HF repo, subset, split), as nanochat's tasks/*.py load them.
TASKS = {
    "smoltalk-train": ("HuggingFaceTB/smol-smoltalk", "default", "train"),
    "smoltalk-test": ("HuggingFaceTB/smol-smoltalk", "default", "test"),
    "mmlu-aux": ("cais/mmlu", "all", "auxiliary_train"),
    "mmlu-test": ("cais/mmlu", "all", "test"),
    "arc-easy-train": ("allenai/ai2_arc", "ARC-Easy", "train"),
    "arc-easy-test": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc-challenge-train": ("allenai/ai2_arc", "ARC-Challenge", "train"),
    "arc-challenge-test": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "gsm8k-train": ("openai/gsm8k", "main", "train"),
    "gsm8k-test": ("openai/gsm8k", "main", "test"),
    "humaneval": ("openai/openai_humaneval", "openai_humaneval", "test"),
}
PARTS_PER_SHARD = 4  # tokenizing jobs per shard: small enough that both cores finish together


# --- paths ---

def default_run_dir() -> str:
    """The run directory when --run-dir is not given (nanochat uses ~/.cache/nanochat)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "tinychat")


def url_to_path(run_dir: str, url: str) -> str:
    """https://HOST/PATH -> run_dir/data/HOST/PATH."""
    return os.path.join(run_dir, "data", *url.split("://", 1)[1].split("/"))


def eval_bundle_path(run_dir: str) -> str:
    return url_to_path(run_dir, EVAL_BUNDLE_URL)


def shard_paths(run_dir: str, split: str) -> list:
    """Sorted paths of the downloaded train shards (all but the val one), or [the val shard]."""
    val = url_to_path(run_dir, SHARD_URL.format(VAL_SHARD))
    if split == "val":
        return [val]
    folder = os.path.dirname(val)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    # NOTE: *.tmp is a download in progress, not a shard (nanochat's list_parquet_files skips it)
    paths = [os.path.join(folder, n) for n in names
             if n.startswith("shard_") and n.endswith(".parquet")]
    paths = [p for p in paths if p != val]
    if not paths:
        raise FileNotFoundError(f"no training shards in {folder}; "
                                "run 'python train_all.py --only download'")
    return paths


# --- downloads ---

def _source(url: str, mirror) -> str:
    """The URL opened: the real one, the mirror server's, or a file:// URL into a mirror folder."""
    if not mirror:
        return url
    host_path = url.split("://", 1)[1]
    if mirror.startswith(("http://", "https://")):
        return mirror.rstrip("/") + "/" + host_path
    if not os.path.isdir(mirror):
        raise FileNotFoundError(f"--mirror {mirror} is not a folder; "
                                "give the folder that holds huggingface.co/")
    path = Path(mirror, *host_path.split("/")).resolve()
    # A listing URL is also a folder in the mirror (its shards live under it):
    # its body is index.json.
    return (path / "index.json" if path.is_dir() else path).as_uri()


def check_file(path: str, kind: str = ""):
    """Raise ValueError when a downloaded file is damaged: parquet footer, zip CRCs, JSON syntax.

    kind is the final name's extension (".parquet", ...); by default that of path itself.
    """
    kind = kind or os.path.splitext(path)[1]
    try:
        if kind == ".parquet":
            pq.ParquetFile(path).metadata  # the footer sits at the end: a cut file has none
        elif kind == ".zip":
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()  # reads every member and compares its CRC-32
            if bad:
                raise ValueError(f"CRC mismatch in member {bad}")
        elif kind == ".json":
            json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # ArrowInvalid is a ValueError
        raise ValueError(f"{path} is damaged ({e})") from e


def fetch(url: str, dest: str, mirror=None, timeout: float = 30.0, max_attempts: int = 5,
          backoff_s: float = 2.0) -> str:
    """Download url to dest (checked, atomic) unless a valid copy is there; return dest.

    Retries network errors, HTTP 5xx/429 and damaged bodies, sleeping backoff_s * 2**attempt in
    between (2, 4, 8, 16 s as nanochat); other HTTP errors (404) and mirror folders fail at once,
    since asking again cannot help. Prints progress lines for big files.
    """
    if os.path.exists(dest):
        try:
            check_file(dest)
            return dest
        except ValueError as e:
            print(f"refetching: {e}", flush=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    src, tmp, error = _source(url, mirror), dest + ".tmp", None
    for attempt in range(max_attempts):
        try:
            with urllib.request.urlopen(src, timeout=timeout) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0)
                progress = Progress(f"download {url.split('://', 1)[1]}", total, "MB", scale=1e6)
                done = 0
                while chunk := response.read(1 << 20):  # 1 MiB chunks, as nanochat
                    done += f.write(chunk)
                    progress.update(done)
                if done > 1e6:  # a closing line for big files only
                    progress.update(done, is_final=True)
            if total and done != total:
                raise ValueError(f"got {done:,} of {total:,} bytes")
            check_file(tmp, os.path.splitext(dest)[1])  # NOTE: tmp ends in .tmp: name the real kind
            os.replace(tmp, dest)
            return dest
        # URLError/HTTPError are OSErrors
        except (OSError, ValueError, http.client.HTTPException) as e:
            error = e
            if os.path.exists(tmp):
                os.remove(tmp)
            if src.startswith("file:") or (isinstance(e, urllib.error.HTTPError)
                                           and e.code < 500 and e.code != 429):
                break
            if attempt + 1 < max_attempts:
                print(f"download {url} failed ({e}); "
                      f"retry {attempt + 1} in {backoff_s * 2 ** attempt:g} s", flush=True)
                time.sleep(backoff_s * 2 ** attempt)
    hint = (f"is {mirror} a complete mirror? (see its README)" if mirror else
            "check the network and rerun, or pass --mirror DIR pointing at an offline copy "
            "(see README)")
    raise ConnectionError(f"could not download {src} ({error}); {hint}") from error


def fetch_task(run_dir: str, name: str, mirror=None, backoff_s: float = 2.0) -> list:
    """Fetch one TASKS entry through the HF parquet listing API; return its parquet paths.

    The listing (a JSON list of shard URLs) is stored as .../{split}/index.json, the shards under
    their own URLs, and manifest.json last: it exists only when every shard is there (nanochat HEAD
    does so).
    """
    listing_url = LISTING_URL.format(*TASKS[name])
    folder = url_to_path(run_dir, listing_url)
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest):
        return [os.path.join(run_dir, p) for p in json.loads(Path(manifest).read_text())["files"]]
    listing = os.path.join(folder, "index.json")
    try:
        fetch(listing_url, listing, mirror, backoff_s=backoff_s)
    except ConnectionError as e:
        if isinstance(e.__cause__, ValueError):  # the body arrived but was not JSON, every time
            raise ValueError(f"{listing_url} did not return a JSON listing ({e.__cause__}); the"
                             " dataset may have moved, or --mirror names the wrong folder") from e
        raise
    urls = json.loads(Path(listing).read_text())
    if not (isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls)):
        raise ValueError(f"{listing} is not a non-empty JSON list of URLs; "
                         "delete it and rerun the download")
    paths = [fetch(u, url_to_path(run_dir, u), mirror, backoff_s=backoff_s) for u in urls]
    Path(manifest + ".tmp").write_text(json.dumps({"url": listing_url, "files": [
        os.path.relpath(p, run_dir) for p in paths]}, indent=1))
    os.replace(manifest + ".tmp", manifest)
    return paths


def task_paths(run_dir: str, name: str) -> list:
    """The parquet paths of a downloaded TASKS entry, in listing order."""
    manifest = os.path.join(url_to_path(run_dir, LISTING_URL.format(*TASKS[name])), "manifest.json")
    if not os.path.exists(manifest):
        raise FileNotFoundError(f"task data {name} is not in {run_dir}; "
                                "run 'python train_all.py --only download'")
    return [os.path.join(run_dir, p) for p in json.loads(Path(manifest).read_text())["files"]]


def task_rows(run_dir: str, name: str) -> list:
    """Every row of a downloaded TASKS entry as a dict (tasks.py makes conversations of them)."""
    return [row for p in task_paths(run_dir, name) for row in pq.read_table(p).to_pylist()]


def download_all(run_dir: str, mirror=None, num_train_shards: int = 4, backoff_s: float = 2.0):
    """Download phase: train shards 0..N-1, the val shard, every task in TASKS, the CORE bundle."""
    for i in [*range(num_train_shards), VAL_SHARD]:
        fetch(SHARD_URL.format(i), url_to_path(run_dir, SHARD_URL.format(i)), mirror,
              backoff_s=backoff_s)
    for name in TASKS:
        fetch_task(run_dir, name, mirror, backoff_s)
    fetch(EVAL_BUNDLE_URL, eval_bundle_path(run_dir), mirror, backoff_s=backoff_s)


# --- pretraining text and the token cache ---

def read_texts(path: str) -> list:
    """The `text` column of one parquet shard, one document per row."""
    f = pq.ParquetFile(path)
    if "text" not in f.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (it has {f.schema_arrow.names}); "
                         "a pretraining shard holds one document per row in 'text': "
                         "delete it and rerun the download")
    if f.metadata.num_rows == 0:
        raise ValueError(f"{path} has no rows; delete it and rerun the download")
    return f.read(columns=["text"]).column("text").to_pylist()


def tokenizer_texts(run_dir: str, max_chars: int, doc_cap: int = 10_000):
    """Yield train docs cut to doc_cap characters, max_chars in all (nanochat's tok_train)."""
    left = max_chars
    for path in shard_paths(run_dir, "train"):
        for text in read_texts(path):
            text = text[:min(doc_cap, left)]
            left -= len(text)
            yield text
            if left <= 0:
                return


def _encode_init(tok):
    """Pool initializer: hand each worker process the tokenizer once."""
    # NOTE: a global of the worker processes only (the parent never sets it). Passing tok with every
    # job instead would unpickle a fresh tokenizer each time and throw away its chunk cache, which
    # makes a shard ~2x slower to encode (the cache is what makes encoding fast)
    global _WORKER_TOK
    _WORKER_TOK = tok


def _encode_part(job):
    """Worker: (path, lo, hi, dtype) -> (ids of docs lo..hi-1 as one array, docs, text bytes): a
    text shard's doc is a `text` row, stored as [<|bos|>] + its ids; a chat file's (SmolTalk) is a
    conversation, rendered with its chat tokens as SFT renders it (<|bos|> first, nothing cut)."""
    path, lo, hi, dtype = job
    f = pq.ParquetFile(path)
    if "messages" in f.schema_arrow.names:
        chats = f.read(columns=["messages"]).slice(lo, hi - lo).to_pylist()
        docs = [render_conversation(_WORKER_TOK, chat, max_tokens=None)[0] for chat in chats]
        texts = ["".join(m["content"] for m in chat["messages"]) for chat in chats]
    else:
        texts = read_texts(path)[lo:hi]
        docs = [[_WORKER_TOK.bos_id] + _WORKER_TOK.encode(text) for text in texts]
    flat = np.array([i for doc in docs for i in doc], dtype=dtype)
    return flat, len(texts), sum(len(t.encode("utf-8")) for t in texts)


def build_token_cache(run_dir: str, tok, use_chats: bool = False) -> dict:
    """Encode every shard once into tokens/{train,val}.bin; return the meta dict (also meta.json).

    Documents go back to back in shard order (_encode_part says how each is stored); use_chats
    adds SmolTalk's train conversations to the train split (the val split stays text). Each shard
    is cut into PARTS_PER_SHARD jobs for a pool with one process per core; every worker keeps its
    tokenizer, and so its chunk cache, for all its jobs. meta.json is written last, so it exists
    only when both .bin files are whole. Nothing is redone while the tokenizer and file names stay.
    """
    folder = os.path.join(run_dir, "tokens")
    meta_path = os.path.join(folder, "meta.json")
    splits = {s: shard_paths(run_dir, s) for s in ("train", "val")}
    if use_chats:
        splits["train"] += task_paths(run_dir, "smoltalk-train")
    want = {"fingerprint": tok.fingerprint(),
            "shards": {s: [os.path.basename(p) for p in ps] for s, ps in splits.items()}}
    if os.path.exists(meta_path):
        meta = json.loads(Path(meta_path).read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return meta
    os.makedirs(folder, exist_ok=True)
    # uint16 halves the file and the memory traffic whenever every id fits (vocab <= 65,536)
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    meta = {**want, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "tokens": {}, "docs": {}, "text_bytes": {}}
    # progress in MB of text; the total is the parquet's uncompressed size, a close estimate
    files = [pq.ParquetFile(p).metadata for ps in splits.values() for p in ps]
    total = sum(m.row_group(i).total_byte_size for m in files for i in range(m.num_row_groups))
    progress = Progress("tokenize", total, "MB", scale=1e6)
    done = 0
    with multiprocessing.Pool(usable_cpus(), initializer=_encode_init, initargs=(tok,)) as pool:
        for split, paths in splits.items():
            jobs = []
            for path in paths:
                bounds = np.linspace(0, pq.ParquetFile(path).metadata.num_rows,
                                     PARTS_PER_SHARD + 1).astype(int)
                jobs += [(path, lo, hi, dtype) for lo, hi in zip(bounds[:-1], bounds[1:])]
            counts = np.zeros(3, dtype=np.int64)  # tokens, docs, text bytes
            with open(os.path.join(folder, f"{split}.bin.tmp"), "wb") as f:
                for ids, num_docs, num_bytes in pool.imap(_encode_part, jobs):  # in job order
                    f.write(ids.tobytes())
                    counts += (len(ids), num_docs, num_bytes)
                    done += num_bytes
                    progress.update(done)
            os.replace(os.path.join(folder, f"{split}.bin.tmp"),
                       os.path.join(folder, f"{split}.bin"))
            (meta["tokens"][split], meta["docs"][split],
             meta["text_bytes"][split]) = (int(c) for c in counts)
    progress.update(done, is_final=True)
    Path(meta_path + ".tmp").write_text(json.dumps(meta, indent=1))
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def load_tokens(run_dir: str, split: str) -> np.ndarray:
    """A split's token cache as a read-only memory map (pages load on demand, nothing is copied)."""
    folder = os.path.join(run_dir, "tokens")
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no token cache in {folder}; "
                                "run 'python train_all.py --only tokenize'")
    meta = json.loads(Path(meta_path).read_text())
    return np.memmap(os.path.join(folder, f"{split}.bin"), dtype=meta["dtype"], mode="r")


# --- pretraining batches ---

def pretrain_batches(run_dir: str, split: str, batch_size: int, seq_len: int, seed: int = 0,
                     state=None, rank: int = 0, world_size: int = 1):
    """Yield (x, y, state) forever: x, y int64 (B, T) windows of the token stream, y = x shifted
    by one.

    Row r is tokens[r*T : r*T + T + 1], so every token is a target exactly once per epoch. Each
    epoch visits the rows in a permutation drawn from (seed, epoch); a step takes world_size*B rows
    and this rank keeps its slice. state = {"epoch", "row"} is the position after the batch just
    yielded: passing it back as `state` continues with exactly the next batch.
    """
    tokens = load_tokens(run_dir, split)
    B, T = batch_size, seq_len
    num_rows, per_step = (len(tokens) - 1) // T, B * world_size
    if num_rows < per_step:
        raise ValueError(f"the {split} cache has {len(tokens):,} tokens, "
                         f"fewer than {per_step} rows of {T}; "
                         "use a smaller batch or seq_len, or download more shards")
    # Worked example, T=4 and 11 tokens "b a b c b d e f b g h" (b = <|bos|>): (11-1)//4 = 2 rows,
    # row 0 = tokens[0:5] = b a b c b -> x = b a b c, y = a b c b; row 1 = tokens[4:9] = b d e f b.
    # The last token of a row is the first of the next, so only "b g h" (no full row) is lost.
    epoch, row = (state["epoch"], state["row"]) if state else (0, 0)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
        while row + per_step <= num_rows:
            # this step uses order[row : row + world_size*B]; rank k takes the k-th run of B rows
            starts = order[row + rank * B: row + (rank + 1) * B] * T  # (B,)
            window = tokens[starts[:, None] + np.arange(T + 1)]  # (B, T+1) gathered from the memmap
            row += per_step
            x = torch.from_numpy(window[:, :-1].astype(np.int64))  # (B, T)
            y = torch.from_numpy(window[:, 1:].astype(np.int64))  # (B, T)
            yield x, y, {"epoch": epoch, "row": row}
        epoch, row = epoch + 1, 0  # the rows left over (fewer than one step) wait for no one


def val_rows(run_dir: str, seq_len: int) -> np.ndarray:
    """(R, seq_len+1) view of the val cache: every val doc with its <|bos|>, cut into whole rows.

    Row i gives inputs row[:-1] and targets row[1:]; the tail that does not fill a row is dropped.
    Score every target: bpb = sum of nats / (ln 2 * sum of tok.token_byte_lengths()[targets]).
    """
    tokens = load_tokens(run_dir, "val")
    R = len(tokens) // (seq_len + 1)
    if R == 0:
        raise ValueError(f"the val cache has {len(tokens)} tokens, "
                         f"less than one row of {seq_len + 1}")
    return tokens[:R * (seq_len + 1)].reshape(R, seq_len + 1)  # (R, T+1)


# --- midtraining and SFT batches ---

def midtrain_batches(tok, conversations: list, batch_size: int, seq_len: int, state=None):
    """Yield (x, y, state) forever: conversations rendered and streamed like pretraining text.

    Every token is trained, user turns and special tokens included (nanochat's midtraining ignores
    the mask), and rows cross conversation boundaries. state = {"epoch", "cursor", "pending"}:
    the next conversation and the rendered tokens not yet used; passing it back resumes exactly.
    """
    if not conversations:
        raise ValueError("midtrain_batches got no conversations; check the task mixture")
    B, T = batch_size, seq_len
    state = state or {"epoch": 0, "cursor": 0, "pending": []}
    epoch, cursor, buffer = state["epoch"], state["cursor"], list(state["pending"])
    while True:
        while len(buffer) < B * T + 1:
            ids, _ = render_conversation(tok, conversations[cursor])
            buffer += ids
            cursor += 1
            if cursor == len(conversations):
                epoch, cursor = epoch + 1, 0
        # B*T+1 tokens make a batch: row b of x is window[b*T : (b+1)*T], its y one token later
        window = torch.tensor(buffer[:B * T + 1], dtype=torch.int64)  # (B*T+1,)
        # keep the window's last token: it is the next batch's first input, so no target is skipped
        del buffer[:B * T]
        yield (window[:-1].view(B, T), window[1:].view(B, T),
               {"epoch": epoch, "cursor": cursor, "pending": list(buffer)})


# torch.compile specializes on the row length and recompiles for each new one (about 15-25 s on a
# CPU), then gives up at its limit of 8 and runs eagerly: rows rounded up to a multiple of 128
# make at most seq_len / 128 shapes, 4 at the --cpu preset's 512
SFT_ROW_MULTIPLE = 128


def sft_batches(tok, conversations: list, batch_size: int, seq_len: int, state=None):
    """Yield (x, y, state) forever: one conversation per row, y = -1 wherever the mask is 0.

    Each conversation is rendered with max_tokens = seq_len + 1, so a long one is cut to fit the row
    (nanochat HEAD renders to 2048 and its packer stalls on NaN at short rows). Rows are padded to
    the longest in the micro-batch, rounded up to a multiple of SFT_ROW_MULTIPLE tokens (at most
    seq_len): x with <|assistant_end|> (nanochat), y with -1.
    NOTE: a conversation left with no trained target after the cut is skipped, so every micro-batch
    has at least B trained targets. Callers still compute the loss as sum / max(1, targets != -1):
    a 0/0 mean is NaN and one NaN gradient ruins the whole model.
    state = {"epoch", "cursor"}: the next conversation; passing it back resumes exactly.
    """
    pad = tok.special_id("<|assistant_end|>")
    epoch, cursor = (state["epoch"], state["cursor"]) if state else (0, 0)
    skipped = 0  # conversations skipped in a row: a full lap of them means none can ever be trained
    while True:
        rows = []
        while len(rows) < batch_size:
            ids, mask = render_conversation(tok, conversations[cursor], max_tokens=seq_len + 1)
            cursor += 1
            if cursor == len(conversations):
                epoch, cursor = epoch + 1, 0
            if any(mask[1:]):
                rows.append((ids, mask))
                skipped = 0
                continue
            skipped += 1
            if skipped >= len(conversations):
                raise ValueError(f"no conversation has an assistant token within {seq_len + 1} "
                                 "tokens; raise seq_len or check the conversations")
        longest = max(len(ids) for ids, _ in rows) - 1
        # rounded up: longest 130 -> T 256 (-(-a // b) is a // b rounded up), at most seq_len
        T = min(seq_len, -(-longest // SFT_ROW_MULTIPLE) * SFT_ROW_MULTIPLE)
        x = torch.full((batch_size, T), pad, dtype=torch.int64)  # (B, T)
        y = torch.full((batch_size, T), -1, dtype=torch.int64)  # (B, T)
        # (us/ue: user start/end, as/ae: assistant)
        # ids = [bos us hi ue as yo ae], mask = [0 0 0 0 0 1 1]
        # -> x = [bos us hi ue as yo], y = [-1 -1 -1 -1 yo ae]
        # target t is ids[t+1] where mask[t+1] is 1
        for i, (ids, mask) in enumerate(rows):
            x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        yield x, y, {"epoch": epoch, "cursor": cursor}
