"""
Benchmarks of tinychat's hot paths, one JSON line per figure.

An entry point (layer 5): each subcommand builds what it measures from the project's own code
(bpe, data, gpt, optim, sampler) and prints its figures; `serve` runs bench_serve.py, which
measures serve.py from outside, over HTTP. Nothing imports bench.py. Speed and memory targets
live here, never in timed tests.

Design:
- the machine is shared and noisy: a figure is the median of several runs, printed beside the
  runs, with CPU time beside wall time (other jobs disturb it least); warm-ups are not counted
- fresh models and random tokens: a step's or a token's cost depends on neither, and a fresh
  GPT's lm_head is zero, so greedy decoding never stops early
- train and decode make the entry points' choices (cli.pick_compile, cli.keep_freed_memory,
  cli.pick_precision, sampler.decode_precision), so they time what a user runs
- NOTE: torch is imported inside the functions that use it (so are cli and gpt, which import
  it): each tokenizer training run is a forked child whose peak RSS is a figure, and a fork
  starts with its parent's resident pages, so torch in the parent would add its own

Left out on purpose:
- correctness checks: those are tests (test_all.py)
- several processes (torchrun): every figure is one process's

Examples (the others: `python bench.py --help`):
    python bench.py tokenizer --mirror ../shared/mirror
    python bench.py train --depth 6 --head-dim 64 --seq-len 512 --batch-size 8 --vocab-size 32768
    python bench.py decode
"""
import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from functools import partial
from statistics import median

import pyarrow.parquet as pq

from bpe import Tokenizer, count_chunks

# where the pretraining shards sit under a mirror or <run_dir>/data: data.py's SHARD_URL without
# "https://", written out because data.py imports torch (see the NOTE above)
CLIMBMIX = "huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"


# --- measuring ---
def emit(**fields):
    """Print one benchmark result as a JSON line."""
    print(json.dumps(fields), flush=True)


