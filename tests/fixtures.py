"""
What several test files share, each under its own banner: quiet output, a local HTTP file
server, tiny models (a random byte-level GPT and a scripted one), and a prepared run dir (a
synthetic --mirror plus a run dir taken through the tokenize phase, made once per test process),
and a serve.Server running in a thread with a fake model that types a fixed answer.

Everything here is made by the tests themselves: no network, no ../shared/mirror, fixed seeds.
"""
import contextlib
import functools
import http.server
import io
import json
import os
import random
import tempfile
import threading
import time
import unittest
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import data
import serve
import train_all
from bpe import SPECIAL_TOKENS, Tokenizer
from gpt import GPT, GPTConfig
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
MIRROR = os.path.join(ROOT, "..", "shared", "mirror")  # the offline data, where a checkout has it


# --- quiet output ---


def quiet():
    """Swallow the progress and retry lines data.py prints, so the test output stays readable."""
    return contextlib.redirect_stdout(io.StringIO())


def run_quiet(fn, *args):
    """Run fn(*args) with stdout captured; return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


# --- a local HTTP file server ---


class FileServer:
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
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out ("slow") and left

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- tiny tokenizers ---


BPE_CORPUS = [
    "The cat sat on the mat. The cat's hat is flat! 1234567 cats, 89 hats.\n\n",
    "aaaa aaaaaaa aa bbbb abab abababab ____ snake_case __init__ ",
    "naïve café 你好世界 🌍🙂 e\u0301 \t\t  \n\r\n  tabs\tand\x00control\x1fchars ",
]


def bpe_tiny_tokenizer(num_merges=60):
    """A BPE with num_merges merges learned from BPE_CORPUS (emoji, CJK, runs, control chars)."""
    return Tokenizer.train(BPE_CORPUS * 3, 256 + num_merges + len(SPECIAL_TOKENS))


# --- tiny models ---


def byte_gpt(seed=0, is_trained_like=True):
    """A tiny GPT over a byte-level tokenizer's 265 ids; random output layers so greedy decoding is
    not constant."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(seq_len=64, vocab_size=Tokenizer([]).vocab_size, n_layer=2, n_head=2,
                          n_kv_head=2, n_embd=32))
    if is_trained_like:  # a fresh GPT has zero lm_head / c_proj, i.e. uniform logits
        for name, p in model.named_parameters():
            if p.dim() == 2 and not p.any():
                torch.nn.init.normal_(p, std=0.3)
    return model.eval()


class ScriptedModel(torch.nn.Module):
    """Fake GPT whose call number n puts all probability on script[n]; records what it was fed."""

    def __init__(self, config, script):
        super().__init__()
        self.config, self.script, self.fed = config, script, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so generate() can find the device

    def forward(self, ids, kv_cache=None, last_only=False):
        B, T = ids.shape
        self.fed.append(ids[:, -1].tolist())
        kv_cache.pos += T
        logits = torch.zeros(B, 1 if last_only else T, self.config.vocab_size)  # (B, T or 1, V)
        logits[:, -1, self.script[min(len(self.fed) - 1, len(self.script) - 1)]] = 10.0
        return logits


# --- a prepared run dir: a synthetic --mirror and a run dir through the tokenize phase ---


WORDS = ("the cat dog sat ran on a mat far away then came back we spell words "
         "here is and of to").split()


