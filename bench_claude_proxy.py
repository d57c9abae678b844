#!/usr/bin/env python3
"""bench_claude_proxy.py: what claude_proxy.py adds in latency, CPU and memory.

Run it from the project root (Python 3.8+, standard library only, 127.0.0.1 only)::

    python3 bench_claude_proxy.py                    # about 60 s
    python3 bench_claude_proxy.py --quick            # about 15 s smoke run
    python3 bench_claude_proxy.py --json bench.json  # also write every figure to a file
    python3 bench_claude_proxy.py --body capture.json --scenarios d1,d2   # your own request

One run starts two children: a fast fake OpenAI upstream (this file run as ``--serve-fake``:
asyncio, HTTP/1.1 keep-alive, JSON answers and SSE streams) and the proxy itself
(``claude_proxy.py --port 0``, pointed at the fake). For each scenario an asyncio keep-alive
load generator sends the same load twice, after a warm-up each time: first the equivalent
Chat Completions request straight to the fake ("direct": the baseline, what the harness itself
costs), then the Anthropic request through the proxy ("proxy").

  a   nonstream_c1     non-stream, 1 connection: the proxy's cost per request
  b   nonstream_c32    non-stream, 32 connections for a fixed time: throughput under load
  c   stream_c16       50 content chunks 2 ms apart, 16 connections: TTFB, TTFT, total
  d1  cc_nonstream_c1  a Claude Code-shaped request (~90 KB: system blocks, 25 tools, a tool
                       round trip, a mid-conversation system message), non-stream, 1 connection
  d2  cc_stream_c4     the same request streamed, 4 connections

How to read the figures:
- overhead = proxy - direct at the same percentile, in ms. At concurrency 1 it is the proxy's
  own work per request; under concurrency it also holds queueing behind other requests.
- ratio = proxy / direct. The fake answers in ~0.1 ms, so the latency ratio of a non-stream
  scenario is large by construction: read the overhead in ms there. A stream takes ~100 ms
  upstream, so its ratio is what a user would notice.
- throughput = ok responses per second of the measured phase. The direct figure is the ceiling
  of the harness (load generator + fake share the 2 cores with the proxy), not a target.
- TTFB = request written -> first response byte; TTFT = -> first non-empty content delta (text,
  tool arguments or thinking). A proxy can send headers early: TTFT is the one that counts.
  Stream total = -> last byte. The fake sends chunk i at a fixed time after the first (a late
  wake-up is caught up, not carried into later chunks), so the upstream's pacing is the same
  direct and via the proxy ("upstream stream duration" shows it) and the difference in total
  time is the proxy's lag behind the upstream.
- proxy CPU ms/req = the proxy's utime+stime (/proc/PID/stat) over the measured phase divided
  by its requests: cost independent of how busy the machine was. /proc counts in 10 ms ticks,
  so a run with under ~1 s of proxy CPU is coarse. cores = that CPU / wall time; ~1.0 means the
  proxy (one process, one GIL) is saturated.
- RSS = VmRSS of the proxy: idle after start, peak sampled every 100 ms during each run.
- upstream conns: "new" = TCP connections to the fake opened during the measured phase that
  carried chat requests (0 = every request reused a kept-alive connection from the warm-up; a
  few under concurrency while the pool grows to it; about one per request = no reuse);
  "used" = distinct connections that carried them; "peak open" = most open at once (the pool).
- rest of the machine: CPU used meanwhile by everything but the proxy, the fake and this
  process (/proc/stat). Above 0.25 cores a warning says the run was disturbed: run it again.
  On a 2-core machine, compare runs made the same way; p50 and CPU ms/req are the most
  stable figures, p99 the least.
A scenario with any error (non-200, a body that is not a message, a stream not ending in
message_stop, an event: error, a timeout, a 400 at the fake) prints samples; exit status 1.
The last line of the output is the JSON summary (--json FILE writes it with every run in full).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPBACK = "127.0.0.1"
BANNER = re.compile(r"listening on http://([0-9.]+):(\d+)")


# =============================================================================================
# Scenarios
# =============================================================================================


class Scenario(NamedTuple):
    key: str
    name: str
    body: str           # "small" (4 KB, like the reference load) or "cc" (Claude Code-shaped)
    stream: bool
    concurrency: int
    requests: int       # measured requests; 0 means: run for `duration` seconds
    duration: float
    warmup: int         # requests sent (on the same connections) before measuring


def build_scenarios(args: argparse.Namespace) -> List[Scenario]:
    quick = args.quick
    conc_b = args.b_concurrency
    return [
        Scenario("a", "nonstream_c1", "small", stream=False, concurrency=1,
                 requests=300 if quick else 3000, duration=0, warmup=50 if quick else 100),
        Scenario("b", "nonstream_c%d" % conc_b, "small", stream=False, concurrency=conc_b,
                 requests=0, duration=args.b_duration or (3.0 if quick else 15.0), warmup=10 * conc_b),
        Scenario("c", "stream_c16", "small", stream=True, concurrency=16,
                 requests=160 if quick else 800, duration=0, warmup=32),
        Scenario("d1", "cc_nonstream_c1", "cc", stream=False, concurrency=1,
                 requests=60 if quick else 500, duration=0, warmup=10 if quick else 30),
        Scenario("d2", "cc_stream_c4", "cc", stream=True, concurrency=4,
                 requests=40 if quick else 320, duration=0, warmup=8),
    ]


# =============================================================================================
# Request bodies
# =============================================================================================
# Built here, deterministically (seeded), so users need no fixture file. The "cc" body has the
# shape of a real Claude Code request: the billing-header first system block, cache_control on
# the long system prompt, a {"role": "system"} message mid-conversation, tool round trips, and
# 25 tools whose JSON schemas carry "$schema" and additionalProperties false.

_WORDS = ("the agent reads files and runs commands to edit code answer questions about a "
          "repository use tools when they help prefer small focused changes explain what you "
          "did never guess a path check the result before you report it keep answers short "
          "tests must pass the user asked for this change security matters read before you "
          "write one task at a time mark it done when finished search with patterns first "
          "ask when unsure output goes to the terminal in markdown").split()


def prose(rng: random.Random, chars: int) -> str:
    """Plausible English-like text of about `chars` characters (a few non-ASCII ones too)."""
    out: List[str] = []
    size = 0
    while size < chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        if rng.random() < 0.15:
            words.insert(rng.randint(1, len(words) - 1), "\u2014")
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ".", ":", "?"))
        if rng.random() < 0.2:
            sentence = "\n- " + sentence
        elif rng.random() < 0.15:
            sentence = "\n\n" + sentence
        out.append(sentence)
        size += len(sentence) + 1
    return " ".join(out).strip()


_SMALL_TOOLS = [
    {"name": "Read", "description": "Reads a file from the local filesystem.",
     "input_schema": {"type": "object", "properties": {
         "file_path": {"type": "string", "description": "The absolute path to the file to read"},
         "limit": {"type": "integer", "description": "The number of lines to read"}},
         "required": ["file_path"]}},
    {"name": "Bash", "description": "Executes a given bash command in a persistent shell session.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string", "description": "The command to execute"},
         "timeout": {"type": "number", "description": "Optional timeout in milliseconds"}},
         "required": ["command"]}},
]


def small_request() -> Dict[str, Any]:
    """About 4 KB: two system blocks, a tool round trip, 2 tools (a typical short turn)."""
    rng = random.Random(7)
    return {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 1024,
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
                   {"type": "text", "text": prose(rng, 2200), "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "What does the main function in app.py do?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me read the file."},
                {"type": "tool_use", "id": "toolu_01A", "name": "Read", "input": {"file_path": "/repo/app.py"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": prose(rng, 600)},
                {"type": "text", "text": "Summarise it in two sentences."}]}],
        "tools": _SMALL_TOOLS,
        "metadata": {"user_id": "user_bench"},
    }


_CC_TOOLS = ("Agent", "AskUserQuestion", "Bash", "BashOutput", "Edit", "EnterPlanMode",
             "ExitPlanMode", "Glob", "Grep", "KillShell", "ListMcpResources", "MultiEdit",
             "NotebookEdit", "Read", "ReadMcpResource", "Skill", "SlashCommand", "TaskCreate",
             "TaskGet", "TaskList", "TaskUpdate", "TodoWrite", "WebFetch", "WebSearch", "Write")
_PARAMS = ("file_path", "pattern", "command", "description", "timeout", "limit", "offset", "path",
           "content", "old_string", "new_string", "replace_all", "glob", "output_mode", "url",
           "prompt", "query", "todos", "run_in_background", "subagent_type", "multiline")


def _tool_schema(rng: random.Random) -> Dict[str, Any]:
    names = rng.sample(_PARAMS, rng.randint(2, 5))
    properties: Dict[str, Any] = {}
    for name in names:
        kind = rng.choice(("string", "string", "integer", "boolean", "enum", "array"))
        description = prose(rng, rng.randint(40, 200))
        if kind == "enum":
            properties[name] = {"type": "string", "enum": ["content", "files_with_matches", "count"],
                                "description": description}
        elif kind == "array":
            properties[name] = {"type": "array", "description": description, "items": {
                "type": "object", "additionalProperties": False, "required": ["content", "status"],
                "properties": {"content": {"type": "string", "minLength": 1},
                               "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]}}}}
        else:
            properties[name] = {"type": kind, "description": description}
    return {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
            "properties": properties, "required": names[:1], "additionalProperties": False}


def claude_code_request() -> Dict[str, Any]:
    """About 90 KB, shaped like a Claude Code turn after two tool calls."""
    rng = random.Random(2025)
    tools = [{"name": name, "description": prose(rng, rng.randint(500, 2000)), "input_schema": _tool_schema(rng)}
             for name in _CC_TOOLS]
    return {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": False,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.99.a1b; cc_entrypoint=cli;"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": prose(rng, 18000), "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, you can use "
                                         "the following context:\n# claudeMd\n" + prose(rng, 2500)
                                         + "\n</system-reminder>"},
                {"type": "text", "text": "Find where the retry logic lives and explain how it backs off."}]},
            {"role": "system", "content": prose(rng, 1800)},
            {"role": "assistant", "content": [
                {"type": "text", "text": "I'll search for the retry logic first."},
                {"type": "tool_use", "id": "toolu_01Grep", "name": "Grep",
                 "input": {"pattern": "retry|backoff", "path": "src", "output_mode": "content"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01Grep", "content": prose(rng, 2000)}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "The matches point at src/client.py; reading it."},
                {"type": "tool_use", "id": "toolu_02Read", "name": "Read",
                 "input": {"file_path": "/repo/src/client.py", "limit": 400}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_02Read",
                 "content": [{"type": "text", "text": prose(rng, 3500)}]},
                {"type": "text", "text": "<system-reminder>\nThe TodoWrite tool hasn't been used recently."
                                         "\n</system-reminder>", "cache_control": {"type": "ephemeral"}}]}],
        "tools": tools,
        "metadata": {"user_id": "user_0000_account__session_00000000-0000-0000-0000-000000000000"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    }


def load_body_file(path: str) -> Dict[str, Any]:
    """A captured request: a JSON object with a top-level "body", or the request itself."""
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    body = document.get("body") if isinstance(document, dict) and isinstance(document.get("body"), dict) else document
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise SystemExit("%s: not an Anthropic Messages request (no messages list)" % path)
    return body


def with_stream(request: Dict[str, Any], stream: bool) -> Dict[str, Any]:
    body = dict(request)
    body.pop("stream", None)
    if stream:
        body["stream"] = True
    return body


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def to_chat_completions(request: Dict[str, Any], stream: bool) -> Dict[str, Any]:
    """The direct baseline: a plain conversion of the Anthropic request to Chat Completions.
    Written here rather than imported from the proxy, so the baseline does not depend on the
    code under test; close in shape and size to what the proxy sends, not byte-identical."""
    messages: List[Dict[str, Any]] = []
    system = request.get("system")
    if isinstance(system, list):
        system = "\n\n".join(b.get("text", "") for b in system if isinstance(b, dict)
                             and not b.get("text", "").startswith("x-anthropic-billing-header"))
    if system:
        messages.append({"role": "system", "content": system})

    def add_user(text: str) -> None:
        if messages and messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": "user", "content": text})

    for message in request["messages"]:
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
        if message.get("role") == "assistant":
            text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
            converted: Dict[str, Any] = {"role": "assistant", "content": text or None}
            calls = [{"id": b.get("id"), "type": "function", "function": {
                "name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}}
                for b in blocks if b.get("type") == "tool_use"]
            if calls:
                converted["tool_calls"] = calls
            messages.append(converted)
        elif message.get("role") == "system":
            add_user("<system-reminder>\n%s\n</system-reminder>" % _text_of(content))
        else:
            texts = []
            for block in blocks:
                if block.get("type") == "tool_result":
                    messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                     "content": _text_of(block.get("content"))})
                elif block.get("type") == "text":
                    texts.append(block.get("text", ""))
            if texts:
                add_user("\n\n".join(texts))
    body: Dict[str, Any] = {"model": "gpt-4o", "messages": messages,
                            "max_tokens": request.get("max_tokens") or 1024}
    tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                               "parameters": t.get("input_schema") or {"type": "object"}}}
             for t in request.get("tools") or () if isinstance(t, dict) and t.get("name")]
    if tools:
        body["tools"] = tools
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def http_request(path: str, port: int, body: bytes, headers: Dict[str, str]) -> bytes:
    """The bytes of one keep-alive POST."""
    head = "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n" % (path, LOOPBACK, port)
    head += "".join("%s: %s\r\n" % item for item in headers.items())
    head += "Content-Length: %d\r\n\r\n" % len(body)
    return head.encode("latin-1") + body


# =============================================================================================
# Fake OpenAI upstream (runs as: bench_claude_proxy.py --serve-fake PORT)
# =============================================================================================
# An asyncio.Protocol per connection: HTTP/1.1 keep-alive (pipelined requests are queued),
# Content-Length request bodies. POST .../chat/completions answers a chat.completion, or an SSE
# stream (one event per HTTP chunk): a role chunk, --chunks content chunks --chunk-delay-ms
# apart, optional tool-call deltas, a finish chunk, a usage chunk if stream_options.include_usage,
# then [DONE]. GET /stats and POST /stats/reset serve the counters the report needs. Answers
# are pre-encoded once, so the fake costs a few tens of microseconds of CPU per request.

REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 411: b"Length Required"}
COUNTERS = ("requests", "stream_requests", "nonstream_requests", "bad_requests",
            "include_usage_requests", "request_bytes", "stream_seconds", "connections_accepted",
            "new_chat_connections", "chat_connections_used")


def sse_chunk(payload: Dict[str, Any]) -> bytes:
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class FakeState:
    def __init__(self, args: argparse.Namespace) -> None:
        self.chunks = args.chunks
        self.chunk_delay = args.chunk_delay_ms / 1000.0
        self.latency = args.upstream_latency_ms / 1000.0
        self.content_bytes = args.content_bytes
        self.tool_calls = args.tool_calls
        self.epoch = 0                 # bumped by /stats/reset; tells "new" connections apart
        self.stats = dict.fromkeys(COUNTERS, 0)
        self.open_chat = 0             # connections that carried a chat request, open now
        self.open_chat_peak = 0
        self.started = time.monotonic()
        self._cache: Dict[Tuple[Any, ...], Any] = {}

    def reset(self) -> None:
        self.epoch += 1
        self.stats = dict.fromkeys(COUNTERS, 0)
        self.open_chat_peak = self.open_chat

    def snapshot(self) -> Dict[str, Any]:
        return dict(self.stats, open_chat_connections=self.open_chat,
                    open_chat_connections_peak=self.open_chat_peak, pid=os.getpid(),
                    uptime_s=round(time.monotonic() - self.started, 3))

    def completion(self, model: str, tool: Optional[str]) -> bytes:
        key = ("completion", model, tool)
        if key not in self._cache:
            message: Dict[str, Any] = {"role": "assistant",
                                       "content": ("Lorem ipsum dolor sit amet. " * 100)[:self.content_bytes]}
            if tool:
                message["tool_calls"] = [{"id": "call_bench_1", "type": "function", "function": {
                    "name": tool, "arguments": "{\"path\": \"README.md\"}"}}]
            body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
                    "model": model, "choices": [{"index": 0, "message": message,
                                                 "finish_reason": "tool_calls" if tool else "stop"}],
                    "usage": {"prompt_tokens": 1200, "completion_tokens": 128, "total_tokens": 1328}}
            self._cache[key] = json.dumps(body, separators=(",", ":")).encode()
        return self._cache[key]

    def stream_frames(self, model: str, tool: Optional[str], usage: bool) -> Tuple[bytes, bytes, bytes]:
        """(headers + role chunk, one content chunk, everything after the content chunks)."""
        key = ("stream", model, tool, usage)
        if key not in self._cache:
            base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                    "model": model}

            def chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> bytes:
                return sse_chunk(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}]))

            head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n") + chunk({"role": "assistant", "content": ""})
            tail = b""
            if tool:
                tail += chunk({"tool_calls": [{"index": 0, "id": "call_bench_1", "type": "function",
                                               "function": {"name": tool, "arguments": ""}}]})
                for part in ("{\"path\"", ": \"READ", "ME.md\"}"):
                    tail += chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            tail += chunk({}, "tool_calls" if tool else "stop")
            if usage:
                tail += sse_chunk(dict(base, choices=[], usage={
                    "prompt_tokens": 1200, "completion_tokens": self.chunks, "total_tokens": 1200 + self.chunks}))
            tail += b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
            self._cache[key] = (head, chunk({"content": " token"}), tail)
        return self._cache[key]


def take_request(buf: bytearray) -> Optional[Tuple[str, str, Dict[str, str], bytes]]:
    """Cut one whole request off the front of `buf`; None if it is not all there yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise ValueError("request head over 64 KB")
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    method, target = lines[0].split(" ")[:2]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ValueError("chunked request bodies are not supported")
    length = int(headers.get("content-length") or 0)
    if len(buf) < end + 4 + length:
        return None
    body = bytes(buf[end + 4:end + 4 + length])
    del buf[:end + 4 + length]
    return method, target, headers, body