def cpu_seconds() -> float:
    """CPU seconds of this process plus its finished children (less noisy than wall time)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, repeats: int, setup=lambda: None):
    """Call setup() (untimed) then fn(), `repeats` times: (fn's last result, wall seconds of
    each fn call, CPU seconds of each). fn must return only once a GPU has done its work."""
    result = None
    walls = []
    cpus = []
    for _ in range(repeats):
        setup()
        t0 = time.perf_counter()
        c0 = cpu_seconds()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return result, walls, cpus


# --- tokenizer ---
def read_shards(data_dir, shards, doc_cap=None):
    """Documents of the numbered shards under data_dir (mirror or <run_dir>/data), cropped."""
    texts = []
    for i in shards:
        path = os.path.join(data_dir, CLIMBMIX, f"shard_{i:05d}.parquet")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no shard at {path}; pass --mirror ../shared/mirror "
                                    "or run 'python train_all.py --only download'")
        column = pq.read_table(path, columns=["text"]).column("text")
        texts += [t[:doc_cap] for t in column.to_pylist()]
    return texts


def _train_in_child(data_dir, vocab_size, out):
    """In a child process: read the training text, train, and put (seconds, peak RSS MiB, its
    workers' peak RSS MiB, merges, CPU seconds) on the queue `out`."""
    texts = read_shards(data_dir, range(4), doc_cap=10_000)
    tok, [dt], [cpu] = timed(lambda: Tokenizer.train(texts, vocab_size), 1)
    # ru_maxrss is in KiB on Linux; for RUSAGE_CHILDREN it is the largest count_chunks worker's
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out.put((dt, peak_mib, workers_mib, tok.merges, cpu))


def bench_tokenizer(args):
    """Pre-split time, BPE training time and peak memory (vocab 32,768 and 8,192), encode speed."""
    data_dir = args.mirror or os.path.expanduser("~/.cache/tinychat/data")
    # 1) split: count_chunks (on every core) over the text the tokenizer trains on
    texts = read_shards(data_dir, range(4), doc_cap=10_000)
    chunks, times, cpus = timed(lambda: count_chunks(texts), args.repeats)
    emit(bench="tokenizer_split", seconds=round(median(times), 2),
         runs=[round(t, 2) for t in times], cpu_seconds=round(median(cpus), 2),
         chars=sum(map(len, texts)), chunks=sum(chunks.values()), distinct_chunks=len(chunks),
         workers=os.cpu_count())
    del texts, chunks
    # 2) train, each run in a fresh child process, so that its peak RSS is its own
    merges = None
    for vocab_size in (32768, 8192):
        runs = []
        for _ in range(args.repeats):
            out = multiprocessing.Queue()
            child_args = (data_dir, vocab_size, out)
            child = multiprocessing.Process(target=_train_in_child, args=child_args)
            child.start()
            runs.append(out.get())  # NOTE: before join: a child with unread queued data never exits
            child.join()
        seconds, peaks, worker_peaks, all_merges, cpus = zip(*runs)
        merges = merges or all_merges[0]  # the first vocab's: 32,768
        emit(bench="tokenizer_train", vocab_size=vocab_size, seconds=round(median(seconds), 2),
             runs=[round(t, 2) for t in seconds], cpu_seconds=round(median(cpus), 2),
             peak_rss_mib=round(max(peaks)), worker_peak_rss_mib=round(max(worker_peaks)),
             text="shards 0-3, docs cropped to 10,000 chars")
    # 3) encode: train 0-3 and val 06542, whole documents, in this one process (data.py's token
    # cache runs the same encode on every core: see `bench.py data`)
    texts = read_shards(data_dir, (0, 1, 2, 3, 6542))
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tok = Tokenizer(merges)
    # setup empties the chunk cache: every run encodes each distinct chunk anew
    ids, times, cpus = timed(lambda: [tok.encode(text) for text in texts], args.repeats,
                             setup=tok.cache.clear)
    num_tokens = sum(map(len, ids))
    dt = median(times)
    emit(bench="tokenizer_encode", vocab_size=tok.vocab_size, seconds=round(dt, 2),
         runs=[round(t, 2) for t in times], cpu_seconds=round(median(cpus), 2),
         mb=round(num_bytes / 1e6, 1), mb_per_s=round(num_bytes / 1e6 / dt, 1),
         tokens=num_tokens, bytes_per_token=round(num_bytes / num_tokens, 3))


# --- train ---
def train_step(model, optimizers, x, y, device, precision):
    """One optimizer step on x, y (B, T): forward, backward, update, gradients cleared; returns
    the loss once the device is done."""
    import torch
    from gpt import autocast
    with autocast(device, precision):
        loss = model(x, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # kernels run queued: wait for them, or the clock stops early
        torch.cuda.synchronize()
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
    # the entry point's choices: compile where it works, freed memory kept (see cli.py)
    use_compile, why = pick_compile(device, args.compile)
    allocator = keep_freed_memory(device) if args.keep_freed_memory == "on" else "default"
    torch.manual_seed(0)
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len, head_dim=args.head_dim)
    model = GPT(config).to(device)
    optimizers = make_optimizers(model)
    forward = torch.compile(model, dynamic=False) if use_compile else model  # same parameters
    shape = (args.batch_size, args.seq_len + 1)
    ids = torch.randint(0, args.vocab_size, shape, device=device)  # (B, T+1)
    x = ids[:, :-1]  # (B, T)
    y = ids[:, 1:]  # (B, T): x shifted by one
    step = partial(train_step, forward, optimizers, x, y, device, precision)
    _, warmup, _ = timed(step, args.warmup_steps)  # they compile, allocate and warm caches
    peak_memory_mib(device, reset=True)
    # wall time is what a learner waits; CPU time is what other jobs on a shared machine
    # disturb least (at one thread it leaves out the time we were not scheduled); kernel
    # (system) time and minor page faults per step show the allocator's churn
    usage = resource.getrusage(resource.RUSAGE_SELF)
    loss, times, cpus = timed(step, args.num_steps)
    end = resource.getrusage(resource.RUSAGE_SELF)
    dt = median(times)
    tok_per_sec = args.batch_size * args.seq_len / dt
    emit(bench="train", depth=args.depth, n_embd=config.n_embd, n_head=config.n_head,
         seq_len=args.seq_len, batch_size=args.batch_size, vocab_size=args.vocab_size,
         params=model.num_params(), device=device.type, precision=precision,
         compile=use_compile, compile_why=why, allocator=allocator,
         threads=torch.get_num_threads(), steps=args.num_steps, warmup_s=round(sum(warmup), 1),
         ms_per_step=round(dt * 1000, 1), runs_ms=[round(t * 1000) for t in times],
         cpu_ms_per_step=round(median(cpus) * 1000, 1),
         sys_ms_per_step=round((end.ru_stime - usage.ru_stime) / args.num_steps * 1000, 1),
         minor_faults_per_step=(end.ru_minflt - usage.ru_minflt) // args.num_steps,
         peak_mib=round(peak_memory_mib(device)), tok_per_sec=round(tok_per_sec, 1),
         # model FLOPs (gpt's flops_per_token: forward + backward) a second: compare with matmul
         gflops_per_sec=round(model.flops_per_token() * tok_per_sec / 1e9, 1),
         final_loss=round(loss.item(), 4))


def bench_matmul(args):
    """GFLOP/s of (n x n) @ (n x n) in fp32 and bf16: the peak a training step is held to."""
    import torch
    from cli import pick_device
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(args.n, args.n, device=device, dtype=dtype)  # (n, n)
        # (n, n) @ (n, n) -> (n, n); .item() waits for a GPU to finish
        _, times, _ = timed(lambda: (a @ a)[0, 0].item(), 6)
        dt = median(times[1:])  # the first run picks kernels: the median of the other 5
        # n^2 outputs, each n multiply-adds: 2 * n^3 FLOPs
        emit(bench="matmul", n=args.n, dtype=str(dtype).removeprefix("torch."),
             device=device.type, threads=torch.get_num_threads(), ms=round(dt * 1000, 1),
             gflops_per_sec=round(2 * args.n**3 / dt / 1e9))


# --- decode ---
def bench_decode(args):
    """Tokens per second at batch 1: sampler.generate with its KV cache vs recomputing."""
    import torch
    from cli import pick_device
    from gpt import GPT, autocast, config_from_depth
    from sampler import decode_precision, generate
    if args.prompt_len < 1 or args.prompt_len + args.new_tokens > args.seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} must "
                         f"fit in --seq-len {args.seq_len}; lower one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = args.precision or decode_precision(device)
    torch.manual_seed(0)
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len, head_dim=args.head_dim)
    model = GPT(config).to(device).eval()
    # a byte-level tokenizer (no merges) is enough: generate() only needs the special tokens' ids
    tok = Tokenizer([])
    prompt = torch.randint(0, 256, (args.prompt_len,)).tolist()
    def run_cached(num_tokens):  # greedy on a fresh model: it never stops early (see Design)
        tokens = generate(model, tok, prompt, num_tokens, temperature=0.0, precision=precision)
        return sum(1 for _ in tokens)
    # Recompute-everything: the whole sequence goes through the model again for each new token
    # (a timing loop, not a second sampler: it never looks at what it would have sampled).
    ids = torch.tensor([prompt + [0] * args.new_tokens], device=device)  # (1, prompt + new)
    @torch.inference_mode()
    def run_naive(num_tokens):
        for t in range(num_tokens):
            with autocast(device, precision):
                model(ids[:, :args.prompt_len + t]).argmax(dim=-1)  # (1, T, V) -> (1, T)
        if device.type == "cuda":  # as in train_step
            torch.cuda.synchronize()
        return num_tokens
    tok_per_sec = {}
    for name, run in (("kv_cache", run_cached), ("recompute", run_naive)):
        run(8)  # warm-up: first-call allocations and kernel selection
        num_tokens, times, _ = timed(lambda: run(args.new_tokens), args.repeats)
        assert num_tokens == args.new_tokens, f"decoded {num_tokens} of {args.new_tokens} tokens"
        dt = median(times)
        tok_per_sec[name] = args.new_tokens / dt
        emit(bench="decode", mode=name, depth=args.depth, n_embd=config.n_embd,
             vocab_size=args.vocab_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
             batch_size=1, device=device.type, precision=precision,
             threads=torch.get_num_threads(), repeats=args.repeats,
             ms_per_token=round(dt * 1000 / args.new_tokens, 2),
             tok_per_sec=round(tok_per_sec[name], 1))
    speedup = tok_per_sec["kv_cache"] / tok_per_sec["recompute"]
    emit(bench="decode", mode="speedup", kv_cache_over_recompute=round(speedup, 2))