def task_rows(kind, n=12):
    """n short rows in the schema of one TASKS parquet (what the HF listing API serves)."""
    if kind == "smol-smoltalk":
        return [{"messages": [{"role": "user", "content": f"hi {i}"},
                              {"role": "assistant", "content": f"hello {i}!"}],
                 "source": "test"} for i in range(n)]
    if kind == "mmlu":
        return [{"question": f"q{i}?", "subject": "s", "choices": ["a", "b", "c", "d"],
                 "answer": i % 4} for i in range(n)]
    if kind == "ai2_arc":
        return [{"id": str(i), "question": f"q{i}?",
                 "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                 "answerKey": "AB"[i % 2]} for i in range(n)]
    if kind == "gsm8k":
        return [{"question": f"{i}+1?", "answer": f"It is <<{i}+1={i + 1}>>{i + 1}.\n#### {i + 1}"}
                for i in range(n)]
    return [{"task_id": str(i), "prompt": "def f():\n", "canonical_solution": "    return 1\n",
             "test": "assert f() == 1", "entry_point": "f"} for i in range(n)]


def write_bundle(path: str, num_examples: int = 9):
    """A tiny eval_bundle.zip: a 2-shot MC task, a 0-shot schema task and a 1-shot LM task whose
    first example is longer than the byte GPT's 640-position rotary table."""
    rng = random.Random(0)
    mc = [{"query": f"q{i}?", "choices": [" yes", " no", " maybe"], "gold": i % 3}
          for i in range(num_examples)]
    schema = [{"context_options": [f"A{i}", f"B{i}"], "continuation": "ends", "gold": i % 2}
              for i in range(num_examples)]
    lm = [{"context": "w" * (800 if i == 0 else rng.randint(5, 20)), "continuation": f"c{i}"}
          for i in range(num_examples)]
    yaml = ("icl_tasks:\n-\n  label: mc\n  dataset_uri: x/mc.jsonl\n  num_fewshot: [2]\n"
            "  icl_task_type: multiple_choice\n-\n  label: sc\n  dataset_uri: x/sc.jsonl\n"
            "  num_fewshot: [0]\n  icl_task_type: schema\n- label: lm\n  dataset_uri: x/lm.jsonl\n"
            "  num_fewshot: [1]\n  icl_task_type: language_modeling\n"
            '  continuation_delimiter: "\\nA: "\n')
    csv = ("Eval Task,Task Type,Random baseline,Description\n"
           'mc,mc,33.3,"a, b"\nsc,s,50,x\nlm,lm,0,y\n')
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("eval_bundle/core.yaml", yaml)
        z.writestr("eval_bundle/eval_meta_data.csv", csv)
        for name, rows in (("mc", mc), ("sc", schema), ("lm", lm)):
            text = "\n".join(json.dumps(r) for r in rows) + "\n"
            z.writestr(f"eval_bundle/eval_data/x/{name}.jsonl", text)
    return path


def make_mirror(root):
    """A --mirror folder at the real URLs' paths: 1 train + the val shard of synthetic text, every
    task, a zip."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "."
            for _ in range(300)]
    files = {data.SHARD_URL.format(0): docs[:200],
             data.SHARD_URL.format(data.VAL_SHARD): docs[200:]}
    for url, texts in files.items():
        path = os.path.join(root, *url.split("://")[1].split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.table({"text": texts}), path)
    for repo, subset, split in data.TASKS.values():
        listing_url = data.LISTING_URL.format(repo, subset, split)
        listing = os.path.join(root, *listing_url.split("://")[1].split("/"))
        os.makedirs(listing, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(task_rows(repo.split("/")[1])),
                       os.path.join(listing, "0.parquet"))
        with open(os.path.join(listing, "index.json"), "w") as f:
            json.dump([data.LISTING_URL.format(repo, subset, split) + "/0.parquet"], f)
    bundle = os.path.join(root, *data.EVAL_BUNDLE_URL.split("://")[1].split("/"))
    os.makedirs(os.path.dirname(bundle), exist_ok=True)
    write_bundle(bundle)
    return root


def tiny_argv(run_dir, mirror, steps=3, compile="off"):
    """Flags for the tiniest run: --smoke shrunk further (1-layer GPT, 64-token rows in
    pretraining and 128 in midtraining and SFT, a few steps), eager unless compile is "auto" or
    "on" (compiling takes seconds even for this)."""
    argv = ["--smoke", "--run-dir", run_dir, "--mirror", mirror, "--compile", compile,
            "--vocab-size", "300",
            "--tokenizer-chars", "50000", "--pretrain-depth", "1", "--pretrain-head-dim", "16",
            "--pretrain-seq-len", "64", "--pretrain-eval-every", "100",
            "--eval-bpb-tokens", "1024", "--eval-sample-tokens", "4"]
    for phase in ("pretrain", "midtrain", "sft"):
        argv += [f"--{phase}-num-steps", str(steps), f"--{phase}-device-batch-size", "2",
                 f"--{phase}-total-batch-tokens", "256", f"--{phase}-eval-tokens", "256"]
    # midtraining and SFT at twice pretraining's context, as the cpu and smoke presets do
    argv += ["--midtrain-seq-len", "128", "--sft-seq-len", "128"]
    return argv


@functools.lru_cache(maxsize=None)
def prepared_run_dir():
    """(temp dir, mirror, run dir done through the tokenize phase), made once and shared by the
    tests below."""
    # the cache keeps it alive; it is removed when the interpreter exits
    tmp = tempfile.TemporaryDirectory()
    mirror, run_dir = make_mirror(os.path.join(tmp.name, "mirror")), os.path.join(tmp.name, "run")
    for phase in ("download", "tokenizer", "tokenize"):
        run_quiet(train_all.main, tiny_argv(run_dir, mirror) + ["--only", phase])
    return tmp, mirror, run_dir


# --- a running serve.Server with a scripted model (tests/test_serve.py, tests/test_ui.py) ---


class TypistModel(torch.nn.Module):
    """Fake GPT that answers any prompt with the bytes of `text`, then <|assistant_end|>, one token
    per call (a prefill starts over). Every call releases self.calls as it begins, so the test can
    count them; gated, it then waits for a permit from self.permits (the test hands them out)."""

    def __init__(self, text: str, is_gated=False):
        super().__init__()
        tok = Tokenizer([])
        self.config = GPTConfig(seq_len=512, vocab_size=tok.vocab_size, n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=4)
        self.script = list(text.encode()) + [tok.special_id("<|assistant_end|>")]
        self.permits = threading.Semaphore(0) if is_gated else None
        self.calls = threading.Semaphore(0)
        self.step = 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # generate() finds the device through it

    def forward(self, ids, kv_cache=None, last_only=False):
        self.calls.release()
        if self.permits is not None:
            assert self.permits.acquire(timeout=60), "the test never let the fake model go on"
        if kv_cache.pos == 0:  # a prefill: a new answer
            self.step = 0
        kv_cache.pos += ids.shape[1]
        T = 1 if last_only else ids.shape[1]
        logits = torch.zeros(ids.shape[0], T, self.config.vocab_size)  # (B, T or 1, V)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 100.0
        self.step += 1
        return logits


class Log:
    """Collects the server's log lines; wait_for() blocks until one holds a text (no sleeps)."""

    def __init__(self):
        self.lines, self.changed = [], threading.Condition()

    def __call__(self, line):
        with self.changed:
            self.lines.append(line)
            self.changed.notify_all()

    def wait_for(self, text: str, count: int = 1) -> list:
        with self.changed:
            is_there = self.changed.wait_for(lambda: sum(text in x for x in self.lines) >= count,
                                             timeout=60)
        assert is_there, f"no log line with {text!r}; the last lines: {self.lines[-5:]}"
        return [line for line in self.lines if text in line]


@contextlib.contextmanager
def running(model=None, phase="sft"):
    """A serve.Server on 127.0.0.1 and a free port, serving in a thread; `model` None: loading."""
    log = Log()
    server = serve.Server("127.0.0.1", 0, log=log)
    if model is not None:
        server.set_model(model, Tokenizer([]), phase, "fp32")
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server, log
    finally:
        server.shutdown()
        server.server_close()


def missing_extra(what: str):
    """Skip a test whose test-only extra (openai client, browser) is missing; fail under CI."""
    if os.environ.get("CI"):
        raise AssertionError(f"{what} is missing and CI is set: .ci/run must install it")
    raise unittest.SkipTest(f"{what} is not installed")
