"""
Benchmarks of tinychat's hot paths, one JSON line per figure.

Speed and memory targets live here, never in timed tests. The machine is shared and noisy, so
each benchmark repeats its measurement and reports the median.

Left out on purpose:
- no correctness checks: those are tests (test_all.py)

Examples:
    python bench.py tokenizer --mirror ../shared/mirror
    python bench.py train --depth 6 --head-dim 64 --seq-len 512 --batch-size 8 --vocab-size 32768
    python bench.py train --depth 4 --seq-len 256 --batch-size 32 --vocab-size 8192 --compile off
    python bench.py matmul
    python bench.py decode
    python bench.py data --mirror ../shared/mirror
    python bench.py serve
"""
import argparse
import json


def emit(**fields):
    """Print one benchmark result as a JSON line."""
    print(json.dumps(fields), flush=True)


# --- tokenizer ---
import multiprocessing
import os
import resource
import statistics
import time

import pyarrow.parquet as pq

from bpe import Tokenizer, count_chunks

CLIMBMIX = "huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"


def read_shards(data_dir, names, doc_cap=None):
    """Documents of the given shards under data_dir (a mirror or <run_dir>/data), cropped to doc_cap."""
    texts = []
    for name in names:
        path = os.path.join(data_dir, CLIMBMIX, name)
        if not os.path.exists(path):
            raise SystemExit(f"no shard at {path}; pass --mirror ../shared/mirror or run 'python train_all.py --only download'")
        texts += [t[:doc_cap] for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
    return texts


def _train_in_child(data_dir, vocab_size, out):
    """Child process: read the training text, train, report seconds, peak RSS (MiB) and merges."""
    texts = read_shards(data_dir, [f"shard_{i:05d}.parquet" for i in range(4)], doc_cap=10_000)
    t0, cpu0 = time.time(), cpu_seconds()
    tok = Tokenizer.train(texts, vocab_size)
    dt, cpu = time.time() - t0, cpu_seconds() - cpu0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB
    workers_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out.put((dt, peak_mib, workers_mib, tok.merges, cpu))


def cpu_seconds():
    """CPU time of this process plus its finished children (less noisy than wall time on a busy machine)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_tokenizer(args):
    """Tokenizer training time and peak memory (vocab 32,768 and 8,192), split time, encode speed."""
    data_dir = args.mirror or os.path.expanduser("~/.cache/tinychat/data")
    texts = read_shards(data_dir, [f"shard_{i:05d}.parquet" for i in range(4)], doc_cap=10_000)
    times, cpus = [], []
    for _ in range(args.repeats):
        t0, cpu0 = time.time(), cpu_seconds()
        chunks = count_chunks(texts)
        times.append(time.time() - t0)
        cpus.append(cpu_seconds() - cpu0)
    emit(bench="tokenizer_split", seconds=round(statistics.median(times), 2), runs=[round(t, 2) for t in times],
         cpu_seconds=round(statistics.median(cpus), 2),
         chars=sum(map(len, texts)), chunks=sum(chunks.values()), distinct_chunks=len(chunks), workers=os.cpu_count())
    del texts, chunks
    # each training run happens in a fresh process, so its peak RSS is its own
    merges = None
    for vocab_size in (32768, 8192):
        runs = []
        for _ in range(args.repeats):
            out = multiprocessing.Queue()
            child = multiprocessing.Process(target=_train_in_child, args=(data_dir, vocab_size, out))
            child.start()
            runs.append(out.get())
            child.join()
        merges = merges or runs[0][3]
        emit(bench="tokenizer_train", vocab_size=vocab_size, seconds=round(statistics.median(r[0] for r in runs), 2),
             runs=[round(r[0], 2) for r in runs], cpu_seconds=round(statistics.median(r[4] for r in runs), 2), peak_rss_mib=round(max(r[1] for r in runs)),
             worker_peak_rss_mib=round(max(r[2] for r in runs)), text="shards 0-3, docs cropped to 10,000 chars")
    # encoding: every pretraining shard (train 0-3 and val 06542), whole documents, in this one
    # process (data.py's token cache runs the same encode on every core: see `bench.py data`)
    texts = read_shards(data_dir, [f"shard_{i:05d}.parquet" for i in (0, 1, 2, 3, 6542)])
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    times, cpus = [], []
    for _ in range(args.repeats):
        tok = Tokenizer(merges)   # an empty chunk cache for every run
        t0, cpu0 = time.time(), cpu_seconds()
        ids = [tok.encode(text) for text in texts]
        times.append(time.time() - t0)
        cpus.append(cpu_seconds() - cpu0)
    dt = statistics.median(times)
    emit(bench="tokenizer_encode", vocab_size=tok.vocab_size, seconds=round(dt, 2), runs=[round(t, 2) for t in times],
         cpu_seconds=round(statistics.median(cpus), 2),
         mb=round(num_bytes / 1e6, 1), mb_per_s=round(num_bytes / 1e6 / dt, 1), tokens=sum(map(len, ids)),
         bytes_per_token=round(num_bytes / sum(map(len, ids)), 3))


# --- train ---

def train_step(model, optimizers, x, y, device, precision):
    """One optimizer step on one batch: forward, backward, update, clear the gradients; returns the loss."""
    from gpt import autocast  # imported here like every torch import: the tokenizer bench needs none
    with autocast(device, precision):
        loss = model(x, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss


def peak_memory_mib(device, reset=False) -> float:
    """MiB at peak since the last call with reset=True: CUDA tensors, or this process's peak RSS."""
    import torch
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**20
    if not os.path.exists("/proc/self/clear_refs"):  # not Linux: the whole process's peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if reset:  # Linux: "5" resets VmHWM, the peak RSS, to the RSS of now
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def bench_train(args):
    """Median time and peak memory of a training step (forward, backward, both optimizers)."""
    import torch

    from cli import keep_freed_memory, pick_compile, pick_device, pick_precision
    from gpt import GPT, config_from_depth
    from optim import make_optimizers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = args.precision or pick_precision(device)
    # the entry point's choices: compile where it works, freed memory kept (see gpt.py)
    use_compile, why = pick_compile(device, args.compile)
    allocator = keep_freed_memory(device) if args.keep_freed_memory == "on" else "default"
    torch.manual_seed(0)
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len, head_dim=args.head_dim)
    model = GPT(config).to(device)
    optimizers = make_optimizers(model)
    forward = torch.compile(model, dynamic=False) if use_compile else model  # same parameters
    # random tokens: the speed of a step does not depend on what the tokens are
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)  # (B, T+1)
    x, y = ids[:, :-1], ids[:, 1:]  # (B, T) each
    t_start = time.perf_counter()
    for _ in range(args.warmup_steps):  # they compile, allocate buffers and warm caches
        train_step(forward, optimizers, x, y, device, precision)
    warmup_s = time.perf_counter() - t_start
    peak_memory_mib(device, reset=True)
    # wall time is what a learner waits; CPU time of this process is the figure that other jobs on
    # a shared machine disturb least (at one thread it excludes the time we were not scheduled);
    # kernel (system) time and minor page faults show the allocator's churn
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times, cpu_times = [], []
    for _ in range(args.num_steps):
        t0 = time.perf_counter()
        c0 = time.process_time()
        loss = train_step(forward, optimizers, x, y, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    end = resource.getrusage(resource.RUSAGE_SELF)
    dt = statistics.median(times)
    tok_per_sec = args.batch_size * args.seq_len / dt
    emit(bench="train", depth=args.depth, n_embd=config.n_embd, n_head=config.n_head, seq_len=args.seq_len,
         batch_size=args.batch_size, vocab_size=args.vocab_size, params=model.num_params(),
         device=device.type, precision=precision, compile=use_compile, compile_why=why,
         allocator=allocator, threads=torch.get_num_threads(), steps=len(times),
         warmup_s=round(warmup_s, 1), ms_per_step=round(dt * 1000, 1),
         runs_ms=[round(t * 1000) for t in times],
         cpu_ms_per_step=round(statistics.median(cpu_times) * 1000, 1),
         sys_ms_per_step=round((end.ru_stime - usage.ru_stime) / len(times) * 1000, 1),
         minor_faults_per_step=(end.ru_minflt - usage.ru_minflt) // len(times),
         peak_mib=round(peak_memory_mib(device)), tok_per_sec=round(tok_per_sec, 1),
         gflops_per_sec=round(model.flops_per_token() * tok_per_sec / 1e9, 1), final_loss=round(loss.item(), 4))


def bench_matmul(args):
    """GFLOP/s of (n x n) @ (n x n) in fp32 and bf16, the peak a training step is held to."""
    import torch

    from cli import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(args.n, args.n, device=device, dtype=dtype)  # (n, n)
        times = []
        for _ in range(6):  # the first run picks kernels and is dropped; median of the other 5
            t0 = time.perf_counter()
            (a @ a)[0, 0].item()  # (n, n); .item() waits for a GPU to finish
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times[1:])
        emit(bench="matmul", n=args.n, dtype=str(dtype).removeprefix("torch."), device=device.type,
             threads=torch.get_num_threads(), ms=round(dt * 1000, 1),
             gflops_per_sec=round(2 * args.n**3 / dt / 1e9))


