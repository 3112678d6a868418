"""
The web chat page and an OpenAI-compatible API, on the standard library's http.server.

Layer 5 entry point: loads a model with sampler.load_model, renders chats with
chat.render_for_completion, writes answers with sampler.generate, stream_text and stop_at, and
serves ui.html from memory. Routes: GET / (the page), GET /health, GET /v1/models,
POST /v1/chat/completions and POST /v1/completions, in the shapes the `openai` client reads.

Design:
- a fixed route table and one page held in memory: no file is served, so no path tricks. HTTP/1.0:
  a response ends when the connection closes, so a stream needs no chunked framing
- every field is checked at this edge: a bad one gets a 4xx in OpenAI's error shape saying what to
  send instead. One broad except per request logs the traceback and answers 500
- one generation at a time behind a lock, MAX_WAITING requests wait, the next get 503 with
  Retry-After. Before each token a peek at the socket tells whether the client left (or pressed
  Stop); then the generation ends there, and the lock is released in a `finally`
- on loopback (the default) a Host header naming another host gets 403: a DNS-rebinding page
  resolves its own name to 127.0.0.1 to read the answers. No CORS headers at all
- a timeout on every socket read and write: a silent client loses its connection, and never holds
  the model, which is taken only once the whole body is read
- the port opens, then the model loads on a thread that ends (/health: 503 until then): the main
  thread never computes: a torch op there starts a second OpenMP pool (decoding: 190 tok/s, not 558)
- an omitted field takes tinychat's chat default (SampleConfig): frequency_penalty 0.5, not 0

Left out on purpose:
- keep-alive, chunked bodies (411), TLS, API keys (any key is accepted; 127.0.0.1 unless --host
  says otherwise), a deadline on a whole request; tools, logprobs, n > 1, `: ping` lines
- methods HTTP does not define get http.server's 501, the status HTTP prescribes for them

References:
- OpenAI chat completions: https://platform.openai.com/docs/api-reference/chat
- Server-sent events: https://html.spec.whatwg.org/multipage/server-sent-events.html
- DNS rebinding: https://en.wikipedia.org/wiki/DNS_rebinding

Examples:
    python serve.py
    curl -N localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'
"""
import argparse
import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
import traceback
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chat import render_for_completion
from cli import keep_freed_memory, pick_device, run_main, set_server_threads
from data import default_run_dir
from sampler import (MAX_NEW_TOKENS, MAX_TEMPERATURE, MAX_TOP_K, PHASE_DIRS, SampleConfig,
                     decode_precision, generate, load_model, stop_at, stream_text)

# Limits on a request; the message and character caps are nanochat's web server's.
MAX_BODY_BYTES = 1_000_000  # 413 above; MAX_TOTAL_CHARS of text fit in it many times over
MAX_MESSAGES = 500          # messages in one chat request
MAX_MESSAGE_CHARS = 8_000   # characters in one message, or in one completion prompt
MAX_TOTAL_CHARS = 32_000    # characters in all the messages of a request
MAX_STOP_STRINGS = 4        # OpenAI's limit on `stop`
MAX_STOP_CHARS = 64         # characters in one stop string
MAX_SEED = 2**63 - 1        # seeds 0..2**63-1: a range every torch.Generator takes
MAX_WAITING = 2             # requests that may wait while one generates; the next get 503
RETRY_AFTER_S = 1           # a 503's Retry-After; the openai client waits that long and retries
SOCKET_TIMEOUT_S = 10       # bound on any one read or write of a connection; then it is dropped

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")
ROUTES = {"/": "GET", "/health": "GET", "/v1/models": "GET",  # path -> the method it takes
          "/v1/chat/completions": "POST", "/v1/completions": "POST"}
# The page's own inline script and style, talking to this server only; no framing by other sites.
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
# JSON can spell half of a UTF-16 surrogate pair ("\ud800"); UTF-8 cannot encode it.
SURROGATE = re.compile("[\ud800-\udfff]")


class ApiError(Exception):
    """A refused request: its HTTP status, a message saying what to fix, an error code, headers."""

    def __init__(self, status: int, message: str, code=None, headers=()):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


class ClientGone(Exception):
    """The client closed its connection, stopped reading, or stopped sending its body."""


def _client_gone(sock) -> bool:
    """True when the client closed its end: a non-blocking peek finds end-of-stream, or fails."""
    # NOTE: a peek leaves pipelined bytes unread; select() would fail on descriptors over 1023
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:  # nothing to read: the client is there, waiting for the answer
        return False
    except OSError:  # reset by the client
        return True
    finally:
        sock.settimeout(timeout)