class FakeConnection(asyncio.Protocol):
    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.epoch = state.epoch       # the stats epoch it was accepted in
        self.chat_epoch = -1           # the last epoch in which it carried a chat request
        self.is_chat = False
        self.buf = bytearray()
        self.busy = False              # an answer (stream or delayed) is still being written
        self.closed = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state.stats["connections_accepted"] += 1

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        if self.is_chat:
            self.state.open_chat -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self) -> None:
        while not self.busy and not self.closed:
            try:
                request = take_request(self.buf)
            except ValueError as exc:
                self.reply(411, json.dumps({"error": {"message": str(exc)}}).encode(), False)
                return
            if request is None:
                return
            method, target, headers, body = request
            keep_alive = headers.get("connection", "").lower() != "close"
            path = target.split("?", 1)[0]
            if method == "POST" and path.endswith("/chat/completions"):
                self.chat(body, keep_alive)
            elif method == "GET" and path == "/stats":
                self.reply(200, json.dumps(self.state.snapshot()).encode(), keep_alive)
            elif method == "POST" and path == "/stats/reset":
                self.state.reset()
                self.reply(200, b"{}", keep_alive)
            else:
                self.reply(404, b'{"error":{"message":"not found"}}', keep_alive)

    def reply(self, status: int, body: bytes, keep_alive: bool) -> None:
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status, REASONS[status], len(body), b"" if keep_alive else b"Connection: close\r\n", body))
        if not keep_alive:
            self.transport.close()
            self.closed = True

    def chat(self, body: bytes, keep_alive: bool) -> None:
        state, stats = self.state, self.state.stats
        stats["request_bytes"] += len(body)
        if self.chat_epoch != state.epoch:
            self.chat_epoch = state.epoch
            stats["chat_connections_used"] += 1
            if self.epoch == state.epoch:
                stats["new_chat_connections"] += 1
        if not self.is_chat:
            self.is_chat = True
            state.open_chat += 1
            state.open_chat_peak = max(state.open_chat_peak, state.open_chat)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list) or not request["messages"]:
            stats["bad_requests"] += 1
            return self.reply(400, b'{"error":{"message":"bad request: need a JSON body with messages",'
                                   b'"type":"invalid_request_error"}}', keep_alive)
        stats["requests"] += 1
        model = str(request.get("model") or "gpt-4o")
        tool = None
        if state.tool_calls and request.get("tools"):
            tool = (request["tools"][0].get("function") or {}).get("name") or "tool"
        if request.get("stream") is True:
            stats["stream_requests"] += 1
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            stats["include_usage_requests"] += usage
            self.busy = True
            asyncio.ensure_future(self.stream(state.stream_frames(model, tool, usage), keep_alive))
        else:
            stats["nonstream_requests"] += 1
            payload = state.completion(model, tool)
            if state.latency:
                self.busy = True
                asyncio.get_running_loop().call_later(state.latency, self.delayed_reply, payload, keep_alive)
            else:
                self.reply(200, payload, keep_alive)

    def delayed_reply(self, payload: bytes, keep_alive: bool) -> None:
        self.busy = False
        if not self.closed:
            self.reply(200, payload, keep_alive)
            self.process()

    async def stream(self, frames: Tuple[bytes, bytes, bytes], keep_alive: bool) -> None:
        head, content, tail = frames
        state = self.state
        started = time.perf_counter()
        try:
            self.transport.write(head)
            loop = asyncio.get_running_loop()
            first = loop.time() + state.latency
            for i in range(state.chunks):
                # Chunk i is due at a fixed time (a model's token rate does not depend on its
                # reader): a late wake-up is caught up, not added to every later chunk.
                wait = first + i * state.chunk_delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.closed:
                    return
                self.transport.write(content)
            self.transport.write(tail)
            state.stats["stream_seconds"] += time.perf_counter() - started
        finally:
            self.busy = False
        if not keep_alive:
            self.transport.close()
            self.closed = True
        elif self.buf:
            self.process()