# --- decode ---

def bench_decode(args):
    """Tokens per second at batch 1: sampler.generate with its KV cache vs recomputing every prefix."""
    import statistics
    import time

    import torch

    from bpe import Tokenizer
    from cli import pick_device
    from gpt import GPT, autocast, config_from_depth
    from sampler import decode_precision, generate

    if args.prompt_len < 1 or args.prompt_len + args.new_tokens > args.seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} must fit in "
                         f"--seq-len {args.seq_len}; lower one of them")
    device = pick_device(args.device)
    precision = args.precision or decode_precision(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len, head_dim=args.head_dim)
    model = GPT(config).to(device).eval()
    # A fresh model has a zero lm_head, so greedy decoding emits token 0 forever and never stops
    # early: every run decodes exactly new_tokens. The cost does not depend on the weights.
    # A byte-level tokenizer (no merges) is enough: generate() only needs the special tokens' ids.
    tok = Tokenizer([])
    prompt = torch.randint(0, 256, (args.prompt_len,)).tolist()

    def run_cached(num_tokens):
        return sum(1 for _ in generate(model, tok, prompt, num_tokens, temperature=0.0, precision=precision))

    # Recompute-everything: the whole sequence goes through the model again for each new token
    # (a timing loop, not a second sampler: it never looks at what it would have sampled).
    ids = torch.tensor([prompt + [0] * args.new_tokens], device=device)  # (1, prompt_len + new_tokens)

    @torch.inference_mode()
    def run_naive(num_tokens):
        for t in range(num_tokens):
            with autocast(device, precision):
                model(ids[:, :args.prompt_len + t]).argmax(dim=-1)  # (1, T) -> (1, T)
        return num_tokens

    results = {}
    for name, run in (("kv_cache", run_cached), ("recompute", run_naive)):
        run(8)  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            num_tokens = run(args.new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        assert num_tokens == args.new_tokens, f"decoded {num_tokens} of {args.new_tokens} tokens"
        dt = statistics.median(times)
        results[name] = args.new_tokens / dt
        emit(bench="decode", mode=name, depth=args.depth, n_embd=config.n_embd, vocab_size=args.vocab_size,
             prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch_size=1, device=device.type,
             precision=precision, threads=torch.get_num_threads(), repeats=args.repeats,
             ms_per_token=round(dt * 1000 / args.new_tokens, 2), tok_per_sec=round(results[name], 1))
    emit(bench="decode", mode="speedup", kv_cache_over_recompute=round(results["kv_cache"] / results["recompute"], 2))


# --- data ---

def bench_data(args):
    """Token cache build time for the train shards + val shard, and batch reading vs a training step."""
    import os
    import shutil
    import statistics
    import tempfile
    import time

    import torch

    from bpe import Tokenizer
    from data import build_token_cache, download_all, pretrain_batches, tokenizer_texts
    from cli import pick_device, pick_precision
    from gpt import GPT, config_from_depth
    from optim import make_optimizers

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="tinychat-bench-")
    download_all(run_dir, args.mirror, args.num_train_shards)
    if args.tokenizer:  # reuse a trained tokenizer: training one is the tokenizer bench, not this one
        tok = Tokenizer.load(args.tokenizer)
    else:
        tok = Tokenizer.train(tokenizer_texts(run_dir, 2_000_000_000), args.vocab_size)
    times = []
    for _ in range(args.repeats):  # rebuild from scratch each time: delete the cache first
        shutil.rmtree(os.path.join(run_dir, "tokens"), ignore_errors=True)
        t0 = time.perf_counter()
        meta = build_token_cache(run_dir, tok)
        times.append(time.perf_counter() - t0)
    dt, text_bytes = statistics.median(times), sum(meta["text_bytes"].values())
    emit(bench="data", what="token_cache", vocab_size=tok.vocab_size, shards=len(meta["shards"]["train"]) + 1,
         text_mb=round(text_bytes / 1e6, 1), tokens=sum(meta["tokens"].values()), repeats=len(times),
         seconds=round(dt, 2), mb_per_s=round(text_bytes / 1e6 / dt, 2))
    # batch reading vs one training step at the same (B, T): the loader must be noise next to the model
    B, T = args.batch_size, args.seq_len
    batches = pretrain_batches(run_dir, "train", B, T, seed=0)
    read = []
    for _ in range(200):
        t0 = time.perf_counter()
        x, y, _ = next(batches)
        read.append(time.perf_counter() - t0)
    device = pick_device(None)
    precision = pick_precision(device)
    torch.manual_seed(0)
    model = GPT(config_from_depth(args.depth, tok.vocab_size, T, head_dim=args.head_dim)).to(device)
    optimizers = make_optimizers(model)
    steps = []
    for step in range(args.train_steps + 1):
        t0 = time.perf_counter()
        train_step(model, optimizers, x, y, device, precision)
        if step > 0:  # the first step allocates buffers
            steps.append(time.perf_counter() - t0)
    read_ms, step_ms = statistics.median(read) * 1000, statistics.median(steps) * 1000
    emit(bench="data", what="batch_read", batch_size=B, seq_len=T, depth=args.depth, read_ms=round(read_ms, 3),
         step_ms=round(step_ms, 1), percent_of_step=float(f"{100 * read_ms / step_ms:.2g}"))
    if not args.run_dir:
        shutil.rmtree(run_dir)



