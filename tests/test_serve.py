"""
Tests of serve.py: answers in OpenAI's shapes (and through the official `openai` client), every
malformed request a 4xx, disconnects and overload, the Host check, `python serve.py` itself, a
fuzz run, and the page in a headless browser.

Each test runs a serve.Server in a thread on a free port, with byte_gpt() or TypistModel: a fake
GPT that types a fixed answer one token per call and can be held between tokens by the test. The
openai client, selenium and Chromium are test-only extras that .ci/run installs: where one is
missing its test skips, except under CI (the CI environment variable set), where it fails.

fuzz_requests() scales up: python -c "import tests.test_serve as t; print(t.fuzz_report(10_000))"
"""
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import unittest

import torch

import serve
from bpe import Tokenizer
from gpt import GPTConfig, save_checkpoint
from tests.fixtures import ROOT, byte_gpt, quiet

XSS = "<img src=x onerror=alert(1)>"  # what a model may write; the page must show it as text


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

    def forward(self, ids, kv_cache=None):
        self.calls.release()
        if self.permits is not None:
            assert self.permits.acquire(timeout=60), "the test never let the fake model go on"
        if kv_cache.pos == 0:  # a prefill: a new answer
            self.step = 0
        kv_cache.pos += ids.shape[1]
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.config.vocab_size)  # (B, T, V)
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
            is_there = self.changed.wait_for(lambda: sum(text in x for x in self.lines) >= count, 60)
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


def call(server, method: str, path: str, body=None, headers=None):
    """One request through http.client: (status, response, the JSON body or the text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        return response.status, response, json.loads(raw)
    except ValueError:
        return response.status, response, raw.decode("utf-8", "replace")


def raw_request(port: int, request: bytes, is_cut: bool = False) -> bytes:
    """Send raw bytes to 127.0.0.1:port; read until the server closes. is_cut: then close our
    sending side, as a client that stops sending mid-request does."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(request)
            if is_cut:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:  # the server closed first (a 413 or 414 leaves bytes unread)
            pass
    return b"".join(chunks)