def serve_fake(args: argparse.Namespace) -> int:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        state = FakeState(args)
        server = await loop.create_server(lambda: FakeConnection(state), LOOPBACK, args.serve_fake,
                                          backlog=1024, reuse_address=True)
        port = server.sockets[0].getsockname()[1]
        print("fake-openai listening on http://%s:%d" % (LOOPBACK, port), flush=True)
        parent, deadline = os.getppid(), time.monotonic() + args.max_lifetime
        while time.monotonic() < deadline and os.getppid() == parent:   # never outlive the bench
            await asyncio.sleep(0.5)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


# =============================================================================================
# Load generator
# =============================================================================================
# C workers, each owning one keep-alive connection (an asyncio.Protocol with a small incremental
# HTTP/1.1 response parser), sending requests back to back. Per response it records the time
# the request was written, the first byte, the first non-empty content delta (streams) and the
# last byte. A timeout aborts the connection; the next request opens a new one.

HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, TRAILER, UNTIL_CLOSE = range(6)


class LoadError(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


class Reply(NamedTuple):
    status: int
    body: bytes
    t_sent: float
    t_first: float
    t_content: Optional[float]
    t_end: float


def _has_content(event: bytes, anthropic: bool) -> bool:
    """Is this SSE event a non-empty content delta?"""
    if anthropic:
        if not event.startswith(b"event: content_block_delta"):
            return False
        data = event[event.find(b"data:") + 5:]
        delta = json.loads(data).get("delta") or {}
        return bool(delta.get("text") or delta.get("partial_json") or delta.get("thinking"))
    if not event.startswith(b"data: {"):
        return False
    choices = json.loads(event[6:]).get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return bool(delta.get("content") or any((c.get("function") or {}).get("arguments")
                                            for c in delta.get("tool_calls") or ()))


class ClientConnection(asyncio.Protocol):
    def __init__(self, anthropic: bool) -> None:
        self.anthropic = anthropic
        self.transport: Any = None
        self.closed = False
        self.buf = bytearray()
        self.waiter: Optional[asyncio.Future] = None
        self.timer: Any = None
        self.state = HEAD
        self.timed_out = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        if self.waiter is not None and self.state == UNTIL_CLOSE:
            self._done()
        else:
            self._fail("timeout" if self.timed_out else "conn_closed", str(exc or "closed by the server"))

    def send(self, payload: bytes, stream: bool, timeout: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.stream, self.state, self.status, self.will_close = stream, HEAD, 0, False
        self.body, self.remaining, self.scan_pos = bytearray(), 0, 0
        self.t_first: Optional[float] = None
        self.t_content: Optional[float] = None
        self.timed_out = False
        self.timer = loop.call_later(timeout, self._timeout)
        self.t_sent = time.perf_counter()
        self.transport.write(payload)
        return self.waiter

    def _timeout(self) -> None:
        self.timed_out = True
        self.transport.abort()

    def _done(self) -> None:
        self.timer.cancel()
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result(Reply(self.status, bytes(self.body), self.t_sent, self.t_first,
                                    self.t_content, time.perf_counter()))
        if self.will_close and not self.closed:
            self.transport.close()

    def _fail(self, kind: str, detail: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(LoadError(kind, detail))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            return                                   # nothing asked: ignore
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._fail("bad_http", str(exc))
            self.transport.abort()

    def _parse(self) -> None:
        buf = self.buf
        while self.waiter is not None:
            if self.state == HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[:end + 4]
                self.status = int(lines[0].split(" ")[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip().lower()
                self.will_close = headers.get("connection") == "close"
                if "chunked" in headers.get("transfer-encoding", ""):
                    self.state = CHUNK_SIZE
                elif "content-length" in headers:
                    self.state, self.remaining = LENGTH, int(headers["content-length"])
                else:
                    self.state, self.will_close = UNTIL_CLOSE, True
            elif self.state == LENGTH:
                take = min(self.remaining, len(buf))
                self.body += buf[:take]
                del buf[:take]
                self.remaining -= take
                if self.remaining:
                    return
                self._done()
            elif self.state == CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[:end + 2]
                self.state, self.remaining = (TRAILER, 0) if size == 0 else (CHUNK_DATA, size)
            elif self.state == CHUNK_DATA:
                if len(buf) < self.remaining + 2:
                    return
                self.body += buf[:self.remaining]
                del buf[:self.remaining + 2]
                self.state = CHUNK_SIZE
                if self.stream and self.t_content is None:
                    self._scan_for_content()
            elif self.state == TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:
                    self._done()
            else:                                    # UNTIL_CLOSE
                self.body += buf
                del buf[:]
                return

    def _scan_for_content(self) -> None:
        body, pos = self.body, self.scan_pos
        while True:
            end = body.find(b"\n\n", pos)
            if end < 0:
                break
            event = bytes(body[pos:end])
            pos = end + 2
            try:
                found = _has_content(event, self.anthropic)
            except (ValueError, AttributeError, IndexError, TypeError):
                found = False                        # validated as a whole at the end
            if found:
                self.t_content = time.perf_counter()
                break
        self.scan_pos = pos


class Phase:
    """What one phase (warm-up or measured) of a load run recorded."""

    def __init__(self) -> None:
        self.ok = 0
        self.latency: List[float] = []
        self.ttfb: List[float] = []
        self.ttft: List[float] = []
        self.content_events: List[int] = []
        self.error_kinds: Dict[str, int] = {}
        self.error_samples: List[str] = []
        self.connections_opened = 0
        self.duration = 0.0
        self.loadgen_cpu = 0.0
        self.truncated = False

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    def error(self, kind: str, detail: Any) -> None:
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if len(self.error_samples) < 5:
            self.error_samples.append("%s: %s" % (kind, str(detail)[:300]))


class Load:
    """`concurrency` keep-alive connections posting `payload` to 127.0.0.1:`port`."""

    def __init__(self, port: int, payload: bytes, anthropic: bool, stream: bool, concurrency: int,
                 timeout: float) -> None:
        self.port, self.payload, self.anthropic, self.stream = port, payload, anthropic, stream
        self.timeout = timeout
        self.conns: List[Optional[ClientConnection]] = [None] * concurrency

    async def _connect(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: ClientConnection(self.anthropic), LOOPBACK, self.port), 10)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None and not conn.closed:
                conn.transport.close()

    def check(self, phase: Phase, reply: Reply) -> None:
        body = reply.body
        if reply.status != 200:
            return phase.error("http_%d" % reply.status, body[:300].decode("utf-8", "replace"))
        if self.stream:
            if self.anthropic:
                if b"event: error" in body:
                    return phase.error("stream_error_event", body[body.find(b"event: error"):][:300])
                if not body[body.rfind(b"event: "):].startswith(b"event: message_stop"):
                    return phase.error("bad_stream_end", body[-300:])
                events = body.count(b"event: content_block_delta")
            else:
                if not body.rstrip().endswith(b"data: [DONE]"):
                    return phase.error("bad_stream_end", body[-300:])
                # the fake's own serialization: non-empty content chunks + tool argument fragments
                events = (body.count(b'"delta":{"content":"') - body.count(b'"delta":{"content":""')
                          + body.count(b'"arguments":"') - body.count(b'"arguments":""'))
            if reply.t_content is None:
                return phase.error("no_content_delta", body[:300])
            phase.ttfb.append(reply.t_first - reply.t_sent)
            phase.ttft.append(reply.t_content - reply.t_sent)
            phase.content_events.append(events)
        else:
            try:
                document = json.loads(body)
            except ValueError:
                return phase.error("invalid_json", body[:300])
            if self.anthropic:
                valid = (isinstance(document, dict) and document.get("type") == "message"
                         and isinstance(document.get("content"), list) and bool(document["content"]))
            else:
                valid = isinstance(document, dict) and document.get("object") == "chat.completion" \
                    and bool(document.get("choices"))
            if not valid:
                return phase.error("invalid_body", body[:300])
        phase.ok += 1
        phase.latency.append(reply.t_end - reply.t_sent)

    async def run(self, requests: int = 0, duration: float = 0.0, max_time: float = 300.0) -> Phase:
        """`requests` requests in all, or as many as fit in `duration` seconds."""
        phase = Phase()
        remaining = [requests]
        start = time.perf_counter()
        stop_at = start + (duration if duration else max_time)

        async def worker(slot: int) -> None:
            while True:
                if time.perf_counter() >= stop_at:
                    phase.truncated = not duration
                    return
                if not duration:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                conn = self.conns[slot]
                if conn is None or conn.closed:
                    try:
                        conn = self.conns[slot] = await self._connect()
                        phase.connections_opened += 1
                    except (OSError, asyncio.TimeoutError) as exc:
                        phase.error("connect_error", repr(exc))
                        await asyncio.sleep(0.05)
                        continue
                try:
                    reply = await conn.send(self.payload, self.stream, self.timeout)
                except LoadError as exc:
                    phase.error(exc.kind, exc.detail)
                    continue
                self.check(phase, reply)

        cpu = time.process_time()
        await asyncio.gather(*(worker(slot) for slot in range(len(self.conns))))
        phase.duration = time.perf_counter() - start
        phase.loadgen_cpu = time.process_time() - cpu
        return phase


# =============================================================================================
# Processes: start, sample (/proc), stop
# =============================================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
STRIPPED_PREFIXES = ("OPENAI_", "ANTHROPIC_", "AZURE_")
PROXY_SETTINGS = ("BIG_MODEL", "MIDDLE_MODEL", "SMALL_MODEL", "HOST", "PORT", "LOG_LEVEL",
                  "MAX_TOKENS_LIMIT", "REQUEST_TIMEOUT", "CONNECT_TIMEOUT", "PING_INTERVAL")

try:                                    # Linux: children get SIGTERM if this process dies
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (ImportError, OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)       # PR_SET_PDEATHSIG


def proc_cpu_s(pid: int) -> Optional[Tuple[float, float]]:
    """(utime, stime) of a process, all its threads, in seconds; None without /proc."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_s() -> Optional[float]:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat), None without /proc."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / CLK_TCK      # minus idle and iowait
    except (OSError, ValueError, IndexError):
        return None


def cpu_used(before: Optional[Tuple[float, float]], after: Optional[Tuple[float, float]]
             ) -> Optional[Tuple[float, float]]:
    if before is None or after is None:
        return None
    return after[0] - before[0], after[1] - before[1]


def proc_mem_mb(pid: int, field: str = "VmRSS") -> Optional[float]:
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


class Children:
    """The processes this run started; stop_all() ends exactly those."""

    def __init__(self, workdir: str, keep_logs: bool) -> None:
        self.workdir = workdir
        self.keep_logs = keep_logs
        self.announced = False
        self.procs: List[subprocess.Popen] = []

    def start(self, name: str, cmd: List[str], env: Dict[str, str], cwd: str,
              timeout: float = 30.0) -> Tuple[subprocess.Popen, int, str]:
        """Start `cmd` with output to <workdir>/<name>.log; wait for its banner. -> (proc, port, log)."""
        log_path = os.path.join(self.workdir, name + ".log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True,
                                    preexec_fn=_die_with_parent if _PRCTL else None)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(log_path, "rb") as log:
                match = BANNER.search(log.read().decode("utf-8", "replace"))
            if match:
                return proc, int(match.group(2)), log_path
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("%s did not start (exit status %s); last output:\n%s" % (
            name, proc.poll(), tail(log_path)))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def cleanup(self) -> None:
        """Stop the children and remove the work folder (unless --keep-logs). Idempotent."""
        self.stop_all()
        if self.keep_logs:
            if not self.announced:
                self.announced = True
                print("logs kept in %s" % self.workdir, file=sys.stderr)
        elif os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as handle:
            return b"\n".join(handle.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return ""


def fake_call(port: int, method: str, path: str) -> Dict[str, Any]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class RssSampler:
    """Peak VmRSS of a process, sampled every 100 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = proc_mem_mb(pid) or 0.0
        self.task: Optional[asyncio.Future] = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, proc_mem_mb(self.pid) or 0.0)
            await asyncio.sleep(0.1)

    def __enter__(self) -> "RssSampler":
        self.task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.task.cancel()
        self.peak = max(self.peak, proc_mem_mb(self.pid) or 0.0)


# =============================================================================================
# Running the scenarios
# =============================================================================================


def percentiles(values: List[float], scale: float = 1000.0) -> Dict[str, Any]:
    """Nearest-rank percentiles (ms by default)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return round(ordered[max(0, min(n - 1, -(-int(p * n) // 100) - 1))] * scale, 3)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(ordered[-1] * scale, 3),
            "mean": round(sum(ordered) / n * scale, 3), "n": n}


class Bench:
    def __init__(self, args: argparse.Namespace, fake_pid: int, fake_port: int, proxy_pid: int,
                 proxy_port: int, bodies: Dict[str, Dict[str, Any]]) -> None:
        self.args = args
        self.fake_pid, self.fake_port = fake_pid, fake_port
        self.proxy_pid, self.proxy_port = proxy_pid, proxy_port
        self.bodies = bodies

    def payload(self, scenario: Scenario, direct: bool) -> bytes:
        request = self.bodies[scenario.body]
        if direct:
            body = json.dumps(to_chat_completions(request, scenario.stream)).encode()
            return http_request("/v1/chat/completions", self.fake_port, body, {"Authorization": "Bearer dummy"})
        body = json.dumps(with_stream(request, scenario.stream)).encode()
        path = "/v1/messages?beta=true" if scenario.body == "cc" else "/v1/messages"
        return http_request(path, self.proxy_port, body, {
            "x-api-key": "bench", "anthropic-version": "2023-06-01",
            "Accept": "text/event-stream" if scenario.stream else "application/json"})

    async def run_one(self, scenario: Scenario, direct: bool) -> Dict[str, Any]:
        payload = self.payload(scenario, direct)
        load = Load(self.fake_port if direct else self.proxy_port, payload, not direct, scenario.stream,
                    scenario.concurrency, self.args.timeout)
        try:
            with RssSampler(self.proxy_pid) as rss:
                warm = await load.run(requests=scenario.warmup, max_time=self.args.max_run_time)
                fake_call(self.fake_port, "POST", "/stats/reset")
                proxy_cpu0, fake_cpu0 = proc_cpu_s(self.proxy_pid), proc_cpu_s(self.fake_pid)
                own_cpu0, busy0 = proc_cpu_s(os.getpid()), machine_busy_s()
                if warm.ok:
                    measured = await load.run(requests=scenario.requests, duration=scenario.duration,
                                              max_time=self.args.max_run_time)
                else:                                # nothing works: do not wait out the timeouts
                    measured = Phase()
                    measured.error("not_measured", "every warm-up request failed")
                proxy_cpu = cpu_used(proxy_cpu0, proc_cpu_s(self.proxy_pid))
                fake_cpu = cpu_used(fake_cpu0, proc_cpu_s(self.fake_pid))
                own_cpu, busy1 = cpu_used(own_cpu0, proc_cpu_s(os.getpid())), machine_busy_s()
                upstream = fake_call(self.fake_port, "GET", "/stats")
        finally:
            load.close()
        served = measured.ok + measured.errors
        result: Dict[str, Any] = {
            "requests": served, "ok": measured.ok, "errors": measured.errors + warm.errors,
            "error_kinds": measured.error_kinds, "error_samples": measured.error_samples,
            "warmup": {"requests": scenario.warmup, "errors": warm.errors, "error_kinds": warm.error_kinds,
                       "error_samples": warm.error_samples, "duration_s": round(warm.duration, 3)},
            "duration_s": round(measured.duration, 3),
            "throughput_rps": round(measured.ok / measured.duration, 2) if measured.duration else 0.0,
            "latency_ms": percentiles(measured.latency),
            "request_bytes": len(payload),
            "client_connections_opened": measured.connections_opened,
            "loadgen_cpu_s": round(measured.loadgen_cpu, 3),
            # CPU the rest of the machine used meanwhile (other processes, interrupts): noise
            # (10 ms ticks: meaningless for runs under a second, and a few hundredths either way)
            "other_cpu_cores": max(0.0, round((busy1 - busy0 - sum(own_cpu) - sum(proxy_cpu) - sum(fake_cpu))
                                              / measured.duration, 2))
            if None not in (busy0, busy1, own_cpu, proxy_cpu, fake_cpu) and measured.duration >= 1.0 else None,
            "truncated": measured.truncated or warm.truncated,
            "upstream": {
                "requests": upstream["requests"], "bad_requests": upstream["bad_requests"],
                "requests_per_client_request": round(upstream["requests"] / served, 3) if served else None,
                "new_connections": upstream["new_chat_connections"],
                "connections_used": upstream["chat_connections_used"],
                "open_connections_peak": upstream["open_chat_connections_peak"],
                "request_body_bytes_avg": round(upstream["request_bytes"] / upstream["requests"])
                if upstream["requests"] else None,
                "stream_ms_avg": round(upstream["stream_seconds"] * 1000 / upstream["stream_requests"], 3)
                if upstream["stream_requests"] else None,
                "cpu_ms_per_request": round(sum(fake_cpu) * 1000 / served, 4) if served and fake_cpu else None,
            },
        }
        if upstream["bad_requests"]:
            result["errors"] += upstream["bad_requests"]
            result["error_kinds"]["upstream_bad_request"] = upstream["bad_requests"]
        if scenario.stream:
            result["ttfb_ms"] = percentiles(measured.ttfb)
            result["ttft_ms"] = percentiles(measured.ttft)
            events = measured.content_events
            result["content_events_per_response"] = round(sum(events) / len(events), 2) if events else None
        if not direct:
            per_request = (lambda seconds: round(seconds * 1000 / served, 4) if proxy_cpu and served else None)
            cpu = sum(proxy_cpu) if proxy_cpu else None
            result["proxy"] = {
                "cpu_ms_per_request": per_request(cpu),
                "cpu_user_ms_per_request": per_request(proxy_cpu[0]) if proxy_cpu else None,
                "cpu_sys_ms_per_request": per_request(proxy_cpu[1]) if proxy_cpu else None,
                "cpu_cores_used": round(cpu / measured.duration, 3) if cpu is not None and measured.duration else None,
                "rss_peak_mb": round(rss.peak, 1),
                "alive": proc_cpu_s(self.proxy_pid) is not None,
            }
        return result

    async def run_scenario(self, scenario: Scenario) -> Dict[str, Any]:
        direct = await self.run_one(scenario, direct=True)
        proxy = await self.run_one(scenario, direct=False)
        return {"config": scenario._asdict(), "direct": direct, "proxy": proxy,
                "headline": headline(scenario, direct, proxy)}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def _minus(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a - b, 3) if a is not None and b is not None else None


def headline(scenario: Scenario, direct: Dict[str, Any], proxy: Dict[str, Any]) -> Dict[str, Any]:
    d, p = direct["latency_ms"], proxy["latency_ms"]
    line: Dict[str, Any] = {
        "direct_p50_ms": d.get("p50"), "proxy_p50_ms": p.get("p50"),
        "direct_p99_ms": d.get("p99"), "proxy_p99_ms": p.get("p99"),
        "overhead_p50_ms": _minus(p.get("p50"), d.get("p50")),
        "overhead_p99_ms": _minus(p.get("p99"), d.get("p99")),
        "p50_ratio": _ratio(p.get("p50"), d.get("p50")), "p99_ratio": _ratio(p.get("p99"), d.get("p99")),
        "direct_rps": direct["throughput_rps"], "proxy_rps": proxy["throughput_rps"],
        "throughput_ratio": _ratio(proxy["throughput_rps"], direct["throughput_rps"]),
        "proxy_cpu_ms_per_request": proxy["proxy"]["cpu_ms_per_request"],
        "proxy_cpu_cores_used": proxy["proxy"]["cpu_cores_used"],
        "proxy_rss_peak_mb": proxy["proxy"]["rss_peak_mb"],
        "upstream_new_connections": proxy["upstream"]["new_connections"],
        "upstream_connections_used": proxy["upstream"]["connections_used"],
        "upstream_open_connections_peak": proxy["upstream"]["open_connections_peak"],
        "upstream_requests_per_proxied_request": proxy["upstream"]["requests_per_client_request"],
        "direct_errors": direct["errors"], "proxy_errors": proxy["errors"],
    }
    if scenario.stream:
        for name in ("ttfb", "ttft"):
            dd, pp = direct[name + "_ms"], proxy[name + "_ms"]
            line.update({
                "direct_%s_p50_ms" % name: dd.get("p50"), "proxy_%s_p50_ms" % name: pp.get("p50"),
                "%s_overhead_p50_ms" % name: _minus(pp.get("p50"), dd.get("p50")),
                "direct_%s_p99_ms" % name: dd.get("p99"), "proxy_%s_p99_ms" % name: pp.get("p99"),
                "%s_overhead_p99_ms" % name: _minus(pp.get("p99"), dd.get("p99")),
            })
        line["content_events_per_response"] = [direct["content_events_per_response"],
                                               proxy["content_events_per_response"]]
    return line


# =============================================================================================
# Report
# =============================================================================================


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return ("%.*f" % (digits, value)) if abs(value) < 1000 else ("%.0f" % value)
    return str(value)


def scenario_block(scenario: Scenario, result: Dict[str, Any]) -> str:
    direct, proxy = result["direct"], result["proxy"]
    shape = "%d requests" % proxy["requests"] if scenario.requests else "%.0f s" % scenario.duration
    out = ["", "== %s %s: %s, concurrency %d, %s, %.1f KB request ==" % (
        scenario.key, scenario.name, "stream" if scenario.stream else "non-stream", scenario.concurrency,
        shape, proxy["request_bytes"] / 1024.0),
        "  %-30s %11s %11s %9s %11s" % ("", "direct", "proxy", "ratio", "overhead")]

    def row(label: str, d: Any, p: Any, overhead: bool = True, digits: int = 3) -> None:
        ratio = _ratio(p, d)
        out.append("  %-30s %11s %11s %9s %11s" % (
            label, _fmt(d, digits), _fmt(p, digits), ("%.2fx" % ratio) if ratio is not None else "-",
            ("%+.3f" % (p - d)) if overhead and d is not None and p is not None else ""))

    if scenario.stream:
        for name, label in (("ttfb", "TTFB"), ("ttft", "TTFT (first content)")):
            row(label + " p50 ms", direct[name + "_ms"].get("p50"), proxy[name + "_ms"].get("p50"))
            row(label + " p99 ms", direct[name + "_ms"].get("p99"), proxy[name + "_ms"].get("p99"))
    total = "total (last byte)" if scenario.stream else "latency"
    row(total + " p50 ms", direct["latency_ms"].get("p50"), proxy["latency_ms"].get("p50"))
    row(total + " p99 ms", direct["latency_ms"].get("p99"), proxy["latency_ms"].get("p99"))
    row("throughput req/s", direct["throughput_rps"], proxy["throughput_rps"], overhead=False, digits=1)
    if scenario.stream:
        row("content events / response", direct["content_events_per_response"],
            proxy["content_events_per_response"], overhead=False, digits=1)
    out.append("  %-30s %11s %11s" % ("errors (incl. warm-up)", direct["errors"], proxy["errors"]))
    p, u = proxy["proxy"], proxy["upstream"]
    out.append("  proxy: CPU %s ms/req (user %s + sys %s; %s cores), RSS peak %s MB" % (
        _fmt(p["cpu_ms_per_request"]), _fmt(p["cpu_user_ms_per_request"]), _fmt(p["cpu_sys_ms_per_request"]),
        _fmt(p["cpu_cores_used"], 2), _fmt(p["rss_peak_mb"], 1)))
    out.append("  upstream via proxy: %s new connections, %s used, peak %s open; %s upstream requests "
               "per request; upstream body %s B (direct %s B)" % (
                   u["new_connections"], u["connections_used"], u["open_connections_peak"],
                   _fmt(u["requests_per_client_request"], 2), _fmt(u["request_body_bytes_avg"]),
                   _fmt(direct["upstream"]["request_body_bytes_avg"])))
    out.append("  harness, proxy run: load generator %s cores, fake upstream %s ms CPU/req (direct run: %s cores);"
               " rest of the machine %s / %s cores (direct / proxy run)" % (
                   _fmt(proxy["loadgen_cpu_s"] / proxy["duration_s"] if proxy["duration_s"] else None, 2),
                   _fmt(u["cpu_ms_per_request"]),
                   _fmt(direct["loadgen_cpu_s"] / direct["duration_s"] if direct["duration_s"] else None, 2),
                   _fmt(direct["other_cpu_cores"], 2), _fmt(proxy["other_cpu_cores"], 2)))
    noisy = max(direct["other_cpu_cores"] or 0, proxy["other_cpu_cores"] or 0)
    if noisy > 0.25:
        out.append("  !! other processes used %.2f cores meanwhile: these figures are noisy, run again" % noisy)
    if scenario.stream:
        out.append("  upstream stream duration as the fake saw it: %s ms via proxy, %s ms direct" % (
                       _fmt(u["stream_ms_avg"]), _fmt(direct["upstream"]["stream_ms_avg"])))
    for side, run in (("direct", direct), ("proxy", proxy)):
        if run["client_connections_opened"]:
            out.append("  !! %s: the client had to reconnect %d times while measuring (keep-alive broken?)" % (
                side, run["client_connections_opened"]))
        if run["errors"]:
            out.append("  !! %s errors: %s (warm-up: %s)" % (side, run["error_kinds"], run["warmup"]["error_kinds"]))
            for sample in (run["error_samples"] + run["warmup"]["error_samples"])[:5]:
                out.append("     " + sample)
        if run["truncated"]:
            out.append("  !! %s run hit --max-run-time and was cut short" % side)
    return "\n".join(out)


def overview_table(scenarios: List[Scenario], results: Dict[str, Dict[str, Any]]) -> str:
    header = ("scenario", "direct p50", "proxy p50", "+p50 ms", "direct p99", "proxy p99", "+p99 ms",
              "p50 x", "thru x", "proxy rps", "cpu ms/req", "rss MB", "new conns", "errors")
    rows = [header]
    for scenario in scenarios:
        if scenario.name not in results:
            continue
        line = results[scenario.name]["headline"]
        rows.append((
            "%s %s" % (scenario.key, scenario.name), _fmt(line["direct_p50_ms"]), _fmt(line["proxy_p50_ms"]),
            _fmt(line["overhead_p50_ms"]), _fmt(line["direct_p99_ms"]), _fmt(line["proxy_p99_ms"]),
            _fmt(line["overhead_p99_ms"]), _fmt(line["p50_ratio"], 2), _fmt(line["throughput_ratio"], 2),
            _fmt(line["proxy_rps"], 0), _fmt(line["proxy_cpu_ms_per_request"]), _fmt(line["proxy_rss_peak_mb"], 1),
            str(line["upstream_new_connections"]), "%s/%s" % (line["direct_errors"], line["proxy_errors"])))
        if scenario.stream:
            rows.append(("  ttft (first content)", _fmt(line["direct_ttft_p50_ms"]), _fmt(line["proxy_ttft_p50_ms"]),
                         _fmt(line["ttft_overhead_p50_ms"]), _fmt(line["direct_ttft_p99_ms"]),
                         _fmt(line["proxy_ttft_p99_ms"]), _fmt(line["ttft_overhead_p99_ms"]),
                         _fmt(_ratio(line["proxy_ttft_p50_ms"], line["direct_ttft_p50_ms"]), 2),
                         "", "", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# =============================================================================================
# Command line
# =============================================================================================


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark claude_proxy.py against a fake OpenAI upstream, direct vs proxied "
                    "(see the docstring at the top of this file for how to read the figures).")
    parser.add_argument("--quick", action="store_true", help="short smoke run (~15 s)")
    parser.add_argument("--json", metavar="FILE", help="write every figure (all runs in full) to FILE")
    parser.add_argument("--scenarios", default="a,b,c,d1,d2", help="comma-separated subset (default: all)")
    parser.add_argument("--proxy", default=os.path.join(HERE, "claude_proxy.py"),
                        help="the proxy script to run (default: claude_proxy.py next to this file)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment variable for the proxy (repeatable)")
    parser.add_argument("--body", metavar="FILE",
                        help="captured Anthropic request for d1/d2 (JSON with a top-level 'body', or the request)")
    parser.add_argument("--b-concurrency", type=int, default=32, help="connections in scenario b (default 32)")
    parser.add_argument("--b-duration", type=float, default=0.0, help="seconds of scenario b (default 10, quick 3)")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per upstream stream (default 50)")
    parser.add_argument("--chunk-delay-ms", type=float, default=2.0, help="gap between stream chunks (default 2)")
    parser.add_argument("--upstream-latency-ms", type=float, default=0.0,
                        help="simulated model time before a non-stream answer / the first stream chunk")
    parser.add_argument("--content-bytes", type=int, default=512, help="text in a non-stream answer (default 512)")
    parser.add_argument("--tool-calls", action="store_true",
                        help="the fake also answers with a tool call (named after the request's first tool)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    parser.add_argument("--max-run-time", type=float, default=120.0, help="cap on any one load run, seconds")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work folder with the children's logs")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--max-lifetime", type=float, default=3600.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def proxy_setting_names(proxy: str) -> List[str]:
    """The environment variables the proxy reads, from its own --check table (first column),
    so settings added later are stripped too; the static list if that fails."""
    names = set(PROXY_SETTINGS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_PREFIXES)}
    try:
        out = subprocess.run([sys.executable, proxy, "--check", "--env-file", os.devnull], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=30, check=False).stdout.decode("utf-8", "replace")
        names.update(line.split()[0] for line in out.splitlines()
                     if line.split() and re.match(r"^[A-Z][A-Z0-9_]+$", line.split()[0]))
    except (OSError, subprocess.SubprocessError):
        pass
    return sorted(names)


def proxy_environment(proxy: str, fake_port: int, extra: List[str]) -> Dict[str, str]:
    """Our environment without a developer's real keys or proxy settings, pointed at the fake."""
    settings = proxy_setting_names(proxy)
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_PREFIXES) and k not in settings}
    env.update(OPENAI_BASE_URL="http://%s:%d/v1" % (LOOPBACK, fake_port), OPENAI_API_KEY="dummy",
               LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit("--env wants K=V, got %r" % item)
        env[key] = value
    return env


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_fake is not None:
        return serve_fake(args)
    started = time.monotonic()
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    scenarios = [s for s in build_scenarios(args) if s.key in wanted or s.name in wanted]
    if not scenarios:
        raise SystemExit("--scenarios: none of %r (choose from a, b, c, d1, d2)" % args.scenarios)
    if not os.path.isfile(args.proxy):
        raise SystemExit("proxy script not found: %s (run from the project root, or pass --proxy)" % args.proxy)
    bodies = {"small": small_request(),
              "cc": load_body_file(args.body) if args.body else claude_code_request()}
    with open(args.proxy, "rb") as handle:
        proxy_sha1 = hashlib.sha1(handle.read()).hexdigest()

    children = Children(tempfile.mkdtemp(prefix="bench-claude-proxy-"), args.keep_logs)
    atexit.register(children.cleanup)

    def on_signal(signum: int, frame: Any) -> None:
        # Straight out, from wherever the run is (the event loop included): stop the children,
        # remove the work folder, exit 128+signal. Partial results are not written.
        os.write(2, b"\ninterrupted (signal %d); stopping the children\n" % signum)
        children.cleanup()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    loadavg_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    summary: Dict[str, Any] = {}
    results: Dict[str, Dict[str, Any]] = {}
    try:
        fake_cmd = [sys.executable, os.path.abspath(__file__), "--serve-fake", "0",
                    "--chunks", str(args.chunks), "--chunk-delay-ms", str(args.chunk_delay_ms),
                    "--upstream-latency-ms", str(args.upstream_latency_ms),
                    "--content-bytes", str(args.content_bytes), "--max-lifetime", "3600"]
        if args.tool_calls:
            fake_cmd.append("--tool-calls")
        fake, fake_port, _ = children.start("fake_openai", fake_cmd, dict(os.environ), HERE)
        # --env-file /dev/null: a developer's .env (keys, ANTHROPIC_API_KEY, limits) stays out of it.
        proxy_cmd = [sys.executable, args.proxy, "--host", LOOPBACK, "--port", "0", "--env-file", os.devnull]
        t0 = time.monotonic()
        proxy, proxy_port, proxy_log = children.start(
            "proxy", proxy_cmd, proxy_environment(args.proxy, fake_port, args.env), os.path.dirname(os.path.abspath(args.proxy)))
        startup_s = time.monotonic() - t0
        time.sleep(0.3)
        rss_idle = proc_mem_mb(proxy.pid)
        print("bench_claude_proxy: %s (sha1 %s), Python %s, %d CPUs; fake upstream :%d, proxy :%d (pid %d)" % (
            os.path.relpath(args.proxy), proxy_sha1[:10], platform.python_version(), os.cpu_count() or 0,
            fake_port, proxy_port, proxy.pid), flush=True)
        print("request bodies: small %.1f KB, Claude Code-shaped %.1f KB (%d tools)%s" % (
            len(json.dumps(bodies["small"])) / 1024.0, len(json.dumps(bodies["cc"])) / 1024.0,
            len(bodies["cc"].get("tools") or ()), " from " + args.body if args.body else ""), flush=True)

        bench = Bench(args, fake.pid, fake_port, proxy.pid, proxy_port, bodies)
        for scenario in scenarios:
            results[scenario.name] = asyncio.run(bench.run_scenario(scenario))
            print(scenario_block(scenario, results[scenario.name]), flush=True)
            if proxy.poll() is not None:
                print("!! the proxy exited (status %s); log tail:\n%s" % (proxy.returncode, tail(proxy_log)))
                break
        summary = {
            "tool": "bench_claude_proxy",
            "proxy_file": os.path.abspath(args.proxy), "proxy_sha1": proxy_sha1,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "loadavg_before": loadavg_before,
                        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "config": {"quick": args.quick, "chunks": args.chunks, "chunk_delay_ms": args.chunk_delay_ms,
                       "upstream_latency_ms": args.upstream_latency_ms, "content_bytes": args.content_bytes,
                       "tool_calls": args.tool_calls, "body": args.body,
                       "body_bytes": {k: len(json.dumps(v)) for k, v in bodies.items()}},
            "proxy_process": {"startup_s": round(startup_s, 3), "rss_idle_mb": rss_idle,
                              "rss_end_mb": proc_mem_mb(proxy.pid), "vmhwm_mb": proc_mem_mb(proxy.pid, "VmHWM"),
                              "alive_at_end": proxy.poll() is None},
            "scenarios": {name: r["headline"] for name, r in results.items()},
        }
        if proxy.poll() is not None:
            summary["proxy_process"]["log_tail"] = tail(proxy_log)
    except RuntimeError as exc:
        print("bench_claude_proxy: %s" % exc, file=sys.stderr)
        return 2
    finally:
        children.cleanup()

    errors = sum(r["direct"]["errors"] + r["proxy"]["errors"] for r in results.values())
    failed = sorted(name for name, r in results.items() if r["direct"]["errors"] or r["proxy"]["errors"])
    incomplete = len(results) < len(scenarios) or not summary["proxy_process"]["alive_at_end"]
    summary["errors"] = errors
    summary["failed_scenarios"] = failed
    summary["total_s"] = round(time.monotonic() - started, 1)
    proc = summary["proxy_process"]
    print("\n== summary (ms; ratio = proxy/direct; 'new conns' = upstream connections opened while measuring) ==")
    print(overview_table(scenarios, results))
    print("proxy RSS: idle %s MB, end %s MB, lifetime peak (VmHWM) %s MB; startup %.2f s; total %.1f s" % (
        _fmt(proc["rss_idle_mb"], 1), _fmt(proc["rss_end_mb"], 1), _fmt(proc["vmhwm_mb"], 1),
        proc["startup_s"], summary["total_s"]))
    print("\nJSON summary (one line):")
    print(json.dumps(summary, separators=(",", ":")))
    if args.json:
        full = dict(summary, runs={name: {"config": r["config"], "direct": r["direct"], "proxy": r["proxy"]}
                                   for name, r in results.items()})
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(full, handle, indent=1)
        print("full results written to %s" % args.json)
    if failed or incomplete:
        print("\nFAILED: %s" % (("errors in " + ", ".join(failed)) if failed else "the proxy died or a scenario did not run"),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
