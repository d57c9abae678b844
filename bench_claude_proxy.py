#!/usr/bin/env python3
"""bench_claude_proxy.py: what claude_proxy.py adds in latency, CPU and memory.

Run it from the project root (Python 3.8+, standard library only, 127.0.0.1 only)::

    python3 bench_claude_proxy.py                    # about 90 s
    python3 bench_claude_proxy.py --quick            # about 30 s
    python3 bench_claude_proxy.py --smoke --json f   # about 15 s; exit 0 only if every figure came out (CI)
    python3 bench_claude_proxy.py --json bench.json  # also write every figure to a file
    python3 bench_claude_proxy.py --body capture.json --scenarios d1,d2   # your own request
    python3 bench_claude_proxy.py --workers 4        # the proxy run as 4 processes

Options change the load: --concurrency (64: scenarios b and load), --stream-concurrency (16:
scenario c), --duration (measured seconds of every run), --body (small, cc or a captured
request, for every scenario), --chunks and --chunk-delay-ms (the fake's streams: 50, 2 ms),
--upstream-latency-ms (the fake's model time, 0), --load-latency-ms (the same in the load
scenario, 20), --workers (passed to the proxy as --workers N when N > 1).

One run starts a fast fake OpenAI upstream (this file run as ``--serve-fake``: asyncio,
HTTP/1.1 keep-alive, JSON answers and SSE streams) and the proxy itself (``claude_proxy.py
--port 0``, pointed at the fake; its start-up line "listening on http://HOST:PORT" is read from
stdout or stderr). For each scenario an asyncio keep-alive load generator sends the same load
twice, after a warm-up each time: first the equivalent Chat Completions request straight to
the fake ("direct": the baseline, what the harness itself costs), then the Anthropic request
through the proxy ("proxy"). Bodies: "small" (4 KB: two system blocks, a tool round trip, 2
tools) and "cc" (Claude Code-shaped, ~90 KB: billing-header and cached system blocks, 25 tools
with JSON schemas, two tool round trips, a mid-conversation system message, thinking).

  a     nonstream_c1     small, non-stream, 1 connection: the proxy's cost per request
  b     nonstream_c64    small, non-stream, 64 connections: throughput, peak memory, pool reuse
  c     stream_c16       small, streamed (50 content chunks 2 ms apart), 16 connections: TTFB,
                         TTFT, total time, CPU per stream
  d1    cc_nonstream_c1  cc, non-stream, 1 connection: the cost of a big request
  d2    cc_stream_c4     cc, streamed, 4 connections
  load  load_mixed_c64   robustness: 64 connections, each cycling small non-stream, small
                         stream, cc non-stream, cc stream, against an upstream that takes
                         20 ms (--load-latency-ms) before answering or streaming

Before the scenarios, start-up is timed (--startup-samples, 5; 3 with --smoke): the proxy and
a baseline (the same Python importing http.server, http.client and json and listening on a
port, nothing else) are started alternately, and each time the clock runs from spawn to the
banner, which both print once their socket listens; the median is reported. The baseline's
RSS, read 0.3 s after its banner as the proxy's idle RSS is, is the memory any stdlib HTTP
proxy costs before its own code.

The figures table at the end has one row per figure: a direct column (the same load straight
to the fake, or the baseline named in the last column), the proxy's, ratio = proxy / direct
and added = proxy - direct. Its rows, with their JSON keys (--json FILE, "figures"):
- added latency p50, c1, 4 KB non-stream (latency_*, scenario a): the proxy's own work per
  request. The fake answers in ~0.05 ms, so the ratio is large by construction: read the ms.
- CPU per request, 4 KB and ~90 KB non-stream (cpu_small_*, cpu_cc_*; scenarios a, d1): the
  proxy's utime+stime over the measured phase / its requests, beside the fake upstream's own
  CPU per request in the same run (it parses the same JSON and answers); the ratio is the
  proxy's cost in units of a minimal server's (the target is at most 5x).
- throughput, c64 non-stream (throughput_*, scenario b): ok responses per second. The direct
  figure is the harness's ceiling (load generator + fake share the cores with the proxy), not
  a target; throughput_proxy_cores ~1.0 means one proxy process is saturated (one GIL).
- stream total p50 and TTFT p50 (stream_*, scenario c): total = request written -> last byte;
  TTFT = -> first non-empty content delta (text, tool arguments or thinking); TTFB (first
  response byte) is in the scenario block: a proxy can send headers early, TTFT is the one that
  counts. The fake sends chunk i at a fixed time after the first (a late wake-up is caught up),
  so the upstream's pacing is the same both ways ("upstream stream duration" shows it) and the
  added total time is the proxy's lag. CPU per stream: as CPU per request, beside the fake's.
- RSS idle (rss_idle_mb, rss_baseline_mb, rss_idle_minus_baseline_mb): the proxy 0.3 s after
  start, before any request, against the baseline above; the difference is the proxy's code
  and data.
- RSS peak, c64 (rss_peak_mb): sampled every 100 ms during scenario b, beside the idle RSS.
- start-up to listening (startup_*_median_ms): see above.
- upstream connections, c64 after warm-up (upstream_new_connections, _reused_connections,
  _closed_connections, upstream_requests): TCP connections to the fake that carried chat
  requests during scenario b's measured phase: "new" were opened during it, "reused" were
  kept alive from the warm-up, "closed" were closed during it (by either side). 0 new = the
  pool holds every connection the load needs; a few new and 0 closed = the pool still growing
  to the number of requests in flight at once; new ~ closed ~ requests = no reuse.
- load (load_*): errors over both phases of the proxied run (must be 0); streams complete =
  streams that ended with message_stop, without an error event, carrying every content chunk
  the fake sent, of the streams sent; non-stream and stream p50 beside direct; RSS at the
  start of the measured phase (after the warm-up), halfway, at its end, and the peak. Memory
  is flat when end - start (load_rss_growth_mb) and, above all, end - halfway
  (load_rss_growth_second_half_mb) stay near 0; a long run (--scenarios load --duration 60)
  tells a leak from a ramp-up. The scenario block prints the RSS once a second.
Each scenario's block also shows p99, TTFB, throughput, content events per stream, CPU split
user/sys and cores used, RSS at the run's start, end and peak, and the harness's own load.

How to read them:
- At concurrency 1 the added latency is the proxy's own work; under concurrency it also holds
  queueing behind other requests.
- CPU: /proc counts in 10 ms ticks, so a run with under ~1 s of proxy CPU is coarse (--smoke).
- The proxy may be several processes (--workers): its CPU and RSS are sums over its process
  tree (the PID started and its descendants). Forked workers share pages, so summed RSS
  overstates their memory.
- rest of the machine: CPU used meanwhile by processes other than the proxy, the fake and this
  one (/proc/stat, interrupts left out). Above 0.25 cores a warning says the run was
  disturbed: run it again. On a 2-core machine, compare runs made the same way; p50 and CPU
  per request are the most stable figures, p99 the least.
A scenario with any error (non-200, a body that is not a message, a stream not ending in
message_stop or missing content, an event: error, a timeout, a 400 at the fake) prints
samples; exit status 1, as when the proxy dies or (all scenarios run) a figure is missing.
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
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPBACK = "127.0.0.1"
# The start-up line of the proxy and of every child here, on stdout or stderr (both are read).
BANNER = re.compile(r"listening on https?://(\[[0-9a-fA-F:.]+\]|[\w.-]+):(\d+)")


# =============================================================================================
# Scenarios
# =============================================================================================


class Scenario(NamedTuple):
    key: str
    name: str
    kinds: Tuple[Tuple[str, bool], ...]  # (body, stream) requests; each connection cycles through
                                         # them, starting at its own index. Body "small" (4 KB) or
                                         # "cc" (Claude Code-shaped, ~90 KB)
    concurrency: int
    duration: float                      # measured seconds
    warmup: int                          # requests sent on the same connections before measuring
    upstream_latency_ms: float           # the fake's simulated model time for this scenario

    @property
    def stream(self) -> bool:
        """Every request streams."""
        return all(stream for _, stream in self.kinds)

    @property
    def mixed(self) -> bool:
        """Stream and non-stream requests both."""
        return len(set(stream for _, stream in self.kinds)) > 1


SCENARIO_KEYS = ("a", "b", "c", "d1", "d2", "load")
DURATIONS = {           # measured seconds of each run (direct and proxy): default, --quick, --smoke
    "a": (5.0, 1.5, 0.8), "b": (8.0, 1.5, 0.8), "c": (5.0, 1.5, 0.8),
    "d1": (5.0, 1.5, 0.8), "d2": (5.0, 1.5, 0.8), "load": (10.0, 3.0, 1.5),
}


def build_scenarios(args: argparse.Namespace) -> List[Scenario]:
    mode = 2 if args.smoke else 1 if args.quick else 0

    def seconds(key: str) -> float:
        return args.duration or DURATIONS[key][mode]

    conc, stream_conc, latency = args.concurrency, args.stream_concurrency, args.upstream_latency_ms
    scenarios = [
        Scenario("a", "nonstream_c1", (("small", False),), 1, seconds("a"), 200, latency),
        Scenario("b", "nonstream_c%d" % conc, (("small", False),), conc, seconds("b"), 16 * conc, latency),
        Scenario("c", "stream_c%d" % stream_conc, (("small", True),), stream_conc, seconds("c"),
                 2 * stream_conc, latency),
        Scenario("d1", "cc_nonstream_c1", (("cc", False),), 1, seconds("d1"), 30, latency),
        Scenario("d2", "cc_stream_c4", (("cc", True),), 4, seconds("d2"), 8, latency),
        Scenario("load", "load_mixed_c%d" % conc,
                 (("small", False), ("small", True), ("cc", False), ("cc", True)),
                 conc, seconds("load"), 8 * conc, args.load_latency_ms),
    ]
    if args.body:               # one body for every request of every scenario
        scenarios = [s._replace(kinds=tuple((args.body if args.body in ("small", "cc") else "file", stream)
                                            for _, stream in s.kinds)) for s in scenarios]
    return scenarios


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
# then [DONE]. GET /stats and POST /stats/reset serve the counters the report needs;
# POST /config?latency_ms=MS changes the simulated model time between scenarios. Answers
# are pre-encoded once, so the fake costs a few tens of microseconds of CPU per request.

REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 411: b"Length Required"}
COUNTERS = ("requests", "stream_requests", "nonstream_requests", "bad_requests",
            "include_usage_requests", "request_bytes", "stream_seconds", "connections_accepted",
            "new_chat_connections", "chat_connections_used", "chat_connections_closed")


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
            self.state.stats["chat_connections_closed"] += 1

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
            elif method == "POST" and path == "/config":
                query = dict(item.partition("=")[::2] for item in target.partition("?")[2].split("&") if item)
                if "latency_ms" in query:
                    self.state.latency = float(query["latency_ms"]) / 1000.0
                self.reply(200, json.dumps({"latency_ms": self.state.latency * 1000.0}).encode(), keep_alive)
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
        self.sent = {"nonstream": 0, "stream": 0}
        self.kind_ok = {"nonstream": 0, "stream": 0}
        self.kind_latency: Dict[str, List[float]] = {"nonstream": [], "stream": []}
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
    """`concurrency` keep-alive connections posting to 127.0.0.1:`port`; connection i sends
    requests[i % n], requests[(i + 1) % n], ... back to back. A stream is complete when it ends
    properly (message_stop / [DONE]) and carries every one of the fake's `chunks` content
    chunks (the text " token" each)."""

    def __init__(self, port: int, requests: List[Tuple[bytes, bool]], anthropic: bool, concurrency: int,
                 timeout: float, chunks: int) -> None:
        self.port, self.requests, self.anthropic = port, requests, anthropic
        self.timeout, self.chunks = timeout, chunks
        self.conns: List[Optional[ClientConnection]] = [None] * concurrency
        self.next = list(range(concurrency))

    async def _connect(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: ClientConnection(self.anthropic), LOOPBACK, self.port), 10)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None and not conn.closed:
                conn.transport.close()

    def check(self, phase: Phase, reply: Reply, stream: bool) -> None:
        body = reply.body
        if reply.status != 200:
            return phase.error("http_%d" % reply.status, body[:300].decode("utf-8", "replace"))
        if stream:
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
            if body.count(b" token") != self.chunks:
                return phase.error("incomplete_stream", "%d of %d content chunks arrived" % (
                    body.count(b" token"), self.chunks))
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
        kind = "stream" if stream else "nonstream"
        phase.ok += 1
        phase.kind_ok[kind] += 1
        phase.latency.append(reply.t_end - reply.t_sent)
        phase.kind_latency[kind].append(reply.t_end - reply.t_sent)

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
                payload, stream = self.requests[self.next[slot] % len(self.requests)]
                self.next[slot] += 1
                phase.sent["stream" if stream else "nonstream"] += 1
                try:
                    reply = await conn.send(payload, stream, self.timeout)
                except LoadError as exc:
                    phase.error(exc.kind, exc.detail)
                    continue
                self.check(phase, reply, stream)

        cpu = time.process_time()
        await asyncio.gather(*(worker(slot) for slot in range(len(self.conns))))
        phase.duration = time.perf_counter() - start
        phase.loadgen_cpu = time.process_time() - cpu
        return phase


# =============================================================================================
# Processes: start, sample (/proc), stop
# =============================================================================================
# The proxy may be several processes (--workers N: a parent and N children sharing the port),
# so its CPU and memory are those of its whole process tree: the PID we started and every live
# descendant, found through /proc/PID/task/TID/children (each thread can fork) or, where the
# kernel has no such file, by scanning /proc for parent PIDs.

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
STRIPPED_PREFIXES = ("OPENAI_", "ANTHROPIC_", "AZURE_")
PROXY_SETTINGS = ("BIG_MODEL", "MIDDLE_MODEL", "SMALL_MODEL", "HOST", "PORT", "LOG_LEVEL",
                  "MAX_TOKENS_LIMIT", "REQUEST_TIMEOUT", "CONNECT_TIMEOUT", "PING_INTERVAL", "WORKERS")
CHILDREN_FILES = os.path.exists("/proc/%d/task/%d/children" % (os.getpid(), os.getpid()))

try:                                    # Linux: children get SIGTERM if this process dies
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (ImportError, OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)       # PR_SET_PDEATHSIG


def _stat_fields(pid: int) -> List[str]:
    """/proc/PID/stat from field 3 (state) on: [1] is the parent PID, [11:15] utime stime
    cutime cstime."""
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()


def child_pids(pid: int) -> List[int]:
    """The live children of `pid`."""
    found: List[int] = []
    if CHILDREN_FILES:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            return found
        for tid in tids:
            try:
                with open("/proc/%d/task/%s/children" % (pid, tid)) as handle:
                    found.extend(int(x) for x in handle.read().split())
            except (OSError, ValueError):
                pass
        return found
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if name.isdigit():
            try:
                if int(_stat_fields(int(name))[1]) == pid:
                    found.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def process_tree(pid: int) -> List[int]:
    """`pid` and all its live descendants, parents first."""
    tree = [pid]
    i = 0
    while i < len(tree):
        tree.extend(child for child in child_pids(tree[i]) if child not in tree)
        i += 1
    return tree


def proc_cpu_s(pids: List[int]) -> Optional[Tuple[float, float]]:
    """(user, system) CPU seconds of these processes, all threads, plus the children each has
    reaped (a worker that exited is still counted, once, in its parent); None if the first is
    gone or there is no /proc."""
    user = system = 0.0
    for i, pid in enumerate(pids):
        try:
            fields = _stat_fields(pid)
            user += (int(fields[11]) + int(fields[13])) / CLK_TCK
            system += (int(fields[12]) + int(fields[14])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            if i == 0:
                return None
    return user, system


def machine_busy_s() -> Optional[float]:
    """CPU seconds the whole machine has spent running processes (all cores; /proc/stat: user,
    nice, system, steal), None without /proc. Interrupt time is left out: at tens of thousands
    of loopback requests a second it is our own traffic's, not a disturbance."""
    try:
        with open("/proc/stat") as handle:
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = [
                int(x) for x in handle.readline().split()[1:9]]
        return (user + nice + system + steal) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def cpu_used(before: Optional[Tuple[float, float]], after: Optional[Tuple[float, float]]
             ) -> Optional[Tuple[float, float]]:
    if before is None or after is None:
        return None
    return after[0] - before[0], after[1] - before[1]


