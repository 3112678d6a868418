"""
The serving benchmark behind `python bench.py serve`: serve.py run as a user runs it, measured
from outside over HTTP, against calling sampler.generate() directly.

Imported by bench.py's serve subcommand only (an entry point's part, like bench.py itself): it
starts `python serve.py` in a subprocess with a fresh GPT saved in a temporary run dir, talks to
it over sockets (http.client; a bare socket reads the streams), and prints each figure through
the emit() it is given.

Design:
- API and direct runs alternate round by round, so that a shared machine's noise hits both, and
  the figures are medians with every round printed beside them
- two shapes: the --cpu preset's (depth 4, vocab 8,192) and nanochat's CPU run's (depth 6, vocab
  32,768); a fresh GPT's lm_head is zero, so greedy answers never stop early
- two clients of the API: one notes each token's arrival as it comes (what a user sees); on 2
  cores its own CPU time is taken from the server's decoding, so a quiet one that reads every
  50 ms is timed too, by the decode speed serve.py logs: the server's own cost
- a client that leaves after 3 chunks, then the time until the next one-token answer is back:
  how fast the server notices and frees the model
- 4 clients at once (a barrier lines them up): each gets a whole answer or a 503 with Retry-After

Left out on purpose:
- load from many machines or long soaks: one process on the same machine as the server
"""
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import median

from bpe import Tokenizer
from chat import render_for_completion


