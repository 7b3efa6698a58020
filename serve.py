"""
Watch the model write: a web page on this machine that streams a story and shows, for every token, the five the
model thought most likely there, with their probabilities, and the one that was drawn (playground.html).

    python serve.py                                   # out/ckpt.pt at http://127.0.0.1:8000
    python serve.py --out_dir=out_cpu --checkpoint=best.pt --port=8080

The page is GET /. Stories come from /generate, which takes sample.py's settings as a JSON object (POST) or a query
string (GET, values in JSON: top_k=null, stop_at_eot=false): prompt, max_new_tokens, temperature, top_k, top_p,
stop_at_eot, and seed (none: a random one). It answers one line of JSON for each new token,
    {"text": " dog", "token": 3290, "p": 0.21, "top": [[1342, " cat", 0.34], [3290, " dog", 0.21], ...]}
and a last line {"done": "length" or "eot", "tokens": 120, "seconds": 2.1, "seed": 7}. The story is sample.py's, from
the same generator: `python sample.py --start=PROMPT --seed=7 --num_samples=1` (and the same settings) writes it again.

It is a server on a user's machine, and behaves as one: it listens on loopback unless --host says otherwise; it
answers only requests for its own address (so a web page elsewhere cannot reach it through DNS rebinding); bad input
gets a 4xx and one line of JSON; at most --max_streams stories are written at once and --max_waiting more requests
wait for a turn (others get 429); a client that hangs up stops its story.
"""
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch

import checkpoint
from config import SAMPLING, SCRIPTS, UserError, get_config, rules
from model import GPT
from runtime import autocast_context, pick_device
from sample import prompt_ids, story_tokens
from tokenizer import get_tokenizer

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground.html")
# What a request may set, and its default when it does not: sample.py's, and a random seed
SETTINGS = dict(prompt="", seed=None, **{k: SAMPLING[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                                   "stop_at_eot")})
MAX_NEW_TOKENS = 2048  # the longest story a request may ask for
MAX_BODY = 1 << 16  # bytes of JSON a request may send
# The page may run its own script and styles, talk to this server and nothing else, and not be framed by another
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; " \
      "frame-ancestors 'none'"


class Refusal(Exception):
    """A request the server will not answer: an HTTP status, and one line saying why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def request_settings(given, max_new_tokens=MAX_NEW_TOKENS):
    """A story's settings: SETTINGS' defaults, with what the request gives, each checked as sample.py checks its
    flags (config.py's rules), and no longer than the server allows."""
    settings = dict(SETTINGS)
    for key, value in given.items():
        if key not in SETTINGS:
            raise Refusal(400, f"unknown setting {key!r}: the settings are {', '.join(SETTINGS)}")
        like = 0 if key == "seed" else SETTINGS[key]  # a value of the type this setting takes
        if isinstance(like, float) and type(value) is int:
            value = float(value)
        if not (type(value) is type(like) or value is None and key in ("top_k", "seed")):
            raise Refusal(400, f"{key}={value!r}: expected {type(like).__name__}, like {like!r}")
        valid, what = rules["start" if key == "prompt" else key]
        if value is not None and not valid(value):
            raise Refusal(400, f"{key}={value!r}: must be {what}")
        settings[key] = value
    if settings["max_new_tokens"] > max_new_tokens:
        raise Refusal(400, f"max_new_tokens={settings['max_new_tokens']}: this server writes at most {max_new_tokens}")
    try:
        settings["prompt"].encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell half a surrogate pair, which no UTF-8 text holds
        raise Refusal(400, "the prompt is not UTF-8 text")
    return settings


def from_json(body):
    """The settings a POST sends: a JSON object, in UTF-8."""
    try:
        given = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refusal(400, "the request body is not UTF-8 text")
    except (ValueError, RecursionError) as e:
        raise Refusal(400, f"malformed JSON: {str(e).splitlines()[0][:200]}")
    if not isinstance(given, dict):
        raise Refusal(400, "expected a JSON object of settings, like {\"prompt\": \"Once upon a time\"}")
    return given


def from_query(query):
    """The settings a GET sends: prompt=TEXT&temperature=0.5, each once; every value but the prompt is JSON."""
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), errors="strict",
                          max_num_fields=len(SETTINGS))
    except ValueError as e:  # a field without "=", too many fields, or %-escapes that are not UTF-8
        raise Refusal(400, f"malformed query string: {e}")
    given = {}
    for key, values in fields.items():
        if len(values) > 1:
            raise Refusal(400, f"malformed query string: {key} is given {len(values)} times")
        try:
            given[key] = values[0] if key == "prompt" else json.loads(values[0])
        except ValueError:
            raise Refusal(400, f"{key}={values[0]!r}: not a JSON value (a number, null, true or false)")
    return given