def proc_mem_mb(pids: List[int], field: str = "VmRSS") -> Optional[float]:
    """Sum of `field` (VmRSS, VmHWM) over these processes in MB; None if the first is gone.
    Forked workers share pages, so a sum over several processes overstates what they use."""
    total = 0
    for i, pid in enumerate(pids):
        try:
            with open("/proc/%d/status" % pid) as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            if i == 0:
                return None
    return total / 1024.0


class Tree:
    """A process we started and its descendants, re-listed at most once a second."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.listed_at = 0.0
        self.members = [pid]

    def pids(self, fresh: bool = False) -> List[int]:
        now = time.monotonic()
        if fresh or now - self.listed_at >= 1.0:
            self.members, self.listed_at = process_tree(self.pid), now
        return self.members

    def cpu_s(self) -> Optional[Tuple[float, float]]:
        return proc_cpu_s(self.pids(fresh=True))

    def rss_mb(self, fresh: bool = False) -> Optional[float]:
        return proc_mem_mb(self.pids(fresh))


class Child:
    """One process this run started. Its stdout and stderr, merged into one pipe, are copied
    line by line to <workdir>/<name>.log by a thread that also notes when the banner
    ("listening on http://HOST:PORT", on either stream) first appears, and its port."""

    def __init__(self, name: str, cmd: List[str], env: Dict[str, str], cwd: str, log_path: str) -> None:
        self.name, self.log_path = name, log_path
        self.port: Optional[int] = None
        self.banner_at: Optional[float] = None
        self.listening = threading.Event()
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                                     preexec_fn=_die_with_parent if _PRCTL else None)
        self.pid = self.proc.pid
        self.tree = Tree(self.pid)
        self.known: List[int] = [self.pid]       # every descendant seen, for stop()
        self.reader = threading.Thread(target=self._copy_output, name=name + "-output", daemon=True)
        self.reader.start()

    def _copy_output(self) -> None:
        with open(self.log_path, "ab") as log:
            for line in iter(self.proc.stdout.readline, b""):
                if self.port is None:
                    match = BANNER.search(line.decode("utf-8", "replace"))
                    if match:
                        self.banner_at = time.monotonic()
                        self.port = int(match.group(2))
                        self.listening.set()
                log.write(line)
                log.flush()
        self.proc.stdout.close()
        self.listening.set()                     # EOF: wake a waiter; port stays None

    def wait_listening(self, timeout: float) -> float:
        """Seconds from spawn to the banner; RuntimeError with the log tail if it never comes."""
        self.listening.wait(timeout)
        if self.port is None:
            raise RuntimeError("%s did not start (exit status %s); last output:\n%s" % (
                self.name, self.proc.poll(), tail(self.log_path)))
        return self.banner_at - self.spawned_at

    def alive(self) -> bool:
        return self.proc.poll() is None

    def remember_descendants(self) -> None:
        if self.alive():
            self.known.extend(pid for pid in process_tree(self.pid) if pid not in self.known)

    def stop(self) -> None:
        """SIGTERM to the PID we started and to every descendant we saw, SIGKILL after 5 s."""
        self.remember_descendants()
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            for pid in self.known:
                if not self._running(pid):
                    continue                     # gone or reaped: its PID may be someone else's now
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(self._running(pid) for pid in self.known):
                time.sleep(0.02)
            if not any(self._running(pid) for pid in self.known):
                break
        self.reader.join(2)

    def _running(self, pid: int) -> bool:
        if pid == self.pid:
            return self.proc.poll() is None
        try:
            return _stat_fields(pid)[0] != "Z"
        except (OSError, IndexError):
            return False


class Children:
    """The processes this run started; cleanup() ends exactly those (and their descendants)."""

    def __init__(self, workdir: str, keep_logs: bool) -> None:
        self.workdir = workdir
        self.keep_logs = keep_logs
        self.announced = False
        self.running: List[Child] = []
        self.count = 0

    def start(self, name: str, cmd: List[str], env: Dict[str, str], cwd: str, timeout: float = 30.0) -> Child:
        """Start `cmd` and wait for its banner."""
        self.count += 1
        child = Child(name, cmd, env, cwd, os.path.join(self.workdir, "%s-%d.log" % (name, self.count)))
        self.running.append(child)
        try:
            child.wait_listening(timeout)
        except RuntimeError:
            self.stop(child)
            raise
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.running:
            self.running.remove(child)

    def cleanup(self) -> None:
        """Stop the children and remove the work folder (unless --keep-logs). Idempotent."""
        for child in list(self.running):
            self.stop(child)
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
    """Peak RSS of a process tree, sampled every 100 ms while running; every 10th sample is
    kept (`series`, one a second) to show whether memory levels off."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.peak = tree.rss_mb(fresh=True) or 0.0
        self.series: List[float] = []
        self.task: Optional[asyncio.Future] = None

    async def _run(self) -> None:
        count = 0
        while True:
            rss = self.tree.rss_mb() or 0.0
            self.peak = max(self.peak, rss)
            if count % 10 == 0:
                self.series.append(round(rss, 1))
            count += 1
            await asyncio.sleep(0.1)

    def __enter__(self) -> "RssSampler":
        self.task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.task.cancel()
        self.peak = max(self.peak, self.tree.rss_mb(fresh=True) or 0.0)


