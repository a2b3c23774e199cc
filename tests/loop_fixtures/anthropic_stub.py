"""A local stand-in for the Anthropic Messages API, for the real `anthropic` SDK to talk to.

Serves POST /v1/messages (non-streaming) and GET /v1/models/{id} on 127.0.0.1. Its
"model" is a tiny scripted researcher: view the training file, raise MATRIX_LR by 1.5x
with str_replace, then end the turn with a DESCRIPTION line. Tests can queue error
statuses (`fail_next`), make it try to edit prepare.py first (`attack_path`), and set the
usage it reports per response.
"""
from __future__ import annotations

import itertools
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error", 400: "invalid_request_error"}


class StubAPI:
    def __init__(self, models=("claude-sonnet-4-6", "claude-opus-4-6"), training_file="train_mlx.py"):
        self.models = set(models)
        self.training_file = training_file
        self.requests: list[tuple[str, str, dict, dict]] = []   # (method, path, headers, body)
        self.fail_next: list[int] = []
        self.attack_path: str | None = None
        self.usage = {"input_tokens": 1000, "output_tokens": 100,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2000}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                stub.requests.append(("GET", self.path, dict(self.headers), {}))
                m = re.fullmatch(r"/v1/models/([^/?]+)", self.path.split("?")[0])
                if m and m.group(1) in stub.models:
                    return self._send(200, {"type": "model", "id": m.group(1), "display_name": m.group(1),
                                            "created_at": "2025-01-01T00:00:00Z"})
                return self._send(404, {"type": "error", "error": {"type": "not_found_error",
                                                                   "message": f"model: {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                stub.requests.append(("POST", self.path, dict(self.headers), body))
                with stub.lock:
                    code = stub.fail_next.pop(0) if stub.fail_next else None
                if code:
                    return self._send(code, {"type": "error", "error": {"type": ERROR_TYPES.get(code, "api_error"),
                                                                        "message": "stub failure"}},
                                      {"retry-after-ms": "5"})
                if self.path != "/v1/messages":
                    return self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
                return self._send(200, stub.reply(body), {"request-id": f"req_{next(stub.ids)}"})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def messages(self) -> list[dict]:
        return [b for m, p, _, b in self.requests if m == "POST" and p == "/v1/messages"]

    # -- the scripted researcher -------------------------------------------------------------
    def _message(self, body, content, stop_reason):
        return {"id": f"msg_{next(self.ids)}", "type": "message", "role": "assistant", "model": body["model"],
                "content": content, "stop_reason": stop_reason, "stop_sequence": None, "usage": dict(self.usage)}

    def _tool(self, body, tool_input):
        return self._message(body, [{"type": "text", "text": "Working on it."},
                                    {"type": "tool_use", "id": f"toolu_{next(self.ids)}",
                                     "name": "str_replace_based_edit_tool", "input": tool_input}], "tool_use")

    def reply(self, body: dict) -> dict:
        last = body["messages"][-1]["content"]
        results = [c for c in last if isinstance(c, dict) and c.get("type") == "tool_result"] if isinstance(last, list) else []
        if not results:
            if self.attack_path:
                return self._tool(body, {"command": "str_replace", "path": self.attack_path,
                                         "old_str": "import os", "new_str": "import os  # hacked"})
            return self._tool(body, {"command": "view", "path": self.training_file})
        result = results[-1]
        content = result["content"] if isinstance(result["content"], str) else \
            "".join(c.get("text", "") for c in result["content"])
        m = re.search(r"MATRIX_LR = ([0-9.eE+-]+)", content)
        if m:   # the result of a view: make the edit
            old = float(m.group(1))
            new = float(f"{old * 1.5:.4g}")
            self._described = f"MATRIX_LR {m.group(1)} -> {new}"
            return self._tool(body, {"command": "str_replace", "path": self.training_file,
                                     "old_str": f"MATRIX_LR = {m.group(1)}", "new_str": f"MATRIX_LR = {new}"})
        if content.startswith("Refused"):
            return self._tool(body, {"command": "view", "path": self.training_file})
        return self._message(body, [{"type": "text", "text": f"Done.\nDESCRIPTION: {getattr(self, '_described', 'edit')}"}],
                             "end_turn")