class Playground(ThreadingHTTPServer):
    """The model and what the server allows; a thread answers each request (Handler)."""
    daemon_threads = True  # Ctrl-C does not wait for the stories being written

    def __init__(self, address, model, enc, device, dtype="auto", max_streams=2, max_waiting=16,
                 max_new_tokens=MAX_NEW_TOKENS, log=None):
        super().__init__(address, Handler)
        self.model, self.enc, self.device, self.dtype, self.max_new_tokens = model, enc, device, dtype, max_new_tokens
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        with open(PAGE, "rb") as f:
            self.page = f.read()
        # a request holds `admitted` from its first byte of story to its last, or while it waits for `streams`
        self.streams = threading.BoundedSemaphore(max_streams)
        self.admitted = threading.BoundedSemaphore(max_streams + max_waiting)
        self.limits = max_streams, max_waiting
        self.host, self.port = address[0], self.server_address[1]

    @property
    def on_loopback(self):
        return self.host == "localhost" or is_address(self.host) and ipaddress.ip_address(self.host).is_loopback

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def serves_host(self, header):
        """Whether a request's Host header names this server. A name that only resolves here, such as a page's own
        domain pointed at 127.0.0.1 (DNS rebinding), is refused; on every interface, so is any but this machine's."""
        name, _, port = (header or "").rpartition(":")
        if port != str(self.port):
            return False
        local = {"localhost", "127.0.0.1", "[::1]"}
        if self.host in local:  # the names of this machine's loopback
            return name in local
        if self.host in ("0.0.0.0", ""):
            return name in local or name in (socket.gethostname(), socket.getfqdn()) or is_address(name)
        return name == self.host