# --- checking a request ---

def _typed(body: dict, name: str, default, kinds=(int,)):
    """body[name] checked to be one of `kinds` (by type(): isinstance takes true for an int)."""
    value = body.get(name)
    if value is not None and type(value) not in kinds:
        raise ApiError(400, f"'{name}' must be {'a number' if float in kinds else 'an integer'}, "
                            f"got {repr(value)[:60]}")
    return default if value is None else value  # null: the default, as OpenAI does


def _text(content, where: str) -> str:
    """A content (a string, or a list of {"type": "text", "text": ...} parts) as one string."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "\n".join(p["text"] for p in content)
    if (not isinstance(content, str) or len(content) > MAX_MESSAGE_CHARS
            or SURROGATE.search(content)):
        raise ApiError(400, f"{where} must be a string or a list of {{'type': 'text', 'text': "
                            f"...}} parts: valid Unicode, {MAX_MESSAGE_CHARS:,} characters at most")
    return content


def chat_messages(body: dict) -> list:
    """The messages as [{"role", "content": str}]; bpe's chat template checks the roles' order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise ApiError(400, f"'messages' must be a list of 1 to {MAX_MESSAGES} {{role, content}}")
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        role = {"developer": "system"}.get(role, role)  # OpenAI's newer name for "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {repr(role)[:30]}: not user/assistant/system")
        out.append({"role": role, "content": _text(msg.get("content"), f"messages[{i}].content")})
    if out[-1]["role"] != "user" or sum(len(m["content"]) for m in out) > MAX_TOTAL_CHARS:
        raise ApiError(400, f"the last message must be the user's (the model answers it), and all "
                            f"of them {MAX_TOTAL_CHARS:,} characters at most")
    return out


