"""A small OpenAI-compatible chat-completions server for a local transformers model.

    creditrl critic serve --model smollm2 --port 8000
    # then, in a run's config:  critic: {backend: openai, base_url: http://127.0.0.1:8000/v1, model: smollm2}

It serves `POST /v1/chat/completions` (fields used: messages, temperature, top_p, max_tokens or
max_completion_tokens, n, seed; the rest is ignored) and `GET /v1/models`, one request at a
time through the project's policy backend, so a CAPO critic can run offline on the machine that
trains.  For throughput, serve the critic with vLLM or SGLang instead; the client is the same.

Bad requests get HTTP 400 with an OpenAI-style `{"error": {"message", "type"}}` body that names
the field; with `api_key_env` set, a request without `Authorization: Bearer <that key>` gets 401.
Only the standard library's `http.server` is used; it is meant for loopback and trusted networks.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from creditrl.policy.transformers_backend import SamplingConfig, TransformersPolicy

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 * 2**20


class RequestError(ValueError):
    """A request the server cannot answer; the message names the field (sent back with HTTP 400)."""


def encode_chat(policy: TransformersPolicy, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a conversation: the chat template when the model has one, else the contents joined by newlines."""
    if policy.use_chat_template:
        return list(policy.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
    return policy.encode_prompt("\n".join(m["content"] for m in messages))


def parse_request(body: bytes, max_tokens_cap: int) -> dict[str, Any]:
    """The sampling request in a chat-completions body, validated field by field."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise RequestError("the body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RequestError(f"messages[{i}] must be an object with string 'role' and 'content'")

    def number(name: str, default: float, low: float, high: float, kind: type = float) -> Any:
        value = request.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (kind is int and value != int(value)):
            raise RequestError(f"'{name}' must be a{'n integer' if kind is int else ' number'} in [{low}, {high}], "
                               f"got {value!r}")
        return kind(value)

    limit = request.get("max_completion_tokens", request.get("max_tokens"))
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "temperature": number("temperature", 1.0, 0.0, 2.0),
            "top_p": number("top_p", 1.0, 1e-6, 1.0),
            "max_tokens": max_tokens_cap if limit is None else
            number("max_completion_tokens" if "max_completion_tokens" in request else "max_tokens",
                   max_tokens_cap, 1, max_tokens_cap, int),
            "n": number("n", 1, 1, 16, int),
            # unseeded requests draw their own seed: one fixed default would make a prompt's k critiques one
            "seed": number("seed", secrets.randbits(31), 0, 2**31 - 1, int)}


class ChatCompletionsServer:
    """Serves one local model on `host:port` (port 0: any free port; see `url`) until `stop()`."""

    def __init__(self, policy: TransformersPolicy, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 max_tokens_cap: int = 1024, api_key_env: str | None = None):
        self.policy, self.model_name, self.max_tokens_cap = policy, model_name, max_tokens_cap
        self.api_key_env = api_key_env
        self.policy.model.eval().requires_grad_(False)
        self.generate_lock = threading.Lock()  # one model, one generation at a time
        self.requests_served = 0
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API root to give clients, e.g. http://127.0.0.1:8000/v1."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ChatCompletionsServer:
        """Serve in a background thread (for tests and notebooks); `serve_forever` blocks instead."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def authorised(self, header: str | None) -> bool:
        expected = os.environ.get(self.api_key_env) if self.api_key_env else None
        return not expected or hmac.compare_digest(header or "", f"Bearer {expected}")

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """The chat.completion object answering a parsed request."""
        prompt = encode_chat(self.policy, request["messages"])
        sampling = SamplingConfig(temperature=request["temperature"], top_p=request["top_p"],
                                  max_new_tokens=request["max_tokens"])
        with self.generate_lock:
            gen = self.policy.sample([prompt], request["n"], sampling, seed=request["seed"])
            self.requests_served += 1
        choices = [{"index": i, "message": {"role": "assistant", "content": self.policy.decode(ids)},
                    "finish_reason": "length" if cut else "stop"}
                   for i, (ids, cut) in enumerate(zip(gen.response_ids, gen.truncated))]
        completion_tokens = sum(len(ids) for ids in gen.response_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}


def _handler(server: ChatCompletionsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.close_connection = True  # any body left unread would be taken for the next request
            if self.path.rstrip("/") != "/v1/models":
                return self._send(404, _error(f"no route {self.path}; try /v1/models or /v1/chat/completions",
                                              "not_found"))
            self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                         "owned_by": "creditrl"}]})

        def do_POST(self) -> None:
            self.close_connection = True  # a reply sent before the body is read must not leave it for the next request
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, _error(f"no route {self.path}; try /v1/chat/completions", "not_found"))
            if not server.authorised(self.headers.get("Authorization")):
                return self._send(401, _error("missing or wrong API key", "authentication_error"))
            declared = self.headers.get("Content-Length")
            if declared is None or not declared.strip().isdigit():
                return self._send(411 if declared is None else 400,
                                  _error(f"Content-Length must be the body's size in bytes, got {declared!r}",
                                         "invalid_request_error"))
            length = int(declared)
            if length > MAX_BODY_BYTES:
                return self._send(413, _error(f"the body is over {MAX_BODY_BYTES} bytes", "invalid_request_error"))
            try:
                request = parse_request(self.rfile.read(length), server.max_tokens_cap)
            except RequestError as err:
                return self._send(400, _error(str(err), "invalid_request_error"))
            try:
                reply = server.complete(request)
            except Exception as err:  # a generation failure is the server's, reported as such
                log.exception("generation failed")
                return self._send(500, _error(f"generation failed: {type(err).__name__}: {err}", "server_error"))
            self._send(200, reply)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

    return Handler


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}