def is_address(name):
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    timeout = 60  # seconds a client may send nothing, or read nothing, before it is dropped

    def do_GET(self):
        self.answer(from_query)

    def do_POST(self):
        self.answer(lambda query: from_json(self.read_body()))

    def answer(self, read_settings):
        try:
            host = self.headers.get("Host")
            if not self.server.serves_host(host):
                raise Refusal(403, f"this server answers requests for {self.server.url} only, not for Host {host!r}")
            origin = self.headers.get("Origin")  # a browser's: the page that sends the request
            if origin is not None and origin != f"http://{host}":
                raise Refusal(403, f"requests from pages of {origin} are refused")
            path = urlsplit(self.path)
            if path.path == "/" and self.command == "GET":
                self.send_page()
            elif path.path == "/generate":
                self.write_story(request_settings(read_settings(path.query), self.server.max_new_tokens))
            elif path.path == "/":
                raise Refusal(405, "the page is GET /")
            else:
                raise Refusal(404, f"nothing at {path.path[:100]!r}: this server has the page / and /generate")
        except Refusal as e:
            self.refuse(e.status, e.message)

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Refusal(411, "a POST needs a Content-Length")
        if int(length) > MAX_BODY:
            raise Refusal(413, f"a request of {int(length):,} bytes: at most {MAX_BODY:,}")
        try:
            return self.rfile.read(int(length))
        except TimeoutError:
            raise Refusal(408, f"the request's body did not come within {self.timeout} s")

    def send_page(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.server.page)))
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(self.server.page)

    def write_story(self, settings):
        server = self.server
        try:
            ids = prompt_ids(server.enc, settings["prompt"], server.model.config.block_size)
        except UserError as e:
            raise Refusal(400, str(e))
        if not server.admitted.acquire(blocking=False):
            raise Refusal(429, "{} stories are being written and {} requests wait: try again in a while".format(
                *server.limits))
        try:
            with server.streams:  # wait for a turn
                self.stream(settings, ids)
        finally:
            server.admitted.release()

    def stream(self, settings, ids):
        """The story, one JSON line a token, as story_tokens writes it; it stops when the client hangs up."""
        server, enc = self.server, self.server.enc
        # a random seed small enough to type, and for the page's JavaScript to hold exactly (2^53 at most)
        seed = secrets.randbelow(2 ** 31) if settings["seed"] is None else settings["seed"]
        generator = torch.Generator(server.device).manual_seed(seed)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        story = story_tokens(server.model, enc, ids, settings, generator)
        ctx, _ = autocast_context(server.device, server.dtype)  # a context of its own: autocast is per thread
        tokens, ended, start = 0, "length", time.perf_counter()
        try:
            with ctx:
                for text, token, p, top in story:
                    top = [[t, enc.decode_single_token_bytes(t).decode("utf-8", "replace"), q] for t, q in top]
                    self.send_line(dict(text=text, token=token, p=p, top=top))
                    tokens += token is not None
                    if token == enc.eot_token and settings["stop_at_eot"]:
                        ended = "eot"
            seconds = time.perf_counter() - start
            self.send_line(dict(done=ended, tokens=tokens, seconds=round(seconds, 3), seed=seed))
        except (ConnectionError, TimeoutError):  # the client hung up, or stopped reading
            ended = "the client went away"
        finally:
            story.close()
        seconds = time.perf_counter() - start
        server.log(f"{self.address_string()} {self.command} /generate: {tokens} tokens in {seconds:.2f} s "
                   f"({tokens / max(seconds, 1e-9):.0f} tokens/s), {ended}")

    def send_line(self, obj):
        self.wfile.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))

    def refuse(self, status, message):
        body = (json.dumps({"error": message}) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a malformed request line, headers too long, an unknown method) in one line of
        # JSON too, after a status line even where the request line was too garbled to say its HTTP version; an
        # unknown method is the client's mistake, so 405 rather than 501
        self.request_version = "HTTP/1.0" if self.request_version == "HTTP/0.9" else self.request_version
        self.refuse(405 if code == 501 else code, message or "bad request")

    def log_message(self, format, *args):
        self.server.log(f"{self.address_string()} {format % args}")


def start(cfg):
    """The server of cfg's checkpoint, listening; its first line says where."""
    device = pick_device(cfg["device"])
    path = checkpoint.find(cfg)
    ckpt = checkpoint.load(path)
    model, enc = GPT.from_checkpoint(ckpt).to(device).eval(), get_tokenizer(ckpt["vocab"])
    try:
        server = Playground((cfg["host"], cfg["port"]), model, enc, device, cfg["dtype"], cfg["max_streams"],
                            cfg["max_waiting"])
    except OSError as e:
        raise UserError(f"cannot listen on {cfg['host']}:{cfg['port']}: {e.strerror or e}")
    if not server.on_loopback:
        print(f"warning: listening on {cfg['host']}, not on this machine alone: whoever can reach it can use the "
              f"model, and this machine's CPU or GPU", file=sys.stderr, flush=True)
    print(f"serving {checkpoint.describe(ckpt, path)} at {server.url}", flush=True)
    return server


def main(argv):
    cfg, _ = get_config(argv, SCRIPTS["serve.py"], "serve.py")
    try:
        with start(cfg) as server:
            server.serve_forever()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("stopped serving (Ctrl-C)")


if __name__ == "__main__":
    main(sys.argv[1:])