# --- serve ---

def _stream_times(port: int, text: str, max_tokens: int, stop_after=None):
    """POST a streamed chat request to serve.py; (send time, arrival time of each content chunk).
    stop_after: leave (close the connection) after that many chunks."""
    import socket
    body = json.dumps({"messages": [{"role": "user", "content": text}], "stream": True,
                       "temperature": 0, "max_tokens": max_tokens}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    times, buffer = [], b""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(request + body)
        while stop_after is None or len(times) < stop_after:
            data = sock.recv(65536)
            if not data:
                break
            now = time.perf_counter()
            *events, buffer = (buffer + data).split(b"\n\n")
            for event in events:
                chunk = json.loads(event[6:]) if event.startswith(b"data: {") else {}
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    times.append(now)
    return t0, times


def _start_server(config, device):
    """`python serve.py` in a subprocess, serving a fresh GPT of `config` (and the byte-level
    tokenizer) from a temp run dir on `device`; returns (process, port, precision, run_dir)."""
    import queue
    import re
    import subprocess
    import sys
    import tempfile
    import threading

    import torch

    from bpe import Tokenizer
    from gpt import GPT, save_checkpoint
    run_dir = tempfile.mkdtemp(prefix="tinychat-bench-serve-")
    torch.manual_seed(0)  # a fresh GPT has a zero lm_head: greedy decoding never stops early
    save_checkpoint(os.path.join(run_dir, "sft"), GPT(config), {})
    Tokenizer([]).save(os.path.join(run_dir, "tokenizer.bin"))
    command = [sys.executable, "serve.py", "--run-dir", run_dir, "--port", "0", "--device", device]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines = queue.Queue()

    def read_log():  # on a thread, so that the server's pipe never fills up
        for line in server.stdout:
            lines.put(line)

    threading.Thread(target=read_log, daemon=True).start()
    found = None
    while found is None:
        found = re.search(r"(bf16|fp32), answers at http://127.0.0.1:(\d+)", lines.get(timeout=120))
    return server, int(found.group(2)), found.group(1), run_dir


def bench_serve(args):
    """Through the HTTP API vs generate() directly (interleaved runs, medians): time to first token
    and decode speed at two shapes; disconnect-to-next-answer latency; 4 clients at once."""
    import http.client
    import shutil
    import signal
    import threading

    from bpe import Tokenizer
    from chat import render_for_completion
    from cli import pick_device
    from gpt import config_from_depth, load_checkpoint
    from sampler import generate

    tok, text = Tokenizer([]), "Tell me a story about a cat."
    ids = render_for_completion(tok, {"messages": [{"role": "user", "content": text}]})
    device = pick_device(args.device)
    emit(bench="serve", what="machine", load_1_5_15_min=os.getloadavg(), cpus=os.cpu_count(),
         device=device.type)
    # the shapes of the --cpu preset and of nanochat's CPU run (d6)
    for depth, seq_len, vocab_size in ((4, 256, 8192), (6, 512, 32768)):
        config = config_from_depth(depth, vocab_size, seq_len, head_dim=64)
        server, port, precision, run_dir = _start_server(config, device.type)
        model, _ = load_checkpoint(os.path.join(run_dir, "sft"), device)
        new_tokens = min(args.new_tokens, seq_len - len(ids))
        runs = {"api": [], "direct": []}
        # API and direct runs alternate, so that the machine's noise hits both; round 0 warms up
        for _ in range(args.repeats + 1):
            t0, times = _stream_times(port, text, new_tokens)
            runs["api"].append((times[0] - t0, (len(times) - 1) / (times[-1] - times[0])))
            t0, times = time.perf_counter(), []
            for _ in generate(model, tok, ids, new_tokens, temperature=0.0, precision=precision):
                times.append(time.perf_counter())
            runs["direct"].append((times[0] - t0, (len(times) - 1) / (times[-1] - times[0])))
        ttft = {k: statistics.median(r[0] for r in v[1:]) * 1000 for k, v in runs.items()}
        speed = {k: statistics.median(r[1] for r in v[1:]) for k, v in runs.items()}
        emit(bench="serve", depth=depth, seq_len=seq_len, vocab_size=vocab_size,
             precision=precision, prompt_tokens=len(ids), new_tokens=new_tokens,
             repeats=args.repeats,
             ttft_ms_api=round(ttft["api"], 1), ttft_ms_direct=round(ttft["direct"], 1),
             tok_per_sec_api=round(speed["api"], 1), tok_per_sec_direct=round(speed["direct"], 1),
             api_over_direct=round(speed["api"] / speed["direct"], 3),
             rounds_tok_per_sec={k: [round(r[1]) for r in v] for k, v in runs.items()})
        # a client leaves mid-answer: how long until the next request's one-token answer is back
        waits = []
        for _ in range(args.repeats):
            _stream_times(port, text, seq_len, stop_after=3)
            t0 = time.perf_counter()
            _stream_times(port, text, 1)
            waits.append(time.perf_counter() - t0)
        # 4 clients at once: each gets a whole answer, or a 503 with Retry-After
        statuses, barrier = [], threading.Barrier(4)

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 32}
            barrier.wait()
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            is_whole = response.status == 200 and "usage" in json.loads(response.read())
            retry_after = response.getheader("Retry-After")
            statuses.append("answer" if is_whole else f"{response.status} retry {retry_after}")

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        emit(bench="serve", depth=depth, runs_ms=[round(w * 1000) for w in waits],
             disconnect_to_next_ms=round(statistics.median(waits) * 1000, 1),
             clients=sorted(statuses))
        server.send_signal(signal.SIGINT)  # as Ctrl-C
        server.wait(timeout=60)
        shutil.rmtree(run_dir)