def sample_params(body: dict) -> dict:
    """A request's sampling settings (generate()'s keywords) and streaming ones, checked."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "'n' must be 1: this server writes one answer per request")
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if type(stream) is not bool or not isinstance(options, dict):
        raise ApiError(400, "'stream' must be true or false, and 'stream_options' an object")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and not SURROGATE.search(s)
            for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} "
                            f"strings of 1 to {MAX_STOP_CHARS} characters")
    seed = _typed(body, "seed", secrets.randbits(31))
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"'seed' must be from 0 to {MAX_SEED}, got {repr(seed)[:60]}")
    # max_completion_tokens is OpenAI's newer name for max_tokens. Either is a cap: clamped here
    # to MAX_NEW_TOKENS, and by generate() to what the context leaves (finish_reason "length").
    name = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    max_tokens = min(_typed(body, name, MAX_NEW_TOKENS), MAX_NEW_TOKENS)
    number = (int, float)
    penalties = {name: _typed(body, name, getattr(SampleConfig, name), number)
                 for name in ("frequency_penalty", "presence_penalty")}  # OpenAI's, -2 to 2
    try:  # SampleConfig checks the ranges, with tinychat.py's limits; top_k 0 means no limit
        temperature = _typed(body, "temperature", SampleConfig.temperature, number)
        sampling = SampleConfig(temperature=temperature,
                                top_k=_typed(body, "top_k", SampleConfig.top_k) or None,
                                top_p=_typed(body, "top_p", SampleConfig.top_p, number),
                                max_tokens=max_tokens, seed=seed, **penalties)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return {"stream": stream, "include_usage": options.get("include_usage") is True, "stop": stop,
            "sampling": asdict(sampling)}


# --- the request handler ---

class Handler(BaseHTTPRequestHandler):
    """One connection, one request: check the Host, route, answer or stream; errors: 4xx, 500."""

    timeout = SOCKET_TIMEOUT_S  # StreamRequestHandler puts it on the socket: every read and write
    disable_nagle_algorithm = True  # TCP_NODELAY: a token leaves at once, not after an ACK (Nagle)
    server_version = "tinychat"
    default_request_version = "HTTP/1.0"  # so that a garbled request line's 400 has a status line
    has_started = False         # a streamed 200 went out: no other status can follow

    def _handle(self):
        try:
            try:
                self._route()
            except ApiError as e:
                self._send_error(e)
        except ClientGone:
            self.log_message("%s: the client left", self.requestline)
        except Exception:  # the one broad except (STYLE.md 8): a bug costs this request only
            self.server.log(traceback.format_exc().rstrip())
            if not self.has_started:  # mid-stream the 200 is sent: the stream just ends, no [DONE]
                with contextlib.suppress(ClientGone):
                    self._send_error(ApiError(500, "internal error; the server log has details"))

    # the methods HTTP defines go to the router, so a wrong one gets 405, not http.server's 501
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _route(self):
        """403 for a foreign Host, 404 or 405 for a wrong path or method, else the answer."""
        server, hosts = self.server, self.headers.get_all("Host") or [""]
        if server.allowed_hosts is not None and (len(hosts) != 1
                                                 or hosts[0].lower() not in server.allowed_hosts):
            raise ApiError(403, f"Host {repr(hosts[0])[:60]} is not a name of this server; open "
                                f"{server.url} (a foreign Host is how DNS rebinding gets in)")
        path = self.path.split("?")[0]
        if path not in ROUTES:
            raise ApiError(404, f"no route {repr(path)[:60]}; this server has {', '.join(ROUTES)}")
        if self.command != ROUTES[path]:
            raise ApiError(405, f"{path} takes {ROUTES[path]}, not {repr(self.command)[:60]}",
                           headers=[("Allow", ROUTES[path])])
        if path == "/":
            headers = [("Content-Security-Policy", PAGE_CSP), ("Cache-Control", "no-store")]
            return self._respond(200, "text/html; charset=utf-8", server.page, headers)
        if server.model is None:
            raise ApiError(503, "the model is still loading; retry in a few seconds",
                           "model_loading", [("Retry-After", str(RETRY_AFTER_S))])
        if path in ("/health", "/v1/models"):
            card = {"object": "list", "data": [server.model_card()]}
            card = {"status": "ok"} if path == "/health" else card
            return self._respond(200, "application/json", json.dumps(card).encode())
        body = self._read_json()
        params = sample_params(body)
        if path == "/v1/chat/completions":
            try:
                ids = render_for_completion(server.tok, {"messages": chat_messages(body)})
            except ValueError as e:  # the template's checks: the order of the roles
                raise ApiError(400, str(e)) from None
            return self._answer(ids, params, is_chat=True)
        prompt = _text(body.get("prompt"), "'prompt'")  # no batches: one prompt a request
        self._answer([server.tok.bos_id] + server.tok.encode(prompt), params, is_chat=False)

    # --- reading and writing ---

    def _read_json(self) -> dict:
        """The body as a JSON object; 400, 411, 413 or 415 if not; ClientGone if it stops coming."""
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "send the body as JSON, with 'Content-Type: application/json'")
        lengths = self.headers.get_all("Content-Length") or ["(none)"]
        if (len(set(lengths)) > 1 or not lengths[0].strip().isdecimal()
                or self.headers.get("Transfer-Encoding")):
            raise ApiError(411, f"send one Content-Length with the body's size in bytes, not "
                                f"{repr(lengths)[:60]} (chunked bodies are not read)")
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is {length:,} bytes; the limit is {MAX_BODY_BYTES:,}")
        try:
            body = self.rfile.read(length)  # each socket read waits SOCKET_TIMEOUT_S at most
        except OSError as e:  # a read timed out (the client stopped sending), or a reset
            raise ClientGone() from e
        if len(body) < length:  # the client closed mid-body
            raise ClientGone()
        try:
            value = json.loads(body)
        # bad syntax or UTF-8, numbers of over 4300 digits, [[[[... nested past the stack
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(value, dict):
            raise ApiError(400, f"the body must be a JSON object, not a {type(value).__name__}")
        return value

    def _respond(self, status: int, content_type: str, body: bytes = b"", headers=()):
        """Send the status, headers and body (a stream's events follow); ClientGone if it left."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if content_type != "text/event-stream":  # a stream ends when the connection closes
                self.send_header("Content-Length", str(len(body)))
            for key, value in [("X-Content-Type-Options", "nosniff"), *headers]:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError as e:  # a broken pipe, a reset, or a write that timed out
            raise ClientGone() from e

    def _event(self, data):
        """One server-sent event, `data: <json>` and a blank line, sent now: wfile is unbuffered."""
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        try:
            self.wfile.write(f"data: {text}\n\n".encode())
        except OSError as e:
            raise ClientGone() from e

    def _send_error(self, e: ApiError):
        kind = "invalid_request_error" if e.status < 500 else "api_error"
        kind = "not_found_error" if e.status == 404 else kind
        error = {"message": str(e), "type": kind, "param": None, "code": e.code}
        body = json.dumps({"error": error}).encode()
        self._respond(e.status, "application/json", body, e.headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, huge headers, unknown method), as JSON."""
        with contextlib.suppress(ClientGone):  # its message (a client's bytes) stays out of headers
            self._send_error(ApiError(code, message or self.responses[code][0]))

    def log_message(self, format, *args):
        # a client's control characters are escaped in the log (CPython #100001)
        message = (format % args).encode("unicode_escape").decode()
        self.server.log(f"{self.address_string()} {message}")

    # --- generating ---

    @contextlib.contextmanager
    def _model_turn(self):
        """Hold the model for one generation: wait in line (at most MAX_WAITING wait), else 503."""
        server = self.server
        if not server.slots.acquire(blocking=False):
            raise ApiError(503, f"the server is busy: one answer is being written, {MAX_WAITING} "
                                f"wait; retry in {RETRY_AFTER_S} s", "server_busy",
                           [("Retry-After", str(RETRY_AFTER_S))])
        try:
            # a client that leaves while waiting costs one prefill: _tokens checks before token 1
            with server.lock:
                yield
        finally:
            server.slots.release()

    def _tokens(self, ids: list, params: dict, record: dict):
        """generate()'s tokens after the prompt `ids`, ending if the client leaves; fills record."""
        model, tok, usage = self.server.model, self.server.tok, record["usage"]
        stops = (tok.special_id("<|assistant_end|>"), tok.bos_id)
        precision = self.server.precision
        for step, _ in generate(model, tok, ids, **params["sampling"], precision=precision):
            # NOTE: asked before every token. Writing to a closed socket fails only at the second
            # write, and a whole (not streamed) answer writes nothing until it is done
            is_gone = _client_gone(self.connection)
            if is_gone or step[0] in stops:
                record["finish_reason"] = "disconnect" if is_gone else "stop"
                return
            usage["completion_tokens"] += 1
            usage["total_tokens"] += 1
            record["times"].append(time.perf_counter())  # when each token came
            yield step[0]
        record["finish_reason"] = "length"  # max_tokens, or the context is full

    def _answer(self, ids: list, params: dict, is_chat: bool):
        """Generate the answer to the prompt `ids`; send it whole, or as server-sent events."""
        server, seq_len = self.server, self.server.model.config.seq_len
        if len(ids) >= seq_len:
            raise ApiError(400, f"the prompt is {len(ids):,} tokens but the model's context holds "
                                f"{seq_len:,} (prompt and answer); shorten the conversation or "
                                f"start a new one", "context_length_exceeded")
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        record = {"usage": usage, "finish_reason": None, "times": []}  # None: still generating
        head = {"id": ("chatcmpl-" if is_chat else "cmpl-") + secrets.token_hex(12),
                "object": "chat.completion" if is_chat else "text_completion",
                "created": int(time.time()), "model": server.model_id}
        with self._model_turn():
            try:
                pieces = stop_at(stream_text(server.tok, self._tokens(ids, params, record)),
                                 params["stop"])
                if params["stream"]:
                    return self._stream(head, pieces, record, params["include_usage"], is_chat)
                text = "".join(pieces)
                record["finish_reason"] = record["finish_reason"] or "stop"  # None: a stop string
            finally:  # the log records how each generation ended (the tests read it)
                record["finish_reason"] = record["finish_reason"] or "disconnect"
                n, t = usage["completion_tokens"], record["times"]  # tok/s after the first token
                self.log_message("%d tokens (%.1f tok/s), finish_reason %s", n,
                                 (n - 1) / (t[-1] - t[0]) if n > 2 else 0, record["finish_reason"])
        if record["finish_reason"] == "disconnect":
            raise ClientGone()
        choice = {"index": 0, "finish_reason": record["finish_reason"], "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if is_chat else
                      {"text": text})
        answer = {**head, "choices": [choice], "usage": usage}
        self._respond(200, "application/json", json.dumps(answer, ensure_ascii=False).encode())

    def _stream(self, head: dict, pieces, record: dict, include_usage: bool, is_chat: bool):
        """Send a chunk per piece of text, then the finish reason, the usage if asked, [DONE]."""
        self._respond(200, "text/event-stream", headers=[("Cache-Control", "no-cache")])
        self.has_started = True
        head = {**head, "object": "chat.completion.chunk" if is_chat else "text_completion"}

        def chunk(content, finish_reason=None):
            choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
            choice.update({"delta": content} if is_chat else {"text": content})
            self._event({**head, "choices": [choice]})

        if is_chat:
            chunk({"role": "assistant", "content": ""})  # before the first token: it has begun
        for text in pieces:
            chunk({"content": text} if is_chat else text)
        if record["finish_reason"] == "disconnect":
            raise ClientGone()
        record["finish_reason"] = record["finish_reason"] or "stop"  # None: a stop string
        chunk({} if is_chat else "", record["finish_reason"])
        if include_usage:  # a chunk with no choices, only when asked: naive clients read choices[0]
            self._event({**head, "choices": [], "usage": record["usage"]})
        self._event("[DONE]")


# --- the server ---

class Server(ThreadingHTTPServer):
    """The listening socket and what all requests share: the model, its lock, the page."""

    daemon_threads = True  # a stuck connection never keeps the process alive at exit

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, log=print):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        port = self.server_address[1]  # the one the OS picked, when asked for port 0
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        # On loopback, the Host headers a browser may send: a loopback name with the port (bare
        # on port 80). None: open to the network on purpose, any Host.
        names = ["127.0.0.1", "localhost", "[::1]"]
        allowed = {f"{name}:{port}" for name in names} | set(names * (port == 80))
        self.allowed_hosts = allowed if host in LOOPBACK_HOSTS else None
        with open(UI_PATH, "rb") as f:
            self.page = f.read()
        self.log = log
        self.model = None             # None while loading: the API answers 503
        self.lock = threading.Lock()  # one generation at a time
        self.slots = threading.BoundedSemaphore(1 + MAX_WAITING)  # the one generating + waiting
        self.load_error = None

    def set_model(self, model, tok, phase: str, precision: str):
        """Answer with this model from the next request on."""
        self.tok, self.phase, self.precision = tok, phase, precision
        self.model_id, self.created = f"tinychat-{phase}", int(time.time())
        self.model = model  # last: a request that sees the model sees the rest

    def load(self, run_dir: str, phase, device, precision: str):
        """Thread body: load the model and answer with it; on failure keep the error and stop."""
        try:
            model, tok, phase = load_model(run_dir, phase, device)
        except (FileNotFoundError, ValueError) as e:
            self.load_error = e
            self.shutdown()
            return
        self.set_model(model, tok, phase, precision)
        card = self.model_card()
        note = " (a base model: it continues text, it was not taught to chat)" * (phase == "base")
        self.log(f"serve: the {phase} model{note}, {card['parameters']:,} parameters, context "
                 f"{card['context']}, {precision}, answers at {self.url}")

    def model_card(self) -> dict:
        """The /v1/models entry: OpenAI's fields, and what the page shows (phase, size, limits)."""
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "tinychat", "phase": self.phase, "precision": self.precision,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "context": self.model.config.seq_len, "defaults": asdict(SampleConfig()),
                "limits": {"temperature": MAX_TEMPERATURE, "top_k": MAX_TOP_K,
                           "max_tokens": MAX_NEW_TOKENS}}