def _post_chat(port: int, text: str, **fields):
    """POST one user message to serve.py's /v1/chat/completions; returns the response."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"messages": [{"role": "user", "content": text}], **fields}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    return conn.getresponse()


# a chunk that carries generated text (the first chunk's delta is {"role": ..., "content": ""})
CONTENT_CHUNK = re.compile(rb'"delta": \{"content": ')


def _stream_times(port: int, text: str, max_tokens: int, stop_after=None, read_every=0.0):
    """A streamed greedy answer: (send time, arrival time of each content chunk). stop_after:
    leave (close the connection) after that many chunks; read_every: sleep that many seconds
    before each read (a quiet client: its arrival times are that coarse)."""
    # greedy and no penalty, as the direct runs call generate(): the same work on both sides
    body = json.dumps({"messages": [{"role": "user", "content": text}], "stream": True,
                       "temperature": 0, "frequency_penalty": 0, "max_tokens": max_tokens})
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}")
    # NOTE: the client does nothing per chunk but recv() and note the time, and parses after the
    # answer: on 2 cores every microsecond it computes is taken from the server's decoding
    # (http.client and json.loads per chunk cost the API about 5% of its measured speed)
    arrivals, received = [], b""  # (time, total bytes so far) after each recv()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        t0 = time.perf_counter()
        sock.sendall(request.encode())
        while True:
            if read_every:  # not even a sleep(0) per chunk for the client that reads as they come
                time.sleep(read_every)
            if not (data := sock.recv(1 << 16)):
                break
            received += data
            arrivals.append((time.perf_counter(), len(received)))
            if b"data: [DONE]" in data or (stop_after and
                                           len(CONTENT_CHUNK.findall(received)) >= stop_after):
                break
    if received.split(b" ", 2)[1:2] != [b"200"]:  # "HTTP/1.0 200 OK ..."
        raise RuntimeError(f"serve.py answered {received[:200]!r}")
    # each chunk arrived with the recv() that brought its last byte
    ends = [m.end() for m in CONTENT_CHUNK.finditer(received)][:stop_after]
    return t0, [next(t for t, size in arrivals if size >= end) for end in ends]


def _start_server(config, device):
    """`python serve.py` in a subprocess, serving a fresh GPT of `config` (and the byte-level
    tokenizer) from a temp run dir on `device`; returns (process, port, precision, run_dir, the
    queue of its log lines)."""
    import torch
    from gpt import GPT, save_checkpoint
    run_dir = tempfile.mkdtemp(prefix="tinychat-bench-serve-")
    torch.manual_seed(0)
    save_checkpoint(os.path.join(run_dir, "sft"), GPT(config), {})
    Tokenizer([]).save(os.path.join(run_dir, "tokenizer.bin"))
    command = [sys.executable, "serve.py", "--run-dir", run_dir, "--port", "0", "--device", device]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines = queue.Queue()
    def read_log():  # on a thread, so that the server's pipe never fills up
        for line in server.stdout:
            lines.put(line)
    threading.Thread(target=read_log, daemon=True).start()
    # NOTE: this reads serve.py's startup line ("..., bf16, answers at http://..."): keep in step
    found = None
    while found is None:
        found = re.search(r"(bf16|fp32), answers at http://127.0.0.1:(\d+)", lines.get(timeout=120))
    return server, int(found.group(2)), found.group(1), run_dir, lines


def _logged_speed(lines) -> float:
    """The decode speed serve.py logged for the answer it has just written (its own clock)."""
    # NOTE: this reads serve.py's "... 128 tokens (512.3 tok/s), finish_reason ...": keep in step
    while not (found := re.search(r"tokens \(([\d.]+) tok/s\)", lines.get(timeout=600))):
        pass
    return float(found.group(1))


def _four_clients(port: int, text: str) -> list:
    """4 clients POST at once (a barrier lines them up); each must get a whole answer or a 503
    with Retry-After. Returns their outcomes, sorted."""
    barrier = threading.Barrier(4)
    def client(_):
        barrier.wait()
        response = _post_chat(port, text, max_tokens=32)
        is_whole = response.status == 200 and "usage" in json.loads(response.read())
        retry_after = response.getheader("Retry-After")
        return "answer" if is_whole else f"{response.status} retry {retry_after}"
    with ThreadPoolExecutor(4) as pool:
        return sorted(pool.map(client, range(4)))


def bench_serve(args, emit):
    """Through the HTTP API vs generate() directly (interleaved runs, medians): time to first token
    and decode speed at two shapes; disconnect-to-next-answer latency; 4 clients at once."""
    from cli import pick_device
    from gpt import config_from_depth, load_checkpoint
    from sampler import generate
    tok = Tokenizer([])
    text = "Tell me a story about a cat."
    ids = render_for_completion(tok, {"messages": [{"role": "user", "content": text}]})
    device = pick_device(args.device)
    emit(bench="serve", what="machine", load_1_5_15_min=os.getloadavg(), cpus=os.cpu_count(),
         device=device.type)
    # the shapes of the --cpu preset and of nanochat's CPU run (d6)
    for depth, seq_len, vocab_size in ((4, 256, 8192), (6, 512, 32768)):
        config = config_from_depth(depth, vocab_size, seq_len, head_dim=64)
        server, port, precision, run_dir, log = _start_server(config, device.type)
        model, _ = load_checkpoint(os.path.join(run_dir, "sft"), device)
        new_tokens = min(args.new_tokens, seq_len - len(ids))
        runs = {"api": [], "direct": []}  # (start time, each token's arrival time) per round
        # the server's own tok/s for those answers: for "api" it checks the log against the client
        logged = {"api": [], "quiet": []}
        # API and direct runs alternate, so that the machine's noise hits both; round 0 warms up
        for _ in range(args.repeats + 1):
            runs["api"].append(_stream_times(port, text, new_tokens))
            logged["api"].append(_logged_speed(log))
            # a client reading each token as it comes takes CPU time from the server on 2 cores;
            # one that reads every 50 ms (as if on another machine) leaves the server on its own
            _stream_times(port, text, new_tokens, read_every=0.05)
            logged["quiet"].append(_logged_speed(log))
            t0 = time.perf_counter()
            tokens = generate(model, tok, ids, new_tokens, temperature=0.0, precision=precision)
            runs["direct"].append((t0, [time.perf_counter() for _ in tokens]))
        # time to the first token, and tokens per second after it
        ttfts = {k: [ts[0] - t0 for t0, ts in v] for k, v in runs.items()}
        speeds = {k: [(len(ts) - 1) / (ts[-1] - ts[0]) for _, ts in v] for k, v in runs.items()}
        ttft = {k: median(v[1:]) * 1000 for k, v in ttfts.items()}
        speed = {k: median(v[1:]) for k, v in speeds.items()}
        speed_logged = {k: median(v[1:]) for k, v in logged.items()}
        emit(bench="serve", depth=depth, seq_len=seq_len, vocab_size=vocab_size,
             precision=precision, prompt_tokens=len(ids), new_tokens=new_tokens,
             repeats=args.repeats,
             ttft_ms_api=round(ttft["api"], 1), ttft_ms_direct=round(ttft["direct"], 1),
             tok_per_sec_api=round(speed["api"], 1), tok_per_sec_direct=round(speed["direct"], 1),
             api_over_direct=round(speed["api"] / speed["direct"], 3),
             tok_per_sec_server_log=round(speed_logged["api"], 1),
             tok_per_sec_quiet_client=round(speed_logged["quiet"], 1),
             quiet_client_over_direct=round(speed_logged["quiet"] / speed["direct"], 3),
             rounds_tok_per_sec={k: [round(x) for x in v] for k, v in speeds.items()},
             rounds_quiet_tok_per_sec=[round(x) for x in logged["quiet"]])
        # a client leaves after 3 chunks (setup): how long until the next one-token answer is back
        waits = []
        for _ in range(args.repeats):
            _stream_times(port, text, seq_len, stop_after=3)
            t0 = time.perf_counter()
            _stream_times(port, text, 1)
            waits.append(time.perf_counter() - t0)
        emit(bench="serve", depth=depth, runs_ms=[round(w * 1000) for w in waits],
             disconnect_to_next_ms=round(median(waits) * 1000, 1),
             clients=_four_clients(port, text))
        server.send_signal(signal.SIGINT)  # as Ctrl-C
        server.wait(timeout=60)
        shutil.rmtree(run_dir)