def add_model_args(p):
    """The model shape and the hardware flags that `train` and `decode` share (nanochat's CPU shape)."""
    p.add_argument("--depth", type=int, default=6, help="transformer blocks (nanochat's CPU run: 6)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim; n_embd = 64 * depth rounded up to it")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row, the model's context")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: gpt.pick_device)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="default: gpt.pick_precision (train), sampler.decode_precision (decode)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # --- subcommands ---
    p = sub.add_parser("data", help="token cache build time (4 train shards + val) and batch reading vs a step")
    p.add_argument("--mirror", default=None, help="offline copy of the data URLs (e.g. ../shared/mirror)")
    p.add_argument("--run-dir", default=None, help="keep downloads and the cache here (default: a temp dir)")
    p.add_argument("--tokenizer", default=None, help="a saved tokenizer to reuse (default: train one)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocab of the tokenizer trained when none is given")
    p.add_argument("--num-train-shards", type=int, default=4, help="train shards (the val shard comes too)")
    p.add_argument("--repeats", type=int, default=3, help="cache builds timed (the median is reported)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (the CPU preset's)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (the CPU preset's)")
    p.add_argument("--depth", type=int, default=4, help="model depth for the training step (the CPU preset's)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim (the CPU preset's)")
    p.add_argument("--train-steps", type=int, default=2, help="timed training steps (the median is reported)")
    p.set_defaults(func=bench_data)
    p = sub.add_parser("tokenizer", help="BPE training time and memory, split time, encode speed")
    p.add_argument("--mirror", default=None, help="data mirror (default: ~/.cache/tinychat/data)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.set_defaults(func=bench_tokenizer)
    p = sub.add_parser("decode", help="batch-1 decoding speed, KV cache vs recomputing every prefix")
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (the median is reported)")
    p.set_defaults(func=bench_decode)
    p = sub.add_parser("train", help="median training step time (forward + backward + optimizer step)")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--num-steps", type=int, default=8, help="timed steps (the median is reported)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (they compile)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="gpt.pick_compile")
    p.add_argument("--keep-freed-memory", choices=["on", "off"], default="on",
                   help="gpt.keep_freed_memory")
    p.set_defaults(func=bench_train)
    p = sub.add_parser("matmul", help="GFLOP/s of a 4096^3 matmul in fp32 and bf16 (the peak)")
    p.add_argument("--n", type=int, default=4096, help="matrix size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: gpt.pick_device)")
    p.set_defaults(func=bench_matmul)
    p = sub.add_parser("serve", help="serve.py: API vs generate() speed, disconnect latency, 4 clients")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per answer (fits both contexts)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of each (medians are reported)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: gpt.pick_device)")
    p.set_defaults(func=bench_serve)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