# =============================================================================================
# Start-up time and the memory baseline
# =============================================================================================
# The baseline is the same Python with nothing but the modules a stdlib HTTP proxy cannot do
# without (http.server, http.client, json), listening on a port: what any such proxy costs
# before its own code. Start-up = process spawned -> banner read from its output (printed once
# the socket listens). Samples alternate baseline and proxy so a disturbance hits both.

BASELINE_CODE = (
    "import http.client, http.server, json\n"
    "server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)\n"
    "print('baseline listening on http://%s:%d' % server.server_address[:2], flush=True)\n"
    "server.serve_forever()\n")
IDLE_SETTLE_S = 0.3         # wait after the banner before reading an idle RSS


def measure_startup(children: "Children", samples: int, proxy_cmd: List[str], proxy_env: Dict[str, str],
                    proxy_cwd: str) -> Dict[str, Any]:
    """Median spawn -> listening time of the proxy and of the baseline over `samples` starts
    each; the baseline's idle RSS, read as the proxy's is (IDLE_SETTLE_S after its banner)."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_PREFIXES)}
    times: Dict[str, List[float]] = {"baseline": [], "proxy": []}
    baseline_rss: Optional[float] = None
    for i in range(samples):
        for name, cmd, env, cwd in (("baseline", [sys.executable, "-c", BASELINE_CODE], base_env, HERE),
                                    ("proxy", proxy_cmd, proxy_env, proxy_cwd)):
            child = children.start("startup-" + name, cmd, env, cwd)
            times[name].append(child.banner_at - child.spawned_at)
            if name == "baseline" and i == samples - 1:
                time.sleep(IDLE_SETTLE_S)
                baseline_rss = child.tree.rss_mb(fresh=True)
            children.stop(child)

    def median(values: List[float]) -> Optional[float]:
        ordered = sorted(values)
        if not ordered:
            return None
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    return {"samples": samples,
            "proxy_ms": [round(t * 1000, 1) for t in times["proxy"]],
            "baseline_ms": [round(t * 1000, 1) for t in times["baseline"]],
            "proxy_median_ms": round(median(times["proxy"]) * 1000, 1) if times["proxy"] else None,
            "baseline_median_ms": round(median(times["baseline"]) * 1000, 1) if times["baseline"] else None,
            "baseline_rss_mb": _round(baseline_rss, 1)}


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
    def __init__(self, args: argparse.Namespace, fake: Child, proxy: Child,
                 bodies: Dict[str, Dict[str, Any]]) -> None:
        self.args = args
        self.fake, self.proxy = fake, proxy
        self.bodies = bodies

    def payload(self, body_name: str, stream: bool, direct: bool) -> bytes:
        request = self.bodies[body_name]
        if direct:
            body = json.dumps(to_chat_completions(request, stream)).encode()
            return http_request("/v1/chat/completions", self.fake.port, body, {"Authorization": "Bearer dummy"})
        body = json.dumps(with_stream(request, stream)).encode()
        path = "/v1/messages?beta=true" if body_name != "small" else "/v1/messages"
        return http_request(path, self.proxy.port, body, {
            "x-api-key": "bench", "anthropic-version": "2023-06-01",
            "Accept": "text/event-stream" if stream else "application/json"})

    async def run_one(self, scenario: Scenario, direct: bool) -> Dict[str, Any]:
        requests = [(self.payload(body, stream, direct), stream) for body, stream in scenario.kinds]
        fake_call(self.fake.port, "POST", "/config?latency_ms=%s" % scenario.upstream_latency_ms)
        load = Load(self.fake.port if direct else self.proxy.port, requests, not direct,
                    scenario.concurrency, self.args.timeout, self.args.chunks)
        tree, fake_tree = self.proxy.tree, self.fake.tree
        try:
            with RssSampler(tree) as rss:
                warm = await load.run(requests=scenario.warmup, max_time=self.args.max_run_time)
                fake_call(self.fake.port, "POST", "/stats/reset")
                rss_start = tree.rss_mb(fresh=True)
                proxy_cpu0, fake_cpu0 = tree.cpu_s(), fake_tree.cpu_s()
                own_cpu0, busy0 = proc_cpu_s([os.getpid()]), machine_busy_s()
                rss_middle: List[Optional[float]] = [None]

                async def read_rss_middle() -> None:
                    await asyncio.sleep(scenario.duration / 2)
                    rss_middle[0] = tree.rss_mb(fresh=True)

                middle = asyncio.ensure_future(read_rss_middle())
                if warm.ok:
                    measured = await load.run(duration=scenario.duration, max_time=self.args.max_run_time)
                else:                                # nothing works: do not wait out the timeouts
                    measured = Phase()
                    measured.error("not_measured", "every warm-up request failed")
                proxy_cpu, fake_cpu = cpu_used(proxy_cpu0, tree.cpu_s()), cpu_used(fake_cpu0, fake_tree.cpu_s())
                own_cpu, busy1 = cpu_used(own_cpu0, proc_cpu_s([os.getpid()])), machine_busy_s()
                rss_end = tree.rss_mb(fresh=True)
                middle.cancel()
                upstream = fake_call(self.fake.port, "GET", "/stats")
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
            "by_kind": {kind: {"sent": measured.sent[kind], "ok": measured.kind_ok[kind],
                               "latency_ms": percentiles(measured.kind_latency[kind])}
                        for kind in ("nonstream", "stream") if measured.sent[kind]},
            "request_bytes": max(len(payload) for payload, _ in requests),
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
                "reused_connections": upstream["chat_connections_used"] - upstream["new_chat_connections"],
                "closed_connections": upstream["chat_connections_closed"],
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
        if measured.sent["stream"]:
            result["ttfb_ms"] = percentiles(measured.ttfb)
            result["ttft_ms"] = percentiles(measured.ttft)
            events = measured.content_events
            result["content_events_per_response"] = round(sum(events) / len(events), 2) if events else None
            result["streams_complete"] = [measured.kind_ok["stream"], measured.sent["stream"]]
        if not direct:
            per_request = (lambda seconds: round(seconds * 1000 / served, 4) if proxy_cpu and served else None)
            cpu = sum(proxy_cpu) if proxy_cpu else None
            result["proxy"] = {
                "cpu_ms_per_request": per_request(cpu),
                "cpu_user_ms_per_request": per_request(proxy_cpu[0]) if proxy_cpu else None,
                "cpu_sys_ms_per_request": per_request(proxy_cpu[1]) if proxy_cpu else None,
                "cpu_cores_used": round(cpu / measured.duration, 3) if cpu is not None and measured.duration else None,
                "rss_start_mb": _round(rss_start, 1),
                "rss_middle_mb": _round(rss_middle[0], 1),
                "rss_end_mb": _round(rss_end, 1),
                "rss_peak_mb": round(rss.peak, 1),
                "rss_series_mb": rss.series,
                "processes": len(tree.pids(fresh=True)),
                "alive": self.proxy.alive(),
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


def _round(value: Optional[float], digits: int) -> Optional[float]:
    return round(value, digits) if value is not None else None


def headline(scenario: Scenario, direct: Dict[str, Any], proxy: Dict[str, Any]) -> Dict[str, Any]:
    """The short version of one scenario. In a mixed scenario the latency figures are the
    non-stream requests' and the stream ones come under stream_*."""
    def latency(run: Dict[str, Any], kind: str) -> Dict[str, Any]:
        return run["by_kind"].get(kind, {}).get("latency_ms", {}) if scenario.mixed else run["latency_ms"]

    d, p = latency(direct, "nonstream"), latency(proxy, "nonstream")
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
        "upstream_cpu_ms_per_request": proxy["upstream"]["cpu_ms_per_request"],
        "upstream_cpu_ms_per_request_direct": direct["upstream"]["cpu_ms_per_request"],
        "proxy_rss_start_mb": proxy["proxy"]["rss_start_mb"],
        "proxy_rss_middle_mb": proxy["proxy"]["rss_middle_mb"],
        "proxy_rss_end_mb": proxy["proxy"]["rss_end_mb"],
        "proxy_rss_peak_mb": proxy["proxy"]["rss_peak_mb"],
        "proxy_processes": proxy["proxy"]["processes"],
        "upstream_new_connections": proxy["upstream"]["new_connections"],
        "upstream_reused_connections": proxy["upstream"]["reused_connections"],
        "upstream_closed_connections": proxy["upstream"]["closed_connections"],
        "upstream_connections_used": proxy["upstream"]["connections_used"],
        "upstream_open_connections_peak": proxy["upstream"]["open_connections_peak"],
        "upstream_requests_per_proxied_request": proxy["upstream"]["requests_per_client_request"],
        "direct_requests": direct["requests"], "proxy_requests": proxy["requests"],
        "direct_errors": direct["errors"], "proxy_errors": proxy["errors"],
    }
    if scenario.mixed:
        dd, pp = latency(direct, "stream"), latency(proxy, "stream")
        line.update({
            "direct_stream_p50_ms": dd.get("p50"), "proxy_stream_p50_ms": pp.get("p50"),
            "direct_stream_p99_ms": dd.get("p99"), "proxy_stream_p99_ms": pp.get("p99"),
            "stream_overhead_p50_ms": _minus(pp.get("p50"), dd.get("p50")),
            "stream_overhead_p99_ms": _minus(pp.get("p99"), dd.get("p99")),
        })
    if "ttft_ms" in proxy:
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
        line["direct_streams_complete"] = direct["streams_complete"]
        line["proxy_streams_complete"] = proxy["streams_complete"]
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