# --- data ---
def bench_data(args):
    """Token cache build time, then one batch read vs one training step at the same (B, T)."""
    import torch
    from cli import pick_device, pick_precision
    from data import build_token_cache, download_all, pretrain_batches, tokenizer_texts
    from gpt import GPT, config_from_depth
    from optim import make_optimizers
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="tinychat-bench-")
    download_all(run_dir, args.mirror, args.num_train_shards)
    if args.tokenizer:  # a trained one: training it is the tokenizer bench's figure, not this one
        tok = Tokenizer.load(args.tokenizer)
    else:  # 2e9 characters: the GPU preset's tokenizer budget (train_all.py)
        tok = Tokenizer.train(tokenizer_texts(run_dir, 2_000_000_000), args.vocab_size)
    tokens_dir = os.path.join(run_dir, "tokens")
    # setup deletes the cache: every run builds it from scratch
    meta, times, _ = timed(partial(build_token_cache, run_dir, tok), args.repeats,
                           setup=partial(shutil.rmtree, tokens_dir, ignore_errors=True))
    dt = median(times)
    text_bytes = sum(meta["text_bytes"].values())
    emit(bench="data", what="token_cache", vocab_size=tok.vocab_size,
         shards=len(meta["shards"]["train"]) + 1, text_mb=round(text_bytes / 1e6, 1),
         tokens=sum(meta["tokens"].values()), repeats=len(times), seconds=round(dt, 2),
         mb_per_s=round(text_bytes / 1e6 / dt, 2))
    # the loader must be noise next to the model
    batches = pretrain_batches(run_dir, "train", args.batch_size, args.seq_len, seed=0)
    (x, y, _), reads, _ = timed(lambda: next(batches), 200)  # 200: reads are cheap
    device = pick_device(None)
    precision = pick_precision(device)
    torch.manual_seed(0)
    config = config_from_depth(args.depth, tok.vocab_size, args.seq_len, head_dim=args.head_dim)
    model = GPT(config).to(device)
    optimizers = make_optimizers(model)
    x = x.to(device)  # (B, T), copied to a GPU outside the read time
    y = y.to(device)  # (B, T)
    step = partial(train_step, model, optimizers, x, y, device, precision)
    _, steps, _ = timed(step, args.train_steps + 1)
    read_ms = median(reads) * 1000
    step_ms = median(steps[1:]) * 1000  # the first step allocates buffers: not counted
    emit(bench="data", what="batch_read", batch_size=args.batch_size, seq_len=args.seq_len,
         depth=args.depth, read_ms=round(read_ms, 3), step_ms=round(step_ms, 1),
         percent_of_step=float(f"{100 * read_ms / step_ms:.2g}"))
    if not args.run_dir:
        shutil.rmtree(run_dir)


