"""A stub of the Anthropic Messages API as the real Claude Code CLI speaks it, on 127.0.0.1.

`POST /v1/messages?beta=true` (the query ignored, any model), always answered as a stream
(SSE). A scripted edit: `Read {file_path}` of the target, then `Edit {file_path,
old_string, new_string}` with absolute paths (the working directory comes from the
`Primary working directory:` line of the system prompt), then a final text with
`DESCRIPTION:`. Behaviours for the tests: `fail_next` (status codes answered first),
`status_always` (e.g. 401), `unknown_model` (404 for one model name), `edit_path` (edit
another file than the target), `endless` (keep reading, never finish: a --max-turns test).
`fail_calls` (the same, but the agent's start-up check passes), `output_tokens` (the usage each
answer reports: a large number runs up the CLI's cost). `log` keeps every request: path,
headers, body.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _usage(i=1200, o=40):
    return {"input_tokens": i, "output_tokens": o, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


class ClaudeStub:
    def __init__(self, target: str, old: str, new: str, description: str = "stub edit"):
        self.target, self.old, self.new, self.description = target, old, new, description
        self.log: list[tuple[str, dict, dict]] = []
        self.fail_next: list[int] = []
        self.status_always: int | None = None
        self.unknown_model: str | None = None
        self.edit_path: str | None = None
        self.endless = False
        self.fail_calls: list[int] = []       # like fail_next, but the agent's start-up check passes
        self.output_tokens = 40
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                stub.log.append((self.path, dict(self.headers), {}))
                self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.loads(raw or b"{}")
                stub.log.append((self.path, dict(self.headers), body))
                if self.path.split("?")[0] != "/v1/messages":
                    return self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
                if stub.status_always:
                    return self._error(stub.status_always)
                if stub.unknown_model and body.get("model") == stub.unknown_model:
                    return self._json(404, {"type": "error", "error": {
                        "type": "not_found_error", "message": f"model: {body.get('model')}"}})
                if stub.fail_next:
                    return self._error(stub.fail_next.pop(0))
                if stub.fail_calls and "Reply with the word OK." not in json.dumps(body.get("messages")):
                    return self._error(stub.fail_calls.pop(0))
                self._stream(stub.reply(body))

            def _error(self, code):
                etype = {401: "authentication_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(code, "api_error")
                msg = "invalid x-api-key" if code == 401 else "stub"
                self._json(code, {"type": "error", "error": {"type": etype, "message": msg}}, {"retry-after-ms": "10"})

            def _json(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, msg):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                for event, data in sse_events(msg):
                    self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- the conversation ------------------------------------------------------------------
    def reply(self, body: dict) -> dict:
        if not body.get("tools"):                     # a side request (a title, a summary): plain text
            return message([{"type": "text", "text": "ok"}], "end_turn", body)
        cwd = working_directory(body)
        path = f"{cwd}/{self.edit_path or self.target}"
        results = [c for m in body.get("messages", []) if isinstance(m.get("content"), list)
                   for c in m["content"] if c.get("type") == "tool_result"]
        if self.endless or not results:
            return tool_use("Read", {"file_path": path}, body, len(results), self.output_tokens)
        if len(results) == 1:
            text = tool_result_text(results[-1])
            old = self.old if self.old in text else text.splitlines()[0]
            return tool_use("Edit", {"file_path": path, "old_string": old, "new_string": self.new}, body, 1)
        return message([{"type": "text", "text": f"Done.\nDESCRIPTION: {self.description}"}], "end_turn", body)

    def requests(self, path="/v1/messages"):
        return [b for p, _, b in self.log if p.split("?")[0] == path]


def working_directory(body: dict) -> str:
    system = body.get("system")
    text = system if isinstance(system, str) else " ".join(b.get("text", "") for b in system or [])
    text += json.dumps(body.get("messages", []))
    m = re.search(r"Primary working directory: ([^\n\\\"]+)", text)
    return m.group(1).strip() if m else "."


def tool_result_text(result: dict) -> str:
    content = result.get("content")
    text = content if isinstance(content, str) else "".join(c.get("text", "") for c in content or [])
    # Read results carry "   N\t" line-number prefixes
    return "\n".join(re.sub(r"^\s*\d+\t", "", line) for line in text.splitlines())


def message(content, stop_reason, body, output_tokens=40):
    return {"id": "msg_stub", "type": "message", "role": "assistant", "model": body.get("model", "stub"),
            "content": content, "stop_reason": stop_reason, "stop_sequence": None, "usage": _usage(o=output_tokens)}


def tool_use(name, args, body, n, output_tokens=40):
    return message([{"type": "tool_use", "id": f"toolu_stub_{n}_{name}", "name": name, "input": args}], "tool_use",
                   body, output_tokens)


def sse_events(msg):
    start = dict(msg, content=[], stop_reason=None, usage=dict(msg["usage"], output_tokens=1))
    yield "message_start", {"type": "message_start", "message": start}
    for i, b in enumerate(msg["content"]):
        if b["type"] == "text":
            yield "content_block_start", {"type": "content_block_start", "index": i,
                                          "content_block": {"type": "text", "text": ""}}
            yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                          "delta": {"type": "text_delta", "text": b["text"]}}
        else:
            yield "content_block_start", {"type": "content_block_start", "index": i,
                                          "content_block": dict(b, input={})}
            yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                          "delta": {"type": "input_json_delta", "partial_json": json.dumps(b["input"])}}
        yield "content_block_stop", {"type": "content_block_stop", "index": i}
    yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                            "usage": {"output_tokens": msg["usage"]["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}