def main(argv=None):
    """Parse the flags, open the port, load the model in the background, serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help=f"run directory (default: {default_run_dir()})")
    parser.add_argument("--phase", choices=PHASE_DIRS, help="default: the newest of sft, mid, base")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; not loopback: open to the network")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    parser.add_argument("--device", help="cpu, cuda or mps (default: cuda if present, else cpu)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port; use 0 to 65535")
    run_dir = args.run_dir or default_run_dir()
    device = pick_device(args.device)
    try:
        server = Server(args.host, args.port, log=lambda line: print(line, flush=True))
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise OSError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from e
    precision = decode_precision(device)  # the one precision choice; every generate() gets it
    machine = f"{set_server_threads(device)} | {keep_freed_memory(device)}"
    if server.allowed_hosts is None:
        print(f"serve: WARNING: {args.host} is open to the network, with no API key and no TLS")
    print(f"serve: loading the model from {run_dir} ... ({machine})", flush=True)
    threading.Thread(target=server.load, args=(run_dir, args.phase, device, precision),
                     daemon=True).start()
    try:
        server.serve_forever()
    finally:  # Ctrl-C, or the model failed to load: the port closes either way
        server.server_close()
    if server.load_error:
        raise server.load_error  # no model: run_main prints the command that trains one


if __name__ == "__main__":
    run_main(main, "serve")