# --- serve: in bench_serve.py, which runs serve.py as a user would ---
def run_bench_serve(args):
    """`python bench.py serve`: bench_serve.py's figures (imported here: it needs torch)."""
    from bench_serve import bench_serve
    bench_serve(args, emit)


# --- command line ---
def add_model_args(p):
    """The model shape and machine flags that train and decode share (nanochat's CPU shape)."""
    p.add_argument("--depth", type=int, default=6, help="transformer blocks (nanochat's CPU run)")
    p.add_argument("--head-dim", type=int, default=64, help="n_embd = 64 * depth rounded up to it")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row, the model's context")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cli.pick_device)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="default: cli.pick_precision (train), sampler.decode_precision (decode)")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    median_of = "(the median is reported)"
    p = sub.add_parser("data", help="token cache build time (4 train shards + val), batch reading")
    p.add_argument("--mirror", default=None, help="offline copy of the data URLs")
    p.add_argument("--run-dir", default=None, help="keep downloads and cache here (default: temp)")
    p.add_argument("--tokenizer", default=None, help="a saved tokenizer to reuse (default: train)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocab of the tokenizer trained")
    p.add_argument("--num-train-shards", type=int, default=4, help="train shards (+ the val shard)")
    p.add_argument("--repeats", type=int, default=3, help=f"cache builds timed {median_of}")
    # the training step the batch reading is held against: the CPU preset's shape
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--depth", type=int, default=4, help="model depth for the training step")
    p.add_argument("--head-dim", type=int, default=64, help="head dim")
    p.add_argument("--train-steps", type=int, default=2, help=f"timed training steps {median_of}")
    p.set_defaults(func=bench_data)
    p = sub.add_parser("tokenizer", help="BPE training time and memory, split time, encode speed")
    p.add_argument("--mirror", default=None, help="data mirror (default: ~/.cache/tinychat/data)")
    p.add_argument("--repeats", type=int, default=3, help=f"timed runs per figure {median_of}")
    p.set_defaults(func=bench_tokenizer)
    p = sub.add_parser("decode", help="batch-1 decoding speed, KV cache vs recomputing")
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per run")
    p.add_argument("--repeats", type=int, default=3, help=f"timed runs per mode {median_of}")
    p.set_defaults(func=bench_decode)
    p = sub.add_parser("train", help="median training step time (forward + backward + optimizers)")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--num-steps", type=int, default=8, help=f"timed steps {median_of}")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (they compile)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="pick_compile")
    p.add_argument("--keep-freed-memory", choices=["on", "off"], default="on",
                   help="cli.keep_freed_memory")
    p.set_defaults(func=bench_train)
    p = sub.add_parser("matmul", help="GFLOP/s of a 4096^3 matmul in fp32 and bf16 (the peak)")
    p.add_argument("--n", type=int, default=4096, help="matrix size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cli.pick_device)")
    p.set_defaults(func=bench_matmul)
    p = sub.add_parser("serve", help="serve.py: API vs generate() speed, disconnect, 4 clients")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per answer (fits both)")
    p.add_argument("--repeats", type=int, default=5, help=f"timed rounds of each {median_of}")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cli.pick_device)")
    p.set_defaults(func=run_bench_serve)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