def _describe(scenario: Scenario, bodies: Dict[str, Dict[str, Any]]) -> str:
    kinds = ", ".join("%s %s (%.1f KB)" % ("stream" if stream else "non-stream", body,
                                           len(json.dumps(bodies[body])) / 1024.0)
                      for body, stream in dict.fromkeys(scenario.kinds))
    latency = ", upstream latency %g ms" % scenario.upstream_latency_ms if scenario.upstream_latency_ms else ""
    return "%s, concurrency %d, %g s%s" % (kinds, scenario.concurrency, scenario.duration, latency)


def scenario_block(scenario: Scenario, result: Dict[str, Any], bodies: Dict[str, Dict[str, Any]]) -> str:
    direct, proxy = result["direct"], result["proxy"]
    out = ["", "== %s %s: %s ==" % (scenario.key, scenario.name, _describe(scenario, bodies)),
           "  %-30s %11s %11s %9s %11s" % ("", "direct", "proxy", "ratio", "overhead")]

    def row(label: str, d: Any, p: Any, overhead: bool = True, digits: int = 3) -> None:
        ratio = _ratio(p, d)
        out.append("  %-30s %11s %11s %9s %11s" % (
            label, _fmt(d, digits), _fmt(p, digits), ("%.2fx" % ratio) if ratio is not None else "-",
            ("%+.3f" % (p - d)) if overhead and d is not None and p is not None else ""))

    if "ttft_ms" in proxy:
        for name, label in (("ttfb", "TTFB"), ("ttft", "TTFT (first content)")):
            row(label + " p50 ms", direct[name + "_ms"].get("p50"), proxy[name + "_ms"].get("p50"))
            row(label + " p99 ms", direct[name + "_ms"].get("p99"), proxy[name + "_ms"].get("p99"))
    if scenario.mixed:
        for kind, label in (("nonstream", "non-stream latency"), ("stream", "stream total (last byte)")):
            d = direct["by_kind"].get(kind, {}).get("latency_ms", {})
            p = proxy["by_kind"].get(kind, {}).get("latency_ms", {})
            row(label + " p50 ms", d.get("p50"), p.get("p50"))
            row(label + " p99 ms", d.get("p99"), p.get("p99"))
    else:
        total = "total (last byte)" if scenario.stream else "latency"
        row(total + " p50 ms", direct["latency_ms"].get("p50"), proxy["latency_ms"].get("p50"))
        row(total + " p99 ms", direct["latency_ms"].get("p99"), proxy["latency_ms"].get("p99"))
    row("throughput req/s", direct["throughput_rps"], proxy["throughput_rps"], overhead=False, digits=1)
    if "ttft_ms" in proxy:
        row("content events / response", direct["content_events_per_response"],
            proxy["content_events_per_response"], overhead=False, digits=1)
        out.append("  %-30s %11s %11s" % ("streams complete", "%d/%d" % tuple(direct["streams_complete"]),
                                          "%d/%d" % tuple(proxy["streams_complete"])))
    out.append("  %-30s %11s %11s" % ("errors (incl. warm-up)", direct["errors"], proxy["errors"]))
    p, u = proxy["proxy"], proxy["upstream"]
    out.append("  proxy: CPU %s ms/req (user %s + sys %s; %s cores); RSS %s MB at start, %s halfway, %s at end, "
               "peak %s%s" % (
        _fmt(p["cpu_ms_per_request"]), _fmt(p["cpu_user_ms_per_request"]), _fmt(p["cpu_sys_ms_per_request"]),
        _fmt(p["cpu_cores_used"], 2), _fmt(p["rss_start_mb"], 1), _fmt(p["rss_middle_mb"], 1),
        _fmt(p["rss_end_mb"], 1),
        _fmt(p["rss_peak_mb"], 1), "; %d processes" % p["processes"] if p["processes"] > 1 else ""))
    out.append("  upstream via proxy: %s new connections, %s reused, %s closed, peak %s open; %s upstream "
               "requests per request; upstream body %s B (direct %s B)" % (
                   u["new_connections"], u["reused_connections"], u["closed_connections"],
                   u["open_connections_peak"],
                   _fmt(u["requests_per_client_request"], 2), _fmt(u["request_body_bytes_avg"]),
                   _fmt(direct["upstream"]["request_body_bytes_avg"])))
    out.append("  harness: fake upstream %s ms CPU/req (direct run %s); load generator %s cores (direct run %s);"
               " rest of the machine %s / %s cores (direct / proxy run)" % (
                   _fmt(u["cpu_ms_per_request"]), _fmt(direct["upstream"]["cpu_ms_per_request"]),
                   _fmt(proxy["loadgen_cpu_s"] / proxy["duration_s"] if proxy["duration_s"] else None, 2),
                   _fmt(direct["loadgen_cpu_s"] / direct["duration_s"] if direct["duration_s"] else None, 2),
                   _fmt(direct["other_cpu_cores"], 2), _fmt(proxy["other_cpu_cores"], 2)))
    noisy = max(direct["other_cpu_cores"] or 0, proxy["other_cpu_cores"] or 0)
    if noisy > 0.25:
        out.append("  !! other processes used %.2f cores meanwhile: these figures are noisy, run again" % noisy)
    if scenario.mixed:
        out.append("  proxy RSS once a second, warm-up included: %s MB" % " ".join(_fmt(v, 1) for v in p["rss_series_mb"]))
    if "ttft_ms" in proxy:
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

    def sub_row(label: str, direct_p50: Any, proxy_p50: Any, added_p50: Any, direct_p99: Any, proxy_p99: Any,
                added_p99: Any) -> None:
        rows.append((label, _fmt(direct_p50), _fmt(proxy_p50), _fmt(added_p50), _fmt(direct_p99),
                     _fmt(proxy_p99), _fmt(added_p99), _fmt(_ratio(proxy_p50, direct_p50), 2),
                     "", "", "", "", "", ""))

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
        if scenario.mixed:
            sub_row("  stream total", line["direct_stream_p50_ms"], line["proxy_stream_p50_ms"],
                    line["stream_overhead_p50_ms"], line["direct_stream_p99_ms"], line["proxy_stream_p99_ms"],
                    line["stream_overhead_p99_ms"])
        if "direct_ttft_p50_ms" in line:
            sub_row("  ttft (first content)", line["direct_ttft_p50_ms"], line["proxy_ttft_p50_ms"],
                    line["ttft_overhead_p50_ms"], line["direct_ttft_p99_ms"], line["proxy_ttft_p99_ms"],
                    line["ttft_overhead_p99_ms"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# The figures: one flat dict with a fixed set of keys, each a number (None when its scenario
# did not run or failed). The table shows them as rows of direct | proxy | ratio | added.

FIGURE_KEYS = (
    "latency_direct_p50_ms", "latency_proxy_p50_ms", "latency_added_p50_ms", "latency_p50_ratio",
    "cpu_small_proxy_ms_per_request", "cpu_small_upstream_ms_per_request", "cpu_small_ratio_to_upstream",
    "cpu_cc_proxy_ms_per_request", "cpu_cc_upstream_ms_per_request", "cpu_cc_ratio_to_upstream",
    "throughput_direct_rps", "throughput_proxy_rps", "throughput_ratio", "throughput_proxy_cores",
    "stream_total_direct_p50_ms", "stream_total_proxy_p50_ms", "stream_total_p50_ratio",
    "stream_ttft_direct_p50_ms", "stream_ttft_proxy_p50_ms", "stream_ttft_added_p50_ms",
    "stream_cpu_proxy_ms_per_stream", "stream_cpu_upstream_ms_per_stream",
    "rss_baseline_mb", "rss_idle_mb", "rss_idle_minus_baseline_mb", "rss_peak_mb",
    "startup_baseline_median_ms", "startup_proxy_median_ms",
    "upstream_new_connections", "upstream_reused_connections", "upstream_closed_connections",
    "upstream_requests",
    "load_requests", "load_errors", "load_streams", "load_streams_complete",
    "load_nonstream_direct_p50_ms", "load_nonstream_proxy_p50_ms",
    "load_stream_direct_p50_ms", "load_stream_proxy_p50_ms",
    "load_rss_start_mb", "load_rss_middle_mb", "load_rss_end_mb", "load_rss_peak_mb", "load_rss_growth_mb",
    "load_rss_growth_second_half_mb",
)



def smoke_failures(figures: Dict[str, Any]) -> List[str]:
    """What a --smoke run must show besides no errors and no missing figure (CI runs it): every
    figure of FIGURE_KEYS a number, a load scenario that sent requests and streams, every load
    stream complete. No timing is judged."""
    problems = []
    odd = [key for key in FIGURE_KEYS if figures.get(key) is not None
           and (isinstance(figures[key], bool) or not isinstance(figures[key], (int, float)))]
    if odd:
        problems.append("figures that are not numbers: " + ", ".join(odd))
    if not (figures.get("load_requests") or 0) > 0 or not (figures.get("load_streams") or 0) > 0:
        problems.append("the load scenario sent no requests or no streams")
    if figures.get("load_errors") != 0:
        problems.append("load errors: %s" % figures.get("load_errors"))
    if figures.get("load_streams_complete") != figures.get("load_streams"):
        problems.append("load streams complete: %s of %s" % (figures.get("load_streams_complete"),
                                                             figures.get("load_streams")))
    return problems

def collect_figures(by_key: Dict[str, Dict[str, Any]], startup: Dict[str, Any], rss_idle: Optional[float]
                    ) -> Dict[str, Any]:
    """`by_key`: scenario key -> its result."""
    def get(key: str, *path: str) -> Any:
        value: Any = by_key.get(key)
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        return value

    figures: Dict[str, Any] = dict.fromkeys(FIGURE_KEYS)
    figures.update({
        "latency_direct_p50_ms": get("a", "headline", "direct_p50_ms"),
        "latency_proxy_p50_ms": get("a", "headline", "proxy_p50_ms"),
        "latency_added_p50_ms": get("a", "headline", "overhead_p50_ms"),
        "latency_p50_ratio": get("a", "headline", "p50_ratio"),
        "cpu_small_proxy_ms_per_request": get("a", "headline", "proxy_cpu_ms_per_request"),
        "cpu_small_upstream_ms_per_request": get("a", "headline", "upstream_cpu_ms_per_request"),
        "cpu_cc_proxy_ms_per_request": get("d1", "headline", "proxy_cpu_ms_per_request"),
        "cpu_cc_upstream_ms_per_request": get("d1", "headline", "upstream_cpu_ms_per_request"),
        "throughput_direct_rps": get("b", "headline", "direct_rps"),
        "throughput_proxy_rps": get("b", "headline", "proxy_rps"),
        "throughput_ratio": get("b", "headline", "throughput_ratio"),
        "throughput_proxy_cores": get("b", "headline", "proxy_cpu_cores_used"),
        "stream_total_direct_p50_ms": get("c", "headline", "direct_p50_ms"),
        "stream_total_proxy_p50_ms": get("c", "headline", "proxy_p50_ms"),
        "stream_total_p50_ratio": get("c", "headline", "p50_ratio"),
        "stream_ttft_direct_p50_ms": get("c", "headline", "direct_ttft_p50_ms"),
        "stream_ttft_proxy_p50_ms": get("c", "headline", "proxy_ttft_p50_ms"),
        "stream_ttft_added_p50_ms": get("c", "headline", "ttft_overhead_p50_ms"),
        "stream_cpu_proxy_ms_per_stream": get("c", "headline", "proxy_cpu_ms_per_request"),
        "stream_cpu_upstream_ms_per_stream": get("c", "headline", "upstream_cpu_ms_per_request"),
        "rss_baseline_mb": startup.get("baseline_rss_mb"),
        "rss_idle_mb": _round(rss_idle, 1),
        "rss_peak_mb": get("b", "headline", "proxy_rss_peak_mb"),
        "startup_baseline_median_ms": startup.get("baseline_median_ms"),
        "startup_proxy_median_ms": startup.get("proxy_median_ms"),
        "upstream_new_connections": get("b", "headline", "upstream_new_connections"),
        "upstream_reused_connections": get("b", "headline", "upstream_reused_connections"),
        "upstream_closed_connections": get("b", "headline", "upstream_closed_connections"),
        "upstream_requests": get("b", "headline", "proxy_requests"),
        "load_requests": get("load", "headline", "proxy_requests"),
        "load_errors": get("load", "headline", "proxy_errors"),
        "load_streams": (get("load", "headline", "proxy_streams_complete") or [None, None])[1],
        "load_streams_complete": (get("load", "headline", "proxy_streams_complete") or [None, None])[0],
        "load_nonstream_direct_p50_ms": get("load", "headline", "direct_p50_ms"),
        "load_nonstream_proxy_p50_ms": get("load", "headline", "proxy_p50_ms"),
        "load_stream_direct_p50_ms": get("load", "headline", "direct_stream_p50_ms"),
        "load_stream_proxy_p50_ms": get("load", "headline", "proxy_stream_p50_ms"),
        "load_rss_start_mb": get("load", "headline", "proxy_rss_start_mb"),
        "load_rss_middle_mb": get("load", "headline", "proxy_rss_middle_mb"),
        "load_rss_end_mb": get("load", "headline", "proxy_rss_end_mb"),
        "load_rss_peak_mb": get("load", "headline", "proxy_rss_peak_mb"),
    })
    figures["cpu_small_ratio_to_upstream"] = _ratio(figures["cpu_small_proxy_ms_per_request"],
                                                    figures["cpu_small_upstream_ms_per_request"])
    figures["cpu_cc_ratio_to_upstream"] = _ratio(figures["cpu_cc_proxy_ms_per_request"],
                                                 figures["cpu_cc_upstream_ms_per_request"])
    figures["rss_idle_minus_baseline_mb"] = _minus(figures["rss_idle_mb"], figures["rss_baseline_mb"])
    figures["load_rss_growth_mb"] = _minus(figures["load_rss_end_mb"], figures["load_rss_start_mb"])
    figures["load_rss_growth_second_half_mb"] = _minus(figures["load_rss_end_mb"], figures["load_rss_middle_mb"])
    return figures


def figures_table(f: Dict[str, Any], config: Dict[str, Any]) -> str:
    """Every figure on one row: direct (or the baseline named at the end) | proxy | ratio | added."""
    conc, sconc = config["concurrency"], config["stream_concurrency"]
    stream = "%d-chunk stream (%g ms apart), c%d" % (config["chunks"], config["chunk_delay_ms"], sconc)
    load = "load c%d mixed, upstream %g ms" % (conc, config["load_latency_ms"])
    rows = [("figure", "direct", "proxy", "ratio", "added", "direct column is")]

    def row(label: str, direct: Any, proxy: Any, baseline: str = "straight to the fake",
            added: bool = True, digits: int = 3) -> None:
        ratio = _ratio(proxy, direct) if isinstance(proxy, (int, float)) else None
        rows.append((label, _fmt(direct, digits), _fmt(proxy, digits), _fmt(ratio, 2),
                     ("%+.*f" % (digits, proxy - direct)) if added and ratio is not None and direct is not None
                     else "", baseline))

    def pair(a: Any, b: Any) -> Optional[str]:
        return None if a is None or b is None else "%s/%s" % (a, b)

    row("added latency p50, c1, 4 KB non-stream, ms", f["latency_direct_p50_ms"], f["latency_proxy_p50_ms"])
    row("CPU per request, 4 KB non-stream c1, ms", f["cpu_small_upstream_ms_per_request"],
        f["cpu_small_proxy_ms_per_request"], "the fake upstream's own CPU", added=False)
    row("CPU per request, %.0f KB non-stream c1, ms" % (config["body_bytes"]["cc"] / 1024.0),
        f["cpu_cc_upstream_ms_per_request"], f["cpu_cc_proxy_ms_per_request"], "the fake upstream's own CPU",
        added=False)
    row("throughput, c%d non-stream, req/s" % conc, f["throughput_direct_rps"], f["throughput_proxy_rps"],
        added=False, digits=0)
    row("%s: total p50, ms" % stream, f["stream_total_direct_p50_ms"], f["stream_total_proxy_p50_ms"])
    row("%s: TTFT p50, ms" % stream, f["stream_ttft_direct_p50_ms"], f["stream_ttft_proxy_p50_ms"])
    row("%s: CPU per stream, ms" % stream, f["stream_cpu_upstream_ms_per_stream"],
        f["stream_cpu_proxy_ms_per_stream"], "the fake upstream's own CPU", added=False)
    row("RSS idle, MB", f["rss_baseline_mb"], f["rss_idle_mb"],
        "python + http.server, http.client, json", digits=1)
    row("RSS peak, c%d non-stream, MB" % conc, f["rss_idle_mb"], f["rss_peak_mb"], "the proxy idle", digits=1)
    row("start-up to listening, median of %d, ms" % config["startup_samples"], f["startup_baseline_median_ms"],
        f["startup_proxy_median_ms"], "python + those imports, listening", digits=1)
    rows.append(("upstream connections, c%d after warm-up" % conc, "",
                 "%s new, %s reused, %s closed" % (_fmt(f["upstream_new_connections"]),
                                                   _fmt(f["upstream_reused_connections"]),
                                                   _fmt(f["upstream_closed_connections"])),
                 "", "", "for %s requests" % _fmt(f["upstream_requests"])))
    rows.append(("%s: errors" % load, "", _fmt(f["load_errors"]), "", "",
                 "of %s requests" % _fmt(f["load_requests"])))
    rows.append(("%s: streams complete" % load, "", _fmt(pair(f["load_streams_complete"], f["load_streams"])),
                 "", "", ""))
    row("%s: non-stream p50, ms" % load, f["load_nonstream_direct_p50_ms"], f["load_nonstream_proxy_p50_ms"])
    row("%s: stream total p50, ms" % load, f["load_stream_direct_p50_ms"], f["load_stream_proxy_p50_ms"])
    row("%s: RSS end vs start, MB" % load, f["load_rss_start_mb"], f["load_rss_end_mb"],
        "the proxy's RSS at the start", digits=1)
    row("%s: RSS end vs middle, MB" % load, f["load_rss_middle_mb"], f["load_rss_end_mb"],
        "the proxy's RSS halfway", digits=1)
    rows.append(("%s: RSS peak, MB" % load, "", _fmt(f["load_rss_peak_mb"], 1), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i in (0, 5) else cell.rjust(widths[i])
                       for i, cell in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


# =============================================================================================
# Command line
# =============================================================================================


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark claude_proxy.py against a fake OpenAI upstream, direct vs proxied "
                    "(see the docstring at the top of this file for how to read the figures).")
    parser.add_argument("--quick", action="store_true", help="short run, 1.5 s per measurement (~35 s)")
    parser.add_argument("--smoke", action="store_true",
                        help="every scenario for about a second (~20 s); exit status 0 only if every figure "
                             "was produced without an error")
    parser.add_argument("--json", metavar="FILE", help="write every figure (all runs in full) to FILE")
    parser.add_argument("--scenarios", default=",".join(SCENARIO_KEYS),
                        help="comma-separated subset of %s (default: all)" % ", ".join(SCENARIO_KEYS))
    parser.add_argument("--proxy", default=os.path.join(HERE, "claude_proxy.py"),
                        help="the proxy script to run (default: claude_proxy.py next to this file)")
    parser.add_argument("--workers", type=int, default=1,
                        help="proxy processes sharing the port (passed as the proxy's --workers when over 1)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment variable for the proxy (repeatable)")
    parser.add_argument("--body", metavar="small|cc|FILE",
                        help="one request body for every scenario: the built-in 4 KB one, the built-in Claude "
                             "Code-shaped one, or a captured request (JSON with a top-level 'body', or the "
                             "request). Default: each scenario's own")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="connections in the throughput and load scenarios (default 64)")
    parser.add_argument("--stream-concurrency", type=int, default=16,
                        help="connections in the stream scenario (default 16)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="measured seconds of every run (default: 5-10 per scenario, --quick 1.5, --smoke 0.8)")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per upstream stream (default 50)")
    parser.add_argument("--chunk-delay-ms", type=float, default=2.0, help="gap between stream chunks (default 2)")
    parser.add_argument("--upstream-latency-ms", type=float, default=0.0,
                        help="simulated model time before a non-stream answer / the first stream chunk")
    parser.add_argument("--load-latency-ms", type=float, default=20.0,
                        help="the same in the load scenario (default 20)")
    parser.add_argument("--content-bytes", type=int, default=512, help="text in a non-stream answer (default 512)")
    parser.add_argument("--tool-calls", action="store_true",
                        help="the fake also answers with a tool call (named after the request's first tool)")
    parser.add_argument("--startup-samples", type=int, default=0,
                        help="proxy starts timed for the start-up median (default 5, --smoke 3)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    parser.add_argument("--max-run-time", type=float, default=120.0, help="cap on any one load run, seconds")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work folder with the children's logs")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--max-lifetime", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.stream_concurrency < 1 or args.workers < 1:
        parser.error("--concurrency, --stream-concurrency and --workers must be at least 1")
    args.startup_samples = args.startup_samples or (3 if args.smoke else 5)
    return args


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
    all_scenarios = build_scenarios(args)
    scenarios = all_scenarios if args.smoke else [s for s in all_scenarios if s.key in wanted or s.name in wanted]
    if not scenarios:
        raise SystemExit("--scenarios: none of %r (choose from %s)" % (args.scenarios, ", ".join(SCENARIO_KEYS)))
    if not os.path.isfile(args.proxy):
        raise SystemExit("proxy script not found: %s (run from the project root, or pass --proxy)" % args.proxy)
    bodies = {"small": small_request(), "cc": claude_code_request()}
    if args.body and args.body not in bodies:
        bodies["file"] = load_body_file(args.body)
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
    config = {"quick": args.quick, "smoke": args.smoke, "workers": args.workers,
              "concurrency": args.concurrency, "stream_concurrency": args.stream_concurrency,
              "duration": args.duration or None, "chunks": args.chunks, "chunk_delay_ms": args.chunk_delay_ms,
              "upstream_latency_ms": args.upstream_latency_ms, "load_latency_ms": args.load_latency_ms,
              "content_bytes": args.content_bytes, "tool_calls": args.tool_calls, "body": args.body,
              "startup_samples": args.startup_samples,
              "body_bytes": {k: len(json.dumps(v)) for k, v in bodies.items()}}
    summary: Dict[str, Any] = {}
    results: Dict[str, Dict[str, Any]] = {}
    try:
        fake_cmd = [sys.executable, os.path.abspath(__file__), "--serve-fake", "0",
                    "--chunks", str(args.chunks), "--chunk-delay-ms", str(args.chunk_delay_ms),
                    "--upstream-latency-ms", str(args.upstream_latency_ms),
                    "--content-bytes", str(args.content_bytes), "--max-lifetime", "3600"]
        if args.tool_calls:
            fake_cmd.append("--tool-calls")
        fake = children.start("fake_openai", fake_cmd, dict(os.environ), HERE)
        # --env-file /dev/null: a developer's .env (keys, ANTHROPIC_API_KEY, limits) stays out of it.
        proxy_cmd = [sys.executable, args.proxy, "--host", LOOPBACK, "--port", "0", "--env-file", os.devnull]
        if args.workers > 1:
            proxy_cmd += ["--workers", str(args.workers)]
        proxy_env = proxy_environment(args.proxy, fake.port, args.env)
        proxy_cwd = os.path.dirname(os.path.abspath(args.proxy))
        startup = measure_startup(children, args.startup_samples, proxy_cmd, proxy_env, proxy_cwd)
        proxy = children.start("proxy", proxy_cmd, proxy_env, proxy_cwd)
        time.sleep(IDLE_SETTLE_S)
        rss_idle = proxy.tree.rss_mb(fresh=True)
        print("bench_claude_proxy: %s (sha1 %s), Python %s, %d CPUs; fake upstream :%d, proxy :%d (pid %d%s)" % (
            os.path.relpath(args.proxy), proxy_sha1[:10], platform.python_version(), os.cpu_count() or 0,
            fake.port, proxy.port, proxy.pid, ", --workers %d" % args.workers if args.workers > 1 else ""),
            flush=True)
        print("request bodies: small %.1f KB, Claude Code-shaped %.1f KB (%d tools)%s" % (
            config["body_bytes"]["small"] / 1024.0, config["body_bytes"]["cc"] / 1024.0,
            len(bodies["cc"]["tools"]),
            "; every scenario uses %s" % args.body if args.body else ""), flush=True)
        print("start-up to listening, median of %d: proxy %s ms, baseline %s ms; RSS idle %s MB, baseline %s MB" % (
            startup["samples"], _fmt(startup["proxy_median_ms"], 1), _fmt(startup["baseline_median_ms"], 1),
            _fmt(rss_idle, 1), _fmt(startup["baseline_rss_mb"], 1)), flush=True)

        bench = Bench(args, fake, proxy, bodies)
        for scenario in scenarios:
            results[scenario.name] = asyncio.run(bench.run_scenario(scenario))
            print(scenario_block(scenario, results[scenario.name], bodies), flush=True)
            if not proxy.alive():
                print("!! the proxy exited (status %s); log tail:\n%s" % (proxy.proc.returncode, tail(proxy.log_path)))
                break
        figures = collect_figures({s.key: results[s.name] for s in scenarios if s.name in results},
                                  startup, rss_idle)
        summary = {
            "tool": "bench_claude_proxy",
            "proxy_file": os.path.abspath(args.proxy), "proxy_sha1": proxy_sha1,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "loadavg_before": loadavg_before,
                        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "config": config,
            "figures": figures,
            "startup": startup,
            "proxy_process": {"rss_idle_mb": _round(rss_idle, 1),
                              "rss_end_mb": _round(proxy.tree.rss_mb(fresh=True), 1),
                              "vmhwm_mb": _round(proc_mem_mb(proxy.tree.pids(fresh=True), "VmHWM"), 1),
                              "processes": len(proxy.tree.pids(fresh=True)), "alive_at_end": proxy.alive()},
            "scenarios": {name: r["headline"] for name, r in results.items()},
        }
        if not proxy.alive():
            summary["proxy_process"]["log_tail"] = tail(proxy.log_path)
    except RuntimeError as exc:
        print("bench_claude_proxy: %s" % exc, file=sys.stderr)
        return 2
    finally:
        children.cleanup()

    errors = sum(r["direct"]["errors"] + r["proxy"]["errors"] for r in results.values())
    failed = sorted(name for name, r in results.items() if r["direct"]["errors"] or r["proxy"]["errors"])
    incomplete = len(results) < len(scenarios) or not summary["proxy_process"]["alive_at_end"]
    every_scenario = len(scenarios) == len(all_scenarios)
    missing = [key for key, value in summary["figures"].items() if value is None] if every_scenario else []
    smoke = smoke_failures(summary["figures"]) if args.smoke else []
    summary["errors"] = errors
    summary["failed_scenarios"] = failed
    summary["missing_figures"] = missing
    summary["smoke_failures"] = smoke
    summary["total_s"] = round(time.monotonic() - started, 1)
    proc = summary["proxy_process"]
    print("\n== scenarios (ms; ratio = proxy/direct; 'new conns' = upstream connections opened while measuring) ==")
    print(overview_table(scenarios, results))
    print("proxy RSS: idle %s MB, end %s MB, lifetime peak (VmHWM) %s MB; total %.1f s" % (
        _fmt(proc["rss_idle_mb"], 1), _fmt(proc["rss_end_mb"], 1), _fmt(proc["vmhwm_mb"], 1), summary["total_s"]))
    print("\n== figures (ratio = proxy / direct column; added = proxy - direct column) ==")
    print(figures_table(summary["figures"], config))
    if args.workers > 1:
        print("(proxy CPU and RSS are sums over its %d processes)" % proc["processes"])
    print("\nJSON summary (one line):")
    print(json.dumps(summary, separators=(",", ":")))
    if args.json:
        full = dict(summary, runs={name: {"config": r["config"], "direct": r["direct"], "proxy": r["proxy"]}
                                   for name, r in results.items()})
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(full, handle, indent=1)
        print("full results written to %s" % args.json)
    if failed or incomplete or missing or smoke:
        print("\nFAILED: %s" % "; ".join(
            (["errors in " + ", ".join(failed)] if failed else [])
            + (["the proxy died or a scenario did not run"] if incomplete else [])
            + (["figures not produced: " + ", ".join(missing)] if missing else []) + smoke), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