def post(port: int, body, path="/v1/chat/completions", extra_headers="") -> bytes:
    """The raw bytes of a POST with a JSON (or raw bytes) body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra_headers}\r\n").encode() + data


def hi(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def _missing(what: str):
    if os.environ.get("CI"):
        raise AssertionError(f"{what} is missing and CI is set: .ci/run must install it")
    raise unittest.SkipTest(f"{what} is not installed")


# --- answers ---


def test_serve_chat_and_completions_in_openai_shapes():
    """Whole and streamed answers carry OpenAI's fields; stop strings, max_tokens and usage work."""
    with running(TypistModel("Hello there!")) as (server, log):
        status, _, answer = call(server, "POST", "/v1/chat/completions", hi())
        choice = answer["choices"][0]
        assert status == 200 and answer["object"] == "chat.completion", f"got {status} {answer}"
        assert choice["message"] == {"role": "assistant", "content": "Hello there!"}, choice
        assert choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 12, answer
        for body, text, finish in [(hi(stop=["there"]), "Hello ", "stop"), (hi(max_tokens=4), "Hell", "length"),
                                   (hi(stop="lo t"), "Hel", "stop")]:
            _, _, answer = call(server, "POST", "/v1/chat/completions", body)
            got = (answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"])
            assert got == (text, finish), f"{body} gave {got}, want {(text, finish)}: stop or max_tokens broken"
        raw = raw_request(server.server_address[1], post(server.server_address[1], hi(
            stream=True, stream_options={"include_usage": True})))
        head, _, events = raw.partition(b"\r\n\r\n")
        assert b"Content-Type: text/event-stream" in head, f"a stream needs the SSE type: {head}"
        events = [e[6:] for e in events.decode().split("\n\n") if e]
        assert events[-1] == "[DONE]", f"the stream must end with [DONE]: {events[-3:]}"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant", chunks[0]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert text == "Hello there!", f"streamed {text!r}"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop", chunks[-2]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12, chunks[-1]
        _, _, plain = call(server, "POST", "/v1/completions", {"prompt": "Once", "max_tokens": 5})
        assert plain["object"] == "text_completion" and plain["choices"][0]["text"] == "Hello", plain
        # a system message leads the first user turn; content may be a list of text parts
        parts = {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
        status, _, answer = call(server, "POST", "/v1/chat/completions", parts)
        assert status == 200 and answer["usage"]["prompt_tokens"] > 15, f"system + parts: {answer}"
        log.wait_for("finish_reason length")


def test_serve_openai_client():
    """The official openai client works unchanged: models.list, chat (whole and streamed), completions."""
    try:
        import openai
    except ImportError:
        _missing("the openai package (pip install openai)")
    with running(byte_gpt()) as (server, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="any",
                               max_retries=0)
        assert [m.id for m in client.models.list()] == ["tinychat-sft"], "models.list() is wrong"
        messages = [{"role": "user", "content": "Hello"}]
        whole = client.chat.completions.create(model="tinychat", messages=messages, temperature=0,
                                               max_tokens=8, seed=1)
        text = whole.choices[0].message.content
        assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.total_tokens > 8, whole
        stream = client.chat.completions.create(model="tinychat", messages=messages, temperature=0,
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text, f"streamed {streamed!r} but the whole answer was {text!r}"
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, chunks[-1]
        completion = client.completions.create(model="tinychat", prompt="The cat", max_tokens=4)
        assert isinstance(completion.choices[0].text, str), completion
        try:
            client.chat.completions.create(model="tinychat", messages=messages, n=2)
            raise AssertionError("n=2 was accepted")
        except openai.BadRequestError as e:
            assert "'n' must be 1" in str(e), f"the 400 should say what to fix: {e}"


# --- refusals ---


def test_serve_malformed_requests_get_4xx_in_openai_shape():
    """Every kind of bad request gets its 4xx, a JSON error saying what to fix, and the server lives."""
    with running(TypistModel("ok")) as (server, _):
        port = server.server_address[1]
        user = {"role": "user", "content": "hi"}
        cases = [  # (what, request bytes, status)
            ("bad JSON", post(port, b"{bad"), 400), ("a JSON list", post(port, b"[]"), 400),
            ("JSON null", post(port, b"null"), 400), ("bad UTF-8", post(port, b'{"x": "\xff"}'), 400),
            ("NaN", post(port, {**hi(), "temperature": "NaN"}).replace(b'"NaN"', b"NaN  "), 400),
            ("1e999", post(port, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}'), 400),
            ("a 5000-digit number", post(port, b'{"seed": 1' + b"0" * 5000 + b"}"), 400),
            ("[[[[...", post(port, b"[" * 100_000), 400),
            ("messages a string", post(port, {"messages": "hi"}), 400),
            ("no messages", post(port, {"messages": []}), 400),
            ("501 messages", post(port, {"messages": [user] * 501}), 400),
            ("unknown role", post(port, {"messages": [{"role": "tool", "content": "hi"}]}), 400),
            ("content a number", post(port, {"messages": [{"role": "user", "content": 5}]}), 400),
            ("an image part", post(port, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400),
            ("a lone surrogate", post(port, b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400),
            ("8001 characters", post(port, {"messages": [{"role": "user", "content": "x" * 8001}]}), 400),
            ("two user turns", post(port, {"messages": [user, user]}), 400),
            ("system not first", post(port, {"messages": [user, {"role": "system", "content": "s"}, user]}), 400),
            ("answer last", post(port, {"messages": [user, {"role": "assistant", "content": "a"}]}), 400),
            ("temperature text", post(port, hi(temperature="hot")), 400),
            ("temperature 3", post(port, hi(temperature=3)), 400),
            ("temperature true", post(port, hi(temperature=True)), 400),
            ("top_k 500", post(port, hi(top_k=500)), 400), ("top_p 2", post(port, hi(top_p=2)), 400),
            ("max_tokens 0", post(port, hi(max_tokens=0)), 400), ("max_tokens 1.5", post(port, hi(max_tokens=1.5)), 400),
            ("seed -1", post(port, hi(seed=-1)), 400), ("seed 2**64", post(port, hi(seed=2**64)), 400),
            ("n 2", post(port, hi(n=2)), 400), ("stream 'yes'", post(port, hi(stream="yes")), 400),
            ("5 stop strings", post(port, hi(stop=["a"] * 5)), 400), ("empty stop", post(port, hi(stop=[""])), 400),
            ("prompt a list", post(port, {"prompt": [1, 2]}, "/v1/completions"), 400),
            ("text/plain", post(port, hi()).replace(b"application/json", b"text/plain"), 415),
            ("no Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
             b"Content-Type: application/json\r\n\r\n{}" % port, 411),
            ("chunked", post(port, hi(), extra_headers="Transfer-Encoding: chunked\r\n"), 411),
            ("Content-Length -1", post(port, b"{}").replace(b"Length: 2", b"Length: -1"), 411),
            ("2 MB body", post(port, b"{}").replace(b"Length: 2", b"Length: 2000000"), 413),
            ("unknown path", b"GET /admin HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port, 404),
            ("GET on a POST route", b"GET /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port, 405),
            ("DELETE /health", b"DELETE /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port, 405),
            ("a garbage request line", b"HELLO\r\n\r\n", 400),
            ("a 70 kB path", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        ]
        for what, request, want in cases:
            response = raw_request(port, request)
            head, _, body = response.partition(b"\r\n\r\n")
            assert head[9:12] == str(want).encode(), f"{what}: want {want}, got {head[:60]!r} {body[:200]!r}"
            error = json.loads(body)["error"]
            assert error["message"] and error["type"], f"{what}: not OpenAI's error shape: {body!r}"
            assert b"Traceback" not in response, f"{what}: a traceback reached the client"
        long = {"messages": [{"role": "user", "content": "x" * 600}]}  # 600 + 4 tokens, context 512
        status, _, answer = call(server, "POST", "/v1/chat/completions", long)
        error = answer["error"]
        assert status == 400 and error["code"] == "context_length_exceeded", answer
        assert "604" in error["message"] and "512" in error["message"], f"give the token counts: {error}"
        status, response, _ = call(server, "GET", "/v1/chat/completions")
        assert status == 405 and response.getheader("Allow") == "POST", "a 405 names the right method"
        assert call(server, "POST", "/v1/chat/completions", hi())[0] == 200, "the server died"


def test_serve_body_that_stops_coming_is_dropped():
    """A client that sends half its body and closes, or goes silent, is dropped; the server lives."""
    with running(TypistModel("ok")) as (server, log):
        port = server.server_address[1]
        assert raw_request(port, post(port, hi())[:-5], is_cut=True) == b"", "a cut body got an answer"
        serve.Handler.timeout = 0.2  # a silent client: the read times out (10 s in real use)
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(post(port, hi())[:-5])
                assert sock.recv(100) == b"", "a silent client's request was answered"
        finally:
            serve.Handler.timeout = serve.SOCKET_TIMEOUT_S
        log.wait_for("the client left", count=2)
        assert call(server, "POST", "/v1/chat/completions", hi())[0] == 200, "the server died"


def test_serve_host_header_and_no_cors():
    """A foreign Host gets 403 (DNS rebinding); localhost, 127.0.0.1 and [::1] with the port are served."""
    with running(TypistModel("ok")) as (server, _):
        port = server.server_address[1]
        for host in ["evil.com", f"evil.com:{port}", f"localhost:{port}.evil.com", "localhost", f"127.0.0.2:{port}"]:
            status, _, answer = call(server, "GET", "/health", headers={"Host": host})
            assert status == 403 and "Host" in answer["error"]["message"], f"Host {host!r} got {status}"
        no_host = raw_request(port, b"GET /health HTTP/1.0\r\n\r\n")
        assert no_host.startswith(b"HTTP/1.0 403"), f"no Host header must be refused: {no_host[:40]}"
        for host in [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"]:
            status, response, _ = call(server, "GET", "/health", headers={"Host": host})
            assert status == 200, f"Host {host!r} got {status}"
            assert not [h for h in response.getheaders() if h[0].lower().startswith("access-control")], \
                "the server must send no CORS headers"
        assert call(server, "OPTIONS", "/v1/chat/completions")[0] == 405, "a CORS preflight must fail"


# --- waiting, leaving, loading ---


def test_serve_disconnect_ends_generation():
    """A client that leaves (streamed or not) ends its generation at the next token; the next request is served."""
    text = "a long answer that the client will not wait for " * 4
    model = TypistModel(text, is_gated=True)
    with running(model) as (server, log):
        port = server.server_address[1]
        for is_stream in (True, False):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(post(port, hi(stream=is_stream)))
                model.permits.release(4)  # the prefill and 3 tokens
                received = b""
                while is_stream and b'"content": "a"' not in received:
                    chunk = sock.recv(65536)
                    assert chunk, f"the stream ended before its first token: {received!r}"
                    received += chunk
                for _ in range(4):
                    assert model.calls.acquire(timeout=60), "the generation did not start"
            model.permits.release(1000)  # the client has gone: let the server reach its next token
            line = log.wait_for("finish_reason disconnect", count=1 + (not is_stream))[-1]
            model.permits = threading.Semaphore(0)  # that generation has ended: gate the next one
            tokens = int(line.split("tokens")[0].split()[-1])
            assert tokens < len(text) // 2, f"{tokens} tokens were generated for a client that left"
        model.permits = None
        status, _, answer = call(server, "POST", "/v1/chat/completions", hi(max_tokens=5))
        assert status == 200 and answer["choices"][0]["message"]["content"] == "a lon", "next request failed"


def test_serve_overload_gets_503_with_retry_after():
    """With one generating and MAX_WAITING waiting, the next request gets 503 and Retry-After; the others finish."""
    model = TypistModel("busy busy", is_gated=True)
    with running(model) as (server, _):
        results = []
        first = threading.Thread(target=lambda: results.append(call(server, "POST", "/v1/chat/completions", hi())))
        first.start()
        assert model.calls.acquire(timeout=60), "the first request did not start generating"
        for _ in range(serve.MAX_WAITING):  # stand in for the requests that wait
            assert server.slots.acquire(timeout=60), "the wait slots are taken by something else"
        status, response, answer = call(server, "POST", "/v1/chat/completions", hi())
        for _ in range(serve.MAX_WAITING):
            server.slots.release()
        assert status == 503 and answer["error"]["code"] == "server_busy", f"overload gave {status} {answer}"
        assert response.getheader("Retry-After") == str(serve.RETRY_AFTER_S), "a 503 needs Retry-After"
        second = threading.Thread(target=lambda: results.append(call(server, "POST", "/v1/chat/completions", hi())))
        second.start()
        model.permits.release(100)
        first.join()
        second.join()
        assert [r[2]["choices"][0]["message"]["content"] for r in results] == ["busy busy"] * 2, results


def test_serve_loading_and_main_without_a_model():
    """While loading, /health and the API answer 503 and the page is served; without a model, main exits in one line."""
    with running(None) as (server, _):
        status, response, answer = call(server, "GET", "/health")
        assert status == 503 and response.getheader("Retry-After"), f"/health while loading: {status}"
        assert call(server, "POST", "/v1/chat/completions", hi())[0] == 503, "the API must wait for the model"
        status, response, page = call(server, "GET", "/")
        assert status == 200 and "<title>tinychat</title>" in page, "the page is not served"
        assert "default-src 'none'" in response.getheader("Content-Security-Policy"), "the page needs its CSP"
    with tempfile.TemporaryDirectory() as run_dir, quiet():
        try:
            serve.main(["--run-dir", run_dir, "--port", "0"])
            raise AssertionError("serve.main served without a model")
        except SystemExit as e:
            assert "python train_all.py" in str(e) and "Traceback" not in str(e), f"exit message: {e}"


def test_serve_main_serves_a_run_dir_and_stops_on_ctrl_c():
    """`python serve.py --run-dir D --port 0` prints its URL, answers, and exits cleanly on Ctrl-C."""
    with tempfile.TemporaryDirectory() as run_dir:
        save_checkpoint(os.path.join(run_dir, "mid"), byte_gpt(), {})
        Tokenizer([]).save(os.path.join(run_dir, "tokenizer.bin"))
        process = subprocess.Popen([sys.executable, "serve.py", "--run-dir", run_dir, "--port", "0"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = [process.stdout.readline() for _ in range(2)]
            assert "mid model" in lines[1] and "answers at http://127.0.0.1:" in lines[1], lines
            port = int(lines[1].rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/v1/models")
            assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tinychat-mid", "wrong model"
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=60)
        finally:
            process.kill()
        assert process.returncode == 0 and "stopped" in out and "Traceback" not in out, f"Ctrl-C: {out}"


# --- fuzz ---


def fuzz_requests(port: int, num_requests: int, seed: int = 0) -> dict:
    """Send num_requests malformed or random requests to a server at 127.0.0.1:port, one connection
    each; returns {status: count}: 0 = closed without an answer, "traceback" = one leaked out."""
    rng = random.Random(seed)
    values = [None, True, -1, 0, 0.5, 3, 2**70, "x", "", [], {}, {"a": [1]}, "\ud800", "a" * 9000,
              [{"type": "image_url"}], [{"type": "text", "text": "hi"}]]
    fields = ["messages", "prompt", "temperature", "top_k", "top_p", "max_tokens", "seed", "n",
              "stream", "stop", "stream_options", "model"]
    raw_bodies = [b"{", b"[]", b"null", b'{"top_p": NaN}', b'{"max_tokens": 1e999}', b"[" * 50_000,
                  b"\xff\xfe{}", b'{"seed": 1' + b"0" * 5000 + b"}", b""]
    routes = [("POST", "/v1/chat/completions")] * 6 + [
        ("POST", "/v1/completions"), ("GET", "/health"), ("GET", "/v1/chat/completions"), ("DELETE", "/"),
        ("FOO", "/"), ("GET", "//x/../y"), ("POST", "/" + "a" * 70_000), ("GET", "/v1/models?x=%00")]
    counts = {}
    for _ in range(num_requests):
        body = hi(max_tokens=2, stream=rng.random() < 0.5)
        for _ in range(rng.randrange(3)):  # up to two fields get a random value
            body[rng.choice(fields)] = rng.choice(values)
        if rng.random() < 0.3:
            roles = ["user", "assistant", "system", "developer", "tool", 1, None]
            body["messages"] = [{"role": rng.choice(roles), "content": rng.choice(values)}
                                for _ in range(rng.randrange(4))]
        data = json.dumps(body).encode() if rng.random() < 0.8 else rng.choice(raw_bodies)
        method, path = rng.choice(routes)
        headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(data))}
        trick = rng.randrange(12)  # 0-6: one more thing wrong; 7-11: nothing more
        if trick == 0:
            headers["Content-Type"] = rng.choice(["text/plain", "", "application/jsonp"])
        elif trick == 1:
            del headers["Content-Length"]
        elif trick == 2:
            headers["Content-Length"] = rng.choice(["-1", "1e3", "99999999", str(len(data) + 5)])
        elif trick == 3:
            headers["Host"] = rng.choice(["evil.com", "", f"localhost:{port}.evil.com"])
        elif trick == 4:
            headers["Transfer-Encoding"] = "chunked"
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = head.encode() + b"\r\n" + data
        if trick == 5:  # noise, an HTTP/0.9 request, an empty line
            request = rng.choice([rng.randbytes(rng.randrange(1, 300)), b"GET /\r\n", b"\r\n"])
        elif trick == 6:  # cut short
            request = request[:rng.randrange(len(request))]
        response = raw_request(port, request, is_cut=trick in (2, 5, 6))
        status = int(response[9:12]) if response[:5] == b"HTTP/" else 0
        status = "traceback" if b"Traceback" in response else status
        counts[status] = counts.get(status, 0) + 1
    return counts


def fuzz_report(num_requests: int, seed: int = 0) -> dict:
    """fuzz_requests against a server with byte_gpt(), then one valid request: the counts, and its status."""
    with running(byte_gpt()) as (server, _):
        counts = fuzz_requests(server.server_address[1], num_requests, seed)
        status = call(server, "POST", "/v1/chat/completions", hi(max_tokens=4))[0]
    return {"statuses": dict(sorted(counts.items(), key=str)), "valid_request_after": status}


def test_serve_fuzz_never_500():
    """Hundreds of malformed or random requests never get a 500 or a traceback, and the server lives on."""
    report = fuzz_report(300)
    statuses = report["statuses"]
    assert not {500, "traceback"} & set(statuses), f"the fuzz got a 500 or a traceback: {statuses}"
    assert set(statuses) <= {0, 200, 400, 403, 404, 405, 411, 413, 414, 415, 501}, f"odd statuses {statuses}"
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 50, f"the fuzz mix is off: {statuses}"
    assert report["valid_request_after"] == 200, f"the server is dead after the fuzz: {report}"


# --- the page ---


def _browser():
    """Headless Chromium driven by selenium (Debian's chromium and chromium-driver, pip's selenium)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        _missing("Chromium (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)  # --no-sandbox: Chromium refuses to run as root otherwise
    return webdriver.Chrome(service=Service(driver), options=options)


def test_serve_page_in_a_browser():
    """In Chromium: send, see streamed text, Stop (the server stops), Regenerate, Edit; model HTML shows as text."""
    browser = _browser()
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    answer = f"Here is {XSS} for you. " * 3
    model = TypistModel(answer, is_gated=True)
    try:
        with running(model) as (server, log):
            wait = WebDriverWait(browser, 60)
            browser.get(f"http://localhost:{server.server_address[1]}/")  # the seed's address
            wait.until(lambda b: "sft model" in b.find_element(By.ID, "model").text)
            box = browser.find_element(By.ID, "input")
            box.send_keys("first line")
            ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
            box.send_keys("second line")
            assert box.get_attribute("value") == "first line\nsecond line", "Shift+Enter must be a newline"
            assert not browser.find_elements(By.CSS_SELECTOR, ".msg"), "Shift+Enter sent the message"
            box.send_keys(Keys.ENTER)

            def texts(role):  # the messages' text, read in one step: the page redraws at any time
                return browser.execute_script(f"return [...document.querySelectorAll('.msg.{role} "
                                              f".text')].map(e => e.textContent)")

            def shown():  # the last answer on the page
                return (texts("assistant") or [""])[-1]

            model.permits.release(12)  # 12 calls: 12 tokens, then the model waits
            wait.until(lambda b: len(shown()) >= 12)
            assert browser.find_element(By.ID, "stop").is_displayed(), "no Stop button while writing"
            browser.find_element(By.ID, "stop").click()
            wait.until(lambda b: b.find_element(By.ID, "regenerate").is_displayed())
            model.permits.release(1000)  # the server goes on to its next token and finds the client gone
            log.wait_for("finish_reason disconnect")
            assert shown() == answer[:12], f"after Stop the page shows {shown()!r}"
            model.permits = None
            browser.find_element(By.ID, "regenerate").click()
            wait.until(lambda b: shown() == answer and b.find_element(By.ID, "regenerate").is_displayed())
            assert XSS in browser.find_element(By.ID, "chat").text, "the model's markup is not shown as text"
            assert not browser.find_elements(By.CSS_SELECTOR, "#chat img"), "model text became an <img>"
            try:
                browser.switch_to.alert
                raise AssertionError("the model's onerror ran")
            except NoAlertPresentException:
                pass
            browser.find_element(By.CSS_SELECTOR, ".msg.user .edit").click()
            assert box.get_attribute("value") == "first line\nsecond line", "Edit did not load the message"
            box.clear()
            box.send_keys("edited", Keys.ENTER)
            wait.until(lambda b: b.find_element(By.ID, "regenerate").is_displayed())
            assert texts("user") == ["edited"] and shown() == answer, f"Edit and resend: {texts('user')}"
    finally:
        browser.quit()
