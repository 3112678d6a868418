"""
Tests of serve.py: answers in OpenAI's shapes (and through the official `openai` client), every
malformed request a 4xx, disconnects and overload, the Host check, `python serve.py` itself, and
a fuzz run. The page's test, in a headless browser, is tests/test_ui.py.

Each test runs a serve.Server in a thread on a free port (fixtures.running) with byte_gpt() or
TypistModel, a fake GPT that types a fixed answer and can be held between tokens by the test.
The openai client is a test-only extra that .ci/run installs: without it its test skips, except
under CI (the CI environment variable set), where it fails.

fuzz_requests() scales up: python -c "import tests.test_serve as t; print(t.fuzz_report(10_000))"
"""
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import serve
from bpe import Tokenizer
from gpt import save_checkpoint
from tests.fixtures import ROOT, TypistModel, byte_gpt, missing_extra, quiet, running


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


# --- answers ---


def test_serve_chat_and_completions_in_openai_shapes():
    """Whole and streamed answers carry OpenAI's fields; stop strings, max_tokens and usage work."""
    with running(TypistModel("Hello there!")) as (server, log):
        status, _, answer = call(server, "POST", "/v1/chat/completions", hi())
        choice = answer["choices"][0]
        assert status == 200 and answer["object"] == "chat.completion", f"got {status} {answer}"
        assert choice["message"] == {"role": "assistant", "content": "Hello there!"}, choice
        assert choice["finish_reason"] == "stop", answer
        assert answer["usage"]["completion_tokens"] == 12, answer
        cases = [(hi(stop=["there"]), "Hello ", "stop"), (hi(max_tokens=4), "Hell", "length"),
                 (hi(stop="lo t"), "Hel", "stop")]
        for body, text, finish in cases:
            choice = call(server, "POST", "/v1/chat/completions", body)[2]["choices"][0]
            got = (choice["message"]["content"], choice["finish_reason"])
            assert got == (text, finish), f"{body} gave {got}: stop strings or max_tokens broken"
        port = server.server_address[1]
        raw = raw_request(port, post(port, hi(stream=True, stream_options={"include_usage": True})))
        head, _, events = raw.partition(b"\r\n\r\n")
        assert b"Content-Type: text/event-stream" in head, f"a stream needs the SSE type: {head}"
        events = [e[6:] for e in events.decode().split("\n\n") if e]
        assert events[-1] == "[DONE]", f"the stream must end with [DONE]: {events[-3:]}"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant", chunks[0]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert text == "Hello there!", f"streamed {text!r}"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop", chunks[-2]
        usage = chunks[-1]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12, usage
        _, _, plain = call(server, "POST", "/v1/completions", {"prompt": "Once", "max_tokens": 5})
        assert plain["object"] == "text_completion", plain
        assert plain["choices"][0]["text"] == "Hello", plain
        # a system message leads the first user turn; content may be a list of text parts
        parts = {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
        status, _, answer = call(server, "POST", "/v1/chat/completions", parts)
        assert status == 200 and answer["usage"]["prompt_tokens"] > 15, f"system + parts: {answer}"
        log.wait_for("finish_reason length")


def test_serve_openai_client():
    """The official openai client works unchanged: models, chat (whole, streamed), completions,
    a penalty."""
    try:
        import openai
    except ImportError:
        missing_extra("the openai package (pip install openai)")
    with running(byte_gpt()) as (server, _):
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = openai.OpenAI(base_url=url, api_key="any", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tinychat-sft"], "models.list() is wrong"
        messages = [{"role": "user", "content": "Hello"}]
        whole = client.chat.completions.create(model="tinychat", messages=messages, temperature=0,
                                               max_tokens=8, seed=1)
        text = whole.choices[0].message.content
        assert whole.choices[0].finish_reason in ("stop", "length"), whole
        assert whole.usage.total_tokens > 8, whole
        stream = client.chat.completions.create(model="tinychat", messages=messages, temperature=0,
                                                max_tokens=8, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text, f"streamed {streamed!r} but the whole answer was {text!r}"
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, chunks[-1]
        completion = client.completions.create(model="tinychat", prompt="The cat", max_tokens=4)
        assert isinstance(completion.choices[0].text, str), completion
        # OpenAI's penalties reach the sampler: a negative one makes the first token repeat
        answers = [client.chat.completions.create(
            model="tinychat", messages=messages, temperature=0, max_tokens=24,
            frequency_penalty=penalty).choices[0].message.content for penalty in (0, -2)]
        assert answers[0] != answers[1], f"frequency_penalty -2 changed nothing: {answers}"
        try:
            client.chat.completions.create(model="tinychat", messages=messages, n=2)
            raise AssertionError("n=2 was accepted")
        except openai.BadRequestError as e:
            assert "'n' must be 1" in str(e), f"the 400 should say what to fix: {e}"


# --- refusals ---


def test_serve_malformed_requests_get_4xx_in_openai_shape():
    """Every kind of bad request gets its 4xx, a JSON error saying what to fix; the server lives."""
    with running(TypistModel("ok")) as (server, _):
        port = server.server_address[1]
        user = {"role": "user", "content": "hi"}
        image = {"role": "user", "content": [{"type": "image_url"}]}
        system = {"role": "system", "content": ""}

        def bad(body, path="/v1/chat/completions", extra_headers=""):
            return post(port, body, path, extra_headers)

        def bare(line):  # a request without a body
            return b"%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (line, port)

        nan = bad({**hi(), "top_p": "NaN"}).replace(b'"NaN"', b"NaN  ")  # the same length
        cases = [  # (what, request bytes, status)
            ("bad JSON", bad(b"{bad"), 400),
            ("a JSON list", bad(b"[]"), 400),
            ("JSON null", bad(b"null"), 400),
            ("bad UTF-8", bad(b'{"x": "\xff"}'), 400),
            ("NaN", nan, 400),
            ("1e999", bad(json.dumps(hi()).encode()[:-1] + b', "top_p": 1e999}'), 400),
            ("a 5000-digit number", bad(b'{"seed": 1' + b"0" * 5000 + b"}"), 400),
            ("[[[[...", bad(b"[" * 100_000), 400),
            ("messages a string", bad({"messages": "hi"}), 400),
            ("no messages", bad({"messages": []}), 400),
            ("501 messages", bad({"messages": [user] * 501}), 400),
            ("unknown role", bad({"messages": [{"role": "tool", "content": "hi"}]}), 400),
            ("content a number", bad({"messages": [{"role": "user", "content": 5}]}), 400),
            ("an image", bad({"messages": [image]}), 400),
            ("\\udc00", bad(b'{"messages": [{"role": "user", "content": "\\udc00"}]}'), 400),
            ("8001 characters", bad({"messages": [{"role": "user", "content": "x" * 8001}]}), 400),
            ("two user turns", bad({"messages": [user, user]}), 400),
            ("system second", bad({"messages": [user, system, user]}), 400),
            ("answer last", bad({"messages": [user, {"role": "assistant", "content": "a"}]}), 400),
            ("temperature text", bad(hi(temperature="hot")), 400),
            ("temperature 3", bad(hi(temperature=3)), 400),
            ("temperature true", bad(hi(temperature=True)), 400),
            ("top_k 500", bad(hi(top_k=500)), 400),
            ("top_p 2", bad(hi(top_p=2)), 400),
            ("frequency_penalty 3", bad(hi(frequency_penalty=3)), 400),
            ("presence_penalty text", bad(hi(presence_penalty="high")), 400),
            ("max_tokens 0", bad(hi(max_tokens=0)), 400),
            ("max_tokens 1.5", bad(hi(max_tokens=1.5)), 400),
            ("seed -1", bad(hi(seed=-1)), 400),
            ("seed 2**64", bad(hi(seed=2**64)), 400),
            ("n 2", bad(hi(n=2)), 400),
            ("stream 'yes'", bad(hi(stream="yes")), 400),
            ("5 stop strings", bad(hi(stop=["a"] * 5)), 400),
            ("empty stop", bad(hi(stop=[""])), 400),
            ("prompt a list", bad({"prompt": [1, 2]}, "/v1/completions"), 400),
            ("text/plain", bad(hi()).replace(b"application/json", b"text/plain"), 415),
            ("no Content-Length", bad(b"{}").replace(b"Content-Length: 2\r\n", b""), 411),
            ("chunked", bad(hi(), extra_headers="Transfer-Encoding: chunked\r\n"), 411),
            ("Content-Length -1", bad(b"{}").replace(b"Length: 2", b"Length: -1"), 411),
            ("2 MB body", bad(b"{}").replace(b"Length: 2", b"Length: 2000000"), 413),
            ("unknown path", bare(b"GET /admin"), 404),
            ("GET on a POST route", bare(b"GET /v1/completions"), 405),
            ("DELETE /health", bare(b"DELETE /health"), 405),
            ("a garbage request line", b"HELLO\r\n\r\n", 400),
            ("a 70 kB path", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        ]
        for what, request, want in cases:
            response = raw_request(port, request)
            head, _, body = response.partition(b"\r\n\r\n")
            assert head[9:12] == str(want).encode(), f"{what}: want {want}, got {response[:200]!r}"
            error = json.loads(body)["error"]
            assert error["message"] and error["type"], f"{what}: not OpenAI's error shape: {body!r}"
            assert b"Traceback" not in response, f"{what}: a traceback reached the client"
        long = {"messages": [{"role": "user", "content": "x" * 600}]}  # 600 + 4 tokens, context 512
        status, _, answer = call(server, "POST", "/v1/chat/completions", long)
        error = answer["error"]
        assert status == 400 and error["code"] == "context_length_exceeded", answer
        assert "604" in error["message"] and "512" in error["message"], f"no token counts: {error}"
        status, response, _ = call(server, "GET", "/v1/chat/completions")
        assert status == 405 and response.getheader("Allow") == "POST", "a 405 names the method"
        assert call(server, "POST", "/v1/chat/completions", hi())[0] == 200, "the server died"


def test_serve_body_that_stops_coming_is_dropped():
    """A client that sends half its body and closes, or goes silent, is dropped; all is well."""
    with running(TypistModel("ok")) as (server, log):
        port = server.server_address[1]
        cut = raw_request(port, post(port, hi())[:-5], is_cut=True)
        assert cut == b"", f"a cut body got an answer: {cut[:100]!r}"
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
    """A foreign Host gets 403 (DNS rebinding); localhost, 127.0.0.1, [::1] with the port do not."""
    with running(TypistModel("ok")) as (server, _):
        port = server.server_address[1]
        foreign = ["evil.com", f"evil.com:{port}", f"localhost:{port}.evil.com", "localhost",
                   f"127.0.0.2:{port}"]
        for host in foreign:
            status, _, answer = call(server, "GET", "/health", headers={"Host": host})
            assert status == 403 and "Host" in answer["error"]["message"], f"{host!r} got {status}"
        no_host = raw_request(port, b"GET /health HTTP/1.0\r\n\r\n")
        assert no_host.startswith(b"HTTP/1.0 403"), f"no Host must be refused: {no_host[:40]}"
        for host in [f"{name}:{port}" for name in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST")]:
            status, response, _ = call(server, "GET", "/health", headers={"Host": host})
            assert status == 200, f"Host {host!r} got {status}"
            cors = [h for h in response.getheaders() if h[0].lower().startswith("access-control")]
            assert not cors, f"the server must send no CORS headers: {cors}"
        assert call(server, "OPTIONS", "/v1/chat/completions")[0] == 405, "a preflight must fail"


# --- waiting, leaving, loading ---


def test_serve_disconnect_ends_generation():
    """A client that leaves (streamed or not) ends its generation at the next token; the next
    request is served."""
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
        content = answer["choices"][0]["message"]["content"]
        assert status == 200 and content == "a lon", f"the next request failed: {status} {answer}"


def test_serve_overload_gets_503_with_retry_after():
    """With one generating and MAX_WAITING waiting, the next request gets 503 and Retry-After; the
    others finish."""
    model = TypistModel("busy busy", is_gated=True)
    with running(model) as (server, _):
        results = []

        def ask():
            results.append(call(server, "POST", "/v1/chat/completions", hi()))

        first = threading.Thread(target=ask)
        first.start()
        assert model.calls.acquire(timeout=60), "the first request did not start generating"
        for _ in range(serve.MAX_WAITING):  # stand in for the requests that wait
            assert server.slots.acquire(timeout=60), "the wait slots are taken by something else"
        status, response, answer = call(server, "POST", "/v1/chat/completions", hi())
        for _ in range(serve.MAX_WAITING):
            server.slots.release()
        assert status == 503 and answer["error"]["code"] == "server_busy", f"got {status} {answer}"
        assert response.getheader("Retry-After") == str(serve.RETRY_AFTER_S), "no Retry-After"
        second = threading.Thread(target=ask)
        second.start()
        model.permits.release(100)
        first.join()
        second.join()
        answers = [r[2]["choices"][0]["message"]["content"] for r in results]
        assert answers == ["busy busy"] * 2, f"the waiting request was not served: {results}"


def test_serve_loading_and_main_without_a_model():
    """While loading, /health and the API answer 503 and the page is served; without a model,
    main exits with one line."""
    with running(None) as (server, _):
        status, response, answer = call(server, "GET", "/health")
        assert status == 503 and response.getheader("Retry-After"), f"loading, /health: {status}"
        assert call(server, "POST", "/v1/chat/completions", hi())[0] == 503, "no model, yet answers"
        status, response, page = call(server, "GET", "/")
        assert status == 200 and "<title>tinychat</title>" in page, "the page is not served"
        csp = response.getheader("Content-Security-Policy")
        assert "default-src 'none'" in csp, f"the page needs its CSP: {csp}"
    with tempfile.TemporaryDirectory() as run_dir, quiet():
        try:
            serve.main(["--run-dir", run_dir, "--port", "0"])
            raise AssertionError("serve.main served without a model")
        except FileNotFoundError as e:  # run_main prints it as one line
            assert "python train_all.py" in str(e), f"the error should name the command to run: {e}"


def test_serve_main_serves_a_run_dir_and_stops_on_ctrl_c():
    """`python serve.py --run-dir D --port 0` prints its URL, answers, exits cleanly on Ctrl-C."""
    with tempfile.TemporaryDirectory() as run_dir:
        save_checkpoint(os.path.join(run_dir, "mid"), byte_gpt(), {})
        Tokenizer([]).save(os.path.join(run_dir, "tokenizer.bin"))
        command = [sys.executable, "serve.py", "--run-dir", run_dir, "--port", "0"]
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            lines = [process.stdout.readline() for _ in range(2)]
            assert "mid model" in lines[1] and "answers at http://127.0.0.1:" in lines[1], lines
            port = int(lines[1].rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/v1/models")
            card = json.loads(conn.getresponse().read())["data"][0]
            assert card["id"] == "tinychat-mid", f"wrong model: {card}"
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=60)
        finally:
            process.kill()
        assert "serve: stopped" in out, f"Ctrl-C did not end it cleanly: {out}"
        assert "Traceback" not in out, f"Ctrl-C printed a traceback: {out}"


# --- fuzz ---


def fuzz_requests(port: int, num_requests: int, seed: int = 0) -> dict:
    """Send num_requests malformed or random requests to a server at 127.0.0.1:port, one connection
    each; returns {status: count}: 0 = closed without an answer, "traceback" = one leaked out."""
    rng = random.Random(seed)
    values = [None, True, -1, 0, 0.5, 3, 2**70, "x", "", [], {}, {"a": [1]}, "\ud800", "a" * 9000,
              [{"type": "image_url"}], [{"type": "text", "text": "hi"}]]
    fields = ["messages", "prompt", "temperature", "top_k", "top_p", "max_tokens", "seed", "n",
              "stream", "stop", "stream_options", "model", "frequency_penalty", "presence_penalty"]
    raw_bodies = [b"{", b"[]", b"null", b'{"top_p": NaN}', b'{"max_tokens": 1e999}', b"[" * 50_000,
                  b"\xff\xfe{}", b'{"seed": 1' + b"0" * 5000 + b"}", b""]
    routes = [("POST", "/v1/chat/completions")] * 6 + [
        ("POST", "/v1/completions"), ("GET", "/health"), ("GET", "/v1/chat/completions"),
        ("DELETE", "/"), ("FOO", "/"), ("GET", "//x/../y"), ("POST", "/" + "a" * 70_000),
        ("GET", "/v1/models?x=%00")]
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
        headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
                   "Content-Length": str(len(data))}
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
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
        head = "".join(line + "\r\n" for line in lines)
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
    """fuzz_requests against a server with byte_gpt(), then one valid request: the counts, and
    that request's status."""
    with running(byte_gpt()) as (server, _):
        counts = fuzz_requests(server.server_address[1], num_requests, seed)
        status = call(server, "POST", "/v1/chat/completions", hi(max_tokens=4))[0]
    return {"statuses": dict(sorted(counts.items(), key=str)), "valid_request_after": status}


def test_serve_fuzz_never_500():
    """Hundreds of malformed or random requests never get a 500 or a traceback; the server lives."""
    report = fuzz_report(300)
    statuses = report["statuses"]
    assert not {500, "traceback"} & set(statuses), f"the fuzz got a 500 or a traceback: {statuses}"
    expected = {0, 200, 400, 403, 404, 405, 411, 413, 414, 415, 501}
    assert set(statuses) <= expected, f"unexpected statuses: {statuses}"
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 50, f"the mix is off: {statuses}"
    assert report["valid_request_after"] == 200, f"the server is dead after the fuzz: {report}"
