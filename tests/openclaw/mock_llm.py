#!/usr/bin/env python3
# Copied unchanged from ../shared/openclaw/mock_llm.py (the OpenClaw research);
# tests/openclaw.rs runs one per real gateway.
"""Scripted OpenAI-compatible mock LLM server (stdlib only, loopback only).

Endpoints:
  GET  /v1/models              -> one model ("mock-model")
  POST /v1/chat/completions    -> scripted reply, streaming (SSE) or not
  GET  /healthz                -> "ok"

Scripting: the reply is chosen from the last real user message (OpenClaw's injected
"<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>" user blocks are skipped).
  [[slow:N]]     stream the reply one word every N seconds (float ok); adds 20 words
  [[words:K]]    append K filler words ("w1 w2 ...") to the reply
  [[error:CODE]] answer with HTTP CODE and an OpenAI-style error body
  [[tool:NAME]]  first call: answer with one tool call NAME({}) ; after the
                 tool result comes back, answer with normal text
  anything else  reply "MOCK-REPLY: <first line of the user text, timestamp prefix removed>"
Set MOCK_LLM_DUMP=1 to also log every full request body.

Every request is appended as one JSON line to $MOCK_LLM_LOG (default
./mock_llm_requests.jsonl) so the exact request shape can be inspected.

Usage: python3 mock_llm.py [--port 18799]
"""
import argparse
import json
import os
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_ID = "mock-model"
LOG_PATH = os.environ.get("MOCK_LLM_LOG", "mock_llm_requests.jsonl")
_log_lock = threading.Lock()


def log_request(entry):
    with _log_lock:
        with open(LOG_PATH, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def content_text(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
        return "\n".join(parts)
    return ""


INTERNAL_MARK = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"


def last_user_text(messages):
    """Text of the last user message, skipping OpenClaw's injected internal-context blocks."""
    fallback = ""
    for m in reversed(messages or []):
        if m.get("role") == "user":
            t = content_text(m.get("content"))
            if not fallback:
                fallback = t
            if not t.lstrip().startswith(INTERNAL_MARK):
                return t
    return fallback


def plan_reply(body):
    """Return (kind, value, delay) for this request."""
    messages = body.get("messages") or []
    text = last_user_text(messages)
    m = re.search(r"\[\[error:(\d{3})\]\]", text)
    if m:
        return ("error", int(m.group(1)), 0.0)
    delay = 0.0
    m = re.search(r"\[\[slow:([0-9.]+)\]\]", text)
    if m:
        delay = float(m.group(1))
    m = re.search(r"\[\[tool:([A-Za-z0-9_\-]+)\]\]", text)
    if m:
        # Call the tool once per user turn: once a tool result follows the user's
        # message (OpenClaw may append internal-context user messages after it), answer.
        start = 0
        for i, msg in enumerate(messages):
            if msg.get("role") == "user" and not content_text(msg.get("content")).lstrip().startswith(INTERNAL_MARK):
                start = i
        results = [msg for msg in messages[start:] if msg.get("role") == "tool"]
        if not results:
            return ("tool", m.group(1), delay)
        return ("text", "MOCK-TOOL-DONE: " + " ".join(content_text(results[-1].get("content")).split())[:80], delay)
    # OpenClaw sends "[<timestamp>] <user text>\n\nRuntime: ..." as the user turn.
    first = (text.strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)
    reply = "MOCK-REPLY: " + first[:80]
    m = re.search(r"\[\[words:(\d+)\]\]", text)
    extra = int(m.group(1)) if m else (20 if delay else 0)
    if extra:
        reply += " " + " ".join("w%d" % i for i in range(1, extra + 1))
    return ("text", reply, delay)


class Handler(BaseHTTPRequestHandler):
    server_version = "mock-llm/1"

    def log_message(self, fmt, *args):  # quieter stderr
        sys.stderr.write("[mock-llm] " + (fmt % args) + "\n")

    def _json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            return self._json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "mock"}]})
        if self.path == "/healthz":
            return self._json(200, {"ok": True})
        return self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except Exception:
            return self._json(400, {"error": {"message": "bad json"}})
        kind, value, delay = plan_reply(body)
        if os.environ.get("MOCK_LLM_DUMP"):
            log_request({"ts": time.time(), "full_body": body})
        log_request({
            "ts": time.time(), "path": self.path, "stream": bool(body.get("stream")),
            "model": body.get("model"), "n_messages": len(body.get("messages") or []),
            "n_tools": len(body.get("tools") or []), "keys": sorted(body.keys()),
            "last_user": last_user_text(body.get("messages"))[-300:],
            # The whole prompt the model was given, as text (capped): what a
            # test checks a model saw (earlier turns carried to a new
            # gateway come ahead of the message).
            "prompt": json.dumps(body.get("messages"))[-20000:],
            "plan": [kind, value, delay],
        })
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._json(404, {"error": {"message": "only /v1/chat/completions"}})
        if kind == "error":
            return self._json(value, {"error": {"message": "mock error %d" % value,
                                                 "type": "mock_error", "code": str(value)}})
        cid = "chatcmpl-" + uuid.uuid4().hex[:12]
        created = int(time.time())
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if kind == "tool":
            tool_call = {"id": "call_" + uuid.uuid4().hex[:8], "type": "function",
                         "function": {"name": value, "arguments": "{}"}}
        if not body.get("stream"):
            if kind == "tool":
                msg = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
                finish = "tool_calls"
            else:
                msg = {"role": "assistant", "content": value}
                finish = "stop"
            return self._json(200, {"id": cid, "object": "chat.completion", "created": created,
                                    "model": body.get("model") or MODEL_ID,
                                    "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                                    "usage": usage})
        # Streaming (SSE). No Content-Length: the connection closes at the end.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        model = body.get("model") or MODEL_ID

        def chunk(delta, finish=None, with_usage=False):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if with_usage:
                obj["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            chunk({"role": "assistant", "content": ""})
            if kind == "tool":
                if delay:
                    time.sleep(delay)
                chunk({"tool_calls": [dict(index=0, **tool_call)]})
                chunk({}, finish="tool_calls")
            else:
                words = value.split(" ")
                for i, w in enumerate(words):
                    if delay:
                        time.sleep(delay)
                    chunk({"content": (w if i == 0 else " " + w)})
                chunk({}, finish="stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [], "usage": usage}
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log_request({"ts": time.time(), "event": "client-disconnected-mid-stream", "id": cid})
        self.close_connection = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=int(os.environ.get("MOCK_LLM_PORT", "18799")))
    args = ap.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    print("mock-llm listening on http://127.0.0.1:%d/v1 (log: %s)" % (args.port, LOG_PATH), flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
