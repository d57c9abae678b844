"""Tests for claude_proxy.py, in the order of its sections: configuration, errors, request and
response translation tables, the stream translator fed chunk by chunk, then the real server
end to end against a scripted fake OpenAI upstream on 127.0.0.1 (port 0)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import http.server
import io
import json
import logging
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading

import pytest

import claude_proxy as cp

cp.install_speedups()       # as main() does: the tests run what users run

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = cp.Settings(openai_base_url="http://127.0.0.1:9/v1")   # a generic upstream


def ids(prefix="toolu_gen"):
    """A deterministic id source, so translated output is the same every run."""
    counter = iter(range(1, 1000))
    return lambda: "%s%d" % (prefix, next(counter))


# =============================================================================================
# A strict checker of the Anthropic stream grammar, used on every stream in this file
# =============================================================================================

DELTA_FOR_BLOCK = {"text": {"text_delta"}, "tool_use": {"input_json_delta"},
                   "thinking": {"thinking_delta", "signature_delta"},
                   "server_tool_use": {"input_json_delta"}, "web_search_tool_result": set()}


def parse_sse(raw: bytes):
    """[(event name, data dict)] from SSE bytes; every frame must have both lines."""
    frames = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        frames.append((lines[0][7:], json.loads(lines[1][6:])))
    return frames


def check_stream(frames):
    """Assert the grammar: message_start, then blocks with indices 0, 1, 2 one open at a time,
    deltas matching their block, message_delta, message_stop; or an error as the last event.
    `event:` equals data.type. Returns the events."""
    events = []
    for name, data in frames:
        assert name == data["type"], (name, data)
        events.append(data)
    assert events and events[0]["type"] == "message_start", events[:1]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert isinstance(start["usage"]["input_tokens"], int) and isinstance(start["usage"]["output_tokens"], int)
    open_index, open_type, next_index, tool_json, signed = None, None, 0, [], False
    state = "blocks"
    for position, event in enumerate(events[1:], 1):
        kind = event["type"]
        if kind == "ping":
            assert state == "blocks"
            continue
        if kind == "error":
            assert position == len(events) - 1, "events after an error"
            assert set(event["error"]) == {"type", "message"}
            return events
        if kind == "content_block_start":
            assert state == "blocks" and open_index is None, event
            assert event["index"] == next_index, event
            block = event["content_block"]
            open_index, open_type, next_index, tool_json, signed = event["index"], block["type"], next_index + 1, [], False
            if open_type == "tool_use":
                assert block["input"] == {} and block["id"] and block["name"], block
            elif open_type == "server_tool_use":
                assert block["input"] == {} and block["id"].startswith("srvtoolu_") and block["name"] == "web_search"
            elif open_type == "web_search_tool_result":     # whole in its start, no delta
                assert block["tool_use_id"].startswith("srvtoolu_"), block
                content = block["content"]
                assert (isinstance(content, list) and all(r["type"] == "web_search_result" and r["url"] for r in content)) \
                    or content["type"] == "web_search_tool_result_error", block
            elif open_type == "text":
                assert block == {"type": "text", "text": ""}
            else:
                assert block == {"type": "thinking", "thinking": "", "signature": ""}
        elif kind == "content_block_delta":
            assert event["index"] == open_index, event
            delta = event["delta"]
            assert delta["type"] in DELTA_FOR_BLOCK[open_type], (open_type, delta)
            assert not signed, "delta after signature_delta"
            if delta["type"] == "input_json_delta":
                tool_json.append(delta["partial_json"])
            elif delta["type"] == "signature_delta":
                signed = True
            elif delta["type"] == "text_delta":
                assert delta["text"], "empty text_delta"
        elif kind == "content_block_stop":
            assert event["index"] == open_index, event
            if open_type in ("tool_use", "server_tool_use"):
                assert isinstance(json.loads("".join(tool_json)), dict), tool_json
            if open_type == "thinking":
                assert signed, "thinking block closed without signature_delta"
            open_index = None
        elif kind == "message_delta":
            assert state == "blocks" and open_index is None, "message_delta with a block open"
            assert event["delta"]["stop_reason"] in (
                "end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"), event
            assert isinstance(event["usage"]["output_tokens"], int)
            state = "delta"
        elif kind == "message_stop":
            assert state == "delta" and position == len(events) - 1
            state = "stopped"
        else:
            raise AssertionError("unknown event %r" % kind)
    assert state == "stopped", "stream ended without message_stop or error"
    return events


def run_translator(chunks, stop_sequences=(), input_tokens=7, done=True):
    ctx = cp.ResponseContext(model="claude-opus-4-8", message_id="msg_1",
                             stop_sequences=tuple(stop_sequences), input_tokens=input_tokens)
    translator = cp.StreamTranslator(ctx, ids())
    events = translator.start()
    for chunk in chunks:
        events += translator.feed(chunk)
    events += translator.finish(done)
    return check_stream([(e["type"], e) for e in events])


def non_meta(events):
    return [e for e in events if e["type"] not in ("message_start", "ping")]


# =============================================================================================
# Configuration
# =============================================================================================


def test_settings_defaults():
    s = cp.load_settings({}, [], "")
    assert (s.openai_base_url, s.big_model, s.middle, s.small_model, s.host, s.port) == (
        "https://api.openai.com/v1", "gpt-4o", "gpt-4o", "gpt-4o-mini", "127.0.0.1", 8082)
    assert s.max_tokens_limit == 0 and s.request_timeout == 600.0


def test_settings_precedence_flag_then_environment_then_dotenv():
    dotenv = "export BIG_MODEL='from-dotenv'\nSMALL_MODEL=dot-small # comment\nPORT=1\n# x=y\nMIDDLE_MODEL=\"m\"\n"
    s = cp.load_settings({"BIG_MODEL": "from-env", "PORT": "9000"}, ["--port", "9100"], dotenv)
    assert (s.big_model, s.small_model, s.port, s.middle_model) == ("from-env", "dot-small", 9100, "m")


def test_settings_quoted_value_with_comment_and_stray_whitespace():
    s = cp.load_settings({"OPENAI_API_KEY": "sk-abc\n"}, [], 'BIG_MODEL="gpt #1"  # team model\nSMALL_MODEL=\'s\' # x\n')
    assert (s.openai_api_key, s.big_model, s.small_model) == ("sk-abc", "gpt #1", "s")
    with pytest.raises(ValueError, match="OPENAI_API_KEY contains a line break") as info:
        cp.load_settings({"OPENAI_API_KEY": "sk-a\nb"}, [], "")
    assert "sk-a" not in str(info.value)


def test_settings_original_variable_names_and_alias():
    env = {"OPENAI_API_KEY": "k", "OPENAI_API_BASE": "http://h/v1", "ANTHROPIC_API_KEY": "a",
           "MIDDLE_MODEL": "mid", "HOST": "0.0.0.0", "LOG_LEVEL": "DEBUG", "MAX_TOKENS_LIMIT": "4096",
           "REQUEST_TIMEOUT": "90"}
    s = cp.load_settings(env, [], "")
    assert (s.openai_api_key, s.openai_base_url, s.anthropic_api_key, s.middle, s.host, s.log_level,
            s.max_tokens_limit, s.request_timeout) == ("k", "http://h/v1", "a", "mid", "0.0.0.0", "DEBUG", 4096, 90.0)


@pytest.mark.parametrize("environ,message", [
    ({"PORT": "eighty"}, "PORT must be a whole number, got 'eighty'"), ({"PORT": "70000"}, "PORT must be between"),
    ({"REQUEST_TIMEOUT": "soon"}, "REQUEST_TIMEOUT must be a number"), ({"CONNECT_TIMEOUT": "0"}, "CONNECT_TIMEOUT must be more than 0"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be one of text, json"),
    ({"OPENAI_BASE_URL": "api.openai.com/v1"}, "OPENAI_BASE_URL must start with https:// or http://"),
    ({"OPENAI_BASE_URL": "http://h:port/v1"}, "OPENAI_BASE_URL has a bad port"),
    ({"UPSTREAM_STREAMING": "maybe"}, "UPSTREAM_STREAMING must be one of on, off"),
    ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY must be more than 0"),
    ({"CA_BUNDLE": "/no/such/ca.pem"}, "CA_BUNDLE: no such file"),
    ({"PROVIDER": "foo"}, "PROVIDER must be auto or one of"), ({"PIN_CPU": "fast"}, "PIN_CPU must be auto, off or a CPU number"),
])
def test_settings_bad_values_are_one_clear_line(environ, message):
    with pytest.raises(ValueError) as info:
        cp.load_settings(environ, [], "")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_describe_settings_masks_keys():
    text = cp.describe_settings(cp.Settings(openai_api_key="sk-secret-value"))
    assert "sk-secret-value" not in text and "set (15 characters)" in text


def test_describe_settings_says_not_set_for_every_empty_setting():
    lines = cp.describe_settings(cp.Settings()).splitlines()
    assert "CA_BUNDLE           not set" in lines and "OPENAI_API_KEY      not set" in lines
    assert [line for line in lines if line.rstrip() != line or len(line.split(None, 1)) < 2] == []
    assert "CA_BUNDLE           /etc/corp.pem" in cp.describe_settings(cp.Settings(ca_bundle="/etc/corp.pem")).splitlines()


# =============================================================================================
# Errors
# =============================================================================================


@pytest.mark.parametrize("status,body,status_out,type_out,retry", [
    (400, b'{"error":{"message":"bad thing","type":"invalid_request_error"}}', 400, "invalid_request_error", "false"),
    (401, b'{"error":{"message":"no key"}}', 401, "authentication_error", "false"),
    (403, b'{"error":{"message":"nope"}}', 403, "permission_error", "false"),
    (404, b'{"error":{"message":"no model"}}', 404, "not_found_error", "false"),
    (422, b'{"detail":"unprocessable"}', 400, "invalid_request_error", "false"),
    (429, b'{"error":{"message":"slow down"}}', 429, "rate_limit_error", None),
    (429, b'{"error":{"message":"You exceeded your current quota"}}', 429, "rate_limit_error", "false"),
    (500, b'{"error":{"message":"boom"}}', 500, "api_error", None),
    (503, b'<html><body><h1>503 Service Unavailable</h1></body></html>', 529, "overloaded_error", None),
    (504, b"gateway timeout", 504, "timeout_error", None),
    (418, b"teapot", 400, "invalid_request_error", "false"),
    (599, b"odd", 502, "api_error", None),
])
def test_upstream_error_mapping(status, body, status_out, type_out, retry):
    err = cp.upstream_error(status, body, None)
    assert (err.status, err.error_type, err.headers.get("x-should-retry")) == (status_out, type_out, retry)
    assert err.message.startswith("upstream: ") and "<" not in err.message


def test_upstream_error_messages_of_every_shape():
    assert cp.upstream_error_message([{"error": {"code": 400, "message": "gemini says"}}], "") == "gemini says"
    assert cp.upstream_error_message({"error": "plain"}, "") == "plain"
    assert cp.upstream_error_message({"error": {"message": "tool call failed", "code": "tool_use_failed",
                                                "failed_generation": "<fn>"}}, "") == \
        "tool call failed\nfailed_generation: <fn>"
    assert cp.upstream_error_message("<html><title>Bad Gateway</title></html>", "x") == "Bad Gateway"


def test_log_records_and_tracebacks_are_redacted():
    try:
        raise ValueError("Invalid header value b'Bearer sk-live-SECRET'")
    except ValueError:
        record = logging.LogRecord("claude_proxy", logging.ERROR, __file__, 1, "key %s", ("sk-live-SECRET",), sys.exc_info())
    assert cp.RedactSecrets(cp.Redactor(("sk-live-SECRET",))).filter(record)
    assert "sk-live-SECRET" not in record.getMessage() and "Bearer ***" in record.getMessage()
    assert record.exc_info is None


def test_retry_after_passed_through():
    assert cp.upstream_error(429, b"{}", "7").headers["retry-after"] == "7"


# --- context overflow in Anthropic's words (issue 12 item 6) ----------------------------------
# Each provider's real wording of "the prompt does not fit" -> Anthropic's 400, which Claude Code
# answers by compacting the conversation. Bodies as the providers send them (sources in the
# commit message); a context error that only a smaller max_tokens fixes stays the upstream's.

def _openai_error(message, code=None, type_="invalid_request_error", param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


TOO_LONG = "prompt is too long: %d tokens > %d maximum"
CONTEXT_OVERFLOW_CASES = [
    ("openai messages", 400, _openai_error(
        "This model's maximum context length is 128000 tokens. However, your messages resulted in 130043 tokens. "
        "Please reduce the length of the messages.", "context_length_exceeded", param="messages"),
     400, "invalid_request_error", TOO_LONG % (130043, 128000)),
    ("openai, prompt and completion: prompt alone too long", 400, _openai_error(
        "This model's maximum context length is 8192 tokens. However, you requested 9100 tokens (8300 in the "
        "messages, 800 in the completion). Please reduce the length of the messages or completion.",
        "context_length_exceeded", param="messages"),
     400, "invalid_request_error", TOO_LONG % (8300, 8192)),
    ("openai, functions counted in the prompt", 400, _openai_error(
        "This model's maximum context length is 8192 tokens. However, you requested 8213 tokens (6683 in the "
        "messages, 730 in the functions, and 800 in the completion). Please reduce the length of the messages, "
        "functions, or completion.", "context_length_exceeded", param="messages"),
     400, "invalid_request_error", "upstream: This model's maximum context length is 8192 tokens. However, you "
     "requested 8213 tokens (6683 in the messages, 730 in the functions, and 800 in the completion). Please reduce "
     "the length of the messages, functions, or completion."),
    ("deepseek", 400, _openai_error(
        "This model's maximum context length is 65536 tokens. However, you requested 68161 tokens (68161 in the "
        "messages, 0 in the completion). Please reduce the length of the messages or completion.",
        "invalid_request_error"),
     400, "invalid_request_error", TOO_LONG % (68161, 65536)),
    ("deepseek, prompt alone over the window", 400, _openai_error(
        "This model's maximum context length is 131072 tokens. However, you requested 141980 tokens (133980 in the "
        "messages, 8000 in the completion). Please reduce the length of the messages or completion.",
        "invalid_request_error"),
     400, "invalid_request_error", TOO_LONG % (133980, 131072)),
    ("vllm input", 400, {"object": "error", "message": "This model's maximum context length is 32768 tokens. However, "
                         "your request has 40000 input tokens. Please reduce the length of the input messages.",
                         "type": "BadRequestError", "param": None, "code": 400},
     400, "invalid_request_error", TOO_LONG % (40000, 32768)),
    ("vllm max_tokens, no room", 400, {"error": {"message": "'max_tokens' or 'max_completion_tokens' is too large: "
     "64000. This model's maximum context length is 32768 tokens and your request has 40000 input tokens "
     "(64000 > 32768 - 40000).", "type": "BadRequestError", "param": None, "code": 400}},
     400, "invalid_request_error", TOO_LONG % (40000, 32768)),
    ("vllm newer wording, no room", 400, {"error": {"message": "This model's maximum context length is 131072 tokens. "
     "However, you requested 64000 output tokens and your prompt contains at least 140000 input tokens, for a total "
     "of at least 204000 tokens.", "type": "BadRequestError", "param": None, "code": 400}},
     400, "invalid_request_error", TOO_LONG % (140000, 131072)),
    ("vllm engine", 400, {"error": {"message": "The decoder prompt (length 17772) is longer than the maximum model "
                                    "length of 16384. Make sure that `max_model_len` is no smaller than the number "
                                    "of text tokens.", "type": "BadRequestError", "code": 400}},
     400, "invalid_request_error", TOO_LONG % (17772, 16384)),
    ("llama.cpp", 400, {"error": {"code": 400, "message": "request (4476 tokens) exceeds the available context size "
                                  "(4096 tokens), try increasing it", "type": "exceed_context_size_error",
                                  "n_prompt_tokens": 4476, "n_ctx": 4096}},
     400, "invalid_request_error", TOO_LONG % (4476, 4096)),
    ("llama.cpp, numbers only in the fields", 400, {"error": {"code": 400, "message": "the request exceeds the "
     "available context size, try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 9000,
     "n_ctx": 8192}}, 400, "invalid_request_error", TOO_LONG % (9000, 8192)),
    ("llama.cpp, older build", 400, {"error": {"code": 400, "message": "the request exceeds the available context "
                                               "size, try increasing it", "type": "invalid_request_error"}},
     400, "invalid_request_error", "prompt is too long: the request exceeds the available context size, try "
     "increasing it"),
    ("gemini", 400, [{"error": {"code": 400, "message": "The input token count (1200293) exceeds the maximum number "
                                "of tokens allowed (1048576).", "status": "INVALID_ARGUMENT"}}],
     400, "invalid_request_error", TOO_LONG % (1200293, 1048576)),
    ("openrouter, no room", 400, {"error": {"message": "This endpoint's maximum context length is 131072 tokens. "
     "However, you requested about 204000 tokens (140000 of text input, 64000 in the output). Please reduce the "
     "length of either one, or use the \"middle-out\" transform to compress your prompt automatically.", "code": 400}},
     400, "invalid_request_error", TOO_LONG % (140000, 131072)),
    ("openrouter in front of anthropic", 400, {"error": {"message": "prompt is too long: 210000 tokens > 200000 "
                                                         "maximum", "code": 400}},
     400, "invalid_request_error", TOO_LONG % (210000, 200000)),
    ("ollama", 400, {"error": {"message": "prompt too long; exceeded max context length by 4096 tokens",
                               "type": "api_error", "param": None, "code": None}},
     400, "invalid_request_error", "prompt is too long: prompt too long; exceeded max context length by 4096 tokens"),
    ("lm studio", 400, {"error": "Trying to keep the first 15857 tokens when context the overflows. However, the "
                                 "model is loaded with context length of only 4096 tokens, which is not enough. Try "
                                 "to load the model with a larger context length, or provide a shorter input"},
     400, "invalid_request_error", TOO_LONG % (15857, 4096)),
    ("lm studio, newer", 400, {"error": "The number of tokens to keep from the initial prompt is greater than the "
                                        "context length. Try to load the model with a larger context length, or "
                                        "provide a shorter input"},
     400, "invalid_request_error", "prompt is too long: The number of tokens to keep from the initial prompt is "
     "greater than the context length. Try to load the model with a larger context length, or provide a shorter "
     "input"),
    ("lm studio, llama.cpp engine", 400, {"error": "Cannot truncate prompt with n_keep (15028) >= n_ctx (7424)"},
     400, "invalid_request_error", TOO_LONG % (15028, 7424)),
    ("groq", 400, _openai_error("Please reduce the length of the messages or completion.", "context_length_exceeded",
                                param="messages"),
     400, "invalid_request_error", "prompt is too long: Please reduce the length of the messages or completion."),
    ("mistral", 400, {"object": "error", "message": "Prompt contains 40000 tokens and 0 draft tokens, too large for "
                      "model with 32768 maximum context length", "type": "invalid_request_message_error",
                      "param": None, "code": "3051"},
     400, "invalid_request_error", TOO_LONG % (40000, 32768)),
    ("overflow on a 5xx is still the client's 400", 500, {"error": {"message": "request (5000 tokens) exceeds the "
     "available context size (4096 tokens), try increasing it", "type": "exceed_context_size_error"}},
     400, "invalid_request_error", TOO_LONG % (5000, 4096)),
    ("prompt fits, output does not: the upstream's words (max_tokens is lowered)", 400, _openai_error(
        "This model's maximum context length is 131072 tokens. However, you requested 131134 tokens (122942 in the "
        "messages, 8192 in the completion). Please reduce the length of the messages or completion."),
     400, "invalid_request_error", "upstream: This model's maximum context length is 131072 tokens. However, you "
     "requested 131134 tokens (122942 in the messages, 8192 in the completion). Please reduce the length of the "
     "messages or completion."),
    ("a rate limit in tokens is no overflow", 429, _openai_error(
        "Request too large for model `llama3-70b-8192` on tokens per minute (TPM): Limit 6000, Requested 7000",
        "rate_limit_exceeded", type_="tokens"),
     429, "rate_limit_error", "upstream: Request too large for model `llama3-70b-8192` on tokens per minute (TPM): "
     "Limit 6000, Requested 7000"),
]


@pytest.mark.parametrize("name,status,body,status_out,type_out,message",
                         CONTEXT_OVERFLOW_CASES, ids=[c[0] for c in CONTEXT_OVERFLOW_CASES])
def test_context_overflow_in_anthropic_words(name, status, body, status_out, type_out, message):
    err = cp.upstream_error(status, json.dumps(body).encode(), "3")
    assert (err.status, err.error_type, err.message) == (status_out, type_out, message)
    if message.startswith("prompt is too long"):
        assert err.headers == {"x-should-retry": "false"}     # no retry-after: nothing to wait for
        # What Claude Code 2.1.332 reads the numbers with.
        numbers = re.search(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", err.message)
        assert (numbers is not None) == ("maximum" in message and ">" in message)
    assert err.upstream_status == status        # failover still sees the upstream's status


def test_context_overflow_keeps_the_max_tokens_fix_when_the_prompt_fits():
    # The same wording: room left -> lower max_tokens and retry; no room -> overflow, no fix.
    body = {"model": "deepseek-chat", "messages": [], "max_tokens": 8192}
    fits = ("This model's maximum context length is 131072 tokens. However, you requested 131134 tokens (122942 in "
            "the messages, 8192 in the completion). Please reduce the length of the messages or completion.")
    assert cp.context_overflow(fits, None) is None
    assert cp.fix_from_error(body, fits) == (cp.ModelFixes(max_output=131072 - 122942 - 1310), False)
    full = fits.replace("122942 in the messages", "132000 in the messages").replace("131134", "140192")
    assert cp.context_overflow(full, None) == TOO_LONG % (132000, 131072)
    assert cp.fix_from_error(body, full) == (None, False)
    # Within the 1 % margin the prompt fits but leaves no room: an overflow in the provider's words.
    edge = fits.replace("122942 in the messages", "130500 in the messages").replace("131134", "138692")
    assert cp.fix_from_error(body, edge) == (None, False)
    assert cp.context_overflow(edge, None) == "prompt is too long: " + edge


def test_context_overflow_in_a_200_body_and_a_stream_chunk():
    completion = {"error": {"message": "The input token count (300000) exceeds the maximum number of tokens allowed "
                                       "(262144).", "code": 400, "status": "INVALID_ARGUMENT"}}
    with pytest.raises(cp.ProxyError) as raised:
        cp.to_anthropic(completion, cp.ResponseContext("m", "msg_1"), lambda: "toolu_1")
    assert (raised.value.status, raised.value.error_type, raised.value.message) == (
        400, "invalid_request_error", TOO_LONG % (300000, 262144))
    # A stream's error chunk: the call the stream translator makes for its error event.
    chunk = {"error": {"message": "prompt too long; exceeded max context length by 12 tokens"}}
    assert cp.context_overflow(cp.upstream_error_message(chunk, "error in stream"), chunk) == \
        "prompt is too long: prompt too long; exceeded max context length by 12 tokens"
    chunk = {"error": {"message": "Internal server error", "code": 500}}
    assert cp.context_overflow(cp.upstream_error_message(chunk, "error in stream"), chunk) is None


def test_e2e_context_overflow_reaches_the_client_as_anthropic_400_without_a_retry(upstream, proxy):
    no_room = {"error": {"message": "This model's maximum context length is 65536 tokens. However, you requested "
                                    "70096 tokens (70000 in the messages, 96 in the completion). Please reduce the "
                                    "length of the messages or completion.", "type": "invalid_request_error"}}
    upstream.script.append(json_reply(no_room, 400))
    status, headers, payload = Client(proxy).json("POST", "/v1/messages", req(max_tokens=96, stream=True))
    assert (status, headers["x-should-retry"], payload["type"], payload["error"]) == (
        400, "false", "error", {"type": "invalid_request_error", "message": TOO_LONG % (70000, 65536)})
    assert len(upstream.requests) == 1, "no max_tokens can make room for a prompt that does not fit"


# =============================================================================================
# Request translation
# =============================================================================================


def req(**fields):
    base = {"model": "claude-opus-4-8", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    base.update(fields)
    return base


def out(messages, **fields):
    base = {"model": "gpt-4o", "messages": messages, "max_tokens": 100}
    base.update(fields)
    return base


TOOL = {"name": "Bash", "description": "Run", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}
FN = {"type": "function", "function": {"name": "Bash", "description": "Run",
                                       "parameters": TOOL["input_schema"]}}
CALL = {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls"}}
OPENAI_CALL = {"id": "toolu_01", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}

REQUEST_CASES = [
    ("string user content", req(), out([{"role": "user", "content": "hi"}])),
    ("system string first", req(system="be brief"),
     out([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])),
    ("system blocks joined, billing header and cache_control dropped", req(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.c40; cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "B"}]),
     out([{"role": "system", "content": "A\n\nB"}, {"role": "user", "content": "hi"}])),
    ("text blocks joined, empty dropped", req(messages=[{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": ""},
        {"type": "text", "text": "two", "cache_control": {"type": "ephemeral"}}]}]),
     out([{"role": "user", "content": "one\n\ntwo"}])),
    ("images base64 and url", req(messages=[{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]),
     out([{"role": "user", "content": [
         {"type": "text", "text": "look"},
         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
         {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])),
    ("mid-conversation system message merged into the user turn before it", req(messages=[
        {"role": "user", "content": "hi"}, {"role": "system", "content": "agents: A"}]),
     out([{"role": "user", "content": "hi\n\n<system-reminder>\nagents: A\n</system-reminder>"}])),
    ("mid-conversation system message as blocks, merged into the user turn after it", req(messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "system", "content": [{"type": "text", "text": "skills", "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "go"}]),
     out([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
          {"role": "user", "content": "<system-reminder>\nskills\n</system-reminder>\n\ngo"}])),
    ("tool round trip, thinking dropped", req(messages=[
        {"role": "user", "content": "list"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "text", "text": "Running it."}, CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.txt",
                                      "is_error": False, "cache_control": {"type": "ephemeral"}}]}]),
     out([{"role": "user", "content": "list"},
          {"role": "assistant", "content": "Running it.", "tool_calls": [OPENAI_CALL]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": "a.txt"}])),
    ("results reordered to call order, text after results becomes a user message", req(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [CALL, dict(CALL, id="toolu_02", input={})]},
        {"role": "user", "content": [
            {"type": "text", "text": "and then?"},
            {"type": "tool_result", "tool_use_id": "toolu_02", "content": [{"type": "text", "text": "two"}]},
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "one", "is_error": True}]}]),
     out([{"role": "user", "content": "go"},
          {"role": "assistant", "content": None, "tool_calls": [
              OPENAI_CALL, {"id": "toolu_02", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": "Error: one"},
          {"role": "tool", "tool_call_id": "toolu_02", "content": "two"},
          {"role": "user", "content": "and then?"}])),
    ("unicode tool input kept as is", req(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [dict(CALL, input={"command": "echo héllo 🚀"})]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": ""}]}]),
     out([{"role": "user", "content": "go"},
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "toolu_01", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "echo héllo 🚀"}'}}]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": ""}])),
    ("image inside a tool result moves to a user message after the tool messages", req(messages=[
        {"role": "user", "content": "shot"},
        {"role": "assistant", "content": [CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": [
            {"type": "text", "text": "screenshot:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "UE5H"}}]}]}]),
     out([{"role": "user", "content": "shot"},
          {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": "screenshot:\n[image attached in the next message]"},
          {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,UE5H"}}]}])),
    ("unanswered call gets a synthetic result, orphan result becomes text", req(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_gone", "content": "old"},
                                     {"type": "text", "text": "stop that"}]}]),
     out([{"role": "user", "content": "go"},
          {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": cp.INTERRUPTED_RESULT},
          {"role": "user", "content": "[Result of tool call toolu_gone]\nold\n\nstop that"}])),
    ("results in separate user turns still answer their calls", req(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [CALL]}, {"role": "assistant", "content": [dict(CALL, id="toolu_02")]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_02", "content": "b"}]}]),
     out([{"role": "user", "content": "go"},
          {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL, dict(OPENAI_CALL, id="toolu_02")]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": "a"},
          {"role": "tool", "tool_call_id": "toolu_02", "content": "b"}])),
    ("deferred tools stay hidden until a tool_reference loads them", req(
        tools=[TOOL, dict(TOOL, name="WebFetch", defer_loading=True), dict(TOOL, name="DeferredToolPlaceholder", defer_loading=True)],
        messages=[{"role": "user", "content": "fetch"},
                  {"role": "assistant", "content": [dict(CALL, name="ToolSearch", input={"query": "select:WebFetch"})]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": [
                      {"type": "tool_reference", "tool_name": "WebFetch"}]}, {"type": "text", "text": "Tool loaded."}]}]),
     out([{"role": "user", "content": "fetch"},
          {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_01", "type": "function", "function": {
              "name": "ToolSearch", "arguments": '{"query": "select:WebFetch"}'}}]},
          {"role": "tool", "tool_call_id": "toolu_01", "content": "Tool loaded: WebFetch"},
          {"role": "user", "content": "Tool loaded."}],
         tools=[FN, {"type": "function", "function": dict(FN["function"], name="WebFetch")}])),
    ("tools, tool_choice any, parallel disabled", req(tools=[TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True}),
     out([{"role": "user", "content": "hi"}], tools=[FN], tool_choice="required", parallel_tool_calls=False)),
    ("tool_choice tool", req(tools=[TOOL], tool_choice={"type": "tool", "name": "Bash"}),
     out([{"role": "user", "content": "hi"}], tools=[FN], tool_choice={"type": "function", "function": {"name": "Bash"}})),
    ("tool_choice auto and none", req(tools=[dict(TOOL, cache_control={"type": "ephemeral"})], tool_choice={"type": "none"}),
     out([{"role": "user", "content": "hi"}], tools=[FN], tool_choice="none")),
    ("server tool dropped", req(tools=[{"type": "web_search_20250305", "name": "web_search"}], tool_choice={"type": "auto"}),
     out([{"role": "user", "content": "hi"}])),
    ("sampling, stop sequences (at most 4), stream", req(
        temperature=0.2, top_p=0.9, top_k=5, stop_sequences=["a", "b", "c", "d", "e"], stream=True),
     out([{"role": "user", "content": "hi"}], temperature=0.2, top_p=0.9, stop=["a", "b", "c", "d"],
         stream=True, stream_options={"include_usage": True})),
    ("fields with no counterpart ignored", req(
        metadata={"user_id": "{\"device_id\":\"x\"}"}, thinking={"type": "adaptive", "display": "omitted"},
        output_config={"effort": "high"}, context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        service_tier="auto", container="c", max_tokens=128000),
     out([{"role": "user", "content": "hi"}], max_tokens=128000)),
    ("structured output as response_format", req(output_config={"effort": "low", "format": {
        "type": "json_schema", "schema": {"type": "object", "properties": {"title": {"type": "string"}}}}}),
     out([{"role": "user", "content": "hi"}], response_format={"type": "json_schema", "json_schema": {
         "name": "output", "schema": {"type": "object", "properties": {"title": {"type": "string"}}}}})),
    ("plain-text document inlined, PDF as a file part", req(messages=[{"role": "user", "content": [
        {"type": "document", "title": "notes", "source": {"type": "text", "media_type": "text/plain", "data": "abc"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]),
     out([{"role": "user", "content": [
         {"type": "text", "text": "Document: notes"}, {"type": "text", "text": "abc"},
         {"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBE"}}]}])),
]


@pytest.mark.parametrize("name,anthropic_in,openai_out", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_to_openai(name, anthropic_in, openai_out):
    before = json.dumps(anthropic_in, sort_keys=True)
    assert cp.to_openai(cp.validate_request(anthropic_in), SETTINGS) == openai_out
    assert json.dumps(anthropic_in, sort_keys=True) == before, "input was mutated"


@pytest.mark.parametrize("model,expected", [
    ("claude-opus-4-8", "big"), ("claude-opus-5-5", "big"), ("claude-sonnet-5", "middle"),
    ("claude-3-5-Sonnet-latest", "middle"), ("claude-haiku-4-5-20251001", "small"),
    ("deepseek-chat", "deepseek-chat"), ("gpt-4.1", "gpt-4.1")])
def test_model_mapping(model, expected):
    settings = cp.Settings(big_model="big", middle_model="middle", small_model="small")
    assert cp.map_model(model, settings) == expected


def test_middle_model_defaults_to_big_model():
    assert cp.map_model("claude-sonnet-5-5", cp.Settings(big_model="big")) == "big"


def test_max_tokens_limit_caps_only_when_set():
    request = req(max_tokens=64000)
    assert cp.to_openai(request, SETTINGS)["max_tokens"] == 64000
    limited = dataclasses.replace(SETTINGS, max_tokens_limit=8192)
    assert cp.to_openai(request, limited)["max_tokens"] == 8192
    assert cp.to_openai(req(max_tokens=100), limited)["max_tokens"] == 100


@pytest.mark.parametrize("request_body,message", [
    ([], "JSON object"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    (req(messages=[]), "messages"),
    (req(messages="hi"), "messages"),
    (req(max_tokens="many"), "max_tokens"),
    (req(messages=[{"role": "tool", "content": "x"}]), "role"),
    (req(messages=[{"role": "user", "content": 5}]), "content"),
    (req(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]), "image source"),
    (req(tools="Bash"), "tools"),
])
def test_invalid_requests_are_400(request_body, message):
    with pytest.raises(cp.ProxyError) as info:
        cp.to_openai(cp.validate_request(request_body), SETTINGS)
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"
    assert message in info.value.message and info.value.headers["x-should-retry"] == "false"


# =============================================================================================
# Response translation
# =============================================================================================

CTX = cp.ResponseContext(model="claude-opus-4-8", message_id="msg_1", stop_sequences=("END",))


def completion(message, finish_reason="stop", usage=None, **choice):
    return {"id": "chatcmpl-1", "object": "chat.completion",
            "choices": [dict({"index": 0, "message": dict({"role": "assistant"}, **message),
                              "finish_reason": finish_reason}, **choice)],
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5}}


def message_out(content, stop_reason="end_turn", stop_sequence=None, usage=None):
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-8",
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": usage or {"input_tokens": 10, "output_tokens": 5,
                               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


RESPONSE_CASES = [
    ("text", completion({"content": "Hi"}), message_out([{"type": "text", "text": "Hi"}])),
    ("null content, no blocks", completion({"content": None}), message_out([])),
    ("tool call, id kept, arguments parsed",
     completion({"content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
         "name": "Bash", "arguments": '{"command":"ls"}'}}]}, "tool_calls"),
     message_out([{"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}], "tool_use")),
    ("text then two calls, missing id generated, empty and object arguments",
     completion({"content": "Both.", "tool_calls": [
         {"id": "", "type": "function", "function": {"name": "A", "arguments": ""}},
         {"id": "c2", "type": "function", "function": {"name": "B", "arguments": {"x": 1}}}]}, "tool_calls"),
     message_out([{"type": "text", "text": "Both."},
                  {"type": "tool_use", "id": "toolu_gen1", "name": "A", "input": {}},
                  {"type": "tool_use", "id": "c2", "name": "B", "input": {"x": 1}}], "tool_use")),
    ("finish_reason stop although a tool was called",
     completion({"content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
         "name": "A", "arguments": "{}"}}]}, "stop"),
     message_out([{"type": "tool_use", "id": "c", "name": "A", "input": {}}], "tool_use")),
    ("length", completion({"content": "cut"}, "length"), message_out([{"type": "text", "text": "cut"}], "max_tokens")),
    ("content_filter", completion({"content": ""}, "content_filter"), message_out([], "refusal")),
    ("refusal field", completion({"content": None, "refusal": "I can't."}),
     message_out([{"type": "text", "text": "I can't."}], "refusal")),
    ("stop sequence left at the end is trimmed and reported", completion({"content": "abcEND"}),
     message_out([{"type": "text", "text": "abc"}], "stop_sequence", "END")),
    ("stop sequence reported by vLLM", completion({"content": "abc"}, stop_reason="END"),
     message_out([{"type": "text", "text": "abc"}], "stop_sequence", "END")),
    ("reasoning becomes a thinking block first", completion({"content": "4", "reasoning_content": "2+2"}),
     message_out([{"type": "thinking", "thinking": "2+2", "signature": cp.thinking_signature("2+2")},
                  {"type": "text", "text": "4"}])),
    ("cached tokens reported as cache reads, not input",
     completion({"content": "x"}, usage={"prompt_tokens": 100, "completion_tokens": 3,
                                          "prompt_tokens_details": {"cached_tokens": 64}}),
     message_out([{"type": "text", "text": "x"}], usage={
         "input_tokens": 36, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 64})),
]


@pytest.mark.parametrize("name,openai_in,anthropic_out", RESPONSE_CASES, ids=[c[0] for c in RESPONSE_CASES])
def test_to_anthropic(name, openai_in, anthropic_out):
    assert cp.to_anthropic(openai_in, CTX, ids()) == anthropic_out


@pytest.mark.parametrize("arguments,expected", [
    ('{"a": 1}', {"a": 1}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('{"a": [1, 2,],}', {"a": [1, 2]}),
    ("{'a': 'b', 'c': True}", {"a": "b", "c": True}),
    ('{"a": ', {"_raw_arguments": '{"a": '}),
    ("[1, 2]", {"_raw_arguments": "[1, 2]"}),
])
def test_tool_arguments_repaired_or_kept_raw(arguments, expected):
    # Invalid arguments are never silently lost: repaired when a lenient parse can, else
    # handed on verbatim so the client's validation error tells the model what went wrong.
    assert cp.parse_tool_arguments(arguments) == expected


def test_upstream_answer_without_choices_is_502():
    with pytest.raises(cp.ProxyError) as info:
        cp.to_anthropic({"id": "x", "choices": []}, CTX, ids())
    assert info.value.status == 502


# =============================================================================================
# Stream translation, chunk by chunk
# =============================================================================================


def chunk(delta=None, finish_reason=None, usage=None, **extra):
    choices = [] if delta is None and finish_reason is None else [
        {"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]
    body = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    body.update(extra)
    return body


def tool_delta(index, arguments=None, call_id=None, name=None):
    fragment = {"index": index, "function": {}}
    if call_id:
        fragment.update(id=call_id, type="function")
    if name:
        fragment["function"]["name"] = name
    if arguments is not None:
        fragment["function"]["arguments"] = arguments
    return {"tool_calls": [fragment]}


USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 20}}


def test_stream_text_exact_events():
    events = run_translator([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                             chunk({"content": "lo"}), chunk({}, "stop"), chunk(usage=USAGE)])
    assert events == [
        {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-8", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}},
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"input_tokens": 100, "output_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 20}},
        {"type": "message_stop"}]


def test_stream_tool_arguments_split_mid_string_and_mid_character_forwarded_as_they_come():
    # "\ud83d" and "\ude80" are the two halves of 🚀 as JSON escapes; the é is split from its
    # key mid-string. Each fragment goes out at once, unchanged.
    pieces = ['{"comm', 'and": "echo h', 'é \\ud83d', '\\ude80"}']
    events = run_translator([chunk({"role": "assistant"}), chunk(tool_delta(0, "", "call_1", "Bash"))]
                            + [chunk(tool_delta(0, p)) for p in pieces] + [chunk({}, "tool_calls")])
    assert non_meta(events) == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}}]\
        + [{"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": p}} for p in pieces]\
        + [{"type": "content_block_stop", "index": 0},
           {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"input_tokens": 7, "output_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}},
           {"type": "message_stop"}]
    assert cp.assemble_message(events)["content"][0]["input"] == {"command": "echo hé 🚀"}


def test_stream_text_then_two_sequential_calls():
    events = run_translator([
        chunk({"content": "Let me look."}),
        chunk(tool_delta(0, '{"a":', "call_a", "Read")), chunk(tool_delta(0, "1}")),
        chunk(tool_delta(1, "", "call_b", "Grep")), chunk(tool_delta(1, '{"b":2}')),
        chunk({}, "tool_calls"), chunk(usage=USAGE)])
    kinds = [(e["type"], e.get("index")) for e in non_meta(events)]
    assert kinds == [("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
                     ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
                     ("content_block_stop", 1), ("content_block_start", 2), ("content_block_delta", 2),
                     ("content_block_stop", 2), ("message_delta", None), ("message_stop", None)]
    message = cp.assemble_message(events)
    assert [b.get("input") for b in message["content"]] == [None, {"a": 1}, {"b": 2}]
    assert message["stop_reason"] == "tool_use"


def test_stream_two_parallel_calls_interleaved():
    events = run_translator([
        chunk(tool_delta(0, "", "call_a", "Read")), chunk(tool_delta(1, "", "call_b", "Grep")),
        chunk(tool_delta(0, '{"path":')), chunk(tool_delta(1, '{"pattern":')),
        chunk(tool_delta(0, '"x"}')), chunk(tool_delta(1, '"y"}')), chunk({}, "tool_calls")])
    message = cp.assemble_message(events)
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("call_a", "Read", {"path": "x"}), ("call_b", "Grep", {"pattern": "y"})]
    # the first call streams live; the second opens once the first one's JSON is complete
    deltas = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert deltas == ['{"path":', '"x"}', '{"pattern":"y"}']


def test_stream_call_without_arguments_gets_empty_object():
    events = run_translator([chunk(tool_delta(0, None, "call_1", "TaskList")), chunk({}, "tool_calls")])
    assert [e["delta"] for e in events if e["type"] == "content_block_delta"] == [
        {"type": "input_json_delta", "partial_json": "{}"}]


def test_stream_reasoning_then_text():
    events = run_translator([chunk({"reasoning_content": "think"}), chunk({"reasoning_content": " more", "content": None}),
                             chunk({"content": "answer"}), chunk({}, "stop")])
    assert [(e["type"], e.get("delta")) for e in non_meta(events)][:5] == [
        ("content_block_start", None),
        ("content_block_delta", {"type": "thinking_delta", "thinking": "think"}),
        ("content_block_delta", {"type": "thinking_delta", "thinking": " more"}),
        ("content_block_delta", {"type": "signature_delta", "signature": cp.thinking_signature("think more")}),
        ("content_block_stop", None)]
    assert cp.assemble_message(events)["content"][1] == {"type": "text", "text": "answer"}


def test_stream_finish_reason_on_the_chunk_with_the_last_content():
    events = run_translator([chunk({"content": "all at once"}, "stop")])
    assert cp.assemble_message(events)["content"] == [{"type": "text", "text": "all at once"}]


def test_stream_end_without_finish_reason_is_an_error_not_a_success():
    events = run_translator([chunk({"content": "partial"})], done=False)
    assert events[-1] == {"type": "error", "error": {
        "type": "api_error", "message": "the upstream closed the stream after 1 events, before the answer ended"}}
    assert not any(e["type"] == "message_stop" for e in events)


# OpenRouter relaying Kimi K2, Snowflake Cortex: [DONE] (or a closing usage-only chunk) after
# content, but never a finish_reason: a finished answer, not a cut one.
@pytest.mark.parametrize("chunks,done,stop_reason", [
    ([chunk({"content": "all of it"})], True, "end_turn"),
    ([chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "Bash", "arguments": '{"a":1}'}}]})],
     True, "tool_use"),
    ([chunk({"content": "all"}), chunk(usage={"prompt_tokens": 3, "completion_tokens": 2})], False, "end_turn"),
])
def test_done_without_finish_reason_after_content_is_a_finished_answer(chunks, done, stop_reason):
    events = run_translator(chunks, done=done)
    assert events[-1] == {"type": "message_stop"}
    assert events[-2]["delta"]["stop_reason"] == stop_reason


def test_context_overflow_inside_a_stream_is_said_in_anthropics_words():
    error = {"error": {"message": "This model's maximum context length is 128000 tokens. However, your messages "
                                  "resulted in 131072 tokens. Please reduce the length of the messages.",
                       "code": "context_length_exceeded"}}
    events = run_translator([chunk({"role": "assistant", "content": ""}), error])
    assert events[-1]["error"] == {"type": "invalid_request_error",
                                   "message": "prompt is too long: 131072 tokens > 128000 maximum"}


MAGISTRAL_PARTS = [{"type": "thinking", "thinking": [{"type": "text", "text": "Let me think."}]},
                   {"type": "text", "text": "The answer is 4."}]


def test_mistral_magistral_typed_parts_become_thinking_then_text_streaming_and_not():
    events = run_translator([chunk({"role": "assistant", "content": [MAGISTRAL_PARTS[0]]}),
                             chunk({"content": [MAGISTRAL_PARTS[1]]}), chunk({}, "stop")])
    message = cp.assemble_message(events)
    assert [(b["type"], b.get("thinking") or b.get("text")) for b in message["content"]] == [
        ("thinking", "Let me think."), ("text", "The answer is 4.")]
    whole = cp.to_anthropic(completion({"content": MAGISTRAL_PARTS}), cp.ResponseContext("m", "msg_1"), ids())
    assert [(b["type"], b.get("thinking") or b.get("text")) for b in whole["content"]] == [
        ("thinking", "Let me think."), ("text", "The answer is 4.")]
    refused = cp.to_anthropic(completion({"content": [{"type": "refusal", "refusal": "No."}]}),
                              cp.ResponseContext("m", "msg_1"), ids())
    assert refused["content"] == [{"type": "text", "text": "No."}] and refused["stop_reason"] == "refusal"


@pytest.mark.parametrize("stream", [True, False])
def test_end_to_end_magistral_typed_parts(upstream, stream):
    if stream:
        upstream.script.append(sse_reply([chunk({"role": "assistant", "content": [MAGISTRAL_PARTS[0]]}),
                                          chunk({"content": [MAGISTRAL_PARTS[1]]}), chunk({}, "stop")]))
    else:
        upstream.script.append(json_reply(completion({"content": MAGISTRAL_PARTS})))
    with running_proxy(upstream.url) as server:
        client = Client(server)
        request = claude_code_request(stream=stream, tools=8)
        if stream:
            message = cp.assemble_message(client.stream(request))
        else:
            message = client.json("POST", "/v1/messages", request)[2]
    assert [(b["type"], b.get("thinking") or b.get("text")) for b in message["content"]] == [
        ("thinking", "Let me think."), ("text", "The answer is 4.")]


def test_end_to_end_stream_without_finish_reason_and_usage_only_in_x_groq(upstream):
    # The shape of OpenRouter relaying Kimi K2 behind Groq: no finish_reason at all, the usage
    # only in the last chunk's x_groq, then [DONE]: a finished answer with the real usage.
    upstream.script.append(sse_reply([
        chunk({"role": "assistant", "content": ""}), chunk(tool_delta(0, '{"command": "ls"}', "call_1", "Bash")),
        {"id": "c", "object": "chat.completion.chunk", "choices": [],
         "x_groq": {"id": "req_1", "usage": {"prompt_tokens": 359, "completion_tokens": 12}}}]))
    with running_proxy(upstream.url) as server:
        events = Client(server).stream(claude_code_request())
    message = cp.assemble_message(events)
    assert message["stop_reason"] == "tool_use" and message["content"][0]["input"] == {"command": "ls"}
    assert (message["usage"]["input_tokens"], message["usage"]["output_tokens"]) == (359, 12)


def test_groq_usage_in_x_groq_is_the_usage_reported():
    last = chunk({}, "stop", x_groq={"id": "req_1", "usage": {"prompt_tokens": 359, "completion_tokens": 12}})
    events = run_translator([chunk({"content": "hi"}), last], input_tokens=1613)
    assert events[-2]["usage"]["input_tokens"] == 359 and events[-2]["usage"]["output_tokens"] == 12


def test_stream_error_chunk_becomes_error_event():
    events = run_translator([chunk({"content": "x"}), {"error": {"message": "Rate limit", "code": 429}}])
    assert events[-1] == {"type": "error", "error": {"type": "rate_limit_error", "message": "upstream: Rate limit"}}


def test_stream_stop_sequence_detected_from_text_tail():
    events = run_translator([chunk({"content": "abc EN"}), chunk({"content": "D"}), chunk({}, "stop")],
                            stop_sequences=["END"])
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_stream_length_and_content_filter():
    assert run_translator([chunk({"content": "x"}, "length")])[-2]["delta"]["stop_reason"] == "max_tokens"
    assert run_translator([chunk({"content": "x"}, "content_filter")])[-2]["delta"]["stop_reason"] == "refusal"


def test_stream_usage_missing_is_estimated_not_null():
    usage = run_translator([chunk({"content": "x" * 40}, "stop")], input_tokens=55)[-2]["usage"]
    assert usage["input_tokens"] == 55 and usage["output_tokens"] == 10


def test_stream_text_in_the_middle_of_tool_arguments_waits_for_the_call_to_complete():
    events = run_translator([
        chunk({"content": "Running it."}), chunk(tool_delta(0, '{"command": "rm -rf build/tmp', "call_1", "Bash")),
        chunk({"content": " "}), chunk({"reasoning_content": "hmm"}), chunk(tool_delta(0, '/cache"}')),
        chunk({"content": "Done."}), chunk({}, "tool_calls")])
    message = cp.assemble_message(events)
    assert [(b["type"], b.get("input") or b.get("text") or b.get("thinking")) for b in message["content"]] == [
        ("text", "Running it."), ("tool_use", {"command": "rm -rf build/tmp/cache"}), ("text", " "),
        ("thinking", "hmm"), ("text", "Done.")]


def test_stream_random_interleavings_never_lose_arguments_or_text():
    import random
    rng = random.Random(1234)
    for case in range(400):
        args = ['{"path": "a/b.py", "n": %d}' % case, '{"pattern": "x\\\\d+", "glob": "*.py"}']
        pieces = []
        for a in args:
            cuts = sorted(rng.sample(range(1, len(a)), rng.randint(1, 6)))
            pieces.append([a[i:j] for i, j in zip([0] + cuts, cuts + [len(a)])])
        script = [("tool", 0, p) for p in pieces[0]] + [("tool", 1, p) for p in pieces[1]]
        texts = ["t%d " % i for i in range(rng.randint(0, 4))]
        script += [("text", None, t) for t in texts]
        rng.shuffle(script)
        # keep each call's fragments in order, and the texts in order
        order = {0: iter(pieces[0]), 1: iter(pieces[1])}
        text_iter = iter(texts)
        chunks, started = [], set()
        for kind, index, _ in script:
            if kind == "text":
                chunks.append(chunk({"content": next(text_iter)}))
            else:
                fragment = next(order[index])
                first = index not in started
                started.add(index)
                chunks.append(chunk(tool_delta(index, fragment, "call_%d" % index if first else None,
                                               ("Read", "Grep")[index] if first else None)))
        message = cp.assemble_message(run_translator(chunks + [chunk({}, "tool_calls")]))
        calls = {b["id"]: b["input"] for b in message["content"] if b["type"] == "tool_use"}
        assert calls == {"call_0": json.loads(args[0]), "call_1": json.loads(args[1])}, case
        assert "".join(b["text"] for b in message["content"] if b["type"] == "text") == "".join(texts), case


@pytest.mark.parametrize("fragments", [
    ['{"a":"\\', '"', '"}'], ['{"a": "}\\"', '"}'], ['[{"x": [1, ', '{"y": "]"}]}', ']'], ['{"a":', ' "b"', '}'],
    ['{"s": "\\\\"', '}'], ['{', '}'],
])
def test_tool_call_json_completeness_tracked_across_fragments(fragments):
    call = cp._ToolCall("c", "c", "A")
    for i in range(len(fragments)):
        call.arguments.append(fragments[i])
        prefix = "".join(fragments[:i + 1])
        try:
            json.loads(prefix)
            valid = True
        except ValueError:
            valid = False
        assert call.complete() == valid, prefix


def test_stream_two_whole_calls_at_one_index_without_ids():
    events = run_translator([chunk(tool_delta(0, '{"a":1}', None, "A")), chunk(tool_delta(0, '{"b":2}', None, "B")),
                             chunk({}, "tool_calls")])
    assert [(b["name"], b["input"]) for b in cp.assemble_message(events)["content"]] == [("A", {"a": 1}), ("B", {"b": 2})]


def test_stream_server_that_sends_a_new_id_on_every_fragment():
    events = run_translator([chunk(tool_delta(0, '{"command":', "id1", "Bash")), chunk(tool_delta(0, ' "ls"}', "id2")),
                             chunk({}, "tool_calls")])
    assert [(b["id"], b["input"]) for b in cp.assemble_message(events)["content"]] == [("id1", {"command": "ls"})]


def test_stream_whitespace_before_a_tool_call_or_reasoning_makes_no_block():
    streamed = cp.assemble_message(run_translator([chunk({"content": "\n\n"}), chunk(tool_delta(0, "{}", "c", "A")),
                                                   chunk({}, "tool_calls")]))
    whole = cp.to_anthropic(completion({"content": "\n\n", "tool_calls": [
        {"id": "c", "function": {"name": "A", "arguments": "{}"}}]}, "tool_calls"), CTX, ids())
    assert [b["type"] for b in streamed["content"]] == [b["type"] for b in whole["content"]] == ["tool_use"]
    events = run_translator([chunk({"content": "\n"}), chunk({"reasoning_content": "r"}), chunk({"content": "Answer"}),
                             chunk({}, "stop")])
    assert [(b["type"], b.get("text")) for b in cp.assemble_message(events)["content"]] == [
        ("thinking", None), ("text", "Answer")]


def test_stream_surrogate_pair_split_across_reasoning_chunks():
    events = run_translator([chunk({"reasoning_content": "smile \ud83d"}), chunk({"reasoning_content": "\ude00 ok"}),
                             chunk({"content": "done"}), chunk({}, "stop")])
    thinking = cp.assemble_message(events)["content"][0]
    assert thinking["signature"] == cp.thinking_signature("smile \U0001F600 ok")
    assert cp.is_proxy_signature(thinking["signature"], thinking["thinking"])


@pytest.mark.parametrize("chunks, blocks", [
    ([chunk({"content": "<"}, "stop")], [("text", "<")]),
    ([chunk({"content": "<think>a</thi"}), chunk({}, "stop")], [("thinking", "a</thi")]),
    ([chunk({"reasoning_content": "r"}), chunk({"content": "<thi"}), chunk({}, "stop")], [("thinking", "r"), ("text", "<thi")]),
    ([chunk(tool_delta(0, '{"a":', "c1", "A")), chunk({"content": "hi"}), chunk(tool_delta(0, "1}")), chunk({}, "stop")],
     [("tool_use", {"a": 1}), ("text", "hi")]),
    ([chunk(tool_delta(0, '{"a":', "c1", "A")), chunk(tool_delta(1, '{"b":2}', "c2", "B")), chunk({"content": "hi"}),
      chunk({}, "stop")], None),
])
def test_stream_end_closes_every_block_it_opens(chunks, blocks):
    # Held text, held tags, deferred text and waiting calls all come out, each block closed
    # (the grammar check in run_translator fails on a block left open before message_delta).
    events = run_translator(chunks)
    if blocks is None:
        # The open call never completed: an error instead of its content_block_stop, so that
        # no client takes the broken input as a finished call; nothing after it.
        assert events[-1]["type"] == "error" and "not a complete JSON object" in events[-1]["error"]["message"]
        assert [e["type"] for e in events[2:]] == ["content_block_start", "content_block_delta", "error"]
        return
    assert events[-1]["type"] == "message_stop"
    content = cp.assemble_message(events)["content"]
    assert [(b["type"], b.get("text", b.get("thinking", b.get("input")))) for b in content] == blocks


@pytest.mark.parametrize("chunks", [
    [chunk(tool_delta(0, '{"command": "ls', "c1", "Bash")), chunk({}, "length")],
    [chunk(tool_delta(0, '{"a":1}', "c1", "A")), chunk(tool_delta(0, '{"a":1}')), chunk({}, "tool_calls")],
    [chunk(tool_delta(0, "[1]", "c1", "A")), chunk({}, "tool_calls")],
])
def test_stream_tool_input_that_is_not_a_json_object_ends_in_an_error(chunks):
    events = run_translator(chunks)
    assert events[-1]["type"] == "error" and "not a complete JSON object" in events[-1]["error"]["message"]


@pytest.mark.parametrize("usage", [{"prompt_tokens_details": "x"}, {"prompt_tokens_details": {"cached_tokens": "3"}},
                                   {"prompt_tokens": "7", "completion_tokens": [1]}, {"completion_tokens": -1}])
def test_odd_usage_values_are_ignored_not_fatal(usage):
    assert run_translator([chunk({"content": "x"}, "stop", usage=usage)])[-1] == {"type": "message_stop"}
    message = cp.to_anthropic(completion({"content": "x"}, usage=usage), CTX, ids())
    assert all(isinstance(v, int) and v >= 0 for v in message["usage"].values())


def test_stream_late_id_is_adopted_not_a_second_call():
    events = run_translator([chunk(tool_delta(0, None, None, "Bash")), chunk(tool_delta(0, '{"command":"ls"}', "call_1")),
                             chunk({}, "tool_calls")])
    assert [(b["id"], b["name"], b["input"]) for b in cp.assemble_message(events)["content"]] == [
        ("call_1", "Bash", {"command": "ls"})]


def test_gemini_metadata_only_delta_for_an_earlier_call_adds_no_block():
    events = run_translator([
        chunk({"tool_calls": [{"index": 0, "id": "call_A", "function": {"name": "Read", "arguments": '{"p":1}'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_B", "function": {"name": "Read", "arguments": '{"p":2}'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_A", "extra_content": {"google": {"thought_signature": "x"}}}]}),
        chunk({}, "stop")])
    assert [b["id"] for b in cp.assemble_message(events)["content"]] == ["call_A", "call_B"]


def test_stream_arguments_for_a_completed_call_are_an_error_not_lost():
    events = run_translator([chunk(tool_delta(0, '{"a":1}', "call_1", "A")), chunk(tool_delta(1, '{}', "call_2", "B")),
                             chunk(tool_delta(0, ',"b":2}')), chunk({}, "tool_calls")])
    assert events[-1]["type"] == "error" and "after they were complete" in events[-1]["error"]["message"]


def test_stream_tool_ids_reused_from_history_are_replaced():
    ctx = cp.ResponseContext(model="m", message_id="msg_1", history_tool_ids=frozenset(["call_0"]))
    translator = cp.StreamTranslator(ctx, ids())
    events = translator.start() + translator.feed(chunk(tool_delta(0, "{}", "call_0", "A"))) + \
        translator.feed(chunk({}, "tool_calls")) + translator.finish()
    assert cp.assemble_message(check_stream([(e["type"], e) for e in events]))["content"][0]["id"] == "toolu_gen1"
    message = cp.to_anthropic(completion({"tool_calls": [{"id": "call_0", "function": {"name": "A", "arguments": "{}"}}]},
                                         "tool_calls"), ctx, ids())
    assert message["content"][0]["id"] == "toolu_gen1"


def test_finish_tool_calls_without_any_call_is_end_turn():
    assert run_translator([chunk({"content": "x"}, "tool_calls")])[-2]["delta"]["stop_reason"] == "end_turn"
    assert cp.to_anthropic(completion({"content": "x"}, "tool_calls"), CTX, ids())["stop_reason"] == "end_turn"


@pytest.mark.parametrize("bad_chunk", [
    {"choices": [None]}, {"choices": [{"index": 0, "delta": "oops"}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": {"index": 0}}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "A"}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [None, {"index": [1]}]}}]},
    {"choices": "all", "usage": [1, 2]}, {"choices": [{"index": 0, "delta": {"content": 5}}]},
])
def test_stream_malformed_chunk_pieces_are_skipped(bad_chunk):
    events = run_translator([chunk({"content": "a"}), bad_chunk, chunk({"content": "b"}, "stop")])
    assert cp.assemble_message(events)["content"] == [{"type": "text", "text": "ab"}]


def test_stream_error_chunk_with_odd_code():
    assert run_translator([{"error": {"code": {"x": 1}, "message": "odd"}}])[-1]["error"]["type"] == "api_error"


def test_message_to_events_and_assemble_round_trip():
    message = message_out([{"type": "thinking", "thinking": "t", "signature": "s"},
                           {"type": "text", "text": "Hi"},
                           {"type": "tool_use", "id": "c", "name": "A", "input": {"k": "é"}}], "tool_use")
    events = cp.message_to_events(message)
    check_stream([(e["type"], e) for e in events])
    assert cp.assemble_message(events) == message


def test_encode_sse():
    assert cp.encode_sse({"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert cp.encode_sse({"type": "x", "t": "é\ud83d"}) == b'event: x\ndata: {"type":"x","t":"\\u00e9\\ud83d"}\n\n'


def test_iter_sse_data_follows_the_spec():
    lines = [b": keep-alive\n", b"data: {\"a\":1}\n", b"\n", b"event: x\r\n", b"data:{\"b\":2}\r\n",
             b"\r\n", b"data: one\n", b"data: two\n", b"\n", b"data: [DONE]"]
    assert list(cp.iter_sse_data(lines)) == ['{"a":1}', '{"b":2}', "one\ntwo", "[DONE]"]


# =============================================================================================
# Responses API (issue 14): the request, the reasoning signature, the answer, the stream
# =============================================================================================

OPENAI = cp.DIALECTS["openai"]
STATELESS = {"store": False, "include": ["reasoning.encrypted_content"]}
# A reasoning item as OpenAI returns it with include=["reasoning.encrypted_content"]
RS_ITEM = {"id": "rs_01", "type": "reasoning", "encrypted_content": "gAAAAABo-é\u2028+/=",
           "summary": [{"type": "summary_text", "text": "**Plan**\n\nList files."}]}
RS_SIGNED = {"type": "thinking", "thinking": "**Plan**\n\nList files.", "signature": cp.reasoning_signature(RS_ITEM)}


def rin(items, **fields):
    """The expected Responses request: input items plus fields (model gpt-4o, 100 tokens)."""
    base = {"model": "gpt-4o", "input": items, "store": False, "include": ["reasoning.encrypted_content"],
            "max_output_tokens": 100}
    base.update(fields)
    return base


def user_item(*texts):
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": t} for t in texts]}


def assistant_item(text):
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}


RESPONSES_TOOL = {"type": "function", "name": "Bash", "description": "Run", "parameters": TOOL["input_schema"],
                  "strict": False}
FUNCTION_CALL = {"type": "function_call", "call_id": "toolu_01", "name": "Bash", "arguments": '{"command": "ls"}'}

RESPONSES_REQUEST_CASES = [
    ("string user content", req(), rin([user_item("hi")])),
    ("system -> instructions, billing header left out", req(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.c40; cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}]),
     rin([user_item("hi")], instructions="A\n\nB")),
    ("text blocks as input_text parts, empty dropped", req(messages=[{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": ""}, {"type": "text", "text": "two"}]}]),
     rin([user_item("one", "two")])),
    ("images as input_image with detail", req(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]),
     rin([{"type": "message", "role": "user", "content": [
         {"type": "input_image", "image_url": "data:image/jpeg;base64,QUJD", "detail": "auto"},
         {"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"}]}])),
    ("PDF as input_file, text document as text", req(messages=[{"role": "user", "content": [
        {"type": "document", "title": "spec", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"}}]}]),
     rin([{"type": "message", "role": "user", "content": [
         {"type": "input_file", "filename": "spec.pdf", "file_data": "data:application/pdf;base64,JVBE"},
         {"type": "input_text", "text": "plain"}]}])),
    ("assistant text as output_text", req(messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": "bye"}]),
     rin([user_item("hi"), assistant_item("hello"), user_item("bye")])),
    ("mid-conversation system message as user text at its place", req(messages=[
        {"role": "user", "content": "hi"}, {"role": "system", "content": [{"type": "text", "text": "agents: A"}]}]),
     rin([user_item("hi", "<system-reminder>\nagents: A\n</system-reminder>")])),
    ("tool round trip: function_call then function_call_output, error result prefixed", req(messages=[
        {"role": "user", "content": "list"},
        {"role": "assistant", "content": [{"type": "text", "text": "Running."}, CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.txt", "is_error": True},
                                     {"type": "text", "text": "next"}]}]),
     rin([user_item("list"), assistant_item("Running."), FUNCTION_CALL,
          {"type": "function_call_output", "call_id": "toolu_01", "output": "Error: a.txt"}, user_item("next")])),
    ("a call without a result gets a synthetic output; a result without a call is user text", req(messages=[
        {"role": "user", "content": "go"}, {"role": "assistant", "content": [CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_zz", "content": "late"}]}]),
     rin([user_item("go"), FUNCTION_CALL,
          {"type": "function_call_output", "call_id": "toolu_01", "output": cp.INTERRUPTED_RESULT},
          user_item("[Result of tool call toolu_zz]\nlate")])),
    ("a second result for one call is user text", req(messages=[
        {"role": "user", "content": "go"}, {"role": "assistant", "content": [CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "1"},
                                     {"type": "tool_result", "tool_use_id": "toolu_01", "content": "2"}]}]),
     rin([user_item("go"), FUNCTION_CALL, {"type": "function_call_output", "call_id": "toolu_01", "output": "1"},
          user_item("[Result of tool call toolu_01]\n2")])),
    ("a call left last in the history is answered too", req(messages=[
        {"role": "user", "content": "go"}, {"role": "assistant", "content": [CALL]}]),
     rin([user_item("go"), FUNCTION_CALL,
          {"type": "function_call_output", "call_id": "toolu_01", "output": cp.INTERRUPTED_RESULT}])),
    ("image in a tool result travels in a user message after the outputs", req(messages=[
        {"role": "user", "content": "shot"}, {"role": "assistant", "content": [CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": [
            {"type": "text", "text": "png:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]}]}]),
     rin([user_item("shot"), FUNCTION_CALL,
          {"type": "function_call_output", "call_id": "toolu_01", "output": "png:\n" + cp.IMAGE_IN_NEXT_MESSAGE},
          {"type": "message", "role": "user", "content": [
              {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "auto"}]}])),
    ("replayed reasoning goes back whole, at its place; other thinking dropped", req(messages=[
        {"role": "user", "content": "list"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "mine", "signature": cp.thinking_signature("mine")},
            {"type": "thinking", "thinking": "anthropic", "signature": "EqQBCkYIBxgCKkA"},
            {"type": "redacted_thinking", "data": "xyz"}, RS_SIGNED, CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Done."}]}]),
     rin([user_item("list"), RS_ITEM, FUNCTION_CALL, {"type": "function_call_output", "call_id": "toolu_01", "output": "a"},
          assistant_item("Done.")])),
    ("reasoning between two calls stays between them", req(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [RS_SIGNED, CALL, dict(RS_SIGNED, signature=cp.reasoning_signature(
            dict(RS_ITEM, id="rs_02"))), dict(CALL, id="toolu_02")]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_02", "content": "2"},
                                     {"type": "tool_result", "tool_use_id": "toolu_01", "content": "1"}]}]),
     rin([user_item("go"), RS_ITEM, FUNCTION_CALL, dict(RS_ITEM, id="rs_02"), dict(FUNCTION_CALL, call_id="toolu_02"),
          {"type": "function_call_output", "call_id": "toolu_01", "output": "1"},
          {"type": "function_call_output", "call_id": "toolu_02", "output": "2"}])),
    ("reasoning with no item after it in its turn is left out", req(messages=[
        {"role": "user", "content": "go"}, {"role": "assistant", "content": [RS_SIGNED, {"type": "text", "text": ""}]},
        {"role": "user", "content": "again"}]),
     rin([user_item("go", "again")])),
    ("tools flat and not strict; server tools and unloaded deferred tools dropped", req(tools=[
        TOOL, {"type": "web_search_20250305", "name": "web_search"},
        {"name": "Later", "input_schema": {"type": "object"}, "defer_loading": True}]),
     rin([user_item("hi")], tools=[RESPONSES_TOOL])),
    ("tool_choice any -> required, parallel use off", req(tools=[TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True}),
     rin([user_item("hi")], tools=[RESPONSES_TOOL], tool_choice="required", parallel_tool_calls=False)),
    ("tool_choice tool -> function by name", req(tools=[TOOL], tool_choice={"type": "tool", "name": "Bash"}),
     rin([user_item("hi")], tools=[RESPONSES_TOOL], tool_choice={"type": "function", "name": "Bash"})),
    ("tool_choice none and auto", req(tools=[TOOL], tool_choice={"type": "none", "disable_parallel_tool_use": True}),
     rin([user_item("hi")], tools=[RESPONSES_TOOL], tool_choice="none")),
    ("adaptive thinking with effort -> reasoning effort and summaries", req(
        thinking={"type": "adaptive"}, output_config={"effort": "max"}),
     rin([user_item("hi")], reasoning={"effort": "high", "summary": "auto"})),
    ("thinking budget -> effort", req(thinking={"type": "enabled", "budget_tokens": 2000}),
     rin([user_item("hi")], reasoning={"effort": "low", "summary": "auto"})),
    ("adaptive thinking alone asks for summaries only", req(thinking={"type": "adaptive"}),
     rin([user_item("hi")], reasoning={"summary": "auto"})),
    ("thinking disabled: no reasoning field", req(thinking={"type": "disabled"}, output_config={"effort": "low"}),
     rin([user_item("hi")])),
    ("temperature, top_p and stream passed; stop sequences have no counterpart", req(
        temperature=0.2, top_p=0.9, stream=True, stop_sequences=["END"], top_k=5, metadata={"user_id": "u"}),
     rin([user_item("hi")], temperature=0.2, top_p=0.9, stream=True)),
    ("structured output -> text.format json_schema", req(output_config={"format": {
        "type": "json_schema", "schema": {"type": "object", "properties": {"title": {"type": "string"}}}}}),
     rin([user_item("hi")], text={"format": {"type": "json_schema", "name": "output", "schema": {
         "type": "object", "properties": {"title": {"type": "string"}}}}})),
    ("no max_tokens, no max_output_tokens", {"model": "gpt-5-codex", "messages": [{"role": "user", "content": "hi"}]},
     {"model": "gpt-5-codex", "input": [user_item("hi")], "store": False, "include": ["reasoning.encrypted_content"]}),
]


@pytest.mark.parametrize("name,anthropic_in,responses_out", RESPONSES_REQUEST_CASES, ids=[c[0] for c in RESPONSES_REQUEST_CASES])
def test_to_responses(name, anthropic_in, responses_out):
    frozen = json.dumps(anthropic_in, sort_keys=True)
    assert cp.to_responses(cp.validate_request(anthropic_in), SETTINGS, OPENAI) == responses_out
    assert json.dumps(anthropic_in, sort_keys=True) == frozen, "input mutated"


def test_to_responses_max_tokens_limit_model_mapping_and_dialect_rules():
    settings = cp.Settings(openai_base_url="http://127.0.0.1:9/v1", max_tokens_limit=50, small_model="gpt-5.1-codex-mini")
    body = cp.to_responses(req(model="claude-haiku-4-5", max_tokens=64000), settings, OPENAI)
    assert (body["model"], body["max_output_tokens"]) == ("gpt-5.1-codex-mini", 50)
    gemini = cp.to_responses(req(tools=[dict(TOOL, input_schema={"type": "object", "additionalProperties": False,
                                                                  "properties": {"n": {"const": "x"}}})]),
                             SETTINGS, cp.DIALECTS["gemini"])
    assert gemini["tools"][0]["parameters"] == {"type": "object", "properties": {"n": {"enum": ["x"]}}}
    # Mistral ids and ids over 40 characters: the same mapping as the Chat path, on both sides.
    long_id = "toolu_" + "x" * 60
    history = req(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": [dict(CALL, id=long_id)]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": long_id, "content": "ok"}]}])
    items = cp.to_responses(history, SETTINGS, OPENAI)["input"]
    assert items[1]["call_id"] == items[2]["call_id"] and len(items[1]["call_id"]) <= 40
    with pytest.raises(cp.ProxyError) as caught:     # Ollama's /v1/responses takes no files
        cp.to_responses(req(messages=[{"role": "user", "content": [{"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]), SETTINGS, cp.DIALECTS["ollama"])
    assert caught.value.status == 400 and "PDF" in caught.value.message


@pytest.mark.parametrize("model,dialect,setting,expected", [
    ("gpt-4o", "openai", "chat", False), ("gpt-5-codex", "openai", "chat", False),
    ("gpt-4o", "generic", "responses", True),
    ("gpt-5-codex", "openai", "auto", True), ("gpt-5.1-codex-mini", "azure", "auto", True),
    ("codex-mini-latest", "generic", "auto", True), ("o3-pro", "openai", "auto", True),
    ("gpt-5-pro-2025-10-06", "azure", "auto", True), ("gpt-5.4-pro", "openai", "AUTO", True),
    ("openai/o3-pro", "openrouter", "auto", False), ("gpt-5", "openai", "auto", False),
    ("gpt-5-chat-latest", "openai", "auto", False), ("proxy-model-pro2", "openai", "auto", False),
])
def test_uses_responses_api(model, dialect, setting, expected):
    assert cp.uses_responses_api(model, dialect, setting) is expected


def test_uses_responses_api_rejects_an_unknown_setting():
    with pytest.raises(ValueError, match="chat, responses, auto"):
        cp.uses_responses_api("gpt-5", "openai", "completions")


@pytest.mark.parametrize("item", [
    RS_ITEM, {"type": "reasoning", "id": "rs_2", "summary": []},
    {"type": "reasoning", "id": "rs_3", "summary": [], "encrypted_content": "x" * 5000, "status": "completed"},
    {"type": "reasoning", "id": "rs_4", "content": [{"type": "reasoning_text", "text": "\ud83d lone half"}]}])
def test_reasoning_signature_round_trip(item):
    signature = cp.reasoning_signature(item)
    assert signature.startswith("ccpr1.") and re.fullmatch(r"[A-Za-z0-9._-]+", signature)
    back = cp.reasoning_item_of(signature)
    assert back == item and json.dumps(back, sort_keys=True) == json.dumps(item, sort_keys=True)


@pytest.mark.parametrize("signature", [
    None, "", "EqQBCkYIBxgCKkA", cp.thinking_signature("hi"), "ccpr1.", "ccpr1.!!!!",
    "ccpr1." + base64.urlsafe_b64encode(b'{"type":"message"}').decode(),
    "ccpr1." + base64.urlsafe_b64encode(b"[1,2]").decode(), "ccpr1." + base64.urlsafe_b64encode(b"\xff").decode()])
def test_other_signatures_are_never_taken_for_a_reasoning_item(signature):
    assert cp.reasoning_item_of(signature) is None


def test_reasoning_signature_is_not_a_chat_path_signature():
    assert not cp.is_proxy_signature(RS_SIGNED["signature"], RS_SIGNED["thinking"])


def response_body(output, status="completed", usage=None, **fields):
    body = {"id": "resp_1", "object": "response", "status": status, "model": "gpt-5-codex", "output": output,
            "usage": usage if usage is not None else {
                "input_tokens": 120, "input_tokens_details": {"cached_tokens": 20},
                "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 129}}
    body.update(fields)
    return body


def message_item(*parts, item_id="msg_1"):
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [
        {"type": "output_text", "text": p, "annotations": []} if isinstance(p, str) else p for p in parts]}


def call_item(call_id="call_1", name="Bash", arguments='{"command":"ls"}', item_id="fc_1"):
    return {"id": item_id, "type": "function_call", "status": "completed", "call_id": call_id, "name": name,
            "arguments": arguments}


USAGE_OUT = {"input_tokens": 100, "output_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 20}

RESPONSES_ANSWER_CASES = [
    ("text", response_body([message_item("Hello", " there")]),
     message_out([{"type": "text", "text": "Hello there"}], usage=USAGE_OUT)),
    ("reasoning then a call: thinking carries the item, tool_use id is the call_id",
     response_body([RS_ITEM, call_item()]),
     message_out([RS_SIGNED, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}],
                 "tool_use", usage=USAGE_OUT)),
    ("reasoning without summary still makes a block to replay",
     response_body([{"type": "reasoning", "id": "rs_9", "summary": [], "encrypted_content": "gAAA"}, message_item("ok")]),
     message_out([{"type": "thinking", "thinking": "", "signature": cp.reasoning_signature(
         {"type": "reasoning", "id": "rs_9", "summary": [], "encrypted_content": "gAAA"})},
                  {"type": "text", "text": "ok"}], usage=USAGE_OUT)),
    ("reasoning that cannot be replayed is a plain thinking block",
     response_body([{"type": "reasoning", "id": "rs_9", "summary": [{"type": "summary_text", "text": "a"},
                                                                   {"type": "summary_text", "text": "b"}]}]),
     message_out([{"type": "thinking", "thinking": "a\n\nb", "signature": cp.thinking_signature("a\n\nb")}],
                 usage=USAGE_OUT)),
    ("parallel calls; a call id already in the conversation is replaced",
     response_body([call_item("call_old"), call_item("call_2", "Read", '{"path":"a"}', "fc_2")]),
     message_out([{"type": "tool_use", "id": "toolu_gen1", "name": "Bash", "input": {"command": "ls"}},
                  {"type": "tool_use", "id": "call_2", "name": "Read", "input": {"path": "a"}}], "tool_use",
                 usage=USAGE_OUT)),
    ("refusal", response_body([message_item({"type": "refusal", "refusal": "I can't help with that."})]),
     message_out([{"type": "text", "text": "I can't help with that."}], "refusal", usage=USAGE_OUT)),
    ("incomplete at max_output_tokens", response_body([message_item("partial")], "incomplete",
                                                       incomplete_details={"reason": "max_output_tokens"}),
     message_out([{"type": "text", "text": "partial"}], "max_tokens", usage=USAGE_OUT)),
    ("incomplete by the content filter", response_body([], "incomplete", incomplete_details={"reason": "content_filter"}),
     message_out([], "refusal", usage=USAGE_OUT)),
    ("no usage: the estimate", response_body([message_item("x")], usage={}),
     message_out([{"type": "text", "text": "x"}], usage={"input_tokens": 0, "output_tokens": 0,
                                                        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})),
    ("server tool items and whitespace text make no block", response_body([
        {"type": "web_search_call", "id": "ws_1", "status": "completed"}, message_item(" \n")]),
     message_out([], usage=USAGE_OUT)),
]


@pytest.mark.parametrize("name,response,anthropic_out", RESPONSES_ANSWER_CASES, ids=[c[0] for c in RESPONSES_ANSWER_CASES])
def test_responses_to_anthropic(name, response, anthropic_out):
    ctx = cp.ResponseContext(model="claude-opus-4-8", message_id="msg_1", history_tool_ids=frozenset({"call_old"}))
    frozen = json.dumps(response, sort_keys=True)
    assert cp.responses_to_anthropic(response, ctx, ids()) == dict(anthropic_out, model="claude-opus-4-8")
    assert json.dumps(response, sort_keys=True) == frozen


@pytest.mark.parametrize("response,status,error_type,text", [
    (response_body([], "failed", error={"code": "rate_limit_exceeded", "message": "Slow down"}), 429, "rate_limit_error", "Slow down"),
    (response_body([], "failed", error={"code": "server_error", "message": "The model failed"}), 500, "api_error", "The model failed"),
    (response_body([], "failed", error={"code": "context_length_exceeded",
                                        "message": "Your input exceeds the context window of this model."}),
     400, "invalid_request_error", "context window"),
    (response_body([], "failed", error={"code": "invalid_image_url", "message": "bad"}), 400, "invalid_request_error", "bad"),
    (response_body([], "failed", error={"code": "server_is_overloaded", "message": "busy"}), 529, "overloaded_error", "busy"),
    (response_body([], "failed", error=None), 502, "api_error", "upstream response failed"),
    ({"error": {"message": "boom", "type": "server_error", "code": None}}, 502, "api_error", "boom"),
    (response_body([], "cancelled"), 502, "api_error", "cancelled"),
    ({"id": "resp_1", "status": "completed"}, 502, "api_error", "no output"),
])
def test_responses_to_anthropic_errors(response, status, error_type, text):
    ctx = cp.ResponseContext(model="claude-opus-4-8", message_id="msg_1")
    with pytest.raises(cp.ProxyError) as caught:
        cp.responses_to_anthropic(response, ctx, ids())
    assert (caught.value.status, caught.value.error_type) == (status, error_type) and text in caught.value.message


# --- the stream, one upstream event at a time ---------------------------------------------------

class ResponsesEvents:
    """Builds Responses stream events in OpenAI's recorded shapes, numbered in order."""

    def __init__(self):
        self.n = 0

    def __call__(self, kind, **fields):
        event = {"type": kind, "sequence_number": self.n}
        self.n += 1
        event.update(fields)
        return event

    def created(self):
        return self("response.created", response={"id": "resp_1", "object": "response", "status": "in_progress",
                                                   "output": [], "usage": None})

    def text_item(self, index, pieces, item_id="msg_1"):
        item = message_item("".join(pieces), item_id=item_id)
        return ([self("response.output_item.added", output_index=index,
                      item={"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}),
                 self("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                      part={"type": "output_text", "text": "", "annotations": []})]
                + [self("response.output_text.delta", item_id=item_id, output_index=index, content_index=0, delta=p,
                        logprobs=[]) for p in pieces]
                + [self("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                        text="".join(pieces)),
                   self("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                        part=item["content"][0]),
                   self("response.output_item.done", output_index=index, item=item)])

    def reasoning_item(self, index, parts, item=RS_ITEM):
        events = [self("response.output_item.added", output_index=index,
                       item={"id": item["id"], "type": "reasoning", "summary": []})]   # no encrypted_content yet
        for summary_index, pieces in enumerate(parts):
            events.append(self("response.reasoning_summary_part.added", item_id=item["id"], output_index=index,
                               summary_index=summary_index, part={"type": "summary_text", "text": ""}))
            events += [self("response.reasoning_summary_text.delta", item_id=item["id"], output_index=index,
                            summary_index=summary_index, delta=p) for p in pieces]
            events.append(self("response.reasoning_summary_text.done", item_id=item["id"], output_index=index,
                               summary_index=summary_index, text="".join(pieces)))
        return events + [self("response.output_item.done", output_index=index, item=item)]

    def call_added(self, index, call_id="call_1", name="Bash", item_id="fc_1"):
        return self("response.output_item.added", output_index=index, item={
            "id": item_id, "type": "function_call", "status": "in_progress", "call_id": call_id, "name": name,
            "arguments": ""})

    def args(self, index, delta, item_id="fc_1"):
        return self("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=delta)

    def call_done(self, index, call_id="call_1", name="Bash", arguments='{"command":"ls"}', item_id="fc_1"):
        return [self("response.function_call_arguments.done", item_id=item_id, output_index=index, arguments=arguments),
                self("response.output_item.done", output_index=index, item=call_item(call_id, name, arguments, item_id))]

    def call_item(self, index, pieces, call_id="call_1", name="Bash", item_id="fc_1"):
        return ([self.call_added(index, call_id, name, item_id)] + [self.args(index, p, item_id) for p in pieces]
                + self.call_done(index, call_id, name, "".join(pieces), item_id))

    def completed(self, output, usage=None):
        return self("response.completed", response=response_body(output, usage=usage))

    def incomplete(self, output, reason="max_output_tokens"):
        return self("response.incomplete", response=response_body(output, "incomplete", incomplete_details={"reason": reason}))


def run_responses(events_in, input_tokens=7, history_tool_ids=()):
    ctx = cp.ResponseContext(model="claude-opus-4-8", message_id="msg_1", input_tokens=input_tokens,
                             history_tool_ids=frozenset(history_tool_ids))
    translator = cp.ResponsesStreamTranslator(ctx, ids())
    events = translator.start()
    for event in events_in:
        events += translator.feed(json.loads(json.dumps(event)))     # a fresh dict, as parsed from the wire
    events += translator.finish()
    assert translator.chunks_seen == len(events_in)
    return check_stream([(e["type"], e) for e in events]), translator


def test_responses_stream_text_exact_events():
    up = ResponsesEvents()
    events, translator = run_responses([up.created(), up("response.in_progress", response={})]
                                       + up.text_item(0, ["Hel", "lo"]) + [up.completed([message_item("Hello")])])
    assert non_meta(events) == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": USAGE_OUT},
        {"type": "message_stop"}]
    assert translator.ended and translator.result == cp.StreamEnd("end_turn", None, USAGE_OUT)
    assert translator.feed({"type": "response.output_text.delta", "output_index": 0, "delta": "x"}) == []
    assert translator.finish() == []


def test_responses_stream_reasoning_then_a_call_signature_carries_the_item_from_its_done_event():
    up = ResponsesEvents()
    events, translator = run_responses(
        [up.created()] + up.reasoning_item(0, [["**Plan**", "\n\nList files."]])
        + up.call_item(1, ['{"comm', 'and":"ls"}']) + [up.completed([RS_ITEM, call_item()])])
    assert [(e["type"], e.get("delta")) for e in non_meta(events)] == [
        ("content_block_start", None),
        ("content_block_delta", {"type": "thinking_delta", "thinking": "**Plan**"}),
        ("content_block_delta", {"type": "thinking_delta", "thinking": "\n\nList files."}),
        ("content_block_delta", {"type": "signature_delta", "signature": cp.reasoning_signature(RS_ITEM)}),
        ("content_block_stop", None),
        ("content_block_start", None),
        ("content_block_delta", {"type": "input_json_delta", "partial_json": '{"comm'}),
        ("content_block_delta", {"type": "input_json_delta", "partial_json": 'and":"ls"}'}),
        ("content_block_stop", None),
        ("message_delta", {"stop_reason": "tool_use", "stop_sequence": None}), ("message_stop", None)]
    message = cp.assemble_message(events)
    assert message["content"] == [RS_SIGNED, {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}]
    assert (message["stop_reason"], message["usage"]["cache_read_input_tokens"]) == ("tool_use", 20)
    assert translator.result.stop_reason == "tool_use"


def test_responses_stream_reasoning_replayed_byte_for_byte_in_the_next_request():
    up = ResponsesEvents()
    item = {"id": "rs_7", "type": "reasoning", "summary": [], "encrypted_content": "gAAAAABp\u00e9==", "status": "completed"}
    events, _ = run_responses([up.created()] + up.reasoning_item(0, [], item) + up.call_item(1, ['{"command":"ls"}'])
                              + [up.completed([item, call_item()])])
    message = cp.assemble_message(events)
    # no summary text: still a thinking block, empty, with the item in its signature
    assert message["content"][0] == {"type": "thinking", "thinking": "", "signature": cp.reasoning_signature(item)}
    follow_up = req(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": message["content"]},
                              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a"}]}])
    body = cp.to_responses(json.loads(json.dumps(follow_up)), SETTINGS, OPENAI)
    assert json.dumps(body["input"][1], ensure_ascii=False) == json.dumps(item, ensure_ascii=False)
    assert [i["type"] for i in body["input"]] == ["message", "reasoning", "function_call", "function_call_output"]


def test_responses_stream_parallel_calls_one_after_the_other():
    up = ResponsesEvents()
    events, _ = run_responses([up.created()] + up.call_item(0, ['{"command":"ls"}'])
                              + up.call_item(1, ['{"path":', '"a"}'], "call_2", "Read", "fc_2")
                              + [up.completed([call_item(), call_item("call_2", "Read", '{"path":"a"}', "fc_2")])])
    assert [(b["id"], b["name"], b["input"]) for b in cp.assemble_message(events)["content"]] == [
        ("call_1", "Bash", {"command": "ls"}), ("call_2", "Read", {"path": "a"})]


def test_responses_stream_parallel_calls_interleaved_wait_for_the_open_one():
    up = ResponsesEvents()
    events, _ = run_responses([
        up.created(), up.call_added(0), up.call_added(1, "call_2", "Read", "fc_2"),
        up.args(1, '{"path":', "fc_2"), up.args(0, '{"command":'), up.args(1, '"a"}', "fc_2"), up.args(0, '"ls"}')]
        + up.call_done(1, "call_2", "Read", '{"path":"a"}', "fc_2") + up.call_done(0)
        + [up.completed([call_item(), call_item("call_2", "Read", '{"path":"a"}', "fc_2")])])
    assert [(b["id"], b["input"]) for b in cp.assemble_message(events)["content"]] == [
        ("call_1", {"command": "ls"}), ("call_2", {"path": "a"})]
    # the first call streams live; the second goes out once the first is done
    assert [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"] == [
        '{"command":', '"ls"}', '{"path":"a"}']


def test_responses_stream_call_id_from_history_is_replaced_and_arguments_only_in_done():
    # LM Studio (Qwen3): the arguments arrive only in function_call_arguments.done.
    up = ResponsesEvents()
    arguments_done, item_done = up.call_done(0, "call_old")
    del item_done["item"]["arguments"]
    events, _ = run_responses([up.created(), up.call_added(0, "call_old"), arguments_done, item_done,
                               up.completed([])], history_tool_ids=["call_old"])
    assert cp.assemble_message(events)["content"] == [
        {"type": "tool_use", "id": "toolu_gen1", "name": "Bash", "input": {"command": "ls"}}]


def test_responses_stream_the_same_call_id_twice_in_one_answer_gets_a_new_id():
    up = ResponsesEvents()
    events, _ = run_responses([up.created()] + up.call_item(0, ["{}"]) + up.call_item(1, ["{}"], item_id="fc_2")
                              + [up.completed([])])
    assert [b["id"] for b in cp.assemble_message(events)["content"]] == ["call_1", "toolu_gen1"]


def test_responses_stream_deltas_found_by_item_id_or_without_any_item():
    # Servers that omit output_index on deltas, or send deltas with no output_item.added.
    up = ResponsesEvents()
    added, done = up.text_item(0, ["hi"])[0], up.text_item(0, ["hi"])[-1]
    by_id = [up.created(), added, up("response.output_text.delta", item_id="msg_1", content_index=0, delta="hi"),
             done, up.completed([message_item("hi")])]
    bare = [up.created(), up("response.output_text.delta", item_id="msg_1", content_index=0, delta="hi"),
            up.completed([message_item("hi")])]
    for events_in in (by_id, bare):
        events, _ = run_responses(events_in)
        assert cp.assemble_message(events)["content"] == [{"type": "text", "text": "hi"}]


def test_responses_stream_call_without_arguments_gets_an_empty_object():
    up = ResponsesEvents()
    events, _ = run_responses([up.created(), up.call_added(0, name="TaskList")]
                              + up.call_done(0, name="TaskList", arguments="") + [up.completed([])])
    assert [e["delta"] for e in events if e["type"] == "content_block_delta"] == [
        {"type": "input_json_delta", "partial_json": "{}"}]


def test_responses_stream_arguments_that_are_not_an_object_end_in_an_error():
    up = ResponsesEvents()
    events, _ = run_responses([up.created()] + up.call_item(0, ['{"command": "l']) + [up.completed([])])
    assert events[-1]["type"] == "error" and "not a complete JSON object" in events[-1]["error"]["message"]


def test_responses_stream_summary_parts_refusal_and_whitespace():
    up = ResponsesEvents()
    refusal_item = {"id": "msg_2", "type": "message", "role": "assistant", "content": []}
    events, _ = run_responses(
        [up.created()] + up.reasoning_item(0, [["one"], ["two"]]) + up.text_item(1, ["  ", "\n"], "msg_1")
        + [up("response.output_item.added", output_index=2, item=refusal_item),
           up("response.refusal.delta", item_id="msg_2", output_index=2, content_index=0, delta="I can't"),
           up("response.refusal.done", item_id="msg_2", output_index=2, content_index=0, refusal="I can't"),
           up("response.output_item.done", output_index=2, item=refusal_item), up.completed([])])
    message = cp.assemble_message(events)
    assert message["content"] == [{"type": "thinking", "thinking": "one\n\ntwo", "signature": RS_SIGNED["signature"]},
                                  {"type": "text", "text": "I can't"}]
    assert message["stop_reason"] == "refusal"


def test_responses_stream_vllm_raw_reasoning_text_and_deltas_without_items():
    # vLLM (gpt-oss): reasoning as response.reasoning_text.delta, items with content, no summary;
    # the summary of the same reasoning, if also sent, is not shown twice.
    up = ResponsesEvents()
    item = {"id": "rs_v", "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "think"}]}
    events, _ = run_responses([
        up.created(), up("response.output_item.added", output_index=0, item={"id": "rs_v", "type": "reasoning", "summary": []}),
        up("response.reasoning_text.delta", item_id="rs_v", output_index=0, content_index=0, delta="think"),
        up("response.reasoning_summary_text.delta", item_id="rs_v", output_index=0, summary_index=0, delta="again"),
        up("response.output_item.done", output_index=0, item=item),
        up("response.output_text.delta", item_id="msg_x", output_index=1, content_index=0, delta="hi"),
        up.completed([item, message_item("hi")])])
    assert cp.assemble_message(events)["content"] == [
        {"type": "thinking", "thinking": "think", "signature": cp.reasoning_signature(item)}, {"type": "text", "text": "hi"}]


def test_responses_stream_items_only_in_the_completed_response():
    up = ResponsesEvents()
    events, _ = run_responses([up.created(), up.completed([RS_ITEM, message_item("whole"), call_item()])])
    assert cp.assemble_message(events)["content"] == [
        RS_SIGNED, {"type": "text", "text": "whole"},
        {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}]


def test_responses_stream_item_never_done_is_taken_whole_from_the_completed_response():
    up = ResponsesEvents()
    events, _ = run_responses([up.created()] + up.reasoning_item(0, [["**Plan**\n\nList files."]])[:-1]
                              + [up.completed([RS_ITEM])])
    assert cp.assemble_message(events)["content"] == [RS_SIGNED]


def test_responses_stream_incomplete_at_max_output_tokens():
    up = ResponsesEvents()
    events, translator = run_responses([up.created()] + up.text_item(0, ["cut sh"])[:3] + [up.incomplete([message_item("cut sh")])])
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert cp.assemble_message(events)["content"] == [{"type": "text", "text": "cut sh"}]
    assert translator.result.stop_reason == "max_tokens"


@pytest.mark.parametrize("event,error_type,text", [
    ({"type": "response.failed", "response": response_body([], "failed", error={
        "code": "rate_limit_exceeded", "message": "Rate limit reached for gpt-5-codex"})}, "rate_limit_error", "Rate limit"),
    ({"type": "response.failed", "response": response_body([], "failed", error={
        "code": "server_error", "message": "The model failed to generate a response."})}, "api_error", "model failed"),
    ({"type": "response.failed", "response": response_body([], "failed", error={
        "code": "context_length_exceeded", "message": "Your input exceeds the context window of this model."})},
     "invalid_request_error", "context window"),
    ({"type": "error", "code": "invalid_encrypted_content", "param": None,
      "message": "The encrypted content for item rs_1 could not be verified."}, "invalid_request_error", "could not be verified"),
    ({"type": "error", "code": "server_is_overloaded", "message": "overloaded", "param": None}, "overloaded_error", "overloaded"),
    ({"type": "error", "error": {"type": "server_error", "code": None, "message": "nested"}}, "api_error", "nested"),
])
def test_responses_stream_failures_become_error_events(event, error_type, text):
    up = ResponsesEvents()
    events, translator = run_responses([up.created()] + up.text_item(0, ["par"])[:3] + [event])
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == error_type
    message = events[-1]["error"]["message"]
    # (context overflow is said in Anthropic's words, so that Claude Code compacts)
    assert text in message and message.startswith("prompt is too long: " if "window" in text else "upstream: ")
    assert translator.result.error == events[-1]["error"] and translator.result.stop_reason is None


def test_responses_stream_cut_before_the_end_is_an_error():
    up = ResponsesEvents()
    events, translator = run_responses([up.created()] + up.reasoning_item(0, [["hm"]])[:3])
    assert events[-1] == {"type": "error", "error": {
        "type": "api_error", "message": "the upstream closed the stream after 4 events, before the answer ended"}}
    assert translator.finish(done=False) == [] and translator.result.error["type"] == "api_error"


def test_responses_stream_and_whole_answer_agree():
    up = ResponsesEvents()
    output = [RS_ITEM, message_item("Let me look."), call_item(), call_item("call_2", "Read", '{"path":"a"}', "fc_2")]
    events, _ = run_responses([up.created()] + up.reasoning_item(0, [["**Plan**\n\nList files."]])
                              + up.text_item(1, ["Let me ", "look."]) + up.call_item(2, ['{"command":"ls"}'])
                              + up.call_item(3, ['{"path":"a"}'], "call_2", "Read", "fc_2") + [up.completed(output)])
    ctx = cp.ResponseContext(model="claude-opus-4-8", message_id="msg_1", input_tokens=7)
    assert cp.assemble_message(events) == cp.responses_to_anthropic(response_body(output), ctx, ids())


# --- a scripted fake /v1/responses upstream that validates requests as OpenAI does -------------

RESPONSES_PARAMETERS = frozenset((
    "model", "input", "instructions", "store", "include", "max_output_tokens", "temperature", "top_p",
    "stream", "stream_options", "reasoning", "text", "tools", "tool_choice", "parallel_tool_calls",
    "metadata", "previous_response_id", "truncation", "user", "service_tier", "prompt_cache_key",
    "background", "max_tool_calls", "safety_identifier", "top_logprobs", "conversation", "prompt"))
RESPONSES_PART_TYPES = {"user": ("input_text", "input_image", "input_file"), "system": ("input_text",),
                        "developer": ("input_text",), "assistant": ("output_text", "refusal")}


class ResponsesRejection(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": "invalid_request_error",
                                                    "param": param, "code": code}}


class FakeResponsesUpstream:
    """A scripted OpenAI Responses server on 127.0.0.1:0. Each valid POST .../responses pops
    the next responder from `script` (a callable(handler, body); when empty, "ok" streamed or
    as JSON, as the request asks); every request is recorded.
    Requests are checked the way OpenAI checks them (see `check`): an invalid one gets
    OpenAI's error status and body, and no responder runs. Reasoning items it hands out
    (`reasoning()`) carry encrypted_content it can verify when they are replayed."""

    def __init__(self):
        self.requests = []
        self.script = []
        self.issued = set()
        self.lock = threading.Lock()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with upstream.lock:
                    body = json.loads(raw)
                    upstream.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    try:
                        if not self.path.split("?")[0].endswith("/responses"):
                            raise ResponsesRejection(404, "Invalid URL (POST %s)" % self.path)
                        upstream.check(body)
                        if upstream.script:
                            responder = upstream.script.pop(0)
                        elif body.get("stream"):
                            responder = responses_sse(responses_events([message_item("ok")]))
                        else:
                            responder = responses_json(response_body([message_item("ok")]))
                    except ResponsesRejection as rejection:
                        responder = responses_json(rejection.body, rejection.status)
                responder(self, body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d/v1" % self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def reasoning(self, summary, item_id=None):
        """A reasoning item as OpenAI returns it with include=["reasoning.encrypted_content"]."""
        with self.lock:
            encrypted = "gAAAAAB" + base64.b64encode(os.urandom(24)).decode("ascii")
            self.issued.add(encrypted)
            item_id = item_id or "rs_%d" % len(self.issued)
        return {"id": item_id, "type": "reasoning", "encrypted_content": encrypted,
                "summary": [{"type": "summary_text", "text": summary}] if summary else []}

    def check(self, body):
        """Raise ResponsesRejection where OpenAI answers an error (messages as OpenAI words them)."""
        for name in body:
            if name not in RESPONSES_PARAMETERS:
                raise ResponsesRejection(400, "Unknown parameter: '%s'." % name, name, "unknown_parameter")
        for name in ("model", "input"):
            if name not in body:
                raise ResponsesRejection(400, "Missing required parameter: '%s'." % name, name, "missing_required_parameter")
        for position, tool in enumerate(body.get("tools") or ()):
            if tool.get("type") == "function" and not isinstance(tool.get("name"), str):
                raise ResponsesRejection(400, "Missing required parameter: 'tools[%d].name'." % position,
                                         "tools[%d].name" % position, "missing_required_parameter")
        items = [{"type": "message", "role": "user", "content": body["input"]}] if isinstance(body["input"], str) \
            else body["input"]
        calls, outputs = [], set()
        for position, item in enumerate(items):
            kind = item.get("type", "message")
            where = "input[%d]" % position
            if kind == "message":
                allowed = RESPONSES_PART_TYPES.get(item.get("role"))
                if allowed is None:
                    raise ResponsesRejection(400, "Invalid value: '%s'." % item.get("role"), where + ".role")
                for index, part in enumerate(item["content"] if isinstance(item["content"], list) else ()):
                    if part.get("type") not in allowed:
                        raise ResponsesRejection(400, "Invalid value: '%s'." % part.get("type"),
                                                 "%s.content[%d].type" % (where, index), "invalid_value")
                    if part["type"] == "output_text" and "annotations" not in part:   # Azure's strictness
                        raise ResponsesRejection(400, "Required property 'annotations' is missing",
                                                 "%s.content[%d].annotations" % (where, index))
            elif kind == "function_call":
                if not isinstance(item.get("arguments"), str):
                    raise ResponsesRejection(400, "Invalid type for '%s.arguments': expected a string." % where,
                                             where + ".arguments", "invalid_type")
                calls.append(item["call_id"])
            elif kind == "function_call_output":
                if item.get("call_id") not in calls:
                    raise ResponsesRejection(400, "No tool call found for function call output with call_id %s."
                                             % item.get("call_id"), "input")
                outputs.add(item["call_id"])
            elif kind == "reasoning":
                if not item.get("encrypted_content"):
                    # This fake stores nothing, so an item sent by id only is never found.
                    message = "Item with id '%s' not found." % item.get("id")
                    if body.get("store") is False:
                        message += (" Items are not persisted when `store` is set to false. Try again with "
                                    "`store` set to true, or remove this item from your input.")
                    raise ResponsesRejection(404, message, "input")
                if item["encrypted_content"] not in self.issued:
                    raise ResponsesRejection(400, "The encrypted content for item %s could not be verified. Reason: "
                                             "Encrypted content could not be decrypted or parsed." % item.get("id"),
                                             None, "invalid_encrypted_content")
            else:
                raise ResponsesRejection(400, "Invalid value: '%s'." % kind, where + ".type", "invalid_value")
        for call_id in calls:
            if call_id not in outputs:
                raise ResponsesRejection(400, "No tool output found for function call %s." % call_id, "input")


def responses_json(payload, status=200):
    def respond(handler, body):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return respond


def responses_sse(events, cut_after=None):
    """A Responses stream as OpenAI sends it: `event:` and `data:` lines, no [DONE]; the
    connection closes after `cut_after` events when given."""
    def respond(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for event in events[:cut_after]:
            handler.wfile.write(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode()))
        handler.close_connection = True
    return respond


def responses_events(output, status="completed", usage=None):
    """The whole event sequence that streams `output` (reasoning, message, function_call items)."""
    up = ResponsesEvents()
    events = [up.created(), up("response.in_progress", response={"id": "resp_1", "status": "in_progress"})]
    for index, item in enumerate(output):
        if item["type"] == "reasoning":
            events += up.reasoning_item(index, [[part["text"]] for part in item["summary"]], item)
        elif item["type"] == "message":
            events += up.text_item(index, [item["content"][0]["text"]], item["id"])
        else:
            events += up.call_item(index, [item["arguments"]], item["call_id"], item["name"], item["id"])
    if status == "completed":
        return events + [up("response.completed", response=response_body(output, usage=usage))]
    return events + [up("response." + status, response=response_body(output, status, usage=usage,
                                                                        incomplete_details={"reason": "max_output_tokens"}))]


@pytest.fixture
def responses_upstream():
    fake = FakeResponsesUpstream()
    yield fake
    fake.close()


def post_responses(fake, body):
    """(status, parsed JSON or the list of parsed SSE data) of a POST /v1/responses to `fake`."""
    conn = http.client.HTTPConnection(*fake.server.server_address, timeout=10)
    try:
        conn.request("POST", "/v1/responses", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.getheader("Content-Type") == "text/event-stream":
            return response.status, [json.loads(d) for d in cp.iter_sse_data(iter(response.readline, b""))]
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_fake_responses_upstream_takes_a_tool_round_trip_from_to_responses(responses_upstream):
    fake = responses_upstream
    reasoning = fake.reasoning("**Looking**\n\nI should list the files.")
    fake.script.append(responses_sse(responses_events([reasoning, call_item()])))
    first = req(stream=True, tools=[TOOL], thinking={"type": "adaptive"}, output_config={"effort": "medium"},
                system="You are Claude Code.", messages=[{"role": "user", "content": "list files"}])
    status, upstream_events = post_responses(fake, cp.to_responses(first, SETTINGS, OPENAI))
    assert status == 200 and upstream_events[-1]["type"] == "response.completed"
    events, _ = run_responses(upstream_events)
    answer = cp.assemble_message(events)
    assert [b["type"] for b in answer["content"]] == ["thinking", "tool_use"] and answer["stop_reason"] == "tool_use"

    # The next turn carries the reasoning back: the fake verifies its encrypted content and the pairing.
    fake.script.append(responses_json(response_body([message_item("a.txt b.txt")])))
    second = dict(first, stream=False, messages=first["messages"] + [
        {"role": "assistant", "content": answer["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a.txt\nb.txt"}]}])
    status, payload = post_responses(fake, cp.to_responses(second, SETTINGS, OPENAI))
    assert status == 200, payload
    ctx = cp.ResponseContext(model="claude-opus-4-8", message_id="msg_2")
    assert cp.responses_to_anthropic(payload, ctx, ids())["content"] == [{"type": "text", "text": "a.txt b.txt"}]
    sent = fake.requests[-1]["body"]
    assert sent["input"][1] == reasoning and sent["store"] is False and sent["instructions"] == "You are Claude Code."


def test_fake_responses_upstream_rejects_what_openai_rejects(responses_upstream):
    fake = responses_upstream
    reasoning = fake.reasoning("")
    history = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]}, reasoning,
               {"type": "function_call", "call_id": "call_1", "name": "Bash", "arguments": "{}"}]
    output = {"type": "function_call_output", "call_id": "call_1", "output": "ok"}
    base = cp.to_responses(req(), SETTINGS, OPENAI)
    cases = [
        (dict(base, input=history), 400, "No tool output found for function call call_1."),
        (dict(base, input=history[:1] + [dict(output, call_id="call_9")]), 400,
         "No tool call found for function call output with call_id call_9."),
        (dict(base, input=[history[0], {"id": reasoning["id"], "type": "reasoning", "summary": []}] + history[2:] + [output]),
         404, "Item with id '%s' not found. Items are not persisted when `store` is set to false." % reasoning["id"]),
        (dict(base, input=[history[0], dict(reasoning, encrypted_content="gAAAAABforged")] + history[2:] + [output]),
         400, "The encrypted content for item %s could not be verified." % reasoning["id"]),
        (cp.to_openai(req(), SETTINGS), 400, "Unknown parameter: 'messages'."),
        (dict(base, tools=[FN]), 400, "Missing required parameter: 'tools[0].name'."),
        (dict(base, input=[{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}]),
         400, "Required property 'annotations' is missing"),
    ]
    for body, status, message in cases:
        got_status, payload = post_responses(fake, body)
        assert (got_status, payload["error"]["message"][:len(message)]) == (status, message)
    assert post_responses(fake, dict(base, input=history + [output]))[0] == 200
    status, streamed = post_responses(fake, dict(base, input=history + [output], stream=True))
    events, _ = run_responses(streamed)
    assert status == 200 and cp.assemble_message(events)["content"] == [{"type": "text", "text": "ok"}]


def test_fake_responses_upstream_cut_stream_reaches_the_translator_as_a_cut(responses_upstream):
    fake = responses_upstream
    fake.script.append(responses_sse(responses_events([message_item("Hello there")]), cut_after=5))
    status, upstream_events = post_responses(fake, cp.to_responses(req(stream=True), SETTINGS, OPENAI))
    events, _ = run_responses(upstream_events)
    assert status == 200 and events[-1]["error"]["message"] == \
        "the upstream closed the stream after 5 events, before the answer ended"


# =============================================================================================
# Providers: each documented bend of the format, named after the provider that sends it
# =============================================================================================


def test_azure_prompt_filter_chunk_no_delta_chunk_and_content_filter_finish():
    events = run_translator([
        {"id": "", "model": "", "object": "", "choices": [], "prompt_filter_results": [
            {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}]},
        chunk({"role": "assistant", "content": ""}),
        dict(chunk({"content": "Some"}), choices=[{"index": 0, "delta": {"content": "Some"}, "finish_reason": None,
                                                    "content_filter_results": {"hate": {"filtered": False}}}]),
        {"id": "c", "choices": [{"index": 0, "finish_reason": None, "content_filter_offsets": {"check_offset": 0}}]},
        chunk({}, "content_filter")])
    assert [(e["type"], e.get("delta")) for e in non_meta(events)] == [
        ("content_block_start", None), ("content_block_delta", {"type": "text_delta", "text": "Some"}),
        ("content_block_stop", None),
        ("message_delta", {"stop_reason": "refusal", "stop_sequence": None}), ("message_stop", None)]


def test_ollama_tool_call_whole_in_one_chunk_then_finish_stop():
    events = run_translator([
        chunk({"role": "assistant", "content": "", "tool_calls": [{"id": "call_x", "index": 0, "type": "function",
              "function": {"name": "Bash", "arguments": '{"command":"ls -la"}'}}]}),
        chunk({"content": ""}, "stop"), chunk(usage={"prompt_tokens": 50, "completion_tokens": 20})])
    assert non_meta(events)[:3] == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "call_x", "name": "Bash", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"command":"ls -la"}'}},
        {"type": "content_block_stop", "index": 0}]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_ollama_non_stream_tool_call_with_finish_stop():
    message = cp.to_anthropic(completion({"content": "", "tool_calls": [{"id": "call_x", "function": {
        "name": "Bash", "arguments": {"command": "ls"}}}]}, "stop"), CTX, ids())
    assert message["stop_reason"] == "tool_use" and message["content"][0]["input"] == {"command": "ls"}


def test_gemini_parallel_calls_all_at_index_0_and_missing_ids():
    events = run_translator([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                     "function": {"name": "Read", "arguments": '{"path":"a"}'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_b", "type": "function",
                               "function": {"name": "Read", "arguments": '{"path":"b"}'}}]}),
        chunk({"tool_calls": [{"type": "function", "function": {"name": "Glob", "arguments": '{"pattern":"*"}'}}]}),
        chunk({}, "stop")])
    message = cp.assemble_message(events)
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("call_a", "Read", {"path": "a"}), ("call_b", "Read", {"path": "b"}), ("toolu_gen1", "Glob", {"pattern": "*"})]
    assert message["stop_reason"] == "tool_use"


def test_gemini_tool_call_split_without_index_continues_the_last_call():
    events = run_translator([
        chunk({"tool_calls": [{"id": "call_a", "function": {"name": "Write", "arguments": '{"file_path":'}}]}),
        chunk({"tool_calls": [{"function": {"arguments": ' "x.py"}'}}]}), chunk({}, "tool_calls")])
    assert cp.assemble_message(events)["content"][0]["input"] == {"file_path": "x.py"}


def test_any_provider_usage_on_every_chunk_keeps_the_last():
    events = run_translator([
        chunk({"content": "a"}, usage={"prompt_tokens": 40, "completion_tokens": 1}),
        chunk({"content": "b"}, usage={"prompt_tokens": 40, "completion_tokens": 2}),
        chunk({}, "stop", usage={"prompt_tokens": 40, "completion_tokens": 3})])
    assert events[-2]["usage"]["output_tokens"] == 3 and events[-2]["usage"]["input_tokens"] == 40


def test_any_provider_null_and_empty_content_and_role_chunk_open_no_block():
    events = run_translator([chunk({"role": "assistant", "content": None}), chunk({"content": ""}),
                             chunk({"role": "assistant"}), chunk({}, "stop")])
    assert [e["type"] for e in non_meta(events)] == ["message_delta", "message_stop"]


def test_any_provider_arguments_sent_as_an_object_in_a_stream():
    events = run_translator([chunk(tool_delta(0, {"command": "pwd"}, "call_1", "Bash")), chunk({}, "tool_calls")])
    assert cp.assemble_message(events)["content"][0]["input"] == {"command": "pwd"}


def test_any_provider_no_done_before_close_after_a_finish_reason_is_a_clean_end():
    events = run_translator([chunk({"content": "ok"}), chunk({}, "stop")])
    assert events[-1] == {"type": "message_stop"}


def test_any_provider_text_after_a_tool_call_opens_a_new_block():
    events = run_translator([chunk(tool_delta(0, "{}", "call_1", "TaskList")), chunk({"content": "Listed."}),
                             chunk({}, "tool_calls")])
    assert [b["type"] for b in cp.assemble_message(events)["content"]] == ["tool_use", "text"]


def test_openrouter_error_inside_a_200_stream_and_finish_reason_error():
    events = run_translator([chunk({"content": "par"}), {"error": {"code": 502, "message": "Provider returned error"},
                                                         "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]}])
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "upstream: Provider returned error"}}
    assert run_translator([chunk({"content": "x"}), chunk({}, "error")])[-1]["type"] == "error"


def test_vllm_usage_chunk_with_null_choices_and_reasoning_field():
    events = run_translator([chunk({"reasoning": "hmm"}), chunk({"content": "yes"}), chunk({}, "stop"),
                             {"id": "c", "choices": None, "usage": {"prompt_tokens": 8, "completion_tokens": 4}}])
    message = cp.assemble_message(events)
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["usage"]["output_tokens"] == 4


def test_deepseek_reasoning_content_streams_as_thinking_then_text():
    events = run_translator([chunk({"role": "assistant", "content": None, "reasoning_content": "Let me"}),
                             chunk({"content": None, "reasoning_content": " see."}),
                             chunk({"content": "Done", "reasoning_content": None}), chunk({}, "stop")])
    message = cp.assemble_message(events)
    assert message["content"] == [
        {"type": "thinking", "thinking": "Let me see.", "signature": cp.thinking_signature("Let me see.")},
        {"type": "text", "text": "Done"}]


def test_llamacpp_think_tags_in_content_become_thinking_even_split_across_chunks():
    events = run_translator([chunk({"role": "assistant", "content": ""}), chunk({"content": "\n<th"}),
                             chunk({"content": "ink>plan"}), chunk({"content": " it</th"}),
                             chunk({"content": "ink>\n\nAnswer <b>"}), chunk({}, "stop")])
    message = cp.assemble_message(events)
    assert [(b["type"], b.get("thinking", b.get("text"))) for b in message["content"]] == [
        ("thinking", "plan it"), ("text", "Answer <b>")]


@pytest.mark.parametrize("pieces", [["<t", "able>x</table>"], ["<", "b>bold"], ["  ", "plain"]])
def test_content_that_only_looks_like_a_think_tag_is_text(pieces):
    events = run_translator([chunk({"content": p}) for p in pieces] + [chunk({}, "stop")])
    assert cp.assemble_message(events)["content"] == [{"type": "text", "text": "".join(pieces)}]


def test_think_tags_after_real_reasoning_or_a_tool_call_are_text():
    # Real reasoning means the content carries none; content after a call leads nothing.
    after_reasoning = run_translator([chunk({"reasoning_content": "plan"}), chunk({"content": "<think>x</think>y"}),
                                      chunk({}, "stop")])
    assert [(b["type"], b.get("text")) for b in cp.assemble_message(after_reasoning)["content"]] == [
        ("thinking", None), ("text", "<think>x</think>y")]
    after_call = run_translator([chunk(tool_delta(0, "{}", "call_0", "A")), chunk({"content": "<think>x</think>"}),
                                 chunk({}, "tool_calls")])
    assert [b["type"] for b in cp.assemble_message(after_call)["content"]] == ["tool_use", "text"]


@pytest.mark.parametrize("text, split", [
    ("<think>a</think>\n\nb", ("a", "b")), ("  <think>a", ("a", "")), ("<thi", ("", "<thi")),
    ("no tags <think>a</think>", ("", "no tags <think>a</think>")), ("<think></think>b", ("", "b"))])
def test_split_think_tags_on_a_whole_answer(text, split):
    assert cp.split_think_tags(text) == split


def test_unclosed_think_tag_at_the_end_is_thinking():
    events = run_translator([chunk({"content": "<think>still going"}), chunk({}, "length")])
    assert [b["type"] for b in cp.assemble_message(events)["content"]] == ["thinking"]


# Tool calls written as text (local servers without a tool parser) -------------------------------

TEXT_TOOLS = {"Bash": {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}}},
              "Read": {"type": "object", "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer"}}}}
BASH_LS = ("Bash", {"command": "ls -la"})

TEXT_CALL_CASES = [
    # Hermes / Qwen2.5 / Qwen3 through Ollama or vLLM without a parser, prose before it
    ('I will list the files.\n<tool_call>\n{"name": "Bash", "arguments": {"command": "ls -la"}}\n</tool_call>',
     "I will list the files.\n", [BASH_LS]),
    # two calls, whitespace between them dropped
    ('<tool_call>\n{"name": "Bash", "arguments": {"command": "ls -la"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "Read", "arguments": {"file_path": "/a"}}\n</tool_call>', "", [BASH_LS, ("Read", {"file_path": "/a"})]),
    # arguments as a JSON string; the closing tag left off at the end of the answer
    ('<tool_call>{"name": "Bash", "arguments": "{\\"command\\": \\"ls -la\\"}"}', "", [BASH_LS]),
    # Qwen3-Coder's XML, typed by the schema: a string stays a string, a number is a number
    ("<tool_call>\n<function=Bash>\n<parameter=command>\necho 42\n</parameter>\n<parameter=timeout>\n5\n"
     "</parameter>\n</function>\n</tool_call>", "", [("Bash", {"command": "echo 42", "timeout": 5})]),
    # Mistral, old and new tokenizers, and [CALL_ID]
    ('[TOOL_CALLS][{"name": "Bash", "arguments": {"command": "ls -la"}}]', "", [BASH_LS]),
    ('[TOOL_CALLS]Bash[ARGS]{"command": "ls -la"}[TOOL_CALLS]Read[ARGS]{"file_path": "/a"}', "",
     [BASH_LS, ("Read", {"file_path": "/a"})]),
    ('[TOOL_CALLS]Bash[CALL_ID]a1b2c3d4e[ARGS]{"command": "ls -la"}', "", [BASH_LS]),
    # Llama 3.x: parameters, and the end-of-message token
    ('<|python_tag|>{"name": "Bash", "parameters": {"command": "ls -la"}}<|eom_id|>', "", [BASH_LS]),
    # an answer that is only the JSON (Llama 3.2 adds "type")
    ('\n{"type": "function", "name": "Bash", "parameters": {"command": "ls -la"}}\n', "", [BASH_LS]),
    ('{"name": "Read", "arguments": {"file_path": "/a", "limit": 3}}', "", [("Read", {"file_path": "/a", "limit": 3})]),
]

TEXT_NOT_CALLS = [
    "Use the tool like this: `Bash` with ls.",
    '{"name": "Bash", "age": 3}',                                            # data, not a call
    '{"name": "Bash", "arguments": {"command": "ls"}} is what a call looks like.',   # prose after it
    'Here is the config:\n{"name": "Bash", "arguments": {"command": "ls"}}',  # JSON inside prose
    '```\n<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>\n```',  # in a code block
    '<tool_call>{"name": "Rm", "arguments": {"path": "/"}}</tool_call>',       # a tool not offered
    '<tool_call>{"name": "Bash", "arguments": {"command": </tool_call>',        # arguments that do not parse
    '[TOOL_CALLS]Bash{"command": "ls"}',                                       # no [ARGS]
    "<tool_call> is the Hermes tag; <|python_tag|> is Llama's.",
    "{not json at all",
    "  <tool_",
]


@pytest.mark.parametrize("text, rest, calls", TEXT_CALL_CASES)
def test_tool_calls_written_as_text_are_found(text, rest, calls):
    assert cp.split_text_calls(text, TEXT_TOOLS) == (rest, calls)


@pytest.mark.parametrize("text", TEXT_NOT_CALLS)
def test_text_that_is_not_a_call_to_an_offered_tool_stays_text(text):
    assert cp.split_text_calls(text, TEXT_TOOLS) == (text, [])


def text_call_stream(pieces, tools=TEXT_TOOLS, finish="stop"):
    ctx = cp.ResponseContext(model="m", message_id="msg_1", text_tools=tools)
    translator = cp.StreamTranslator(ctx, ids())
    events = translator.start()
    for piece in pieces:
        events += translator.feed(chunk({"content": piece}))
    events += translator.feed(chunk({}, finish)) + translator.finish()
    return check_stream([(e["type"], e) for e in events])


def blocks_of(message):
    return [(b["type"], b.get("text", b.get("name")), b.get("input")) for b in message["content"]]


@pytest.mark.parametrize("text", [c[0] for c in TEXT_CALL_CASES] + TEXT_NOT_CALLS)
def test_text_calls_stream_the_same_split_anywhere(text):
    """Cut at every position (two pieces) and in one-character pieces, the stream gives the
    same message as the whole answer, whose stop reason is tool_use exactly when calls came."""
    whole = cp.to_anthropic(completion({"content": text}), cp.ResponseContext(
        model="m", message_id="msg_1", text_tools=TEXT_TOOLS), ids())
    expected = blocks_of(whole)
    for cut in range(1, len(text)):
        assert blocks_of(cp.assemble_message(text_call_stream([text[:cut], text[cut:]]))) == expected, cut
    message = cp.assemble_message(text_call_stream(list(text)))
    assert blocks_of(message) == expected
    has_calls = any(b["type"] == "tool_use" for b in whole["content"])
    assert message["stop_reason"] == whole["stop_reason"] == ("tool_use" if has_calls else "end_turn")


def test_prose_before_a_text_call_streams_before_the_call_arrives():
    # Only what may start an opener is held back: the prose goes out at once.
    ctx = cp.ResponseContext(model="m", message_id="msg_1", text_tools=TEXT_TOOLS)
    translator = cp.StreamTranslator(ctx, ids())
    translator.start()
    events = translator.feed(chunk({"content": "Listing the files now. <tool"}))
    assert [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"] == ["Listing the files now. "]
    events = translator.feed(chunk({"content": '_call>{"name": "Bash", "arguments": {"command": "ls -la"}}'}))
    assert events == []
    events = translator.feed(chunk({"content": "</tool_call>"}))
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["tool_use"]


def test_text_calls_need_offered_tools():
    text = TEXT_CALL_CASES[0][0]
    for ctx in (cp.ResponseContext(model="m", message_id="msg_1"),
                cp.ResponseContext(model="m", message_id="msg_1", text_tools={})):
        message = cp.to_anthropic(completion({"content": text}), ctx, ids())
        assert blocks_of(message) == [("text", text, None)] and message["stop_reason"] == "end_turn"


def test_text_tools_are_the_tools_sent_upstream():
    request = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
               "tools": [{"name": "Bash", "input_schema": {"type": "object"}},
                         {"name": "Later", "input_schema": {"type": "object"}, "defer_loading": True},
                         {"type": "web_search_20250305", "name": "web_search"}]}
    assert cp.text_tools(request) == {"Bash": {"type": "object"}}
    assert cp.text_tools(dict(request, tool_choice={"type": "none"})) == {}


@pytest.mark.parametrize("stream", [True, False])
def test_end_to_end_text_tool_call_becomes_tool_use(upstream, stream):
    text = 'Let me look.\n<tool_call>\n{"name": "Bash", "arguments": {"command": "echo hi"}}\n</tool_call>'
    reply = sse_reply([chunk({"role": "assistant", "content": ""})] + [chunk({"content": text[i:i + 7]})
                      for i in range(0, len(text), 7)] + [chunk({}, "stop")]) if stream else json_text(text)
    upstream.script.append(reply)
    with running_proxy(upstream.url) as server:
        client = Client(server)
        request = claude_code_request(stream=stream)
        if stream:
            message = cp.assemble_message(client.stream(request))
        else:
            status, _, message = client.json("POST", "/v1/messages", request)
            assert status == 200
    assert message["stop_reason"] == "tool_use"
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["content"][0]["text"] == "Let me look.\n"
    call = message["content"][1]
    assert call["name"] == "Bash" and call["input"] == {"command": "echo hi"} and call["id"].startswith("toolu_")


def test_end_to_end_text_tool_calls_off_leaves_the_text(upstream):
    text = '<tool_call>{"name": "Bash", "arguments": {"command": "echo hi"}}</tool_call>'
    upstream.script.append(json_text(text))
    with running_proxy(upstream.url, text_tool_calls="off") as server:
        status, _, message = Client(server).json("POST", "/v1/messages", claude_code_request(stream=False))
    assert status == 200 and message["content"] == [{"type": "text", "text": text}]
    assert message["stop_reason"] == "end_turn"


# Stream and non-stream agree: the same answer, sent both ways, gives the same message.
AGREEMENT_CASES = [
    ("text", {"content": "Hello there"}, [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello "}),
                                          chunk({"content": "there"})], "stop"),
    ("reasoning, text and two tools", {"reasoning_content": "Think.", "content": "Calling.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "Read", "arguments": '{"p":"a"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "Grep", "arguments": '{"q":"b"}'}}]},
     [chunk({"reasoning_content": "Thi"}), chunk({"reasoning_content": "nk."}), chunk({"content": "Calling."}),
      chunk(tool_delta(0, '{"p":', "call_1", "Read")), chunk(tool_delta(0, '"a"}')),
      chunk(tool_delta(1, '{"q":"b"}', "call_2", "Grep"))], "tool_calls"),
    ("llama.cpp: think tags", {"content": "<think>hmm</think>\nYes."},
     [chunk({"content": "<think>h"}), chunk({"content": "mm</think>\nYes."})], "stop"),
    ("ollama: tool with finish stop", {"content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]},
     [chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]})], "stop"),
]


@pytest.mark.parametrize("name,message,chunks,finish_reason", AGREEMENT_CASES, ids=[c[0] for c in AGREEMENT_CASES])
def test_stream_and_non_stream_agree(name, message, chunks, finish_reason):
    usage = {"prompt_tokens": 30, "completion_tokens": 12}
    whole = cp.to_anthropic(completion(message, finish_reason, usage), CTX, ids())
    streamed = cp.assemble_message(run_translator(chunks + [chunk({}, finish_reason), chunk(usage=usage)]))
    assert streamed == whole


# --- reasoning replay and effort ---------------------------------------------------------------

DEEPSEEK = cp.Settings(openai_base_url="https://api.deepseek.com", big_model="deepseek-v4-pro")


def history_with_thinking(signature):
    return req(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "plan it", "signature": signature},
                                          {"type": "text", "text": "ok"}, CALL]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "done"}]},
        {"role": "assistant", "content": "finished"}, {"role": "user", "content": "next"}])


def test_deepseek_gets_its_reasoning_back_on_assistant_messages():
    body = cp.to_openai(history_with_thinking(cp.thinking_signature("plan it")), DEEPSEEK)
    assistants = [m for m in body["messages"] if m["role"] == "assistant"]
    assert [m["reasoning_content"] for m in assistants] == ["plan it", ""]


def test_deepseek_does_not_get_reasoning_it_did_not_produce():
    body = cp.to_openai(history_with_thinking("EqQBCkYIBRgCKkAnthropicSignature"), DEEPSEEK)
    assert [m["reasoning_content"] for m in body["messages"] if m["role"] == "assistant"] == ["", ""]


def test_other_providers_get_no_reasoning_back_unless_configured():
    request = history_with_thinking(cp.thinking_signature("plan it"))
    assert all("reasoning_content" not in m and "reasoning" not in m for m in cp.to_openai(request, SETTINGS)["messages"])
    vllm = dataclasses.replace(SETTINGS, reasoning_replay="reasoning")
    assert [m.get("reasoning") for m in cp.to_openai(request, vllm)["messages"] if m["role"] == "assistant"] == ["plan it", ""]


@pytest.mark.parametrize("model,fields,expected", [
    ("o3-mini", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}, {"reasoning_effort": "high"}),
    ("gpt-5", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, {"reasoning_effort": "high"}),
    ("gpt-5", {"thinking": {"type": "enabled", "budget_tokens": 2000}}, {"reasoning_effort": "low"}),
    ("gpt-5", {"thinking": {"type": "enabled", "budget_tokens": 10000}}, {"reasoning_effort": "medium"}),
    ("gemini-2.5-pro", {"thinking": {"type": "enabled", "budget_tokens": 32000}}, {"reasoning_effort": "high"}),
    ("gpt-5", {"thinking": {"type": "disabled"}, "output_config": {"effort": "high"}}, {}),
    ("gpt-5", {"thinking": {"type": "adaptive"}}, {}),
    ("gpt-4o", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}, {}),
])
def test_reasoning_effort_for_models_that_take_it(model, fields, expected):
    body = cp.to_openai(req(model=model, **fields), SETTINGS)
    assert {k: v for k, v in body.items() if k.startswith("reasoning")} == expected


@pytest.mark.parametrize("fields,expected", [
    ({"thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "max"}},
     {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, {"thinking": {"type": "enabled"}, "reasoning_effort": "low"}),
    ({"thinking": {"type": "disabled"}}, {"thinking": {"type": "disabled"}}),
    ({}, {}),
])
def test_deepseek_thinking_toggle_and_effort(fields, expected):
    body = cp.to_openai(req(**fields), DEEPSEEK)
    assert {k: v for k, v in body.items() if k in ("thinking", "reasoning_effort")} == expected


def test_openrouter_gets_the_reasoning_object():
    settings = cp.Settings(openai_base_url="https://openrouter.ai/api/v1")
    body = cp.to_openai(req(model="anthropic/claude-sonnet-4", output_config={"effort": "medium"}), settings)
    assert body["reasoning"] == {"effort": "medium"} and "reasoning_effort" not in body


# --- parameter negotiation ---------------------------------------------------------------------


def test_openai_gets_max_completion_tokens_and_reasoning_models_lose_sampling():
    settings = cp.Settings()
    body = cp.to_openai(req(temperature=0.5), settings)
    assert body["max_completion_tokens"] == 100 and body["temperature"] == 0.5 and "max_tokens" not in body
    o3 = cp.apply_fixes(cp.to_openai(req(model="o3", temperature=0.5, top_p=0.9), SETTINGS), cp.fixes_by_name("o3"))
    assert o3["max_completion_tokens"] == 100 and "temperature" not in o3 and "top_p" not in o3
    assert cp.fixes_by_name("gpt-4o") == cp.NO_FIXES and cp.fixes_by_name("gpt-5-mini").completion_tokens_field


NEGOTIATION_CASES = [
    ("openai max_tokens unsupported",
     "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
     "max_tokens", cp.ModelFixes(completion_tokens_field=True), True),
    ("openai temperature unsupported value",
     "Unsupported value: 'temperature' does not support 0.2 with this model. Only the default (1) value is supported.",
     "temperature", cp.ModelFixes(drop=frozenset(["temperature"])), True),
    ("openai output limit",
     "max_tokens is too large: 64000. This model supports at most 16384 completion tokens, whereas you provided 64000.",
     "max_tokens", cp.ModelFixes(max_output=16384), True),
    ("deepseek output limit", "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]", None,
     cp.ModelFixes(max_output=8192), True),
    ("groq output limit", "`max_tokens` must be less than or equal to `32768`, the maximum value for `max_tokens` "
     "is less than the `context_window` for this model", None, cp.ModelFixes(max_output=32768), True),
    ("anthropic-style output limit", "max_tokens: 64000 > 32000, which is the maximum allowed number of output "
     "tokens for claude-x", None, cp.ModelFixes(max_output=32000), True),
    ("vllm context length: this request only", "'max_tokens' or 'max_completion_tokens' is too large: 64000. This "
     "model's maximum context length is 32768 tokens and your request has 1234 input tokens (64000 > 32768 - 1234).",
     None, cp.ModelFixes(max_output=31207), False),
    ("vllm context length, newer wording", "This model's maximum context length is 131072 tokens. However, you "
     "requested 64000 output tokens and your prompt contains at least 70000 input tokens, for a total of at least "
     "134000 tokens.", None, cp.ModelFixes(max_output=59762), False),
    ("openrouter context length", "This endpoint's maximum context length is 131072 tokens. However, you requested "
     "about 138956 tokens (74956 of text input, 64000 in the output). Please reduce the length of either one, or "
     "use the \"middle-out\" transform to compress your prompt automatically.", None,
     cp.ModelFixes(max_output=54806), False),
    ("mistral extra field", "[{'type': 'extra_forbidden', 'loc': ('body', 'stream_options'), "
     "'msg': 'Extra inputs are not permitted'}]", None, cp.ModelFixes(drop=frozenset(["stream_options"])), True),
    ("azure unrecognized argument", "Unrecognized request argument supplied: parallel_tool_calls", None,
     cp.ModelFixes(drop=frozenset(["parallel_tool_calls"])), True),
    ("ollama reasoning effort", '"reasoning_effort" is not supported for this model', None,
     cp.ModelFixes(drop=frozenset(["reasoning_effort"])), True),
    ("deepseek response_format", "This response_format type is unavailable now", None,
     cp.ModelFixes(drop=frozenset(["response_format"])), True),
    ("a tool schema property is not a parameter", "Invalid schema for function 'get_weather': In context=("
     "'properties', 'temperature'), array schema missing items.", "tools[0].function.parameters", None, False),
    ("too many tools is no output limit", "tools: 140 > 128, which is the maximum allowed number of tools", None,
     None, False),
    ("input alone too long: nothing to fix", "This model's maximum context length is 32768 tokens and your request "
     "has 40000 input tokens", None, None, False),
    ("unrelated 400", "Invalid 'messages[2].tool_calls': empty array.", None, None, False),
    ("absurd number", "max_tokens must be less than or equal to `%s`" % ("9" * 5000), None, None, False),
]


@pytest.mark.parametrize("name,message,param,fix,model_wide", NEGOTIATION_CASES, ids=[c[0] for c in NEGOTIATION_CASES])
def test_fix_from_error(name, message, param, fix, model_wide):
    body = {"model": "m", "messages": [], "max_tokens": 64000, "temperature": 0.2, "stream": True,
            "stream_options": {"include_usage": True}, "parallel_tool_calls": False, "reasoning_effort": "high",
            "response_format": {"type": "json_schema"}, "tools": [{"type": "function"}]}
    assert cp.fix_from_error(body, message, param) == (fix, model_wide)


def test_apply_fixes():
    body = {"model": "m", "max_tokens": 64000, "temperature": 1, "stream_options": {}}
    fixed = cp.apply_fixes(body, cp.ModelFixes(frozenset(["stream_options"]), True, 16384))
    assert fixed == {"model": "m", "max_completion_tokens": 16384, "temperature": 1}
    assert body == {"model": "m", "max_tokens": 64000, "temperature": 1, "stream_options": {}}


# --- tool schemas, ids, documents ----------------------------------------------------------------

CLAUDE_CODE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
    "required": ["command", "gone"],
    "properties": {
        "command": {"type": "string", "description": "The command", "minLength": 1},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 600000, "default": 120000},
        "url": {"type": "string", "format": "uri"}, "when": {"type": "string", "format": "date-time"},
        "mode": {"const": "fast"}, "maybe": {"type": ["string", "null"]},
        "env": {"type": "object", "propertyNames": {"pattern": "^[A-Z]+$"}, "additionalProperties": {"type": "string"}},
        "items": {"type": "array", "uniqueItems": True, "items": {"$ref": "#/$defs/item"}},
        "format": {"oneOf": [{"type": "string"}, {"type": "integer", "multipleOf": 2}]}},
    "$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"}}, "additionalProperties": False}}}


def test_gemini_tool_schema_cleaned():
    settings = cp.Settings(openai_base_url="https://generativelanguage.googleapis.com/v1beta/openai/")
    body = cp.to_openai(req(model="gemini-2.5-pro", tools=[dict(TOOL, input_schema=CLAUDE_CODE_SCHEMA)]), settings)
    assert body["tools"][0]["function"]["parameters"] == {
        "type": "object", "required": ["command"],
        "properties": {
            "command": {"type": "string", "description": "The command", "minLength": 1},
            "timeout": {"type": "number", "maximum": 600000},
            "url": {"type": "string"}, "when": {"type": "string", "format": "date-time"},
            "mode": {"enum": ["fast"]}, "maybe": {"type": "string", "nullable": True},
            "env": {"type": "object"},
            "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}}}},
            "format": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}


def test_gemini_model_behind_a_generic_server_also_gets_clean_schemas_others_untouched():
    gemini = cp.to_openai(req(model="gemini-3-pro", tools=[dict(TOOL, input_schema=CLAUDE_CODE_SCHEMA)]), SETTINGS)
    assert "$schema" not in gemini["tools"][0]["function"]["parameters"]
    other = cp.to_openai(req(tools=[dict(TOOL, input_schema=CLAUDE_CODE_SCHEMA)]), SETTINGS)
    assert other["tools"][0]["function"]["parameters"] == CLAUDE_CODE_SCHEMA


def test_gemini_recursive_refs_are_cut_not_expanded_forever():
    tree = {"type": "object", "properties": {"root": {"$ref": "#/$defs/Node"}}, "$defs": {"Node": {
        "type": "object", "properties": {"c%d" % i: {"$ref": "#/$defs/Node"} for i in range(3)}}}}
    cleaned = cp.clean_schema(tree)
    assert cleaned == {"type": "object", "properties": {"root": {"type": "object", "properties": {
        "c0": {"type": "object"}, "c1": {"type": "object"}, "c2": {"type": "object"}}}}}
    assert cp.clean_schema({"properties": {"x": {"const": 3}, "y": {"const": "a"}}}) == {
        "properties": {"x": {}, "y": {"enum": ["a"]}}}


def test_gemini_replayed_tool_calls_carry_a_thought_signature():
    settings = cp.Settings(openai_base_url="https://generativelanguage.googleapis.com/v1beta/openai/")
    request = req(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": [CALL]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "x"}]}])
    call = cp.to_openai(request, settings)["messages"][1]["tool_calls"][0]
    assert call["extra_content"] == {"google": {"thought_signature": "skip_thought_signature_validator"}}


GEMINI = cp.Settings(openai_base_url="https://generativelanguage.googleapis.com/v1beta/openai/", big_model="gemini-3-pro")
SIGNED_CALL = {"id": "call_g1", "type": "function", "extra_content": {"google": {"thought_signature": "CiQB+sig/=="}},
               "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}


def gemini_follow_up(tool_use):
    return req(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": [tool_use]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "a"}]}])


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_gemini_thought_signature_travels_in_the_tool_use_id_and_comes_back(stream):
    if stream:
        events = run_translator([chunk({"tool_calls": [dict(SIGNED_CALL, index=0)]}), chunk({}, "stop")])
        tool_use = cp.assemble_message(events)["content"][0]
    else:
        tool_use = cp.to_anthropic(completion({"tool_calls": [SIGNED_CALL]}, "tool_calls"), CTX, ids())["content"][0]
    assert tool_use["id"].startswith("call_g1" + cp.SIGNATURE_MARK) and re.fullmatch(r"[A-Za-z0-9_-]+", tool_use["id"])
    messages = cp.to_openai(gemini_follow_up(tool_use), GEMINI)["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "call_g1" and messages[2]["tool_call_id"] == "call_g1"
    assert messages[1]["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": "CiQB+sig/=="}}
    # another provider gets the plain id and no signature
    other = cp.to_openai(gemini_follow_up(tool_use), SETTINGS)["messages"]
    assert other[1]["tool_calls"][0] == {"id": "call_g1", "type": "function", "function": {
        "name": "Bash", "arguments": '{"command": "ls"}'}} and other[2]["tool_call_id"] == "call_g1"


def test_tool_ids_over_40_characters_are_shortened_for_every_upstream_and_still_pair():
    long_id = "fc_0f0e50a1476a6c35006912c58dc9f8819192c25864eb16f07f"
    request = req(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": [dict(CALL, id=long_id)]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": long_id, "content": "a"}]}])
    messages = cp.to_openai(request, cp.Settings())["messages"]
    short = messages[1]["tool_calls"][0]["id"]
    assert short.startswith("call_") and len(short) <= 40 and messages[2]["tool_call_id"] == short
    assert cp.to_openai(request, cp.Settings())["messages"][1]["tool_calls"][0]["id"] == short


def test_mistral_tool_ids_are_nine_alphanumerics_and_still_pair():
    settings = cp.Settings(openai_base_url="https://api.mistral.ai/v1")
    request = req(messages=[{"role": "user", "content": "go"},
                            {"role": "assistant", "content": [CALL, dict(CALL, id="D681PevKs")]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a"},
                                                         {"type": "tool_result", "tool_use_id": "D681PevKs", "content": "b"}]}])
    messages = cp.to_openai(request, settings)["messages"]
    call_ids = [c["id"] for c in messages[1]["tool_calls"]]
    assert call_ids == [cp.short_tool_id("toolu_01"), "D681PevKs"]
    assert all(len(i) == 9 and i.isalnum() for i in call_ids)
    assert [m["tool_call_id"] for m in messages[2:]] == call_ids
    gemini_elsewhere = cp.resolve_dialect(cp.Settings(openai_base_url="https://aiplatform.googleapis.com/v1"), "gemini-3-pro")
    assert gemini_elsewhere.clean_schemas and gemini_elsewhere.thought_signatures
    local = cp.Settings(openai_base_url="http://127.0.0.1:8080/v1", big_model="devstral-small")
    assert cp.to_openai(request, local)["messages"][1]["tool_calls"][0]["id"] == call_ids[0]


def test_pdf_refused_with_a_clear_400_where_the_provider_cannot_read_it():
    pdf = req(messages=[{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}])
    with pytest.raises(cp.ProxyError) as info:
        cp.to_openai(pdf, cp.Settings(openai_base_url="http://localhost:11434/v1"))
    assert info.value.status == 400 and "ollama" in info.value.message and "PDF" in info.value.message
    assert cp.to_openai(pdf, cp.Settings())["messages"][0]["content"][0]["type"] == "file"


@pytest.mark.parametrize("url,provider", [
    ("https://api.openai.com/v1", "openai"), ("https://res.openai.azure.com/openai/deployments/gpt4o", "azure"),
    ("https://generativelanguage.googleapis.com/v1beta/openai/", "gemini"), ("https://api.deepseek.com", "deepseek"),
    ("https://openrouter.ai/api/v1", "openrouter"), ("https://api.mistral.ai/v1", "mistral"),
    ("https://api.groq.com/openai/v1", "groq"), ("http://localhost:11434/v1", "ollama"),
    ("http://localhost:1234/v1", "lmstudio"), ("http://localhost:8000/v1", "generic"),
    ("http://localhost:12345/v1", "generic"), ("http://my-ollama.lan:11434", "ollama")])
def test_provider_detected_from_the_base_url(url, provider):
    assert cp.resolve_dialect(cp.Settings(openai_base_url=url), "m").name == provider
    assert cp.resolve_dialect(cp.Settings(openai_base_url=url, provider="vllm"), "m").name == "vllm"


# --- history repair ---------------------------------------------------------------------------


def test_history_repair_is_logged_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    cp.to_openai(req(messages=[{"role": "user", "content": "go"}, {"role": "assistant", "content": [CALL]},
                               {"role": "user", "content": "never mind"}]), SETTINGS)
    assert "history repair: tool call toolu_01 had no result" in caplog.text


def test_history_repair_empty_assistant_turn_dropped_and_user_turns_merged():
    body = cp.to_openai(req(messages=[
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}, {"type": "text", "text": ""}]},
        {"role": "user", "content": [{"type": "text", "text": ""}]}, {"role": "user", "content": "two"}]), SETTINGS)
    assert body["messages"] == [{"role": "user", "content": "one\n\ntwo"}]


# =============================================================================================
# Tokens
# =============================================================================================


TOKEN_CODE_SAMPLE = '''def read_body(response, origin):
    """Read an upstream body; a transport fault becomes a ProxyError."""
    try:
        return response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise transport_error(exc, origin) from None


class Heartbeat:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.streams: Dict[SSEWriter, None] = {}
        self.lock = threading.Lock()

    def _run(self) -> None:
        tick = max(min(self.interval / 4, 1.0), 0.01)
        while True:
            time.sleep(tick)
            for writer in list(self.streams):
                writer.ping_if_idle(time.monotonic(), self.interval)
''' * 4
TOKEN_ENGLISH = ("The proxy accepts the Anthropic Messages API, translates each request to Chat Completions, "
                 "and translates the answer back: text, tool calls and their arguments, images, reasoning, "
                 "stop reasons, token usage and errors. ") * 6
TOKEN_CHINESE = "代理接受消息接口的请求，把它翻译成聊天补全格式，再把回答翻译回来，包括文本、工具调用、图像和推理。" * 8
TOKEN_JAPANESE = "このプロキシはメッセージAPIを受け取り、チャット補完の形式に変換して、答えを元の形式に戻します。" * 8


ENGLISH_TOKENS, CODE_TOKENS, CHINESE_TOKENS, JAPANESE_TOKENS, SCHEMA_TOKENS, CLAUDE_CODE_TOKENS = 272, 659, 271, 288, 1492, 7799


def token_cases():
    """(name, request, o200k_base count of its Chat Completions form, allowed error). The counts
    were measured with tiktoken's o200k_base (GPT-4o): 3 tokens per message plus role and
    content, 3 per tool call plus name and arguments, 3 for the reply, and the tools as
    json.dumps lines (how vLLM, llama.cpp and Ollama chat templates render them)."""
    return [
        ("english", req(messages=[{"role": "user", "content": TOKEN_ENGLISH}]), ENGLISH_TOKENS, 0.10),
        ("code", req(messages=[{"role": "user", "content": TOKEN_CODE_SAMPLE}]), CODE_TOKENS, 0.10),
        ("chinese", req(messages=[{"role": "user", "content": TOKEN_CHINESE}]), CHINESE_TOKENS, 0.20),
        ("japanese", req(messages=[{"role": "user", "content": TOKEN_JAPANESE}]), JAPANESE_TOKENS, 0.20),
        ("json schemas", req(tools=[dict(TOOL, input_schema=CLAUDE_CODE_SCHEMA)] * 5), SCHEMA_TOKENS, 0.10),
        ("claude code request", claude_code_request(), CLAUDE_CODE_TOKENS, 0.10),
    ]


@pytest.mark.parametrize("case", range(6))
def test_estimate_tokens_is_calibrated_against_o200k(case):
    name, request, reference, allowed = token_cases()[case]
    estimate = cp.estimate_tokens(request)
    assert abs(estimate - reference) <= allowed * reference, (name, estimate, reference)


def test_estimate_tokens_counts_images_and_skips_thinking():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x" * 100000}}
    with_image = cp.estimate_tokens(req(messages=[{"role": "user", "content": [image]}]))
    assert cp.IMAGE_TOKENS <= with_image <= cp.IMAGE_TOKENS + 10
    thinking = {"type": "thinking", "thinking": "long " * 5000, "signature": "s"}
    assert cp.estimate_tokens(req(messages=[{"role": "assistant", "content": [thinking, {"type": "text", "text": "hi"}]}])) < 20


def test_estimate_tokens_survives_odd_input():
    # The odd parts count nothing: the same as the one text block alone (reply, message, 1 token).
    odd = {"messages": [None, {"content": [None, {"type": "text", "text": "\ud83d"}]}],
           "system": 5, "tools": [None, {"type": "web_search_20250305"}]}
    assert cp.estimate_tokens(odd) == cp.estimate_tokens({"messages": [{"content": [{"type": "text", "text": "\ud83d"}]}]}) \
        == cp.REPLY_TOKENS + cp.MESSAGE_TOKENS + 1


# --- estimate_tokens counts what to_openai sends (issue 11) -----------------------------------


def test_estimate_tokens_skips_deferred_and_server_tools_like_to_openai():
    deferred = [dict(TOOL, name="Deferred%d" % i, description="A deferred tool " * 20, defer_loading=True,
                     input_schema=CLAUDE_CODE_SCHEMA) for i in range(20)]
    server = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}]
    request = req(tools=[TOOL] + deferred + server)
    assert cp.to_openai(request, SETTINGS)["tools"] == cp.upstream_tools(request) == [FN]
    assert cp.estimate_tokens(request) == cp.estimate_tokens(req(tools=[TOOL]))
    # A tool_reference loads a deferred tool: from then on it is sent, and counted.
    loaded = req(tools=[TOOL] + deferred + server, messages=[
        {"role": "user", "content": "find a tool"},
        {"role": "assistant", "content": [dict(CALL, name="ToolSearch", input={"query": "d3"})]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": [{"type": "tool_reference", "tool_name": "Deferred3"}]}]}])
    sent = cp.to_openai(loaded, SETTINGS)["tools"]
    assert [t["function"]["name"] for t in sent] == ["Bash", "Deferred3"] and sent == cp.upstream_tools(loaded)
    undeferred = dict(deferred[3])
    del undeferred["defer_loading"]
    assert cp.estimate_tokens(loaded) == cp.estimate_tokens(dict(loaded, tools=[TOOL, undeferred]))


def test_estimate_tokens_counts_the_system_text_to_openai_sends():
    blocks = [{"type": "text", "text": cp.BILLING_HEADER_PREFIX + " cc_version=2.1.332; cch=00000;"},
              {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Be brief."}]
    request = req(system=blocks)
    assert cp.to_openai(request, SETTINGS)["messages"][0] == {"role": "system", "content": "You are Claude Code.\n\nBe brief."}
    assert cp.estimate_tokens(request) == cp.estimate_tokens(req(system="You are Claude Code.\n\nBe brief."))
    assert cp.estimate_tokens(request) > cp.estimate_tokens(req())


# =============================================================================================
# Web search (issue 13): the web_search server tool run by the proxy against a search backend
# =============================================================================================


class FakeSearch:
    """A search backend on 127.0.0.1:0: each request gets `reply` (status, JSON body); requests
    are recorded. `hang=True`: accept and never answer (for the timeout)."""

    def __init__(self, status=200, body=None, hang=False):
        self.status, self.body, self.requests = status, body, []
        fake = self
        self.released = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                fake.requests.append((self.command, self.path, dict(self.headers),
                                      self.rfile.read(length) if length else b""))
                if hang:
                    fake.released.wait(10)
                    return
                data = json.dumps(fake.body).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_search():
    made = []

    def make(**kw):
        made.append(FakeSearch(**kw))
        return made[-1]
    yield make
    for fake in made:
        fake.close()


SEARXNG_BODY = {"results": [
    {"url": "https://docs.python.org/3/whatsnew/3.13.html", "title": "What's New In Python 3.13",
     "content": "Python 3.13 <b>adds</b> a new REPL", "publishedDate": "2024-10-07"},
    {"url": "https://blog.spam.example/py", "title": "Spam", "content": "ads"},
]}


def test_searxng_results_and_request_shape(fake_search):
    fake = fake_search(body=SEARXNG_BODY)
    found = cp.SearxngSearch(fake.url, 5)("python 3.13 news")
    assert found[0] == cp.SearchResult("https://docs.python.org/3/whatsnew/3.13.html",
                                       "What's New In Python 3.13", "Python 3.13 adds a new REPL", "2024-10-07")
    method, path, _, _ = fake.requests[0]
    assert method == "GET" and path == "/search?q=python+3.13+news&format=json"


def test_searxng_empty_results(fake_search):
    assert cp.SearxngSearch(fake_search(body={"results": []}).url, 5)("x") == []


@pytest.mark.parametrize("status,code", [(429, "too_many_requests"), (500, "unavailable"), (403, "unavailable")])
def test_backend_error_statuses(fake_search, status, code):
    fake = fake_search(status=status, body={"error": "no"})
    with pytest.raises(cp.SearchError) as caught:
        cp.SearxngSearch(fake.url, 5)("x")
    assert caught.value.error_code == code


def test_backend_timeout_is_unavailable(fake_search):
    fake = fake_search(hang=True)
    with pytest.raises(cp.SearchError) as caught:
        cp.SearxngSearch(fake.url, 0.3)("x")
    assert caught.value.error_code == "unavailable" and "0.3" in caught.value.message


def test_backend_refused_is_unavailable():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(cp.SearchError) as caught:
        cp.SearxngSearch("http://127.0.0.1:%d" % port, 1)("x")
    assert caught.value.error_code == "unavailable"


def test_brave_request_and_results(fake_search):
    fake = fake_search(body={"web": {"results": [
        {"url": "https://a.example/1", "title": "A", "description": "about <strong>a</strong>", "age": "2 days ago"},
        {"url": "https://b.example/2", "title": "B", "description": "b", "page_age": "2025-01-01T00:00:00"}]}})
    found = cp.BraveSearch("brave-secret", 5, base_url=fake.url)("q w")
    assert [(r.url, r.snippet, r.page_age) for r in found] == [
        ("https://a.example/1", "about a", "2 days ago"), ("https://b.example/2", "b", "2025-01-01T00:00:00")]
    method, path, headers, _ = fake.requests[0]
    assert method == "GET" and path.startswith("/res/v1/web/search?q=q+w")
    assert headers["X-Subscription-Token"] == "brave-secret"


def test_tavily_request_results_and_domains(fake_search):
    fake = fake_search(body={"results": [
        {"url": "https://docs.python.org/x", "title": "X", "content": "x", "published_date": "2025-02-02"},
        {"url": "https://evil.example/", "title": "E", "content": "e"}]})
    found = cp.TavilySearch("tvly-secret", 5, base_url=fake.url)("q", ["python.org"], ["evil.example"])
    assert [r.url for r in found] == ["https://docs.python.org/x"]      # filtered after, too
    method, path, headers, body = fake.requests[0]
    assert (method, path, headers["Authorization"]) == ("POST", "/search", "Bearer tvly-secret")
    sent = json.loads(body)
    assert sent["query"] == "q" and sent["include_domains"] == ["python.org"]
    assert sent["exclude_domains"] == ["evil.example"]


def test_domain_filters_cover_subdomains_only():
    results = [cp.SearchResult("https://docs.python.org/a", "", ""), cp.SearchResult("https://notpython.org/", "", ""),
               cp.SearchResult("https://python.org/", "", ""), cp.SearchResult("https://x.spam.example/", "", "")]
    assert [r.url for r in cp.filter_results(results, ["python.org"])] == [
        "https://docs.python.org/a", "https://python.org/"]
    assert [r.url for r in cp.filter_results(results, (), ["spam.example", "python.org"])] == ["https://notpython.org/"]


@pytest.mark.parametrize("value,message", [
    ("bing", "WEB_SEARCH must be one of"), ("brave", "BRAVE_API_KEY"), ("tavily", "TAVILY_API_KEY"),
    ("searxng:", "instance's http(s) URL"), ("searxng:ftp://x", "instance's http(s) URL")])
def test_bad_web_search_settings_stop_start_up(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cp.check_settings(cp.Settings(web_search=value))


def test_web_search_keys_are_secrets():
    settings = cp.Settings(brave_api_key="BSAbrave-key-123456", tavily_api_key="tvly-dev-key-456789")
    redact = cp.Redactor(cp.settings_secrets(settings)).redact
    assert "BSAbrave-key-123456" not in redact("key BSAbrave-key-123456") and "tvly-dev-key-456789" not in redact("tvly-dev-key-456789")


def test_make_search_picks_the_backend():
    assert cp.make_search(cp.Settings()) is None
    assert isinstance(cp.make_search(cp.Settings(web_search="searxng:http://127.0.0.1:9")), cp.SearxngSearch)
    assert isinstance(cp.make_search(cp.Settings(web_search="brave", brave_api_key="k")), cp.BraveSearch)
    assert isinstance(cp.make_search(cp.Settings(web_search="tavily", tavily_api_key="k")), cp.TavilySearch)


WS_REQUEST = {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": True,
              "system": "search once, then reply with a brief summary",
              "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}],
              "messages": [{"role": "user", "content": "Perform a web search for the query: python 3.13"}]}


def model_answers(*answers):
    """call_model scripted: each answer is a list of blocks; the requests are recorded."""
    seen, queue = [], list(answers)

    def call_model(request):
        seen.append(request)
        content = queue.pop(0)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
        return {"id": "msg_%d" % len(seen), "type": "message", "role": "assistant", "model": "m",
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 3}}
    return call_model, seen


def search_call(query, n=1):
    return {"type": "tool_use", "id": "call_%d" % n, "name": "web_search", "input": {"query": query}}


def counter_ids():
    count = iter(range(1, 1000))
    return lambda prefix: "%s%d" % (prefix, next(count))


def test_run_web_search_one_search_then_answer():
    call_model, seen = model_answers([search_call("python 3.13")], [{"type": "text", "text": "It adds a REPL."}])
    queries = []

    def search(query, allowed, blocked):
        queries.append((query, allowed, blocked))
        return [cp.SearchResult("https://docs.python.org/3/whatsnew/3.13.html", "What's New", "a new REPL", "2024-10-07")]
    message = cp.run_web_search(WS_REQUEST, call_model, search, counter_ids())
    assert queries == [("python 3.13", (), ())]
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    use, result, text = message["content"]
    assert use == {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "python 3.13"}}
    assert result["tool_use_id"] == "srvtoolu_1"
    assert result["content"][0]["url"] == "https://docs.python.org/3/whatsnew/3.13.html"
    assert result["content"][0]["page_age"] == "2024-10-07" and result["content"][0]["encrypted_content"]
    assert message["usage"] == {"input_tokens": 20, "output_tokens": 6, "server_tool_use": {"web_search_requests": 1}}
    assert message["stop_reason"] == "end_turn"
    # the model got a client-style tool, non-streaming, and then the results as a tool result
    assert seen[0]["tools"] == [cp.WEB_SEARCH_TOOL] and seen[0]["stream"] is False
    fed = seen[1]["messages"][-1]["content"][0]
    assert fed["type"] == "tool_result" and fed["tool_use_id"] == "call_1"
    assert "1. What's New" in fed["content"] and "https://docs.python.org/3/whatsnew/3.13.html" in fed["content"]
    assert WS_REQUEST["tools"][0]["type"] == "web_search_20250305"          # input untouched


def test_run_web_search_max_uses_and_errors():
    call_model, seen = model_answers([search_call("a", 1), search_call("b", 2)], [search_call("c", 3)],
                                     [{"type": "text", "text": "done"}])
    runs = []

    def search(query, allowed, blocked):
        runs.append(query)
        if query == "b":
            raise cp.SearchError("too_many_requests", "rate limited")
        return []
    message = cp.run_web_search(WS_REQUEST, call_model, search, counter_ids())
    results = [b["content"] for b in message["content"] if b["type"] == "web_search_tool_result"]
    assert results == [[], {"type": "web_search_tool_result_error", "error_code": "too_many_requests"},
                       {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}]
    assert runs == ["a", "b"] and message["usage"]["server_tool_use"] == {"web_search_requests": 2}
    assert "max_uses_exceeded" in seen[2]["messages"][-1]["content"][0]["content"]


def test_run_web_search_stops_asking_the_model_to_search_after_max_uses():
    forever = [[search_call("again", n)] for n in range(10)]
    call_model, seen = model_answers(*forever)
    cp.run_web_search(WS_REQUEST, call_model, lambda q, a, b: [], counter_ids())
    assert len(seen) == 4 and all(t["name"] != "web_search" for t in seen[-1]["tools"])


def test_run_web_search_query_checks():
    call_model, _ = model_answers([search_call("x" * 401, 1), {"type": "tool_use", "id": "c2", "name": "web_search",
                                   "input": {}}], [{"type": "text", "text": "ok"}])
    message = cp.run_web_search(WS_REQUEST, call_model, lambda q, a, b: 1 / 0, counter_ids())
    codes = [b["content"]["error_code"] for b in message["content"] if b["type"] == "web_search_tool_result"]
    assert codes == ["query_too_long", "invalid_tool_input"]
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 0}


def test_run_web_search_domains_filtered_after_the_backend():
    request = dict(WS_REQUEST, tools=[{"type": "web_search_20250305", "name": "web_search",
                                       "allowed_domains": ["python.org"]}])
    call_model, _ = model_answers([search_call("x")], [{"type": "text", "text": "ok"}])
    message = cp.run_web_search(request, call_model, lambda q, a, b: [
        cp.SearchResult("https://docs.python.org/", "P", ""), cp.SearchResult("https://other.example/", "O", "")],
        counter_ids())
    assert [r["url"] for r in message["content"][1]["content"]] == ["https://docs.python.org/"]


def test_run_web_search_unset_backend_says_how_to_turn_it_on():
    call_model, _ = model_answers([search_call("x")], [{"type": "text", "text": "I could not search."}])
    message = cp.run_web_search(WS_REQUEST, call_model, None, counter_ids())
    assert message["content"][1]["content"] == {"type": "web_search_tool_result_error", "error_code": "unavailable"}
    assert "WEB_SEARCH=searxng:" in message["content"][2]["text"]
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 0}


def test_run_web_search_client_tools_go_to_the_client():
    request = dict(WS_REQUEST, tools=WS_REQUEST["tools"] + [{"name": "Read", "input_schema": {"type": "object"}}])
    read = {"type": "tool_use", "id": "toolu_r", "name": "Read", "input": {"path": "a"}}
    call_model, seen = model_answers([search_call("x"), read])
    blocks = []
    message = cp.run_web_search(request, call_model, lambda q, a, b: [], counter_ids(), on_block=blocks.append)
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "tool_use"]
    assert message["stop_reason"] == "tool_use" and blocks == message["content"] and len(seen) == 1
    assert [t.get("name") for t in seen[0]["tools"]] == ["web_search", "Read"]


def test_replayed_web_search_reaches_the_upstream_as_text():
    call_model, _ = model_answers([search_call("py")], [{"type": "text", "text": "ok"}])
    message = cp.run_web_search(WS_REQUEST, call_model, lambda q, a, b: [
        cp.SearchResult("https://docs.python.org/", "Python docs", "the snippet text")], counter_ids())
    history = WS_REQUEST["messages"] + [{"role": "assistant", "content": message["content"]},
                                        {"role": "user", "content": "thanks"}]
    converted = cp.convert_messages(history)
    assistant = [m for m in converted if m["role"] == "assistant"][0]
    assert "https://docs.python.org/" in assistant["content"] and "the snippet text" in assistant["content"]


# =============================================================================================
# End to end: the real server against a scripted fake upstream on loopback
# =============================================================================================


class FakeUpstream:
    """A scripted OpenAI-compatible server on 127.0.0.1:0. Each chat request pops the next
    responder from `script` (a callable(handler, body)); requests are recorded."""

    def __init__(self):
        self.requests = []
        self.script = []
        self.get_script = []
        self.connections = 0
        self.lock = threading.Lock()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def setup(self):
                super().setup()
                with upstream.lock:
                    upstream.connections += 1

            def log_message(self, *args):
                pass

            def do_GET(self):
                with upstream.lock:
                    upstream.requests.append({"path": self.path, "headers": dict(self.headers), "body": None})
                    responder = upstream.get_script.pop(0) if upstream.get_script else json_reply(
                        {"object": "list", "data": [{"id": "gpt-4o"}, {"id": "gpt-4o-mini"}]})
                responder(self, None)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with upstream.lock:
                    upstream.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    responder = upstream.script.pop(0) if upstream.script else sse_text("ok")
                responder(self, body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d/v1" % self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def json_reply(payload, status=200, headers=None):
    def respond(handler, body):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            handler.wfile.write(data)
        except OSError:              # the proxy gave up on us (timeout tests)
            handler.close_connection = True
    return respond


def begin_sse(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def send_parts(handler, parts, before_each=None):
    """Each part as one HTTP chunk; `before_each(i)` runs before part i is written."""
    for i, part in enumerate(parts):
        if before_each:
            before_each(i)
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))


def sse_data(chunk_dict):
    return b"data: " + cp.json_bytes(chunk_dict) + b"\n\n"


def note_when_proxy_closes(handler, event):
    """Set `event` once the proxy closes this upstream connection."""
    handler.connection.settimeout(10)
    try:
        if handler.connection.recv(1) == b"":
            event.set()
    except OSError:
        event.set()


def sse_reply(chunks, done=True, pieces=None, before_each=None):
    """An SSE answer with chunked transfer encoding, one HTTP chunk per event. `pieces`: raw
    byte pieces instead (to split a UTF-8 character across writes). `before_each(i)` runs
    before event i is written (to hold the stream at a point)."""
    def respond(handler, body):
        begin_sse(handler)
        parts = pieces if pieces is not None else [sse_data(c) for c in chunks]
        if done and pieces is None:
            parts = parts + [b"data: [DONE]\n\n"]
        try:
            send_parts(handler, parts, before_each)
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True
    return respond


def sse_text(text, usage=None):
    return sse_reply([chunk({"role": "assistant", "content": ""}), chunk({"content": text}),
                      chunk({}, "stop"), chunk(usage=usage or {"prompt_tokens": 11, "completion_tokens": 2})])


def json_text(text):
    return json_reply(completion({"content": text}))


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    yield fake
    fake.close()


def start_proxy(upstream_url, **settings):
    settings.setdefault("port", 0)
    settings.setdefault("openai_api_key", "sk-upstream-secret-123")
    server = cp.ProxyServer(cp.Settings(openai_base_url=upstream_url, **settings))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    return server


def stop_proxy(server):
    server.shutdown()
    server.server_close()
    server.close_upstreams()


@contextlib.contextmanager
def running_proxy(upstream_url, **settings):
    server = start_proxy(upstream_url, **settings)
    try:
        yield server
    finally:
        stop_proxy(server)


@pytest.fixture
def proxy(upstream):
    with running_proxy(upstream.url) as server:
        yield server


class Client:
    """A keep-alive client of the proxy."""

    def __init__(self, server, timeout=30):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=timeout)

    def call(self, method, path, body=None, headers=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=dict({"Content-Type": "application/json"}, **(headers or {})))
        response = self.conn.getresponse()
        payload = response.read()
        return response, payload

    def json(self, method, path, body=None, headers=None):
        response, payload = self.call(method, path, body, headers)
        return response.status, dict(response.getheaders()), json.loads(payload) if payload else None

    def stream(self, body, headers=None):
        response, payload = self.call("POST", "/v1/messages?beta=true", dict(body, stream=True), headers)
        assert response.status == 200, payload
        assert response.getheader("Content-Type").startswith("text/event-stream")
        return check_stream(parse_sse(payload))


def claude_code_request(stream=True, tools=25):
    """A request with the shape Claude Code 2.1.x sends: billing header, cached system blocks, a
    mid-conversation system message, a tool round trip, 25 tools with 2020-12 schemas."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "additionalProperties": False, "required": ["command"],
              "properties": {"command": {"type": "string", "description": "The command", "minLength": 1},
                             "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 600000},
                             "url": {"type": "string", "format": "uri"},
                             "mode": {"const": "fast"}, "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"}},
                             "env": {"type": "object", "propertyNames": {"pattern": "^[A-Z]+$"}}}}
    names = ["Bash", "Read", "Edit", "Write", "Agent", "TaskUpdate", "WebFetch", "WebSearch"] + [
        "Tool%02d" % i for i in range(tools - 8)]
    return {
        "model": "claude-opus-4-8", "max_tokens": 64000, "stream": stream,
        "metadata": {"user_id": json.dumps({"device_id": "0" * 64, "account_uuid": "", "session_id": "s"})},
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.c40; cc_entrypoint=sdk-cli;"},
                   {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be helpful. " * 400, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<system-reminder>context</system-reminder>"},
                                         {"type": "text", "text": "run echo hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": [{"type": "text", "text": "Available agent types: general",
                                            "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "I'll run it", "signature": "sig"},
                                              {"type": "text", "text": "Running it."},
                                              {"type": "tool_use", "id": "toolu_01", "name": "Bash",
                                               "input": {"command": "echo hi", "description": "echo"}}]},
            {"role": "user", "content": [{"tool_use_id": "toolu_01", "type": "tool_result", "content": "hi",
                                          "is_error": False, "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"name": n, "description": "Tool %s. " % n * 20, "input_schema": schema} for n in names],
    }


CLAUDE_CODE_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "dummy", "x-app": "cli",
                       "anthropic-beta": "claude-code-20250219,mid-conversation-system-2026-04-07,effort-2025-11-24",
                       "Accept": "application/json", "User-Agent": "claude-cli/2.1.197 (external, sdk-cli)"}


def test_e2e_non_stream_text(upstream, proxy):
    upstream.script.append(json_reply(completion({"content": "Hello!"}, usage={"prompt_tokens": 9, "completion_tokens": 2})))
    status, headers, message = Client(proxy).json("POST", "/v1/messages", req())
    assert status == 200 and headers["request-id"].startswith("req_")
    assert message["id"].startswith("msg_") and message["model"] == "claude-opus-4-8"
    assert (message["content"], message["stop_reason"], message["usage"]["input_tokens"]) == (
        [{"type": "text", "text": "Hello!"}], "end_turn", 9)
    sent = upstream.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == "Bearer sk-upstream-secret-123"
    assert sent["body"] == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


def test_e2e_stream_text(upstream, proxy):
    upstream.script.append(sse_text("Hello stream", {"prompt_tokens": 30, "completion_tokens": 3}))
    events = Client(proxy).stream(req())
    message = cp.assemble_message(events)
    assert message["content"] == [{"type": "text", "text": "Hello stream"}]
    assert message["usage"]["input_tokens"] == 30 and message["usage"]["output_tokens"] == 3
    assert upstream.requests[0]["body"]["stream_options"] == {"include_usage": True}


def test_e2e_tool_round_trip_streaming(upstream, proxy):
    client = Client(proxy)
    upstream.script.append(sse_reply([
        chunk({"role": "assistant", "content": None}),
        chunk(tool_delta(0, "", "call_9", "Bash")), chunk(tool_delta(0, '{"command":')),
        chunk(tool_delta(0, ' "ls"}')), chunk({}, "tool_calls"), chunk(usage={"prompt_tokens": 5, "completion_tokens": 4})]))
    first = cp.assemble_message(client.stream(req(tools=[TOOL], messages=[{"role": "user", "content": "list files"}])))
    assert first["stop_reason"] == "tool_use"
    call = first["content"][0]
    assert (call["id"], call["name"], call["input"]) == ("call_9", "Bash", {"command": "ls"})

    upstream.script.append(sse_text("There is one file."))
    history = [{"role": "user", "content": "list files"}, {"role": "assistant", "content": first["content"]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_9", "content": "a.txt"}]}]
    second = cp.assemble_message(client.stream(req(tools=[TOOL], messages=history)))
    assert second["content"] == [{"type": "text", "text": "There is one file."}]
    assert upstream.requests[1]["body"]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "a.txt"}]


def test_e2e_tool_round_trip_non_stream(upstream, proxy):
    upstream.script.append(json_reply(completion({"content": None, "tool_calls": [
        {"id": "call_2", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"pwd"}'}}]}, "tool_calls")))
    status, _, message = Client(proxy).json("POST", "/v1/messages", req(tools=[TOOL]))
    assert status == 200 and message["stop_reason"] == "tool_use"
    assert message["content"] == [{"type": "tool_use", "id": "call_2", "name": "Bash", "input": {"command": "pwd"}}]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_e2e_claude_code_request_shape(upstream, proxy, stream):
    answer = "Done: hi"
    upstream.script.append(sse_text(answer) if stream else json_text(answer))
    client = Client(proxy)
    request = claude_code_request(stream)
    if stream:
        message = cp.assemble_message(client.stream(request, CLAUDE_CODE_HEADERS))
    else:
        status, _, message = client.json("POST", "/v1/messages?beta=true", request, CLAUDE_CODE_HEADERS)
        assert status == 200
    assert message["content"] == [{"type": "text", "text": answer}]
    sent = upstream.requests[0]["body"]
    assert sent["model"] == "gpt-4o" and sent["max_tokens"] == 64000 and len(sent["tools"]) == 25
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert sent["messages"][0]["content"].startswith("You are Claude Code.\n\nBe helpful.")
    assert sent["messages"][1]["content"] == (
        "<system-reminder>context</system-reminder>\n\nrun echo hi\n\n"
        "<system-reminder>\nAvailable agent types: general\n</system-reminder>")
    assert sent["tools"][0]["function"]["parameters"] == request["tools"][0]["input_schema"]
    for absent in ("thinking", "output_config", "context_management", "metadata"):
        assert absent not in sent


def test_e2e_upstream_answers_json_to_a_stream_request(upstream, proxy):
    upstream.script.append(json_text("not streamed"))
    events = Client(proxy).stream(req())
    assert cp.assemble_message(events)["content"] == [{"type": "text", "text": "not streamed"}]


def test_e2e_upstream_streaming_off_streams_a_whole_answer_to_the_client(upstream):
    with running_proxy(upstream.url, upstream_streaming="off") as server:
        upstream.script.append(json_reply(completion({"content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]}, "stop")))
        message = cp.assemble_message(Client(server).stream(req(tools=[TOOL])))
        assert message["stop_reason"] == "tool_use" and message["content"][0]["input"] == {"command": "ls"}
        assert "stream" not in upstream.requests[0]["body"] and "stream_options" not in upstream.requests[0]["body"]


def test_e2e_upstream_streams_to_a_non_stream_request(upstream, proxy):
    upstream.script.append(sse_text("streamed anyway"))
    status, _, message = Client(proxy).json("POST", "/v1/messages", req())
    assert status == 200 and message["content"] == [{"type": "text", "text": "streamed anyway"}]


def test_e2e_utf8_character_split_across_upstream_writes(upstream, proxy):
    event = ("data: " + json.dumps(chunk({"content": "h€llo"}), ensure_ascii=False) + "\n\n").encode()
    cut = event.index("€".encode()) + 1
    finish = b"data: " + json.dumps(chunk({}, "stop")).encode() + b"\n\ndata: [DONE]\n\n"
    upstream.script.append(sse_reply(None, pieces=[event[:cut], event[cut:], finish]))
    assert cp.assemble_message(Client(proxy).stream(req()))["content"] == [{"type": "text", "text": "h€llo"}]


def test_e2e_stream_cut_mid_answer_ends_with_error_event(upstream, proxy):
    upstream.script.append(sse_reply([chunk({"content": "half an ans"})], done=False))
    events = Client(proxy).stream(req())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    assert cp.assemble_message(events[:-1])["content"] == [{"type": "text", "text": "half an ans"}]


@pytest.mark.parametrize("status,body,headers,status_out,type_out", [
    (400, {"error": {"message": "context too long"}}, {}, 400, "invalid_request_error"),
    (401, {"error": {"message": "Incorrect API key provided: sk-upstream-secret-123"}}, {}, 401, "authentication_error"),
    (429, {"error": {"message": "rate limited"}}, {"Retry-After": "3"}, 429, "rate_limit_error"),
    (500, {"error": {"message": "oops"}}, {}, 500, "api_error"),
    (503, b"<html>down</html>", {}, 529, "overloaded_error"),
])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_e2e_upstream_errors_before_the_stream_are_http_errors(upstream, proxy, status, body, headers,
                                                               status_out, type_out, stream):
    upstream.script.append(json_reply(body, status, headers))
    got_status, got_headers, payload = Client(proxy).json("POST", "/v1/messages", req(stream=stream))
    assert got_status == status_out and payload["type"] == "error"
    assert payload["error"]["type"] == type_out and payload["request_id"] == got_headers["request-id"]
    assert "sk-upstream-secret-123" not in json.dumps(payload)
    if status == 429:
        assert got_headers["retry-after"] == "3"
    assert got_headers.get("x-should-retry") == ("false" if status_out in (400, 401) else None)


def test_e2e_upstream_unreachable_is_502(upstream):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed_port = sock.getsockname()[1]
    sock.close()
    server = start_proxy("http://127.0.0.1:%d/v1" % closed_port)
    try:
        status, _, payload = Client(server).json("POST", "/v1/messages", req())
        assert status == 502 and payload["error"]["type"] == "api_error" and "unreachable" in payload["error"]["message"]
    finally:
        stop_proxy(server)


def test_kernel_timeouts_raise_socket_timeout_like_python_timeouts():
    """A read or write the kernel timed out (EAGAIN on a blocking socket) is socket.timeout,
    never the b"" of a closed stream."""
    a, b = socket.socketpair()
    with a, b:
        if not cp.set_io_timeout(a, 0.05):
            pytest.skip("Python timeouts on this platform")
        assert a.gettimeout() is None and isinstance(a, cp.KernelTimedSocket)
        reader = a.makefile("rb")
        with pytest.raises(socket.timeout):
            reader.read1(100)
        with pytest.raises(OSError):           # as after a Python timeout
            reader.read1(100)
        reader.close()
        with pytest.raises(socket.timeout):
            a.sendall(b"x" * (16 << 20))       # nobody reads b
        with pytest.raises(BlockingIOError):   # (a non-blocking peek still says "nothing yet")
            a.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        b.sendall(b"line\nrest")
        assert a.makefile("rb").readline() == b"line\n"


def test_e2e_upstream_timeout_is_504(upstream):
    release = threading.Event()

    def hang(handler, body):
        release.wait(10)
        json_text("late")(handler, body)

    upstream.script.append(hang)
    server = start_proxy(upstream.url, request_timeout=0.3)
    try:
        status, _, payload = Client(server).json("POST", "/v1/messages", req())
        assert status == 504 and payload["error"]["type"] == "timeout_error"
    finally:
        release.set()
        stop_proxy(server)


def test_e2e_keep_alive_reuses_upstream_connections(upstream, proxy):
    client = Client(proxy)
    for i in range(6):
        upstream.script.append(sse_text("s%d" % i) if i % 2 else json_text("n%d" % i))
        if i % 2:
            client.stream(req())
        else:
            assert client.json("POST", "/v1/messages", req())[0] == 200
    assert upstream.connections == 1


def test_e2e_ping_while_upstream_is_silent(upstream):
    pinged = threading.Event()
    server = start_proxy(upstream.url, ping_interval=0.05)

    def hold(i):
        if i == 1:
            assert pinged.wait(10), "no ping reached the client"

    upstream.script.append(sse_reply([chunk({"role": "assistant"}), chunk({"content": "late"}), chunk({}, "stop")],
                                     before_each=hold))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=20)
        conn.request("POST", "/v1/messages", json.dumps(req(stream=True)), {"Content-Type": "application/json"})
        response = conn.getresponse()
        seen = b""
        while b"event: ping" not in seen.split(b"event: message_start", 1)[-1].split(b"event: ping", 1)[-1] and \
                seen.count(b"event: ping") < 2:
            seen += response.read1(65536) if hasattr(response, "read1") else response.read(1)
        pinged.set()
        seen += response.read()
        events = check_stream(parse_sse(seen))
        assert [e["type"] for e in events[:3]] == ["message_start", "ping", "ping"]
        assert cp.assemble_message(events)["content"] == [{"type": "text", "text": "late"}]
    finally:
        pinged.set()
        stop_proxy(server)


def test_e2e_client_going_away_closes_the_upstream_request(upstream, caplog):
    upstream_saw_close = threading.Event()
    client_left = threading.Event()
    server = start_proxy(upstream.url, ping_interval=0.05)

    def respond(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        send_parts(handler, [sse_data(chunk({"content": "x"}))])
        client_left.wait(10)
        note_when_proxy_closes(handler, upstream_saw_close)
        handler.close_connection = True

    upstream.script.append(respond)
    try:
        sock = socket.create_connection(server.server_address[:2], timeout=10)
        body = json.dumps(req(stream=True)).encode()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"text_delta" not in received:
            received += sock.recv(65536)
        sock.close()
        client_left.set()
        assert upstream_saw_close.wait(10), "upstream connection stayed open after the client left"
        upstream.script.append(json_text("next"))
        assert Client(server).json("POST", "/v1/messages", req())[0] == 200
        assert "unexpected error" not in caplog.text
        assert "stream ended before" not in caplog.text, "the client left; the upstream did nothing wrong"
    finally:
        client_left.set()
        stop_proxy(server)


def test_e2e_negotiation_fixes_once_and_remembers_for_the_model(upstream, proxy, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    limit = {"error": {"message": "max_tokens is too large: 64000. This model supports at most 16384 completion "
                                  "tokens, whereas you provided 64000.", "param": "max_tokens", "code": "invalid_value"}}
    upstream.script.extend([json_reply(limit, 400), json_text("first"), sse_text("second")])
    client = Client(proxy)
    status, _, message = client.json("POST", "/v1/messages", req(max_tokens=64000))
    assert status == 200 and message["content"][0]["text"] == "first"
    assert cp.assemble_message(client.stream(req(max_tokens=64000)))["content"][0]["text"] == "second"
    assert [r["body"]["max_tokens"] for r in upstream.requests] == [64000, 16384, 16384]
    learned = [r.getMessage() for r in caplog.records if "from now on" in r.getMessage()]
    assert learned == ["model gpt-4o: at most 16384 output tokens from now on (upstream said: max_tokens is too "
                       "large: 64000. This model supports at most 16384 completion tokens, whereas you provided 64000.)"]


def test_e2e_negotiation_never_retries_more_than_once(upstream, proxy):
    rejected = {"error": {"message": "Unsupported value: 'temperature' does not support 0.5 with this model.",
                          "param": "temperature"}}
    rejected_again = {"error": {"message": "Unsupported parameter: 'top_p' is not supported with this model.",
                                "param": "top_p"}}
    upstream.script.extend([json_reply(rejected, 400), json_reply(rejected_again, 400)])
    status, headers, payload = Client(proxy).json("POST", "/v1/messages", req(temperature=0.5, top_p=0.9, stream=True))
    assert status == 400 and "top_p" in payload["error"]["message"] and headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 2
    assert "temperature" not in upstream.requests[1]["body"] and upstream.requests[1]["body"]["top_p"] == 0.9
    upstream.script.append(json_text("ok"))
    Client(proxy).json("POST", "/v1/messages", req(temperature=0.5))
    assert upstream.requests[2]["body"]["temperature"] == 0.5, "a fix that did not work was remembered"


def test_e2e_context_window_limit_is_used_for_the_retry_only(upstream, proxy):
    too_long = {"error": {"message": "'max_tokens' or 'max_completion_tokens' is too large: 64000. This model's maximum "
                                     "context length is 32768 tokens and your request has 30000 input tokens."}}
    upstream.script.extend([json_reply(too_long, 400), json_text("first"), json_text("second")])
    client = Client(proxy)
    assert client.json("POST", "/v1/messages", req(max_tokens=64000))[2]["content"][0]["text"] == "first"
    assert client.json("POST", "/v1/messages", req(max_tokens=64000))[2]["content"][0]["text"] == "second"
    assert [r["body"]["max_tokens"] for r in upstream.requests] == [64000, 2441, 64000]


def test_e2e_azure_deployment_url_api_version_and_api_key(upstream):
    base = upstream.url.replace("/v1", "/openai/deployments/my-gpt4o")
    server = start_proxy(base, provider="azure", openai_api_key="azure-key-789")
    try:
        upstream.script.append(json_text("from azure"))
        assert Client(server).json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "from azure"
        sent = upstream.requests[0]
        assert sent["path"] == "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
        assert sent["headers"]["api-key"] == "azure-key-789" and "Authorization" not in sent["headers"]
    finally:
        stop_proxy(server)


def test_e2e_pdf_refused_before_reaching_an_upstream_that_cannot_read_it(upstream):
    server = start_proxy(upstream.url, provider="ollama")
    try:
        status, _, payload = Client(server).json("POST", "/v1/messages", req(messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]))
        assert status == 400 and "does not take PDF documents" in payload["error"]["message"]
        assert upstream.requests == []
    finally:
        stop_proxy(server)


def test_e2e_lone_surrogate_in_the_history_and_in_the_answer(upstream, proxy):
    # JavaScript's JSON.stringify writes "\ud83d" for a string cut mid-emoji.
    body = b'{"model":"claude-opus-4-8","max_tokens":10,"messages":[{"role":"user","content":"cut here: \\ud83d"}]}'
    upstream.script.append(json_text("reply \ud83d"))
    response, payload = Client(proxy).call("POST", "/v1/messages", body)
    assert response.status == 200 and json.loads(payload)["content"][0]["text"] == "reply \ud83d"
    assert upstream.requests[0]["body"]["messages"][0]["content"] == "cut here: \ud83d"
    upstream.script.append(sse_text("stream \ud83d"))
    assert cp.assemble_message(Client(proxy).stream(req()))["content"][0]["text"] == "stream \ud83d"


def test_e2e_pooled_connections_closed_by_the_upstream_are_not_used(upstream, proxy):
    both_arrived = threading.Barrier(2, timeout=10)

    def reply_then_hang_up(handler, body):
        both_arrived.wait()
        json_text("pooled")(handler, body)
        handler.close_connection = True          # keep-alive promised, then closed while idle

    upstream.script.extend([reply_then_hang_up, reply_then_hang_up])
    results = []
    threads = [threading.Thread(target=lambda: results.append(Client(proxy).json("POST", "/v1/messages", req())[0]))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [200, 200]
    upstream.script.append(json_text("fresh"))
    status, _, message = Client(proxy).json("POST", "/v1/messages", req())
    assert status == 200 and message["content"][0]["text"] == "fresh"


def test_e2e_unexpected_error_mid_stream_ends_with_an_error_event(upstream, proxy, monkeypatch):
    def broken(self, text, events):
        raise RuntimeError("bug")
    monkeypatch.setattr(cp.StreamTranslator, "_text", broken)
    upstream.script.append(sse_text("x"))
    events = Client(proxy).stream(req())
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "internal proxy error"}}
    monkeypatch.undo()
    upstream.script.append(json_text("still serving"))
    assert Client(proxy).json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "still serving"


def test_e2e_error_inside_a_stream_is_redacted(upstream, proxy):
    upstream.script.append(sse_reply([chunk({"content": "a"}),
                                      {"error": {"message": "Incorrect API key provided: sk-upstream-secret-123"}}]))
    events = Client(proxy).stream(req())
    assert events[-1]["type"] == "error" and "sk-upstream-secret-123" not in events[-1]["error"]["message"]
    assert "***" in events[-1]["error"]["message"]


def test_e2e_done_without_finish_reason_is_an_error(upstream, proxy):
    upstream.script.append(sse_reply([]))
    assert Client(proxy).stream(req())[-1]["type"] == "error"      # nothing came: no answer


def test_e2e_done_after_content_without_finish_reason_is_a_finished_answer(upstream, proxy):
    upstream.script.append(sse_reply([chunk({"role": "assistant", "content": "done, no reason"})]))
    upstream.script.append(sse_reply([chunk({"content": "whole"}),
                                      chunk(x_groq={"usage": {"prompt_tokens": 359, "completion_tokens": 4}})]))
    events = Client(proxy).stream(req())
    assert events[-1]["type"] == "message_stop" and events[-2]["delta"]["stop_reason"] == "end_turn"
    status, _, message = Client(proxy).json("POST", "/v1/messages", req())   # (answered as a stream anyway)
    assert status == 200 and message["usage"]["input_tokens"] == 359


def test_e2e_upstream_holding_its_body_open_after_done_loses_the_connection(upstream, proxy, monkeypatch):
    monkeypatch.setattr(cp, "DRAIN_TIMEOUT", 0.05)
    released, closed = threading.Event(), threading.Event()

    def done_then_hold(handler, body):
        begin_sse(handler)
        send_parts(handler, [sse_data(chunk({"content": "hi"}, "stop")), b"data: [DONE]\n\n"])
        note_when_proxy_closes(handler, closed)
        released.wait(10)
        handler.close_connection = True

    upstream.script.append(done_then_hold)
    client = Client(proxy)
    try:
        assert cp.assemble_message(client.stream(req()))["content"][0]["text"] == "hi"
        assert closed.wait(10), "the proxy kept waiting on an upstream body that never ended"
        upstream.script.append(json_text("next"))
        assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "next"
    finally:
        released.set()


def test_e2e_upstream_chattering_after_done_is_cut_at_the_drain_deadline(upstream, proxy, monkeypatch):
    monkeypatch.setattr(cp, "DRAIN_TIMEOUT", 0.05)
    closed = threading.Event()

    def done_then_keepalives(handler, body):
        begin_sse(handler)
        send_parts(handler, [sse_data(chunk({"content": "hi"}, "stop")), b"data: [DONE]\n\n"])
        try:
            while not closed.wait(0.01):         # an upstream that never ends its body
                send_parts(handler, [b": keep-alive\n\n"])
        except OSError:
            closed.set()
        handler.close_connection = True

    upstream.script.append(done_then_keepalives)
    client = Client(proxy)
    assert cp.assemble_message(client.stream(req()))["content"][0]["text"] == "hi"
    assert closed.wait(10), "the proxy kept draining an upstream body that never ended"
    upstream.script.append(json_text("next"))
    assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "next"


def test_e2e_deeply_nested_body_is_400(proxy):
    response, payload = Client(proxy).call("POST", "/v1/messages", b"[" * 100000)
    assert response.status == 400 and json.loads(payload)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {"choices": [{}], "usage": 1.5}, {"choices": [{"finish_reason": [1], "message": {"content": "x"}}]},
    {"choices": [{"message": {"tool_calls": 5, "content": [{"text": 5}]}}]}, {"choices": [{"message": "x"}]},
])
def test_e2e_odd_upstream_answers_never_500(upstream, proxy, body, caplog):
    upstream.script.append(json_reply(body))
    status, _, payload = Client(proxy).json("POST", "/v1/messages", req())
    assert status in (200, 502), payload
    assert payload["type"] in ("message", "error") and "unexpected error" not in caplog.text


def test_e2e_uppercase_event_stream_content_type(upstream, proxy):
    def respond(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Type", "Text/Event-Stream; charset=utf-8")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        send_parts(handler, [sse_data(chunk({"content": "ok"}, "stop")), b"data: [DONE]\n\n"])
        handler.wfile.write(b"0\r\n\r\n")
    upstream.script.append(respond)
    assert cp.assemble_message(Client(proxy).stream(req()))["content"][0]["text"] == "ok"


def test_e2e_nan_and_infinity_are_not_json(upstream, proxy):
    for raw in (b'{"model":"m","max_tokens":5,"temperature":NaN,"messages":[{"role":"user","content":"x"}]}',
                b'{"model":"m","max_tokens":5,"temperature":1e400,"messages":[{"role":"user","content":"x"}]}'):
        response, payload = Client(proxy).call("POST", "/v1/messages", raw)
        assert response.status == 400, payload
    assert upstream.requests == []


def test_e2e_body_nested_too_deep_to_re_encode_is_400(upstream, proxy, monkeypatch, caplog):
    # json.loads accepts a depth that re-encoding the request (deeper in the stack) cannot.
    def too_deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    monkeypatch.setattr(cp, "describe_request", too_deep)
    response, payload = Client(proxy).call("POST", "/v1/messages", json.dumps(req()).encode())
    assert response.status == 400 and "nested too deeply" in json.loads(payload)["error"]["message"]


def test_e2e_client_leaving_before_the_answer_is_no_error(upstream, proxy, caplog):
    client_left = threading.Event()

    def slow(handler, body):
        client_left.wait(10)
        json_text("too late")(handler, body)

    upstream.script.append(slow)
    sock = socket.create_connection(proxy.server_address[:2], timeout=10)
    body = json.dumps(req()).encode()
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    while not upstream.requests:
        client_left.wait(0.01)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()                               # a reset, like a killed client
    client_left.set()
    upstream.script.append(json_text("next"))
    assert Client(proxy).json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "next"
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text


def test_e2e_error_inside_a_200_body_keeps_its_status(upstream, proxy):
    upstream.script.append(json_reply({"error": {"code": 429, "message": "busy"}}))
    status, _, payload = Client(proxy).json("POST", "/v1/messages", req())
    assert status == 429 and payload["error"]["type"] == "rate_limit_error"


def test_e2e_usage_missing_is_estimated(upstream, proxy):
    upstream.script.append(json_reply({"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}]}))
    message = Client(proxy).json("POST", "/v1/messages", req(messages=[{"role": "user", "content": "word " * 400}]))[2]
    assert message["usage"]["input_tokens"] > 300


@pytest.mark.parametrize("body", [
    req(messages=[{"role": "user", "content": [{"type": "image", "source": "https://x/y.png"}]}]),
    req(messages=[{"role": "user", "content": [{"type": "mystery", "text": 5}]}]),
    req(messages=[{"role": "user", "content": [{"type": ["text"]}]}]),
    req(messages=[{"role": "assistant", "content": [{"type": "text", "text": {"a": 1}}]}]),
    req(stop_sequences={"a": 1}), req(tools=[TOOL], tool_choice={"type": ["any"]}),
])
def test_e2e_fields_of_the_wrong_type_are_400_not_500(upstream, proxy, body):
    status, headers, payload = Client(proxy).json("POST", "/v1/messages", body)
    assert status == 400 and payload["error"]["type"] == "invalid_request_error", payload
    assert headers["x-should-retry"] == "false" and upstream.requests == []


@pytest.mark.parametrize("head,body", [
    (b"Content-Length: -1\r\n", b"zz"), (b"Content-Length: +2\r\n", b"{}"), (b"Content-Length: 1_0\r\n", b"{}"),
    (b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"),
    (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"{}"),
    (b"Transfer-Encoding: chunked\r\n", b"zz\r\n"), (b"Transfer-Encoding: chunked\r\n", b"-5\r\n{}\r\n0\r\n\r\n"),
    (b"Transfer-Encoding: chunked\r\n", b"-1\r\n{}\r\n0\r\n\r\n"), (b"Transfer-Encoding: chunked\r\n", b"\r\n"),
])
def test_e2e_bad_request_framing_is_400(proxy, head, body):
    sock = socket.create_connection(proxy.server_address[:2], timeout=10)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("request_line,status", [(b"FOO / HTTP/1.1", 405), (b"post /v1/messages HTTP/1.1", 405),
                                                 (b"GET /" + b"a" * 70000 + b" HTTP/1.1", 414)])
def test_e2e_http_level_errors_are_anthropic_shaped(proxy, request_line, status):
    sock = socket.create_connection(proxy.server_address[:2], timeout=10)
    sock.sendall(request_line + b"\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    answer = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    sock.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status) and json.loads(payload)["type"] == "error"
    if request_line.startswith(b"FOO"):
        assert b"\r\nAllow: GET, HEAD" in head


def test_e2e_either_auth_header_may_carry_the_key(upstream):
    server = start_proxy(upstream.url, anthropic_api_key="client-key-456")
    try:
        upstream.script.append(json_text("ok"))
        status = Client(server).json("POST", "/v1/messages", req(), {"x-api-key": "x", "Authorization": "Bearer client-key-456"})[0]
        assert status == 200
    finally:
        stop_proxy(server)


def test_e2e_auth_required_when_configured(upstream):
    server = start_proxy(upstream.url, anthropic_api_key="client-key-456")
    try:
        client = Client(server)
        status, headers, payload = client.json("POST", "/v1/messages", req())
        assert status == 401 and payload["error"]["type"] == "authentication_error"
        assert headers["x-should-retry"] == "false"
        assert client.json("POST", "/v1/messages", req(), {"x-api-key": "wrong"})[0] == 401
        upstream.script.extend([json_text("a"), json_text("b")])
        assert client.json("POST", "/v1/messages", req(), {"x-api-key": "client-key-456"})[0] == 200
        assert client.json("POST", "/v1/messages", req(), {"Authorization": "Bearer client-key-456"})[0] == 200
        assert client.json("HEAD", "/")[0] == 200
        assert len(upstream.requests) == 2
    finally:
        stop_proxy(server)


@pytest.mark.parametrize("method,path,status", [
    ("HEAD", "/", 200), ("GET", "/", 200), ("GET", "/health", 200), ("HEAD", "/health", 200),
    ("GET", "/v1/messages", 405), ("POST", "/v1/complete", 404), ("GET", "/nope", 404),
    ("DELETE", "/v1/messages", 405), ("POST", "/api/event_logging/batch", 200), ("HEAD", "/api/hello", 200),
    ("POST", "/health", 405), ("GET", "/v1/messages/count_tokens", 405),
])
def test_e2e_routes(proxy, method, path, status):
    client = Client(proxy)
    response, payload = client.call(method, path, b"{}" if method == "POST" else None)
    assert response.status == status
    if status == 404:
        assert json.loads(payload)["error"]["type"] == "not_found_error"
    if status == 405:
        assert json.loads(payload)["error"]["type"] == "invalid_request_error"
        assert response.getheader("Allow") in ("POST", "GET, HEAD")
    assert client.json("GET", "/health")[0] == 200, "connection not kept alive after %s" % path


def test_e2e_models(proxy):
    client = Client(proxy)
    status, _, listing = client.json("GET", "/v1/models")
    assert status == 200 and listing["has_more"] is False
    assert [m["id"] for m in listing["data"]] == ["claude-opus", "claude-sonnet", "claude-haiku", "gpt-4o", "gpt-4o-mini"]
    assert listing["first_id"] == "claude-opus" and listing["last_id"] == "gpt-4o-mini"
    assert all(m["type"] == "model" and m["created_at"] for m in listing["data"])
    status, _, model = client.json("GET", "/v1/models/claude-opus-4-8")
    assert status == 200 and model["id"] == "claude-opus-4-8"
    assert client.json("GET", "/v1/models/gpt-4o-mini")[2]["id"] == "gpt-4o-mini"
    status, _, payload = client.json("GET", "/v1/models/unknown-model")
    assert status == 404 and payload["error"]["type"] == "not_found_error"


def test_e2e_count_tokens(proxy, upstream):
    client = Client(proxy)
    status, _, payload = client.json("POST", "/v1/messages/count_tokens?beta=true", {
        "model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hello " * 100}]})
    assert status == 200 and payload == {"input_tokens": cp.estimate_tokens(
        {"messages": [{"role": "user", "content": "hello " * 100}]})}
    assert client.json("POST", "/v1/messages/count_tokens", {"model": "x"})[0] == 400
    assert upstream.requests == []


@pytest.mark.parametrize("body,message", [
    (b"{not json", "not valid JSON"), (b'{"model": "claude-opus-4-8"}', "messages"),
    (b'{"model":"m","messages":[{"role":"user","content":[{"type":"tool_result"}]}]}', None),
])
def test_e2e_bad_input_is_400_and_server_keeps_serving(proxy, upstream, body, message):
    client = Client(proxy)
    upstream.script.append(json_text("fine"))
    response, payload = client.call("POST", "/v1/messages", body)
    error = json.loads(payload)
    if message is None:   # a tool_result with no id and nothing before it: repaired, not refused
        assert response.status == 200
    else:
        assert response.status == 400 and error["type"] == "error"
        assert message in error["error"]["message"] and response.getheader("x-should-retry") == "false"
    upstream.script.append(json_text("still here"))
    assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] in ("fine", "still here")


def test_e2e_placeholder_keys_are_not_masked_as_secrets(upstream):
    with running_proxy(upstream.url, openai_api_key="ollama") as server:
        upstream.script.append(json_reply({"error": {"message": "model 'x' not found, try pulling it first: ollama pull x"}}, 404))
        payload = Client(server).json("POST", "/v1/messages", req())[2]
        assert payload["error"]["message"].endswith("ollama pull x")


def test_e2e_debug_log_shows_a_request_summary_and_failures_warn(upstream, caplog):
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    with running_proxy(upstream.url) as server:
        upstream.script.extend([json_text("ok"), sse_reply([chunk({"content": "cut"})], done=False)])
        Client(server).json("POST", "/v1/messages", req(tools=[TOOL], system="sys"))
        Client(server).stream(req())
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upstream request: ")][0]
    assert '"messages": "2: system user"' in summary and '"tools": ["Bash"]' in summary and '"last": "hi"' in summary
    failed = [r for r in caplog.records if "stream error" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING]


def test_e2e_secrets_never_logged(upstream, caplog):
    server = start_proxy(upstream.url, anthropic_api_key="client-key-456", log_level="DEBUG")
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    try:
        upstream.script.append(json_reply({"error": {"message": "bad key sk-upstream-secret-123"}}, 401))
        client = Client(server)
        status, _, payload = client.json("POST", "/v1/messages", req(), {"x-api-key": "client-key-456"})
        assert status == 401 and "sk-upstream-secret-123" not in payload["error"]["message"]
        client.json("POST", "/v1/messages", req(), {"Authorization": "Bearer client-key-456x"})
    finally:
        stop_proxy(server)
    assert caplog.records and "POST /v1/messages 401" in caplog.text
    assert "sk-upstream-secret-123" not in caplog.text and "client-key-456" not in caplog.text


def test_command_line_starts_the_server_and_serves(upstream, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    (tmp_path / ".env").write_text("OPENAI_BASE_URL=%s\nOPENAI_API_KEY=from-dotenv-key\nBIG_MODEL=dot-big\n" % upstream.url)
    pin = ["--pin-cpu", str(min(os.sched_getaffinity(0)))] if hasattr(os, "sched_getaffinity") else []
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--port", "0"] + pin,
                               cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        banner = process.stdout.readline().decode()
        assert "listening on http://127.0.0.1:" in banner, banner
        port = int(banner.split("http://127.0.0.1:", 1)[1].split()[0])
        upstream.script.append(json_text("from the CLI"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/messages", json.dumps(req()), {"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read())["content"][0]["text"] == "from the CLI"
        assert upstream.requests[0]["body"]["model"] == "dot-big"
        assert upstream.requests[0]["headers"]["Authorization"] == "Bearer from-dotenv-key"
        if pin:
            assert os.sched_getaffinity(process.pid) == {int(pin[1])}
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def test_command_line_check_passes_against_a_working_upstream_and_masks_keys(upstream, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "PROVIDER", "BIG_", "MIDDLE_"))}
    env.update(OPENAI_BASE_URL=upstream.url, PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--check", "--big-model", "gpt-5",
                             "--openai-api-key", "sk-very-secret"], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "MIDDLE_MODEL        gpt-5 (BIG_MODEL)" in out and "PROVIDER            auto: generic" in out
    assert "OPENAI_API_KEY      set (14 characters)" in out and "sk-very-secret" not in out
    for line in ("✓ dns      127.0.0.1 -> 127.0.0.1", "✓ connect  127.0.0.1:", "✓ models   2 listed; not listed: gpt-5",
                 "✓ opus     gpt-5 answered in", "✓ haiku    gpt-4o-mini answered in"):
        assert line in out.replace("! models", "✓ models"), out
    assert [r["path"] for r in upstream.requests] == ["/v1/models", "/v1/chat/completions", "/v1/chat/completions"]
    assert upstream.requests[1]["body"]["max_completion_tokens"] == 1 and upstream.requests[1]["body"]["model"] == "gpt-5"
    assert upstream.requests[1]["headers"]["Authorization"] == "Bearer sk-very-secret"
    bad = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--check", "--provider", "foo"],
                         cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert bad.returncode == 2 and b"PROVIDER must be auto or one of" in bad.stdout


def doctor(url, **settings):
    out = io.StringIO()
    ok = cp.Doctor(cp.Settings(openai_base_url=url, **dict({"openai_api_key": "sk-doctor-123"}, **settings)), out).run()
    return ok, out.getvalue().split("\n\n", 1)[1]      # the steps, after the settings


def test_doctor_wrong_key(upstream, clean_proxy_env):
    upstream.get_script.append(json_reply({"error": {"message": "Incorrect API key provided: sk-doctor-123"}}, 401))
    ok, out = doctor(upstream.url)
    assert "sk-doctor-123" not in out
    assert not ok and "FAIL models   the upstream refused the key (401): Incorrect API key" in out
    assert "fix: check OPENAI_API_KEY" in out and not any(r["path"].endswith("completions") for r in upstream.requests)


def test_doctor_unknown_model_names_the_setting_to_change(upstream, clean_proxy_env):
    upstream.script.append(json_reply({"error": {"message": "The model `nope` does not exist", "code": "model_not_found"}}, 404))
    ok, out = doctor(upstream.url, big_model="nope")
    assert not ok and "warn models   2 listed; not listed: nope" in out
    assert "FAIL opus     nope: HTTP 404: The model `nope` does not exist" in out
    assert "set BIG_MODEL (which serves opus)" in out and "ok   haiku    gpt-4o-mini answered" in out


def test_doctor_untrusted_certificate_points_at_ca_bundle(tls_upstream, certs, clean_proxy_env):
    ok, out = doctor(tls_upstream.url)
    assert not ok and "FAIL tls      certificate of 127.0.0.1 not trusted" in out and "fix: set CA_BUNDLE" in out
    ok, out = doctor(tls_upstream.url, ca_bundle=str(certs / "ca.pem"))
    assert ok and "ok   tls      TLSv1." in out and "certificate of 127.0.0.1 trusted" in out, out


def test_doctor_proxy_refused_or_wanting_credentials(tls_upstream, certs, clean_proxy_env):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    proxy = ConnectProxy(tls_upstream.server.server_address[1], credentials="u:p")
    try:
        clean_proxy_env.setenv("HTTPS_PROXY", "http://127.0.0.1:%d" % closed.getsockname()[1])
        ok, out = doctor("https://%s/v1" % CORP_HOST, ca_bundle=str(certs / "ca.pem"))
        assert not ok and "FAIL connect  proxy 127.0.0.1:" in out and "fix: check HTTPS_PROXY / HTTP_PROXY" in out
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        ok, out = doctor("https://%s/v1" % CORP_HOST, ca_bundle=str(certs / "ca.pem"))
        assert not ok and "FAIL proxy    CONNECT llm.corp.example:443 refused" in out and "407" in out
        assert "http://user:password@host:port" in out
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://u:p@"))
        ok, out = doctor("https://%s/v1" % CORP_HOST, ca_bundle=str(certs / "ca.pem"))
        assert ok, out
    finally:
        proxy.close()
        closed.close()


def test_doctor_name_that_does_not_resolve_and_nothing_listening(clean_proxy_env):
    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with clean_proxy_env.context() as patch:
        patch.setattr(cp.socket, "getaddrinfo", no_such_host)
        ok, out = doctor("https://api.typo.example/v1")
    assert not ok and "FAIL dns      cannot resolve the name api.typo.example" in out
    assert "fix: check the host name in OPENAI_BASE_URL" in out
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        ok, out = doctor("http://127.0.0.1:%d/v1" % closed.getsockname()[1])
    finally:
        closed.close()
    assert not ok and "FAIL connect  127.0.0.1:" in out and "refused" in out.lower()


def test_command_line_warns_when_open_to_the_network_without_a_client_key(tmp_path):
    proxy = ProxyProcess("--host", "0.0.0.0", "--openai-base-url", "http://127.0.0.1:9/v1", cwd=str(tmp_path))
    try:
        assert wait_for(lambda: "without ANTHROPIC_API_KEY" in proxy.output), proxy.output
        assert "ANTHROPIC_BASE_URL=http://127.0.0.1:%d " % proxy.port in proxy.output
    finally:
        proxy.stop()


def test_command_line_banner_names_the_upstream_models_and_auth_but_no_secret(tmp_path):
    proxy = ProxyProcess(cwd=str(tmp_path), env={
        "OPENAI_BASE_URL": "https://user:hunter2-password@llm.example.com:8443/openai/v1?api-key=query-secret-99",
        "OPENAI_API_KEY": "sk-banner-secret-123456", "ANTHROPIC_API_KEY": "client-banner-secret-654321",
        "BIG_MODEL": "big-one", "SMALL_MODEL": "small-one", "HTTPS_PROXY": "http://puser:ppass-secret@127.0.0.1:3128"})
    try:
        assert wait_for(lambda: "start Claude Code with" in proxy.output and "ANTHROPIC_BASE_URL" in proxy.output)
    finally:
        proxy.stop()
    out = proxy.output
    assert "upstream  https://llm.example.com:8443/openai/v1 (generic) via proxy http://127.0.0.1:3128" in out
    assert "opus -> big-one, sonnet -> big-one, haiku -> small-one" in out and "must send ANTHROPIC_API_KEY" in out
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:%d ANTHROPIC_AUTH_TOKEN=<your ANTHROPIC_API_KEY> claude" % proxy.port in out
    for secret in ("hunter2-password", "query-secret-99", "sk-banner-secret-123456", "client-banner-secret-654321",
                   "ppass-secret"):
        assert secret not in out


@pytest.mark.parametrize("args,message", [
    (["--no-such-flag"], "claude-code-proxy: unrecognized arguments: --no-such-flag (see --help)"),
    (["--port", "eighty"], "claude-code-proxy: PORT must be a whole number, got 'eighty'"),
    (["--log-level", "LOUD"], "claude-code-proxy: LOG_LEVEL must be one of"),
    (["--openai-base-url", "api.openai.com/v1"], "claude-code-proxy: OPENAI_BASE_URL must start with https://"),
])
def test_command_line_bad_flags_and_values_stop_with_one_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py")] + args, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert result.returncode == 2 and result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_command_line_help_lists_every_setting_with_its_variable_and_default():
    result = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--help"],
                            stdout=subprocess.PIPE, timeout=30)
    text = " ".join(result.stdout.decode().split())
    assert result.returncode == 0
    for f in cp.SETTING_FIELDS:
        flag = "--" + f.name.replace("_", "-")
        assert "%s %s" % (flag, f.metadata["env"]) in text, flag
        assert "default" in " ".join(f.metadata["help"].split()) or "(default: %r)" % f.default in text, flag
    assert "--version" in text and "--env-file" in text and "--check" in text


# ---------------------------------------------------------------------------------------------
# Providers per tier, failover chains, keys in turn, extra headers (two or three fake upstreams)


def provider_settings(environ, argv=()):
    environ = dict(environ)
    environ.setdefault("PORT", "0")
    return cp.load_settings(environ, list(argv), "")


@contextlib.contextmanager
def proxy_for(environ):
    server = cp.ProxyServer(provider_settings(environ))
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        yield server
    finally:
        stop_proxy(server)


@pytest.fixture
def second():
    fake = FakeUpstream()
    yield fake
    fake.close()


def chain_of(settings, model):
    return [(e.provider, e.model) for e in cp.model_chain(cp.map_model(model, settings), (p.name for p in settings.providers))]


def test_model_settings_name_providers_and_chains():
    s = provider_settings({"LOCAL_BASE_URL": "http://127.0.0.1:11434/v1", "SMALL_MODEL": "local/qwen3-coder:30b",
                           "BIG_MODEL": "gpt-5, openrouter/openai/gpt-5,deepseek/deepseek-v4-pro",
                           "MIDDLE_MODEL": "Qwen/Qwen3-Coder-480B", "OPENROUTER_API_KEY": "or-key",
                           "DEEPSEEK_API_KEY": "ds-key", "ANTHROPIC_BASE_URL": "http://x", "OPENAI_API_KEY": "k1,k2"})
    assert chain_of(s, "claude-haiku-4-5") == [("local", "qwen3-coder:30b")]
    assert chain_of(s, "claude-opus-4-8") == [("default", "gpt-5"), ("openrouter", "openai/gpt-5"),
                                              ("deepseek", "deepseek-v4-pro")]
    assert chain_of(s, "claude-sonnet-5") == [("default", "Qwen/Qwen3-Coder-480B")]    # no provider "qwen"
    assert chain_of(s, "openai/gpt-4o") == [("default", "openai/gpt-4o")]          # OPENAI_ is the default
    assert chain_of(s, "ollama/llama3") == [("ollama", "llama3")]                   # local: needs no key
    assert chain_of(s, "groq/llama3") == [("default", "groq/llama3")]               # no GROQ_API_KEY
    assert chain_of(s, "default/deepseek/r1") == [("default", "deepseek/r1")]       # the default, said outright
    providers = {p.name: p for p in s.providers}
    assert "anthropic" not in providers and providers["default"].api_keys == ("k1", "k2")
    assert providers["openrouter"].base_url == "https://openrouter.ai/api/v1"
    assert providers["deepseek"].api_keys == ("ds-key",)


@pytest.mark.parametrize("environ,message", [
    ({"LOCAL_BASE_URL": "localhost:11434"}, "LOCAL_BASE_URL must start with https:// or http://"),
    ({"QWEN_API_KEY": "q", "BIG_MODEL": "qwen/qwen3-max"},
     "BIG_MODEL names provider 'qwen': QWEN_API_KEY is set but QWEN_BASE_URL is not"),
    ({"LOCAL_BASE_URL": "http://h/v1", "LOCAL_PROVIDER": "nope"}, "LOCAL_PROVIDER must be auto or one of"),
])
def test_bad_provider_definitions_stop_start_up_with_one_line(environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        provider_settings(environ)
    assert provider_settings({"BIG_MODEL": "qwen/qwen3-max"}).big_model == "qwen/qwen3-max"   # just a name


def test_tiers_go_to_their_providers_with_their_keys_and_headers(upstream, second):
    environ = {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "sk-default-key-0001",
               "LOCAL_BASE_URL": second.url, "LOCAL_API_KEY": "local-key-0000002", "SMALL_MODEL": "local/qwen3",
               "BIG_MODEL": "gpt-5", "CUSTOM_HEADER_X_CORP_TEAM": "team-42", "LOCAL_HEADER_X_TITLE": "my-team"}
    with proxy_for(environ) as server:
        client = Client(server)
        assert client.json("POST", "/v1/messages", req(model="claude-haiku-4-5"))[0] == 200
        assert client.stream(req(model="claude-opus-4-8"))[-1]["type"] == "message_stop"
        status, _, listing = client.json("GET", "/v1/models")
    (local,), (default,) = second.requests, upstream.requests
    assert local["body"]["model"] == "qwen3" and local["headers"]["Authorization"] == "Bearer local-key-0000002"
    assert local["headers"]["X-Corp-Team"] == "team-42" and local["headers"]["X-Title"] == "my-team"
    assert default["body"]["model"] == "gpt-5" and default["headers"]["Authorization"] == "Bearer sk-default-key-0001"
    assert default["headers"]["X-Corp-Team"] == "team-42" and "X-Title" not in default["headers"]
    names = {m["id"]: m["display_name"] for m in listing["data"]}
    assert names["claude-haiku"] == "claude-haiku (served by local/qwen3)" and "local/qwen3" in names


def failing(status, retry_after=None):
    headers = {"Retry-After": retry_after} if retry_after else None
    return json_reply({"error": {"message": "failure %d" % status, "type": "server_error"}}, status, headers)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
def test_a_failing_provider_hands_the_request_to_the_next_in_the_chain(upstream, second, caplog, status):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    upstream.script.append(failing(status))
    second.script.append(json_text("from the second"))
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url,
                    "BIG_MODEL": "gpt-5,backup/other-model"}) as server:
        status_out, _, message = Client(server).json("POST", "/v1/messages", req())
    assert status_out == 200 and message["content"][0]["text"] == "from the second"
    assert second.requests[0]["body"]["model"] == "other-model"
    assert "claude-opus-4-8 -> backup/other-model failed: default %d" % status in caplog.text


def test_unreachable_and_silent_providers_fail_over_too(upstream, second):
    silent = threading.Event()
    upstream.script.append(lambda handler, body: silent.wait(10))
    second.script.extend([json_text("after a timeout"), json_text("after a refusal")])
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url, "REQUEST_TIMEOUT": "0.3",
                    "BIG_MODEL": "gpt-5,backup/b", "SMALL_MODEL": "dead/x,backup/b",
                    "DEAD_BASE_URL": "http://127.0.0.1:9/v1"}) as server:
        client = Client(server)
        assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "after a timeout"
        answer = client.json("POST", "/v1/messages", req(model="claude-haiku-4-5"))[2]
    silent.set()
    assert answer["content"][0]["text"] == "after a refusal"


def test_a_provider_that_does_not_start_a_stream_gives_way_within_failover_timeout(upstream, second, caplog):
    # REQUEST_TIMEOUT stays long (a model may think for minutes once it has started); a provider
    # that has not started a stream within FAILOVER_TIMEOUT hands the request to the next one.
    caplog.set_level(logging.INFO, logger="claude_proxy")
    silent = threading.Event()
    upstream.script.append(lambda handler, body: silent.wait(10))
    second.script.append(sse_text("from the second"))
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url, "REQUEST_TIMEOUT": "600",
                    "FAILOVER_TIMEOUT": "0.3", "BIG_MODEL": "gpt-5,backup/b"}) as server:
        events = Client(server).stream(req())
    silent.set()
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == "from the second"
    assert "failed: default timeout" in caplog.text           # (not the closed connection 10 s later)
    assert "FAILOVER_TIMEOUT" in server.router.upstream("default").last_error


def test_failover_timeout_spares_the_last_provider_and_whole_answers(upstream, second):
    # The last provider of a chain (or the only one), and a request for a whole answer, wait
    # REQUEST_TIMEOUT for the head as before.
    def slow_answer(handler, body):             # a provider slower than FAILOVER_TIMEOUT
        threading.Event().wait(0.3)
        json_text("slow but whole")(handler, body)
    upstream.script += [slow_answer, slow_answer]
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url, "FAILOVER_TIMEOUT": "0.05",
                    "BIG_MODEL": "gpt-5,backup/b", "SMALL_MODEL": "gpt-5-mini"}) as server:
        client = Client(server)
        events = client.stream(req(model="claude-haiku-4-5"))                  # its chain has one provider
        status, _, message = client.json("POST", "/v1/messages", req())       # a whole answer, in a chain
    assert "slow but whole" in json.dumps(events)
    assert status == 200 and message["content"][0]["text"] == "slow but whole" and not second.requests


def test_no_failover_on_a_bad_request_or_after_the_stream_began(upstream, second):
    upstream.script.extend([failing(400), sse_reply([chunk({"content": "half"})], done=False)])
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url,
                    "BIG_MODEL": "gpt-5,backup/b"}) as server:
        client = Client(server)
        status, _, error = client.json("POST", "/v1/messages", req())
        events = client.stream(req())
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert events[-1]["type"] == "error" and not second.requests


def test_a_failed_provider_cools_down_then_is_tried_again(upstream, second, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(cp.time, "monotonic", lambda: clock[0])
    upstream.script.extend([failing(503, retry_after="20"), json_text("default again")])
    second.script.extend([json_text("b1"), json_text("b2")])
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url,
                    "BIG_MODEL": "gpt-5,backup/b"}) as server:
        client = Client(server)
        assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "b1"
        assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "b2"   # skipped
        assert len(upstream.requests) == 1
        clock[0] += 21
        assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "default again"


def test_when_every_provider_cools_down_the_first_is_tried_anyway(upstream, second, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(cp.time, "monotonic", lambda: clock[0])
    upstream.script.extend([failing(502), json_text("first anyway")])
    second.script.append(failing(502))
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url,
                    "BIG_MODEL": "gpt-5,backup/b"}) as server:
        client = Client(server)
        assert client.json("POST", "/v1/messages", req())[0] == 502
        assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "first anyway"
    assert (len(upstream.requests), len(second.requests)) == (2, 1)


def test_keys_are_used_in_turn_and_a_rate_limited_key_rests(upstream, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(cp.time, "monotonic", lambda: clock[0])
    upstream.script.extend([json_text("1"), failing(429, retry_after="60"), json_text("2"), json_text("3"),
                            json_text("4")])
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "key-one-000000001,key-two-000000002"}) as server:
        client = Client(server)
        for _ in range(3):
            assert client.json("POST", "/v1/messages", req())[0] == 200
        clock[0] += 61
        assert client.json("POST", "/v1/messages", req())[0] == 200
    keys = [r["headers"]["Authorization"][-1] for r in upstream.requests]
    # one, two (429: rests; retried at once with one), one (two still resting), then in turn again
    assert keys == ["1", "2", "1", "1", "2"]


def test_a_custom_header_replaces_the_proxys_own_and_is_masked_in_logs(upstream, caplog):
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    upstream.script.append(failing(401))
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "sk-never-sent-0001",
                    "CUSTOM_HEADER_AUTHORIZATION": "Token gateway-secret-0002"}) as server:
        Client(server).json("POST", "/v1/messages", req())
    headers = upstream.requests[0]["headers"]
    assert headers["Authorization"] == "Token gateway-secret-0002"
    upstream_error = cp.upstream_error(401, b'{"error": {"message": "bad Token gateway-secret-0002"}}', None)
    assert server.redact(upstream_error.message) == "upstream: bad ***"
    assert "gateway-secret-0002" not in caplog.text


def test_banner_and_check_show_every_tier_chain(upstream, second, tmp_path):
    env = dict(os.environ, OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-check-0000001", BACKUP_BASE_URL=second.url,
               BIG_MODEL="gpt-4o,backup/b-model", SMALL_MODEL="backup/b-model", PIN_CPU="off")
    second.get_script.append(json_reply({"object": "list", "data": [{"id": "b-model"}]}))
    second.script.extend([json_text("ok"), json_text("ok")])
    result = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--check"], cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "opus                gpt-4o, backup/b-model" in out and "haiku               backup/b-model" in out
    assert "backup %s (generic)" % second.url in out
    assert [r["body"]["model"] for r in second.requests if r["body"]] == ["b-model"]    # once for both tiers
    server = cp.ProxyServer(provider_settings({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url,
                                               "BIG_MODEL": "gpt-4o,backup/b-model"}), listen=False)
    try:
        text = cp.banner(server.settings, server)
    finally:
        server.server_close()
        server.close_upstreams()
    assert "opus -> gpt-4o, backup/b-model, sonnet -> gpt-4o, backup/b-model" in text
    assert "provider  backup %s (generic)" % second.url in text


def test_idle_keep_alive_connections_are_closed_after_keepalive_timeout(upstream):
    with running_proxy(upstream.url, keepalive_timeout=0.2) as server:
        sock = socket.create_connection(server.server_address[:2], timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        assert sock.recv(4096) == b""          # closed by the proxy, well before the 10 s here
        sock.close()


def test_after_a_cut_stream_the_connection_serves_the_retry(upstream, proxy):
    upstream.script.extend([sse_reply([chunk({"content": "half"})], done=False), json_text("retried")])
    client = Client(proxy)
    response, payload = client.call("POST", "/v1/messages", dict(req(), stream=True))
    assert response.getheader("Connection") != "close"
    error = check_stream(parse_sse(payload))[-1]
    assert error["type"] == "error"
    assert "closed the stream after 1 events, before the answer ended" in error["error"]["message"] \
        or "before the answer" in error["error"]["message"]
    assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "retried"   # same socket
    assert upstream.connections >= 1


def test_a_stream_the_upstream_cut_says_so_not_unreachable(upstream, proxy):
    def cut_mid_body(handler, body):
        begin_sse(handler)
        send_parts(handler, [sse_data(chunk({"role": "assistant", "content": ""})), sse_data(chunk({"content": "par"}))])
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)       # no last chunk: the body is cut
        handler.close_connection = True
    upstream.script.append(cut_mid_body)
    error = Client(proxy).stream(req())[-1]
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "closed the stream after 2 events, before the answer ended" in error["error"]["message"]
    assert "unreachable" not in error["error"]["message"]


def test_access_line_says_what_happened_once(upstream, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    upstream.script.extend([failing(500), json_text("whole")])
    with running_proxy(upstream.url, anthropic_api_key="client-key-000000001", upstream_streaming="off") as server:
        client = Client(server)
        assert client.json("POST", "/v1/messages", req(model="claude-haiku-4-5"))[0] == 401       # no key
        headers = {"x-api-key": "client-key-000000001"}
        assert client.json("POST", "/v1/messages", req(), headers)[0] == 500
        assert client.stream(req(), headers)[-1]["type"] == "message_stop"
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "failure 500" in line] == [
        [line for line in lines if line.startswith("POST /v1/messages 500")][0]]      # logged once, on the access line
    assert any(line.startswith("POST /v1/messages 401 claude-haiku-4-5 ") for line in lines)
    assert any("claude-opus-4-8 -> gpt-4o stream (upstream whole)" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# The Responses API through the proxy: codex models, reasoning carried across a tool round trip


@pytest.mark.parametrize("stream", [True, False])
def test_e2e_codex_tool_round_trip_carries_the_reasoning_item_back_byte_for_byte(responses_upstream, stream):
    fake = responses_upstream
    reasoning = fake.reasoning("**Looking**\n\nI should list the files.")
    first = [reasoning, call_item(arguments='{"command":"ls"}')]
    fake.script.append(responses_sse(responses_events(first)) if stream else responses_json(response_body(first)))
    fake.script.append(responses_sse(responses_events([message_item("two files")])) if stream
                       else responses_json(response_body([message_item("two files")])))
    tools = [{"name": "Bash", "description": "Run a command", "input_schema": {
        "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}]
    with proxy_for({"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "sk-codex-0000000001",
                    "BIG_MODEL": "gpt-5-codex"}) as server:
        client = Client(server)
        ask = req(messages=[{"role": "user", "content": "list the files"}], tools=tools, thinking={"type": "adaptive"})
        if stream:
            turn = cp.assemble_message(client.stream(ask))
        else:
            status, _, turn = client.json("POST", "/v1/messages", ask)
            assert status == 200, turn
        assert [b["type"] for b in turn["content"]] == ["thinking", "tool_use"] and turn["stop_reason"] == "tool_use"
        assert turn["content"][1]["id"] == "call_1" and turn["content"][1]["input"] == {"command": "ls"}
        history = ask["messages"] + [{"role": "assistant", "content": turn["content"]},
                                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                                                   "content": "a.txt b.txt"}]}]
        follow = dict(ask, messages=history)
        answer = cp.assemble_message(client.stream(follow)) if stream else client.json("POST", "/v1/messages", follow)[2]
    assert answer["content"][-1] == {"type": "text", "text": "two files"}
    first_request, second_request = (r["body"] for r in fake.requests)
    assert all(r["path"] == "/v1/responses" for r in fake.requests)
    assert first_request["store"] is False and first_request["include"] == ["reasoning.encrypted_content"]
    replayed = [item for item in second_request["input"] if item.get("type") == "reasoning"]
    assert replayed == [reasoning]                                    # byte for byte, as it came
    kinds = [item.get("type") for item in second_request["input"]]
    assert kinds[-3:] == ["reasoning", "function_call", "function_call_output"]


def test_e2e_a_failover_chain_may_mix_chat_and_responses(upstream, responses_upstream):
    upstream.script.append(failing(503))
    responses_upstream.script.append(responses_json(response_body([message_item("from codex")])))
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "CODEX_BASE_URL": responses_upstream.url,
                    "CODEX_API_KEY": "sk-codex-0000000002", "BIG_MODEL": "gpt-4o,codex/gpt-5-codex"}) as server:
        status, _, message = Client(server).json("POST", "/v1/messages", req())
    assert status == 200 and message["content"] == [{"type": "text", "text": "from codex"}]
    assert upstream.requests[0]["path"] == "/v1/chat/completions"
    assert responses_upstream.requests[0]["path"] == "/v1/responses"
    assert responses_upstream.requests[0]["body"]["max_output_tokens"] == 100


def test_e2e_the_api_setting_chooses_the_wire_and_a_rejection_comes_back_as_anthropic(responses_upstream, upstream):
    responses_upstream.script.append(responses_json(
        {"error": {"message": "No tool output found for function call call_9.", "type": "invalid_request_error",
                   "param": "input", "code": None}}, 400))
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "OPENAI_API": "responses", "BIG_MODEL": "gpt-4o",
                    "SMALL_MODEL": "codex/gpt-4o-mini", "CODEX_BASE_URL": responses_upstream.url,
                    "CODEX_API": "chat"}) as server:
        client = Client(server)
        status, _, error = client.json("POST", "/v1/messages", req())          # the default, forced to /responses
        client.json("POST", "/v1/messages", req(model="claude-haiku-4-5"))    # CODEX_API=chat
    assert upstream.requests[0]["path"] == "/v1/responses"
    assert responses_upstream.requests[-1]["path"] == "/v1/chat/completions"
    with proxy_for({"OPENAI_BASE_URL": responses_upstream.url, "BIG_MODEL": "gpt-5-codex"}) as server:
        status, _, error = Client(server).json("POST", "/v1/messages", req())
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"] == "upstream: No tool output found for function call call_9."


def test_a_model_without_encrypted_reasoning_is_asked_again_without_include(responses_upstream, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    responses_upstream.script.append(responses_json(
        {"error": {"message": "Encrypted content is not supported with this model.", "type": "invalid_request_error",
                   "param": None, "code": None}}, 400))
    with proxy_for({"OPENAI_BASE_URL": responses_upstream.url, "BIG_MODEL": "gpt-5-codex"}) as server:
        assert Client(server).json("POST", "/v1/messages", req())[0] == 200
    first, second = (r["body"] for r in responses_upstream.requests)
    assert "include" in first and "include" not in second
    assert "claude-opus-4-8 -> gpt-5-codex via /responses" in caplog.text


def test_check_answers_through_the_responses_api(responses_upstream):
    out = io.StringIO()
    settings = provider_settings({"OPENAI_BASE_URL": responses_upstream.url, "OPENAI_API_KEY": "sk-doctor-00000001",
                                  "BIG_MODEL": "gpt-5-codex", "SMALL_MODEL": "gpt-5-codex"})
    assert cp.Doctor(settings, out).run(), out.getvalue()
    assert "gpt-5-codex answered" in out.getvalue()
    (post,) = [r for r in responses_upstream.requests if r["path"].endswith("/responses")]
    assert post["body"]["max_output_tokens"] == 16 and "stream" not in post["body"]


# ---------------------------------------------------------------------------------------------
# Speed-ups: `import claude_proxy` changes nothing in the process; the plain path works alone

PLAIN_PATH_SCRIPT = r'''
import http.client, http.server, json, socket, sys, threading
parse_headers, socket_class = http.client.parse_headers, socket.socket
sys.path.insert(0, sys.argv[1])
import claude_proxy as cp
assert http.client.parse_headers is parse_headers and socket.socket is socket_class
assert cp.ProxyServer.handler_class is cp.Handler and cp.UpstreamPool.connection_classes[0] is http.client.HTTPConnection

class Fake(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            events = [{"choices": [{"index": 0, "delta": {"content": "plain"}, "finish_reason": "stop"}]}]
            data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            kind = "text/event-stream"
        else:
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "plain"},
                                            "finish_reason": "stop"}]}).encode()
            kind = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
threading.Thread(target=fake.serve_forever, daemon=True).start()
server = cp.ProxyServer(cp.Settings(openai_base_url="http://127.0.0.1:%d/v1" % fake.server_address[1], port=0))
threading.Thread(target=server.serve_forever, daemon=True).start()
conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
for stream in (False, True, False):
    request = {"model": "claude-haiku-4-5", "max_tokens": 10, "stream": stream,
               "messages": [{"role": "user", "content": "hi"}]}
    conn.request("POST", "/v1/messages", json.dumps(request), {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read().decode()
    assert response.status == 200 and "plain" in payload, payload
    assert ("event: message_stop" in payload) == stream
print("plain path ok")
'''


def test_import_changes_nothing_and_the_plain_path_serves_streams_and_answers():
    result = subprocess.run([sys.executable, "-c", PLAIN_PATH_SCRIPT, HERE], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=60)
    assert result.stdout.decode().strip().endswith("plain path ok"), result.stdout.decode()


# ---------------------------------------------------------------------------------------------
# Web search end to end (issue 13): the real server, the upstream fake scripting the model's
# calls, a fake SearXNG on loopback
# ---------------------------------------------------------------------------------------------


def search_tool_call(query):
    return json_reply(completion({"content": None, "tool_calls": [{"id": "call_s1", "type": "function", "function": {
        "name": "web_search", "arguments": json.dumps({"query": query})}}]}, "tool_calls"))


def e2e_search_request(**extra):
    return dict({"model": "claude-sonnet-4-5", "max_tokens": 1000,
                 "system": "search once, then reply with a brief summary",
                 "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
                 "messages": [{"role": "user", "content": "Perform a web search for the query: python 3.13"}]}, **extra)


@pytest.mark.parametrize("stream", [False, True])
def test_e2e_web_search_with_searxng(upstream, fake_search, stream, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    searx = fake_search(body=SEARXNG_BODY)
    upstream.script += [search_tool_call("python 3.13"),
                        json_reply(completion({"content": "Python 3.13 adds a new REPL."}))]
    with running_proxy(upstream.url, web_search="searxng:" + searx.url) as server:
        client = Client(server)
        if stream:
            events = client.stream(e2e_search_request(), {"x-claude-code-session-id": "sess-42"})   # grammar checked
            assert [e["type"] for e in events][:2] == ["message_start", "ping"]
            assert events[-1]["type"] == "message_stop"
            message = cp.assemble_message(events)
        else:
            status, _, message = client.json("POST", "/v1/messages", e2e_search_request(),
                                             {"x-claude-code-session-id": "sess-42"})
            assert status == 200, message
        status_page = client.json("GET", "/status.json")[2]
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    assert message["content"][0]["input"] == {"query": "python 3.13"}
    assert message["content"][0]["id"].startswith("srvtoolu_")
    assert message["content"][1]["tool_use_id"] == message["content"][0]["id"]
    assert [r["url"] for r in message["content"][1]["content"]] == [
        "https://docs.python.org/3/whatsnew/3.13.html", "https://blog.spam.example/py"]
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 1}
    assert searx.requests[0][1] == "/search?q=python+3.13&format=json"
    first, second = [r["body"] for r in upstream.requests[:2]]
    assert first["tools"][0]["function"]["name"] == "web_search" and not first.get("stream")
    assert "What's New In Python 3.13" in json.dumps(second["messages"])
    assert status_page["searches"] == 1
    line = next(r.getMessage() for r in caplog.records if "searches=1" in r.getMessage())
    assert "session=sess-42" in line and ("ttft=" in line) == stream


def test_e2e_web_search_stream_starts_before_the_search_answers(upstream, fake_search):
    # The stream opens with the first block, while the search backend still works: the client
    # sees message_start and server_tool_use at once, not after the whole loop.
    searx = fake_search(hang=True)
    upstream.script += [search_tool_call("slow query"), json_reply(completion({"content": "Nothing found."}))]
    with running_proxy(upstream.url, web_search="searxng:" + searx.url) as server:
        # (5 s: less than the fake backend's 10 s hang, so bytes held until the search ends fail)
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        conn.request("POST", "/v1/messages", body=json.dumps(e2e_search_request(stream=True)),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        seen = b""
        while not (b'"type":"content_block_stop"' in seen and seen.endswith(b"\n\n")):
            line = response.readline()
            assert line, seen
            seen += line
        # (the backend cannot answer before `released` is set: these bytes came before its answer)
        names = [name for name, _ in parse_sse(seen)]
        assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop"]
        searx.released.set()                 # the backend gives up without an answer
        events = check_stream(parse_sse(seen + response.read()))
        conn.close()
    message = cp.assemble_message(events)
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    assert message["content"][1]["content"] == {"type": "web_search_tool_result_error", "error_code": "unavailable"}
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 1} and len(searx.requests) == 1


def test_e2e_web_search_stream_pings_while_the_model_works(upstream, fake_search):
    gate = threading.Event()
    answer = json_reply(completion({"content": "Python 3.13 adds a new REPL."}))

    def held_answer(handler, body):          # the model's second call answers once the test saw a ping
        gate.wait(10)
        answer(handler, body)
    upstream.script += [search_tool_call("python 3.13"), held_answer]
    with running_proxy(upstream.url, web_search="searxng:" + fake_search(body=SEARXNG_BODY).url,
                       ping_interval=0.05) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        conn.request("POST", "/v1/messages", body=json.dumps(e2e_search_request(stream=True)),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        seen = b""
        while seen.count(b"event: ping") < 2 or not seen.endswith(b"\n\n"):   # message_start's, then the heartbeat's
            line = response.readline()
            assert line, seen
            seen += line
        gate.set()
        events = check_stream(parse_sse(seen + response.read()))
        conn.close()
    types = [e["type"] for e in events]
    assert types.index("ping", 2) > types.index("content_block_stop") and types[-1] == "message_stop"
    assert [b["type"] for b in cp.assemble_message(events)["content"]] == [
        "server_tool_use", "web_search_tool_result", "text"]


def test_e2e_web_search_error_after_the_stream_started_is_an_error_event(upstream, fake_search):
    searx = fake_search(body=SEARXNG_BODY)
    upstream.script += [search_tool_call("python"), json_reply({"error": {"message": "invalid model"}}, 404),
                        sse_text("next")]
    with running_proxy(upstream.url, web_search="searxng:" + searx.url) as server:
        client = Client(server)
        response, payload = client.call("POST", "/v1/messages", e2e_search_request(stream=True))
        assert response.status == 200
        events = check_stream(parse_sse(payload))
        assert [e["type"] for e in events if e["type"] == "content_block_start"] == ["content_block_start"] * 2
        assert events[-1]["type"] == "error" and "invalid model" in events[-1]["error"]["message"]
        assert [e["type"] for e in client.stream(claude_code_request())][-1] == "message_stop"   # same connection


def test_e2e_web_search_first_call_failing_keeps_its_status(upstream, fake_search):
    upstream.script.append(json_reply({"error": {"message": "slow down"}}, 429, {"retry-after": "7"}))
    with running_proxy(upstream.url, web_search="searxng:" + fake_search(body=SEARXNG_BODY).url) as server:
        status, headers, body = Client(server).json("POST", "/v1/messages", e2e_search_request(stream=True))
    assert status == 429 and body["error"]["type"] == "rate_limit_error"


# WEB_SEARCH=upstream: the provider's own search

OPENAI_CITATIONS = {"content": "Python 3.13 adds a new REPL [docs.python.org].", "annotations": [
    {"type": "url_citation", "url_citation": {"url": "https://docs.python.org/3/whatsnew/3.13.html",
                                              "title": "What's New In Python 3.13", "start_index": 0, "end_index": 10}},
    {"type": "url_citation", "url_citation": {"url": "https://blog.spam.example/py", "title": "Spam",
                                              "start_index": 11, "end_index": 20, "content": "ads"}},
    {"type": "url_citation", "url_citation": {"url": "https://docs.python.org/3/whatsnew/3.13.html",
                                              "title": "again", "start_index": 30, "end_index": 40}}]}


def test_provider_search_body_turns_on_each_providers_search():
    spec = {"type": "web_search_20250305", "name": "web_search", "allowed_domains": ["python.org"]}
    blocked = {"type": "web_search_20250305", "name": "web_search", "blocked_domains": ["spam.example"]}
    body = {"model": "m", "messages": [], "tools": [{"type": "function", "function": {"name": "Bash"}}]}
    openrouter = cp.provider_search_body(body, "openrouter", "openai/gpt-5", "chat", "https://openrouter.ai", spec)
    assert openrouter["tools"][1] == {"type": "openrouter:web_search", "parameters": {"allowed_domains": ["python.org"]}}
    assert cp.provider_search_body(body, "openrouter", "x", "chat", "o", blocked)["tools"][1]["parameters"] == {
        "excluded_domains": ["spam.example"]}
    assert cp.provider_search_body(body, "generic", "sonar-pro", "chat", "https://api.perplexity.ai", blocked)[
        "search_domain_filter"] == ["-spam.example"]
    assert cp.provider_search_body(body, "openai", "gpt-4o-search-preview", "chat", "https://api.openai.com",
                                   spec)["web_search_options"] == {}
    responses = cp.provider_search_body({"model": "gpt-5", "input": []}, "openai", "gpt-5", "responses", "o", spec)
    assert responses["tools"] == [{"type": "web_search", "filters": {"allowed_domains": ["python.org"]}}]
    assert body["tools"] == [{"type": "function", "function": {"name": "Bash"}}]      # the original is untouched


def test_provider_citations_from_each_answer_shape():
    openai = {"choices": [{"message": OPENAI_CITATIONS}]}
    results, queries = cp.provider_citations(openai)
    assert [(r.url, r.title) for r in results] == [
        ("https://docs.python.org/3/whatsnew/3.13.html", "What's New In Python 3.13"), ("https://blog.spam.example/py", "Spam")]
    assert queries == []
    perplexity = {"choices": [{"message": {"content": "x"}}], "citations": ["https://a.example/1", "https://b.example/2"],
                  "search_results": [{"title": "A", "url": "https://a.example/1", "date": "2025-01-02", "snippet": "s"}]}
    results, _ = cp.provider_citations(perplexity)
    assert [(r.url, r.title, r.page_age) for r in results] == [
        ("https://a.example/1", "A", "2025-01-02"), ("https://b.example/2", "https://b.example/2", None)]
    responses = {"output": [
        {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "py 3.13"}},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "t", "annotations": [
            {"type": "url_citation", "url": "https://docs.python.org/3/", "title": "Docs", "start_index": 0, "end_index": 1}]}]}]}
    results, queries = cp.provider_citations(responses)
    assert [r.url for r in results] == ["https://docs.python.org/3/"] and queries == ["py 3.13"]
    for bad in ({"choices": "bad", "output": [None, {"type": "message", "content": [7]}]}, {"citations": "https://x"},
                {"search_results": {"url": 1}}, {"choices": [{"message": {"annotations": 5}}]},
                {"output": [{"type": "message", "content": [{"annotations": 3}]}]}):
        assert cp.provider_citations(bad) == ([], []), bad


@pytest.mark.parametrize("stream", [False, True])
def test_e2e_web_search_upstream_openrouter(upstream, stream):
    upstream.script.append(json_reply(completion(OPENAI_CITATIONS)))
    request = e2e_search_request(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 8,
                                         "blocked_domains": ["spam.example"]}])
    with running_proxy(upstream.url, web_search="upstream", provider="openrouter") as server:
        client = Client(server)
        if stream:
            message = cp.assemble_message(client.stream(request))
        else:
            status, _, message = client.json("POST", "/v1/messages", request)
            assert status == 200, message
    sent = upstream.requests[0]["body"]
    assert sent["tools"] == [{"type": "openrouter:web_search", "parameters": {"excluded_domains": ["spam.example"]}}]
    assert not sent.get("stream") and len(upstream.requests) == 1
    assert [b["type"] for b in message["content"]] == ["server_tool_use", "web_search_tool_result", "text"]
    assert message["content"][0]["input"] == {"query": "python 3.13"}
    assert [r["url"] for r in message["content"][1]["content"]] == ["https://docs.python.org/3/whatsnew/3.13.html"]
    assert message["content"][2]["text"] == OPENAI_CITATIONS["content"]
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 1}


def test_e2e_web_search_upstream_perplexity_keeps_client_tools(upstream):
    upstream.script.append(json_reply(dict(completion({"content": "Found it."}), search_results=[
        {"title": "A", "url": "https://a.example/1", "date": "2025-01-02"}])))
    request = e2e_search_request(model="claude-haiku-4-5")
    request["tools"].append({"name": "Bash", "input_schema": {"type": "object"}})
    with running_proxy(upstream.url, web_search="upstream", small_model="sonar-pro") as server:
        status, _, message = Client(server).json("POST", "/v1/messages", request)
    sent = upstream.requests[0]["body"]
    assert status == 200 and sent["model"] == "sonar-pro" and "web_search_options" not in sent
    assert [t["function"]["name"] for t in sent["tools"]] == ["Bash"]
    assert message["content"][1]["content"][0]["page_age"] == "2025-01-02"


def test_e2e_web_search_unset_says_how_to_turn_it_on(upstream, proxy):
    upstream.script += [search_tool_call("x"), json_reply(completion({"content": "No search was possible."}))]
    status, _, message = Client(proxy).json("POST", "/v1/messages", e2e_search_request())
    assert status == 200
    assert message["content"][1]["content"] == {"type": "web_search_tool_result_error", "error_code": "unavailable"}
    assert "WEB_SEARCH=" in message["content"][2]["text"]
    assert message["usage"]["server_tool_use"] == {"web_search_requests": 0}


def test_e2e_web_search_backend_down_is_not_a_5xx_and_keys_stay_out_of_logs(upstream, fake_search, caplog):
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    brave = fake_search(status=503, body={"error": "down"})
    upstream.script += [search_tool_call("x"), json_reply(completion({"content": "Search failed."}))]
    with running_proxy(upstream.url, web_search="brave", brave_api_key="BSA-secret-key-987654",
                       brave_base_url=brave.url) as server:
        status, _, message = Client(server).json("POST", "/v1/messages", e2e_search_request())
    assert status == 200 and brave.requests[0][2]["X-Subscription-Token"] == "BSA-secret-key-987654"
    assert message["content"][1]["content"]["error_code"] == "unavailable"
    assert "BSA-secret-key-987654" not in caplog.text


def test_check_tries_one_search(fake_search):
    good, bad = fake_search(body=SEARXNG_BODY), fake_search(status=429, body={})
    out = io.StringIO()
    cp.Doctor(cp.Settings(web_search="searxng:" + good.url), out)._search()
    cp.Doctor(cp.Settings(web_search="searxng:" + bad.url), out)._search()
    cp.Doctor(cp.Settings(), out)._search()
    lines = out.getvalue().splitlines()
    assert "search   SearXNG answered with 2 results" in lines[0]
    assert "search   too_many_requests" in lines[1] and "fix: check WEB_SEARCH" in lines[2] and len(lines) == 3


# ---------------------------------------------------------------------------------------------
# Never down: bad input, limits, upstream faults, clients leaving, overload, shutdown

def raw_exchange(server, data, read_all=True):
    """Send raw bytes to the proxy; the whole answer (until it closes) or just the head."""
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    try:
        sock.sendall(data)
        answer = b""
        while read_all or b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        return answer
    finally:
        sock.close()


def answer_status(answer):
    return int(answer.split(b" ", 2)[1])


def answer_json(answer):
    return json.loads(answer.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("body,message", [
    (b"", "not valid JSON"), (b"[]", "JSON object"), (b'"text"', "JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "m", "messages": "hi"}', "messages"), (b'{"model": "m"}', "messages"),
    (b'{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}', "role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "content"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [5]}]}', "content"),
    (b'{"model": "m", "messages": [5]}', "message"),
    (b'{"model": "m", "max_tokens": -1, "messages": [{"role": "user", "content": "hi"}]}', "max_tokens"),
    (b'{"model": "m", "max_tokens": "ten", "messages": [{"role": "user", "content": "hi"}]}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid JSON"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]' + b"x", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_e2e_each_kind_of_bad_input_is_one_400_and_one_log_line(upstream, proxy, body, message, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    client = Client(proxy)
    response, payload = client.call("POST", "/v1/messages", body)
    error = json.loads(payload)
    assert response.status == 400 and error["type"] == "error", payload
    assert error["error"]["type"] == "invalid_request_error" and message in error["error"]["message"]
    assert wait_for(lambda: [r for r in caplog.records if "POST /v1/messages 400" in r.getMessage()])
    lines = [r for r in caplog.records if "POST /v1/messages 400" in r.getMessage()]
    assert len(lines) == 1 and "invalid_request_error" in lines[0].getMessage()
    assert "Traceback" not in caplog.text and not upstream.requests
    upstream.script.append(json_text("still serving"))
    assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "still serving"


def test_e2e_body_over_the_limit_is_413_from_the_content_length_alone(upstream):
    with running_proxy(upstream.url, max_request_bytes=1000) as server:
        answer = raw_exchange(server, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 40000000\r\n\r\n")
        assert answer_status(answer) == 413 and answer_json(answer)["error"]["type"] == "request_too_large"
        assert b"MAX_REQUEST_BYTES" in answer
        # a client that sends its whole body anyway still reads the 413 (no reset)
        body = b'{"pad": "' + b"x" * 20000000 + b'"}'
        sock = socket.create_connection(server.server_address[:2], timeout=10)

        send_errors = []

        def send_all():
            try:
                sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            except OSError as exc:
                send_errors.append(exc)

        sender = threading.Thread(target=send_all)
        sender.start()
        sender.join(10)                  # all sent (or refused) before the answer is read
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        sock.close()
        assert answer_status(head) == 413 and send_errors == [], "the proxy reset a client still sending"
        # Expect: 100-continue gets the 413 instead of a 100, and the body is never sent
        answer = raw_exchange(server, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                                      b"Expect: 100-continue\r\n\r\n")
        assert answer_status(answer) == 413 and b"100 Continue" not in answer
        assert not upstream.requests
        upstream.script.append(json_text("small is fine"))
        assert Client(server).json("POST", "/v1/messages", req())[0] == 200


def test_e2e_chunked_request_body_is_accepted(upstream, proxy):
    upstream.script.append(json_text("chunked ok"))
    body = json.dumps(req()).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    answer = raw_exchange(proxy, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                 b"Connection: close\r\n\r\n" + chunks)
    assert answer_status(answer) == 200 and answer_json(answer)["content"][0]["text"] == "chunked ok"


@pytest.mark.parametrize("headers", [
    b"".join(b"X-Header-%d: %d\r\n" % (i, i) for i in range(120)), b"X-Long: " + b"a" * 70000 + b"\r\n"])
def test_e2e_too_many_or_too_large_headers_are_431(proxy, headers, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    answer = raw_exchange(proxy, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer_status(answer) == 431 and answer_json(answer)["type"] == "error"
    assert "431" in caplog.text and "Traceback" not in caplog.text
    assert Client(proxy).json("GET", "/health")[0] == 200


def test_e2e_absolute_request_target_and_host_header_cannot_change_the_upstream(upstream, proxy):
    upstream.script.append(json_text("the configured upstream"))
    body = json.dumps(req()).encode()
    answer = raw_exchange(proxy, b"POST http://169.254.169.254/v1/messages HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert answer_status(answer) == 200 and answer_json(answer)["content"][0]["text"] == "the configured upstream"
    assert len(upstream.requests) == 1


def test_e2e_connect_timeout_is_504_and_names_its_setting(upstream):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)                  # never accepts: once its queue is full, connects hang
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        url = "http://127.0.0.1:%d/v1" % listener.getsockname()[1]
        with running_proxy(url, connect_timeout=0.3) as server:
            status, _, payload = Client(server).json("POST", "/v1/messages", req())
        assert status == 504 and payload["error"]["type"] == "timeout_error"
        assert "CONNECT_TIMEOUT" in payload["error"]["message"]
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_e2e_stream_silent_longer_than_the_read_timeout_ends_in_an_error_event(upstream):
    release = threading.Event()

    def stall(handler, body):
        begin_sse(handler)
        send_parts(handler, [sse_data(chunk({"content": "one"}))])
        release.wait(10)
        handler.close_connection = True

    upstream.script.append(stall)
    try:
        with running_proxy(upstream.url, request_timeout=0.3) as server:
            response, payload = Client(server).call("POST", "/v1/messages", dict(req(), stream=True))
        events = check_stream(parse_sse(payload))
        assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "timeout_error"
        assert "REQUEST_TIMEOUT" in events[-1]["error"]["message"]
    finally:
        release.set()


@pytest.mark.parametrize("status,body,status_out", [
    (200, b"<html><body><h1>Sign in to the corporate gateway</h1></body></html>", 502),
    (502, b"<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>", 502),
])
def test_e2e_gateway_html_is_502_with_a_short_excerpt(upstream, proxy, status, body, status_out):
    def html(handler, _):
        handler.send_response(status)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    upstream.script.append(html)
    code, _, payload = Client(proxy).json("POST", "/v1/messages", req())
    message = payload["error"]["message"]
    assert code == status_out and payload["error"]["type"] == "api_error"
    assert ("Sign in to the corporate gateway" in message or "502 Bad Gateway" in message) and "<" not in message


def test_e2e_upstream_that_reads_the_request_then_hangs_up_is_not_replayed(upstream, proxy):
    def hang_up(handler, body):
        handler.close_connection = True

    upstream.script.append(hang_up)
    status, _, payload = Client(proxy).json("POST", "/v1/messages", req())
    assert status == 502 and len(upstream.requests) == 1, "a request the upstream received was sent again"


def send_raw_post(address, request):
    """A POST /v1/messages of `request` on a new socket, left open (to be read or abandoned)."""
    sock = socket.create_connection(address, timeout=10)
    body = json.dumps(request).encode()
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def closing_watcher(closed):
    """An upstream responder that sets `closed` once the proxy closes its connection."""
    def watch_proxy(handler, body):
        note_when_proxy_closes(handler, closed)
        handler.close_connection = True
    return watch_proxy


def wait_for(condition, timeout=10.0):
    """Wait (polling) until condition() is true; False if it never was."""
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        while not condition():
            if deadline.wait(0.02):
                return condition()
        return True
    finally:
        timer.cancel()


def held_upstream(upstream, answer, started=None):
    """A responder that waits for `release` before answering (`started` is set when it is called)."""
    release = threading.Event()

    def respond(handler, body):
        if started is not None:
            started.set()
        release.wait(10)
        answer(handler, body)

    return respond, release


def test_e2e_client_leaving_a_non_stream_request_closes_the_upstream_request(upstream, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    closed = threading.Event()
    watch_proxy = closing_watcher(closed)
    upstream.script.append(watch_proxy)
    with running_proxy(upstream.url, ping_interval=30) as server:
        sock = send_raw_post(server.server_address[:2], req())
        assert wait_for(lambda: upstream.requests)
        sock.close()
        assert closed.wait(3), "the upstream kept working for a client that had left"
        assert wait_for(lambda: "client went away" in caplog.text)
        upstream.script.append(json_text("next"))
        assert Client(server).json("POST", "/v1/messages", req())[0] == 200
    assert "Traceback" not in caplog.text and "upstream answered" not in caplog.text


def test_e2e_client_leaving_a_silent_stream_closes_the_upstream_without_waiting_for_a_ping(upstream):
    closed = threading.Event()

    def respond(handler, body):
        begin_sse(handler)
        send_parts(handler, [sse_data(chunk({"content": "thinking hard"}))])
        note_when_proxy_closes(handler, closed)
        handler.close_connection = True

    upstream.script.append(respond)
    with running_proxy(upstream.url, ping_interval=30) as server:
        sock = send_raw_post(server.server_address[:2], req(stream=True))
        received = b""
        while b"thinking hard" not in received:
            received += sock.recv(65536)
        sock.close()
        assert closed.wait(3), "the upstream stream stayed open after the client left"


def resource_counts():
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_e2e_fifty_abandoned_streams_leave_no_thread_or_descriptor_behind(upstream):
    with running_proxy(upstream.url, ping_interval=0.05) as server:
        Client(server).stream(req())            # the heartbeat and pool exist before the baseline
        assert wait_for(lambda: server.open_connections == 0)
        before = resource_counts()
        for i in range(50):
            gone = threading.Event()

            def respond(handler, body, gone=gone):
                begin_sse(handler)
                send_parts(handler, [sse_data(chunk({"content": "partial"}))])
                note_when_proxy_closes(handler, gone)
                handler.close_connection = True

            upstream.script.append(respond)
            sock = send_raw_post(server.server_address[:2], req(stream=True))
            received = b""
            while b"partial" not in received:
                received += sock.recv(65536)
            sock.close()
            assert gone.wait(5)
        assert wait_for(lambda: server.open_connections == 0 and resource_counts() <= before), \
            (before, resource_counts())


def test_e2e_requests_beyond_max_concurrency_get_529_and_the_rest_finish(upstream):
    started = [threading.Event(), threading.Event()]
    held = [held_upstream(upstream, json_text("held %d" % i), started[i]) for i in range(2)]
    upstream.script.extend(respond for respond, _ in held)
    with running_proxy(upstream.url, max_concurrency=2) as server:
        results = []
        threads = [threading.Thread(target=lambda: results.append(Client(server).json("POST", "/v1/messages", req())))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        assert started[0].wait(10) and started[1].wait(10)
        status, headers, payload = Client(server).json("POST", "/v1/messages", req())
        assert status == 529 and payload["error"]["type"] == "overloaded_error"
        assert "MAX_CONCURRENCY" in payload["error"]["message"] and "x-should-retry" not in headers
        for _, release in held:
            release.set()
        for thread in threads:
            thread.join(10)
        assert sorted(r[0] for r in results) == [200, 200]
        upstream.script.append(json_text("room again"))
        assert Client(server).json("POST", "/v1/messages", req())[0] == 200


def test_e2e_connections_beyond_twice_max_concurrency_are_refused_with_529(upstream):
    with running_proxy(upstream.url, max_concurrency=1) as server:
        idle = [Client(server), Client(server)]
        for client in idle:
            assert client.json("GET", "/health")[0] == 200     # two kept-alive connections
        answer = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer_status(answer) == 529 and answer_json(answer)["error"]["type"] == "overloaded_error"
        idle[0].conn.close()
        assert wait_for(lambda: server.open_connections == 1)
        assert Client(server).json("GET", "/health")[0] == 200


class ProxyProcess:
    """claude_proxy.py run as a user runs it, its output collected line by line."""

    def __init__(self, *args, env=None, cwd=None):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
        self.process = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--port", "0"]
                                        + list(args), env=dict(base, **(env or {})), cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert wait_for(lambda: "listening on" in self.output or self.process.poll() is not None), self.output
        match = re.search(r"listening on http://[^:]+:(\d+)", self.output)
        assert match, self.output
        self.port = int(match.group(1))

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.decode("utf-8", "replace"))

    @property
    def output(self):
        return "".join(self.lines)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.reader.join(10)
        self.process.stdout.close()


def held_stream(first_text):
    """An upstream stream that sends one piece of text, then waits for `release`."""
    release = threading.Event()

    def respond(handler, body):
        begin_sse(handler)
        send_parts(handler, [sse_data(chunk({"role": "assistant", "content": ""})),
                             sse_data(chunk({"content": first_text}))])
        release.wait(10)
        try:
            send_parts(handler, [sse_data(chunk({"content": " and the rest"})), sse_data(chunk({}, "stop")),
                                 b"data: [DONE]\n\n"])
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True

    return respond, release


def open_stream(port, until):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps(req(stream=True)).encode()
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: client-secret-7654321\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while until not in received:
        received += sock.recv(65536)
    return sock, received


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):   # (reset: queued as the socket closed)
        return True
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_command_line_sigterm_stops_accepting_and_lets_a_stream_finish(upstream):
    respond, release = held_stream("first half")
    upstream.script.append(respond)
    proxy = ProxyProcess(env={"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": "sk-secret-cli-1234567",
                              "ANTHROPIC_API_KEY": "client-secret-7654321", "LOG_LEVEL": "DEBUG"})
    try:
        sock, received = open_stream(proxy.port, b"first half")
        proxy.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "shutting down" in proxy.output), proxy.output
        assert wait_for(lambda: refused(proxy.port)), "still accepting connections after SIGTERM"
        release.set()
        while not received.endswith(b"0\r\n\r\n"):
            piece = sock.recv(65536)
            assert piece, received
            received += piece
        sock.close()
        assert b"event: message_stop" in received and b"and the rest" in received
        assert proxy.process.wait(10) == 0
    finally:
        release.set()
        proxy.stop()
    assert "1 request(s) in flight" in proxy.output
    assert "sk-secret-cli-1234567" not in proxy.output and "client-secret-7654321" not in proxy.output


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("how", ["second signal", "grace over"])
def test_command_line_second_signal_or_end_of_grace_exits_with_a_stream_in_flight(upstream, how):
    respond, release = held_stream("waiting")
    upstream.script.append(respond)
    proxy = ProxyProcess("--shutdown-grace", "60" if how == "second signal" else "0.2",
                         env={"OPENAI_BASE_URL": upstream.url})
    try:
        sock, _ = open_stream(proxy.port, b"waiting")
        proxy.process.send_signal(signal.SIGINT)
        assert wait_for(lambda: "shutting down" in proxy.output), proxy.output
        if how == "second signal":
            proxy.process.send_signal(signal.SIGINT)
        assert proxy.process.wait(10) == (1 if how == "second signal" else 0)
        sock.close()
    finally:
        release.set()
        proxy.stop()


def test_e2e_a_client_resetting_between_requests_leaves_no_traceback(proxy, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    client = Client(proxy)
    assert client.json("GET", "/health")[0] == 200
    sock = client.conn.sock
    sock.sendall(b"GET /health HTTP/1.1\r\n")         # half a request, then a reset
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert wait_for(lambda: proxy.open_connections == 0)
    assert Client(proxy).json("GET", "/health")[0] == 200
    assert "Traceback" not in capfd.readouterr().err and "Traceback" not in caplog.text


def test_e2e_one_access_log_line_per_request_with_models_tokens_and_times(upstream, proxy, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    upstream.script.extend([sse_text("hi", usage={"prompt_tokens": 31, "completion_tokens": 4}), json_text("plain")])
    client = Client(proxy)
    client.stream(req(model="claude-sonnet-4-5"))
    client.json("POST", "/v1/messages?beta=true", req(model="claude-3-5-haiku"))
    client.json("GET", "/nope")
    assert wait_for(lambda: len([r for r in caplog.records if hasattr(r, "access")]) == 3)
    stream, plain, missing = [r for r in caplog.records if hasattr(r, "access")]
    assert re.match(r"POST /v1/messages 200 claude-sonnet-4-5 -> gpt-4o stream in=31 out=4 ttft=0\.\d{3}s \d+\.\d{3}s$",
                    stream.getMessage()), stream.getMessage()
    assert stream.access["input_tokens"] == 31 and stream.access["stream"] is True and stream.access["ttft"] > 0
    assert re.match(r"POST /v1/messages 200 claude-3-5-haiku -> gpt-4o-mini in=\d+ out=\d+ \d+\.\d{3}s$",
                    plain.getMessage()), plain.getMessage()
    assert missing.getMessage().startswith("GET /nope 404 ") and missing.access["status"] == 404
    assert "not_found_error" in missing.access["note"]


def test_command_line_json_log_format_writes_one_object_a_line(upstream, tmp_path):
    upstream.script.append(json_text("logged"))
    upstream.script.append(sse_text("streamed"))
    proxy = ProxyProcess("--log-format", "json", cwd=str(tmp_path), env={"OPENAI_BASE_URL": upstream.url,
                                                                         "OPENAI_API_KEY": "sk-json-secret-1234567"})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("POST", "/v1/messages", json.dumps(req()), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        conn.request("POST", "/v1/messages", json.dumps(req(stream=True)), {"Content-Type": "application/json"})
        conn.getresponse().read()
        assert wait_for(lambda: proxy.output.count('"path": "/v1/messages"') == 2), proxy.output
    finally:
        proxy.stop()
    log_lines = [line for line in proxy.lines if line.startswith("{")]
    entries = [json.loads(line) for line in log_lines]
    access = [e for e in entries if e.get("path") == "/v1/messages"][0]
    assert access["status"] == 200 and access["model"] == "claude-opus-4-8" and access["upstream_model"] == "gpt-4o"
    assert access["level"] == "INFO" and access["time"].endswith("Z") and "total" in access
    streamed = [e for e in entries if e.get("path") == "/v1/messages"][1]
    assert streamed["ttft"] == round(streamed["ttft"], 4) and streamed["total"] == round(streamed["total"], 4)
    assert list(streamed)[:3] == ["time", "level", "message"] and streamed["provider"] == "default"
    assert "sk-json-secret-1234567" not in proxy.output



# ---------------------------------------------------------------------------------------------
# Corporate networks: a private CA and an HTTPS proxy (CONNECT), all on loopback.
# A test CA and a server certificate it signed (for 127.0.0.1, localhost and llm.corp.example),
# valid until 2126, made with the openssl command-line tool (EC P-256).

TEST_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBsDCCAVWgAwIBAgIURJ7RABIXDpJVEI1oiMhlemV8KhwwCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZY2xhdWRlLWNvZGUtcHJveHkgdGVzdCBDQTAgFw0yNjExMjUx
NjQxNDZaGA8yMTI2MTEwMTE2NDE0NlowJDEiMCAGA1UEAwwZY2xhdWRlLWNvZGUt
cHJveHkgdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABKVrmhF/3nrs
iCg1cU07l4FAlIqYMUEsNG7KFGC9jcoJIUFJASBTNH1GV0U1X6ykcWWMzTef13GL
QarCUrfPvRijYzBhMB0GA1UdDgQWBBTsuLf3g1BgluHXv0gXHooQ34ef6jAfBgNV
HSMEGDAWgBTsuLf3g1BgluHXv0gXHooQ34ef6jAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAKBggqhkjOPQQDAgNJADBGAiEAmePrY1xCt/x5FUV7FwyS
cilYdFTIV6QPPwmtuuxCgOkCIQDyps2BEESFeKRyOlZ1/aKLz7oKjm6O+8NqLJr3
a5PZJA==
-----END CERTIFICATE-----
"""
TEST_SERVER_PEM = """-----BEGIN CERTIFICATE-----
MIIB2jCCAYGgAwIBAgIUYDChNUFwZeVcu8NWPsNJza6cDO8wCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZY2xhdWRlLWNvZGUtcHJveHkgdGVzdCBDQTAgFw0yNjExMjUx
NjQyNDlaGA8yMTI2MTEwMTE2NDI0OVowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEUL3xd6LDDUr2UyGBD2x8h4FmupBkEGKV
MlQ3VGt/k/kjUGizyUme2KmYB+VHqnw2GsDWmn3RmDKyhw0aesTbIqOBnjCBmzAs
BgNVHREEJTAjhwR/AAABgglsb2NhbGhvc3SCEGxsbS5jb3JwLmV4YW1wbGUwCQYD
VR0TBAIwADALBgNVHQ8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwHQYDVR0O
BBYEFKofcaGveF+xomgVJMSWNymWAY1OMB8GA1UdIwQYMBaAFOy4t/eDUGCW4de/
SBceihDfh5/qMAoGCCqGSM49BAMCA0cAMEQCIB1QRmiFuHFwOEXFsxRx8NMFl3Oe
Ah33OjVukJ9tgQ9IAiAx29s0jbcCroUeM37n3E9El07QCp/ZEN4aVJjcv4e+ow==
-----END CERTIFICATE-----
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIHCQaXVtBrFMnSmn1lO4EhQMTN8NOXC1owpyhDUIeT2FoAoGCCqGSM49
AwEHoUQDQgAEUL3xd6LDDUr2UyGBD2x8h4FmupBkEGKVMlQ3VGt/k/kjUGizyUme
2KmYB+VHqnw2GsDWmn3RmDKyhw0aesTbIg==
-----END EC PRIVATE KEY-----
"""
CORP_HOST = "llm.corp.example"        # resolved only by the test proxy, never by DNS


@pytest.fixture
def certs(tmp_path):
    (tmp_path / "ca.pem").write_text(TEST_CA_PEM)
    (tmp_path / "server.pem").write_text(TEST_SERVER_PEM)
    return tmp_path


@pytest.fixture
def tls_upstream(certs):
    fake = FakeUpstream()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs / "server.pem"))
    fake.server.socket = context.wrap_socket(fake.server.socket, server_side=True)
    fake.url = "https://127.0.0.1:%d/v1" % fake.server.server_address[1]
    yield fake
    fake.close()


class ConnectProxy:
    """A forward proxy on 127.0.0.1:0: CONNECT tunnels (HTTPS) and absolute-URI requests
    (plain HTTP). Any host it is asked for is served by `target_port` on 127.0.0.1. With
    `credentials`, requests without that Proxy-Authorization get 407."""

    def __init__(self, target_port, credentials=None):
        self.target_port = target_port
        self.credentials = credentials
        self.seen = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                piece = client.recv(65536)
                if not piece:
                    return
                head += piece
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            self.seen.append((lines[0], headers.get("Proxy-Authorization")))
            if self.credentials and headers.get("Proxy-Authorization") != "Basic " + base64.b64encode(
                    self.credentials.encode()).decode():
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            with upstream:
                if lines[0].startswith("CONNECT "):
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:          # absolute URI: pass the request on in origin form
                    method, target, version = lines[0].split(" ")
                    path = "/" + target.split("://", 1)[1].split("/", 1)[1]
                    upstream.sendall(("%s %s %s\r\n" % (method, path, version)).encode() +
                                     "\r\n".join(lines[1:]).encode("latin-1") + b"\r\n\r\n" + rest)
                self._pipe(client, upstream)

    @staticmethod
    def _pipe(a, b):
        def copy(src, dst):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        other = threading.Thread(target=copy, args=(b, a), daemon=True)
        other.start()
        copy(a, b)
        other.join(10)

    def close(self):
        self.listener.close()


@pytest.fixture
def clean_proxy_env(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
                 "ALL_PROXY", "all_proxy", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_e2e_private_ca_via_ca_bundle_and_via_ssl_cert_file(tls_upstream, certs, clean_proxy_env):
    for _ in range(3):
        tls_upstream.script.append(json_text("over TLS"))
    with running_proxy(tls_upstream.url) as server:        # not trusted yet
        status, _, payload = Client(server).json("POST", "/v1/messages", req())
        assert status == 502 and "not trusted" in payload["error"]["message"]
        assert "CA_BUNDLE" in payload["error"]["message"]
    with running_proxy(tls_upstream.url, ca_bundle=str(certs / "ca.pem")) as server:
        assert Client(server).json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "over TLS"
    clean_proxy_env.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    with running_proxy(tls_upstream.url) as server:
        assert Client(server).json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "over TLS"
    assert cp.upstream_ssl_context().cert_store_stats()["x509_ca"] > 1, "SSL_CERT_FILE replaced the system CAs"


@pytest.mark.parametrize("case", ["HTTPS_PROXY", "https_proxy"])
def test_e2e_https_through_a_connect_proxy_with_credentials(tls_upstream, certs, clean_proxy_env, case):
    proxy = ConnectProxy(tls_upstream.server.server_address[1], credentials="corp user:p@ss")
    try:
        clean_proxy_env.setenv(case, proxy.url.replace("http://", "http://corp%20user:p%40ss@"))
        tls_upstream.script.extend([json_text("through the proxy"), sse_text("streamed through")])
        with running_proxy("https://%s/v1" % CORP_HOST, ca_bundle=str(certs / "ca.pem")) as server:
            client = Client(server)
            assert client.json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "through the proxy"
            events = client.stream(req())
            assert cp.assemble_message(events)["content"][0]["text"] == "streamed through"
        assert proxy.seen[0][0] in ("CONNECT %s:443 HTTP/1.0" % CORP_HOST, "CONNECT %s:443 HTTP/1.1" % CORP_HOST)
        assert proxy.seen[0][1] == "Basic " + base64.b64encode(b"corp user:p@ss").decode()
        assert tls_upstream.requests[0]["path"] == "/v1/chat/completions"
        assert len(proxy.seen) == 1, "the tunnel was not kept alive"
    finally:
        proxy.close()


def test_e2e_plain_http_upstream_through_http_proxy(upstream, clean_proxy_env):
    proxy = ConnectProxy(upstream.server.server_address[1])
    try:
        clean_proxy_env.setenv("HTTP_PROXY", proxy.url)
        upstream.script.append(json_text("via http proxy"))
        with running_proxy("http://%s:%d/v1" % (CORP_HOST, upstream.server.server_address[1])) as server:
            assert Client(server).json("POST", "/v1/messages", req())[2]["content"][0]["text"] == "via http proxy"
        assert proxy.seen[0][0].startswith("POST http://%s:" % CORP_HOST)
    finally:
        proxy.close()


def test_e2e_proxy_refusing_or_wanting_credentials_is_a_502_naming_the_proxy(tls_upstream, certs, clean_proxy_env):
    proxy = ConnectProxy(tls_upstream.server.server_address[1], credentials="u:p")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        for proxy_url, expected in ((proxy.url, "407"), ("http://127.0.0.1:%d" % closed.getsockname()[1], "Refused")):
            clean_proxy_env.setenv("HTTPS_PROXY", proxy_url)
            with running_proxy("https://%s/v1" % CORP_HOST, ca_bundle=str(certs / "ca.pem")) as server:
                status, _, payload = Client(server).json("POST", "/v1/messages", req())
            message = payload["error"]["message"]
            assert status == 502 and "via proxy " + proxy_url in message and expected in message, message
            assert "HTTPS_PROXY" in message
    finally:
        closed.close()
        proxy.close()


@pytest.mark.parametrize("no_proxy", ["llm.corp.example", ".corp.example", "*"])
def test_no_proxy_names_hosts_that_skip_the_proxy(clean_proxy_env, no_proxy):
    clean_proxy_env.setenv("NO_PROXY", no_proxy)
    clean_proxy_env.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert cp.UpstreamPool("https://%s/v1" % CORP_HOST, 1, 1).proxy is None
    assert cp.UpstreamPool("https://api.other.example/v1", 1, 1).proxy is not None or no_proxy == "*"
    assert cp.UpstreamPool("http://127.0.0.1:8000/v1", 1, 1).proxy is None     # loopback never


def test_readme_settings_table_matches_the_settings():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
        rows = re.findall(r"^\| `([A-Z_]+)` \| `(--[a-z-]+)` \| (.+?) \|", handle.read(), re.M)
    assert [(env, flag) for env, flag, _ in rows] == [
        (f.metadata["env"], "--" + f.name.replace("_", "-")) for f in cp.SETTING_FIELDS]
    for (env, _, default), f in zip(rows, cp.SETTING_FIELDS):
        shown = "%g" % f.default if isinstance(f.default, float) else str(f.default)
        assert shown in default or (f.default == "" and default in ("(none)", "`BIG_MODEL`")), (env, default)


def child_pids(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
        return [int(p) for p in handle.read().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
def test_command_line_workers_share_the_port_are_replaced_and_stop_on_sigterm(upstream, tmp_path):
    proxy = ProxyProcess("--workers", "2", cwd=str(tmp_path), env={"OPENAI_BASE_URL": upstream.url})
    try:
        assert "(2 workers)" in proxy.output
        assert wait_for(lambda: len(child_pids(proxy.process.pid)) == 2)
        for _ in range(20):                  # new connections, spread over the workers by the kernel
            upstream.script.append(json_text("served"))
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("POST", "/v1/messages", json.dumps(req()), {"Content-Type": "application/json"})
            assert json.loads(conn.getresponse().read())["content"][0]["text"] == "served"
            conn.close()
        assert upstream.connections >= 2, "one worker served everything"
        first = child_pids(proxy.process.pid)
        started = threading.Event()
        threading.Timer(1.1, started.set).start()     # a worker that dies at start is not replaced
        started.wait(5)
        os.kill(first[0], signal.SIGKILL)
        assert wait_for(lambda: len(child_pids(proxy.process.pid)) == 2 and first[0] not in child_pids(proxy.process.pid))
        upstream.script.append(json_text("after the replacement"))
        assert Client(type("S", (), {"server_address": ("127.0.0.1", proxy.port)})()).json(
            "POST", "/v1/messages", req())[0] == 200
        workers = child_pids(proxy.process.pid)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(10) == 0
        assert not any(os.path.exists("/proc/%d/status" % pid) and "zombie" not in open("/proc/%d/status" % pid).read()
                       for pid in workers)
        assert "starting another" in proxy.output
    finally:
        proxy.stop()


def test_benchmark_smoke_checks_what_ci_relies_on():
    """`.ci/run` runs bench_claude_proxy.py --smoke (every scenario for about a second, ~15 s in
    all, so not in this suite); these are the checks besides errors and missing figures that
    make it exit 1. The figure list is the benchmark's own."""
    import bench_claude_proxy as bench
    good = dict.fromkeys(bench.FIGURE_KEYS, 1.5)
    good.update(load_requests=40, load_streams=8, load_streams_complete=8, load_errors=0)
    assert bench.smoke_failures(good) == []
    assert bench.smoke_failures(dict(good, latency_p50_ratio="1.2", rss_idle_mb=True)) == [
        "figures that are not numbers: latency_p50_ratio, rss_idle_mb"]
    assert bench.smoke_failures(dict(good, load_streams=0, load_streams_complete=0)) == [
        "the load scenario sent no requests or no streams"]
    assert bench.smoke_failures(dict(good, load_errors=2)) == ["load errors: 2"]
    assert bench.smoke_failures(dict(good, load_streams_complete=7)) == ["load streams complete: 7 of 8"]
    assert set(bench.collect_figures({}, {}, None)) == set(bench.FIGURE_KEYS)


def test_e2e_client_leaving_on_a_reused_upstream_connection_is_never_sent_again(upstream, caplog):
    caplog.set_level(logging.INFO, logger="claude_proxy")
    closed = threading.Event()
    watch_proxy = closing_watcher(closed)
    with running_proxy(upstream.url, ping_interval=0.05) as server:
        upstream.script.extend([json_text("warm"), watch_proxy])
        assert Client(server).json("POST", "/v1/messages", req())[0] == 200     # the pool holds one now
        sock = send_raw_post(server.server_address[:2], req())
        assert wait_for(lambda: len(upstream.requests) == 2)
        sock.close()
        assert closed.wait(5)
        assert wait_for(lambda: "client went away" in caplog.text)
        upstream.script.append(json_text("next"))
        assert Client(server).json("POST", "/v1/messages", req())[0] == 200
    assert len(upstream.requests) == 3, "the abandoned request was sent upstream again"


def test_header_parser_matches_the_email_parser_and_keeps_the_limits():
    raw = (b"Content-Type: application/json\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Space:   padded \r\n"
           b"X-Latin: caf\xe9\r\n\r\n")
    import email.parser
    ours = cp.parse_headers(io.BytesIO(raw))
    theirs = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(raw.decode("iso-8859-1"))
    assert ours.items() == theirs.items() and ours.get_all("x-dup") == ["1", "2"]
    folded = cp.parse_headers(io.BytesIO(b"X-Folded: a\r\n b\r\n\r\n"))     # obs-fold: the email parser's way
    assert folded["X-Folded"] == email.parser.Parser().parsestr("X-Folded: a\r\n b\r\n\r\n")["X-Folded"]
    with pytest.raises(http.client.HTTPException):
        cp.parse_headers(io.BytesIO(b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n"))
    with pytest.raises(http.client.LineTooLong):
        cp.parse_headers(io.BytesIO(b"H: " + b"v" * 70000 + b"\r\n\r\n"))


def test_a_ping_never_blocks_the_heartbeat_on_a_client_that_stopped_reading():
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                ours.send(b"x" * 65536)        # the client reads nothing: its buffers are full
        ours.setblocking(True)
        writer = cp.SSEWriter(ours.makefile("wb", buffering=0), lambda: None, ours)
        writer.last_write = 0
        done = threading.Event()
        threading.Thread(target=lambda: (writer.ping_if_idle(100.0, 5.0), done.set()), daemon=True).start()
        assert done.wait(5), "the heartbeat blocked on one client"
        assert writer.unsent == cp._http_chunk(cp.PING_BYTES)
    finally:
        ours.close()
        theirs.close()


def test_doctor_reset_during_tls_without_a_proxy_is_not_blamed_on_a_proxy(clean_proxy_env):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def reset_each():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(1024)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

    threading.Thread(target=reset_each, daemon=True).start()
    try:
        ok, out = doctor("https://127.0.0.1:%d/v1" % listener.getsockname()[1])
    finally:
        listener.close()
    assert not ok and "FAIL tls      connection to 127.0.0.1 broken during the TLS handshake" in out, out
    assert "HTTPS_PROXY;" not in out and "check HTTPS_PROXY" not in out


def test_doctor_reasoning_model_that_spends_its_one_token_still_passes(upstream, clean_proxy_env):
    upstream.script.append(json_reply({"error": {"message": "Could not finish the message because max_tokens or model "
                                                            "output limit was reached. Please try again with higher max_tokens."}}, 400))
    ok, out = doctor(upstream.url, big_model="o3", small_model="o3")
    assert ok and "ok   opus     o3 answered (up to its 1-token limit)" in out, out


def test_settings_ca_bundle_that_is_not_pem_names_the_setting(tmp_path):
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="CA_BUNDLE .* is not a PEM file of certificates"):
        cp.load_settings({"CA_BUNDLE": str(tmp_path / "bad.pem")}, [], "")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers")
def test_command_line_workers_refuse_a_port_in_use_and_stop_when_the_main_process_dies(upstream, tmp_path):
    first = ProxyProcess(cwd=str(tmp_path), env={"OPENAI_BASE_URL": upstream.url})
    try:
        second = subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--workers", "2", "--port",
                                 str(first.port)], cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=30)
        assert second.returncode == 2 and b"in use" in second.stdout, second.stdout
    finally:
        first.stop()
    proxy = ProxyProcess("--workers", "2", cwd=str(tmp_path), env={"OPENAI_BASE_URL": upstream.url})
    try:
        assert wait_for(lambda: len(child_pids(proxy.process.pid)) == 2)
        workers = child_pids(proxy.process.pid)
        proxy.process.kill()                   # the main process dies without passing anything on
        proxy.process.wait(10)

        def gone(pid):
            try:
                with open("/proc/%d/status" % pid) as handle:
                    return "zombie" in handle.read()
            except OSError:
                return True

        assert wait_for(lambda: all(gone(pid) for pid in workers)), "workers outlived the main process"
    finally:
        proxy.stop()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and more than one CPU")
@pytest.mark.parametrize("pin,expected", [(None, "last"), ("off", "all")])
def test_command_line_runs_on_one_cpu_unless_told_otherwise(tmp_path, pin, expected):
    allowed = os.sched_getaffinity(0)
    proxy = ProxyProcess(*(["--pin-cpu", pin] if pin else []), cwd=str(tmp_path),
                         env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    try:
        assert os.sched_getaffinity(proxy.process.pid) == ({max(allowed)} if expected == "last" else allowed)
    finally:
        proxy.stop()


def test_command_line_text_access_line_is_in_the_log_format_and_redacted(upstream, tmp_path):
    upstream.script.append(json_text("logged"))
    proxy = ProxyProcess(cwd=str(tmp_path), env={"OPENAI_BASE_URL": upstream.url,
                                                 "OPENAI_API_KEY": "sk-access-secret-123456"})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("POST", "/v1/messages?beta=true", json.dumps(req(model="m-sk-access-secret-123456")),
                     {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        assert wait_for(lambda: "POST /v1/messages 200" in proxy.output), proxy.output
    finally:
        proxy.stop()
    line = [l for l in proxy.lines if "POST /v1/messages 200" in l][0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO POST /v1/messages 200 m-\*\*\* -> m-\*\*\* "
                    r"in=\d+ out=\d+ \d+\.\d{3}s\n$", line), line
    assert "sk-access-secret-123456" not in proxy.output


# ---------------------------------------------------------------------------------------------
# Status (issue 15): the live page, /status.json, /metrics, the session id, and
# `claude-code-proxy claude`

PROM_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
PROM_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
PROM_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def prom_value(text):
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    assert re.match(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\Z", text), text
    return float(text)


def prom_labels(text, i):
    """Parse `{a="x",b="y"}` from text[i] == "{"; (labels, index after "}")."""
    labels = {}
    i += 1
    while text[i] != "}":
        match = PROM_LABEL.match(text, i)
        assert match, "bad label name at %r" % text[i:]
        name = match.group(0)
        assert not name.startswith("__") and name not in labels, name
        i = match.end()
        assert text[i:i + 2] == '="', text[i:]
        i += 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                escaped = {"\\": "\\", '"': '"', "n": "\n"}.get(text[i + 1])
                assert escaped is not None, "bad escape %r" % text[i:i + 2]
                value.append(escaped)
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        labels[name] = "".join(value)
        i += 1
        if text[i] == ",":
            i += 1
    return labels, i + 1


def parse_prometheus(text):
    """A strict reader of the text exposition format 0.0.4: {family: {"type", "help", "samples":
    [(name, labels, value)]}}. Families are contiguous, HELP and TYPE come once and before
    their samples, counters end in _total, histograms are cumulative and end in +Inf == _count."""
    assert text.endswith("\n")
    families, order = {}, []

    def family_of(name):
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and families.get(base, {}).get("type") == "histogram":
                return base
        return name

    for line in text[:-1].split("\n"):
        assert line and line == line.strip(), repr(line)
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[0] == "#" and parts[1] in ("HELP", "TYPE") and PROM_NAME.match(parts[2]), line
            family = families.setdefault(parts[2], {"type": "untyped", "help": None, "samples": []})
            assert not family["samples"], "metadata after samples: " + line
            if parts[1] == "HELP":
                assert family["help"] is None and len(parts) == 4, line
                assert not re.search(r"\\[^\\n]", parts[3]), line
                family["help"] = parts[3]
            else:
                assert "typed" not in family and parts[3] in PROM_TYPES, line
                family["type"], family["typed"] = parts[3], True
            if not order or order[-1] != parts[2]:
                assert parts[2] not in order, "family %s not contiguous" % parts[2]
                order.append(parts[2])
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        assert PROM_NAME.match(name), line
        i = len(name)
        labels = {}
        if line[i] == "{":
            labels, i = prom_labels(line, i)
        assert line[i] == " ", line
        fields = line[i + 1:].split(" ")
        assert len(fields) in (1, 2), line
        value = prom_value(fields[0])
        base = family_of(name)
        assert order and order[-1] == base, "sample of %s outside its family" % name
        families[base]["samples"].append((name, labels, value))
    for name, family in families.items():
        assert family.get("typed") and family["help"], name
        if family["type"] == "counter":
            assert name.endswith("_total"), name
            assert all(value >= 0 for _, _, value in family["samples"]), name
        if family["type"] == "histogram":
            groups = {}
            for sample_name, labels, value in family["samples"]:
                key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                groups.setdefault(key, {"buckets": []})
                if sample_name.endswith("_bucket"):
                    groups[key]["buckets"].append((prom_value(labels["le"]), value))
                else:
                    groups[key][sample_name[len(name):]] = value
            for group in groups.values():
                bounds = [le for le, _ in group["buckets"]]
                counts = [count for _, count in group["buckets"]]
                assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
                assert counts == sorted(counts), "buckets not cumulative: %r" % counts
                assert bounds[-1] == float("inf") and counts[-1] == group["_count"], group
                assert "_sum" in group
    return families


def prom_samples(families, name):
    family = name if name in families else name.rsplit("_", 1)[0]
    return {tuple(sorted(labels.items())): value for sample_name, labels, value in families[family]["samples"]
            if sample_name == name}


def test_prometheus_parser_rejects_what_the_format_forbids():
    good = '# HELP a_total Help.\n# TYPE a_total counter\na_total{x="q\\"\\\\\\n"} 1\n'
    assert prom_samples(parse_prometheus(good), "a_total") == {(("x", 'q"\\\n'),): 1.0}
    hist = ("# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1.0\"} %d\n"
            "h_seconds_bucket{le=\"+Inf\"} %d\nh_seconds_sum 3\nh_seconds_count %d\n")
    parse_prometheus(hist % (1, 2, 2))
    for bad in (good[:-1], good.replace("a_total{", "a-total{"), good.replace('\\"', '\\t'),
                good.replace("counter", "count"), good.replace("a_total counter\n", "a_total counter\nb 1\n"),
                good + "# TYPE a_total counter\n", good.replace("a_total", "a"), good.replace("x=", "__x="),
                hist % (2, 1, 1), hist % (1, 2, 3), good.replace("# HELP a_total Help.\n", "")):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


def status_mix(upstream, proxy):
    """A known mix: a stream with cached tokens and a session id, a whole answer, a 429, a 500
    answered once more with 500, a count_tokens, and a model name that needs escaping."""
    upstream.script += [
        sse_text("hi", usage={"prompt_tokens": 20, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 5}}),
        json_reply(completion({"content": "whole"}, usage={"prompt_tokens": 9, "completion_tokens": 2})),
        json_reply({"error": {"message": "slow down"}}, status=429),
        json_reply({"error": {"message": "broken"}}, status=500),
        json_reply(completion({"content": "odd"}, usage={"prompt_tokens": 1, "completion_tokens": 1}))]
    client = Client(proxy)
    client.stream(req(model="claude-sonnet-4-5"), headers={"x-claude-code-session-id": "sess-42"})
    assert client.json("POST", "/v1/messages", req(model="claude-haiku-4-5"))[0] == 200
    assert client.json("POST", "/v1/messages", req())[0] == 429
    assert client.json("POST", "/v1/messages", req())[0] == 500
    assert client.json("POST", "/v1/messages", req(model='we"ird\\model\nx'))[0] == 200
    assert client.json("POST", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "a"}]})[0] == 200
    return client


def test_status_data_after_a_known_mix_of_requests(upstream, proxy):
    client = status_mix(upstream, proxy)
    status, headers, data = client.json("GET", "/status.json")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert client.json("GET", "/status.json")[0] == 200        # polls are not recorded
    status, _, data = client.json("GET", "/status.json")
    recent = data["recent"]
    assert [(r["path"], r["status"], r["model"]) for r in recent] == [
        ("/v1/messages/count_tokens", 200, ""), ("/v1/messages", 200, 'we"ird\\model\nx'),
        ("/v1/messages", 500, "claude-opus-4-8"), ("/v1/messages", 429, "claude-opus-4-8"),
        ("/v1/messages", 200, "claude-haiku-4-5"), ("/v1/messages", 200, "claude-sonnet-4-5")]
    stream = recent[-1]
    assert (stream["provider"], stream["upstream_model"], stream["stream"], stream["session"]) == (
        "default", "gpt-4o", True, "sess-42")
    assert (stream["input_tokens"], stream["output_tokens"], stream["cached_tokens"]) == (15, 3, 5)
    assert 0 < stream["ttft"] <= stream["duration"] and stream["error"] == "" and stream["failed"] == []
    assert recent[-2]["ttft"] is None and recent[-2]["upstream_model"] == "gpt-4o-mini"
    assert recent[3]["error"] == "rate_limit_error: upstream: slow down" and recent[3]["failed"] == [["default", "429"]]
    assert recent[3]["provider"] == "" and recent[2]["failed"] == [["default", "500"]]
    assert data["requests"] == 6 and data["errors"] == 2 and data["in_flight"] == 0 and data["searches"] == 0
    assert data["totals"] == [
        {"provider": "default", "upstream_model": "gpt-4o", "requests": 3, "errors": 2,
         "input_tokens": 15, "output_tokens": 3, "cached_tokens": 5},
        {"provider": "default", "upstream_model": "gpt-4o-mini", "requests": 1, "errors": 0,
         "input_tokens": 9, "output_tokens": 2, "cached_tokens": 0},
        {"provider": "default", "upstream_model": 'we"ird\\model\nx', "requests": 1, "errors": 0,
         "input_tokens": 1, "output_tokens": 1, "cached_tokens": 0}]
    assert data["failures"] == [{"provider": "default", "kind": "429", "count": 1},
                                {"provider": "default", "kind": "500", "count": 1}]
    last = data["series"][-2:]                  # (the mix may straddle a minute's end)
    assert len(data["series"]) == 60 and sum(s["requests"] for s in last) == 6
    assert sum(s["input_tokens"] for s in last) == 25 and sum(s["errors"] for s in last) == 2
    assert data["requests_per_minute"] == 6.0
    until = data["providers"][0].pop("until")       # the failures put it to rest for COOL_DOWN seconds
    assert data["now"] < until <= data["now"] + cp.COOL_DOWN + 1
    assert data["providers"] == [{"name": "default", "url": upstream.url, "dialect": "generic", "api": "auto",
                                  "keys": 1, "state": "cooling", "last_error": "500: upstream: broken"}]
    assert data["tiers"] == [{"tier": "opus", "chain": ["default/gpt-4o"]}, {"tier": "sonnet", "chain": ["default/gpt-4o"]},
                             {"tier": "haiku", "chain": ["default/gpt-4o-mini"]}]
    assert "OPENAI_API_KEY      set (22 characters)" in data["settings"]
    assert "sk-upstream-secret-123" not in json.dumps(data) and data["version"] == cp.__version__
    assert 0 <= data["uptime"] < 60
    assert "whole" not in json.dumps(data) and "odd" not in json.dumps(data)     # no answer text


def test_metrics_follow_the_text_format_after_a_known_mix(upstream, proxy):
    client = status_mix(upstream, proxy)
    response, payload = client.call("GET", "/metrics")
    assert response.status == 200 and response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    families = parse_prometheus(payload.decode("utf-8"))
    requests = prom_samples(families, "claude_proxy_requests_total")
    key = lambda model, upstream_model, provider, status: (("model", model), ("provider", provider),
                                                            ("status", status), ("upstream_model", upstream_model))
    assert requests == {key("claude-sonnet-4-5", "gpt-4o", "default", "200"): 1,
                        key("claude-haiku-4-5", "gpt-4o-mini", "default", "200"): 1,
                        key("claude-opus-4-8", "gpt-4o", "", "429"): 1, key("claude-opus-4-8", "gpt-4o", "", "500"): 1,
                        key('we"ird\\model\nx', 'we"ird\\model\nx', "default", "200"): 1, key("", "", "", "200"): 1}
    tokens = prom_samples(families, "claude_proxy_tokens_total")
    assert tokens[(("kind", "cached"), ("provider", "default"), ("upstream_model", "gpt-4o"))] == 5
    assert tokens[(("kind", "input"), ("provider", "default"), ("upstream_model", "gpt-4o-mini"))] == 9
    assert families["claude_proxy_request_duration_seconds"]["type"] == "histogram"
    assert prom_samples(families, "claude_proxy_request_duration_seconds_count") == {(): 6}
    assert prom_samples(families, "claude_proxy_time_to_first_token_seconds_count") == {(): 1}
    assert prom_samples(families, "claude_proxy_requests_in_flight") == {(): 0}
    assert families["claude_proxy_requests_in_flight"]["type"] == "gauge"
    assert prom_samples(families, "claude_proxy_upstream_failures_total") == {
        (("kind", "429"), ("provider", "default")): 1, (("kind", "500"), ("provider", "default")): 1}
    assert prom_samples(families, "claude_proxy_failovers_total") == {}      # one provider: nowhere to go
    assert prom_samples(families, "claude_proxy_web_searches_total") == {(): 0}
    assert prom_samples(families, "claude_proxy_provider_cooling") == {(("provider", "default"),): 1}   # after the 500


def test_stats_failovers_cooling_and_bounded_memory():
    stats = cp.Stats()
    stats.record(cp.RequestRecord(started=120.0, method="POST", path="/v1/messages", status=200, model="claude-opus-4-8",
                                  provider="deepseek", upstream_model="deepseek-v4-pro", duration=2.0, ttft=0.5,
                                  searches=2, failed=(("openrouter", "429"), ("groq", "timeout"))))
    stats.record(cp.RequestRecord(started=121.0, method="POST", path="/v1/messages", status=502, model="claude-opus-4-8",
                                  upstream_model="deepseek-v4-pro", duration=1.0, error="api_error: unreachable",
                                  failed=(("openrouter", "connect"), ("deepseek", "500"))))
    health = [{"name": "openrouter", "state": "cooling", "until": 200.0}, {"name": "deepseek", "state": "ok"},
              {"tier": "opus", "chain": ["openrouter/x", "deepseek/deepseek-v4-pro"]}]
    families = parse_prometheus(stats.render_metrics(health))
    assert prom_samples(families, "claude_proxy_upstream_failures_total") == {
        (("kind", "429"), ("provider", "openrouter")): 1, (("kind", "timeout"), ("provider", "groq")): 1,
        (("kind", "connect"), ("provider", "openrouter")): 1, (("kind", "500"), ("provider", "deepseek")): 1}
    assert prom_samples(families, "claude_proxy_failovers_total") == {      # the last failure led nowhere
        (("kind", "429"), ("provider", "openrouter")): 1, (("kind", "timeout"), ("provider", "groq")): 1,
        (("kind", "connect"), ("provider", "openrouter")): 1}
    assert prom_samples(families, "claude_proxy_provider_cooling") == {
        (("provider", "openrouter"),): 1, (("provider", "deepseek"),): 0}
    assert prom_samples(families, "claude_proxy_web_searches_total") == {(): 2}
    buckets = {labels["le"]: value for name, labels, value in families["claude_proxy_request_duration_seconds"]["samples"]
               if name.endswith("_bucket")}
    assert (buckets["0.5"], buckets["1.0"], buckets["2.5"], buckets["+Inf"]) == (0, 1, 2, 2)   # le: 1.0 counts in "1.0"
    snapshot = stats.snapshot(150.0, health[:2], health[2:], ["A  b"], "9.9", 100.0)
    assert snapshot["totals"] == [{"provider": "deepseek", "upstream_model": "deepseek-v4-pro", "requests": 2,
                                   "errors": 1, "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}]
    assert stats.last_errors() == {"openrouter": "api_error: unreachable", "groq": "", "deepseek": "api_error: unreachable"}
    assert snapshot["series"][-1] == {"minute": 120, "requests": 2, "errors": 1, "mean_duration": 1.5,
                                      "input_tokens": 0, "output_tokens": 0}
    assert (snapshot["tiers"], snapshot["settings"], snapshot["version"], snapshot["uptime"]) == (
        health[2:], ["A  b"], "9.9", 50.0)
    for i in range(cp.MAX_SERIES + 50):           # client-chosen model names cannot grow memory forever
        stats.record(cp.RequestRecord(started=4000.0 + i, method="POST", path="/v1/messages", status=404,
                                      model="m%d" % i, upstream_model="m%d" % i))
    assert len(stats.requests) <= cp.MAX_SERIES + 1 and len(stats.totals) <= cp.MAX_SERIES + 1
    assert stats.requests[("other", "other", "other", "other")] > 0 and len(stats.recent) == 100
    assert min(stats.minutes) > 4000 // 60 - 60 and 2 not in stats.minutes      # an hour of minutes kept


def test_status_and_metrics_show_a_failover_and_the_cooling_provider(upstream, second):
    upstream.script.append(failing(503, retry_after="120"))
    second.script.append(json_reply(completion({"content": "x"}, usage={"prompt_tokens": 7, "completion_tokens": 1})))
    with proxy_for({"OPENAI_BASE_URL": upstream.url, "BACKUP_BASE_URL": second.url, "BACKUP_API_KEY": "b-key-1,b-key-2",
                    "BIG_MODEL": "gpt-5,backup/other-model"}) as server:
        client = Client(server)
        assert client.json("POST", "/v1/messages", req())[0] == 200
        data = client.json("GET", "/status.json")[2]
        families = parse_prometheus(client.call("GET", "/metrics")[1].decode())
    (rec,) = data["recent"]
    assert (rec["provider"], rec["upstream_model"], rec["failed"], rec["input_tokens"]) == (
        "backup", "other-model", [["default", "503"]], 7)
    providers = {p["name"]: p for p in data["providers"]}
    assert providers["default"]["state"] == "cooling" and providers["backup"]["state"] == "ok"
    assert data["now"] + 100 < providers["default"]["until"] <= data["now"] + 121      # its Retry-After
    assert providers["default"]["last_error"].startswith("503: ") and providers["backup"]["keys"] == 2
    assert data["tiers"][0] == {"tier": "opus", "chain": ["default/gpt-5", "backup/other-model"]}
    assert "b-key-1" not in json.dumps(data) and "b-key-2" not in json.dumps(data)
    assert prom_samples(families, "claude_proxy_failovers_total") == {(("kind", "503"), ("provider", "default")): 1}
    assert prom_samples(families, "claude_proxy_upstream_failures_total") == {(("kind", "503"), ("provider", "default")): 1}
    assert prom_samples(families, "claude_proxy_provider_cooling") == {
        (("provider", "default"),): 1, (("provider", "backup"),): 0}


@pytest.mark.parametrize("client_key,host,authorization,x_api_key,expected", [
    ("", "127.0.0.1", "", "", None), ("", "::1", "", "", None), ("", "127.0.0.2", "", "", None),
    ("", "0.0.0.0", "", "", 403), ("", "10.1.2.3", "Bearer anything", "", 403),
    ("k-123", "127.0.0.1", "", "", 401), ("k-123", "0.0.0.0", "Bearer k-123", "", None),
    ("k-123", "0.0.0.0", "bearer  k-123 ", "", None), ("k-123", "0.0.0.0", "", "k-123", None),
    ("k-123", "127.0.0.1", "Bearer k-124", "k-12", 401)])
def test_status_access_rules(client_key, host, authorization, x_api_key, expected):
    error = cp.status_access_error(client_key, host, authorization, x_api_key)
    assert (error and error.status) == expected
    if expected == 403:
        assert error.error_type == "permission_error" and "ANTHROPIC_API_KEY" in error.message


@pytest.mark.parametrize("host,client_key", [("127.0.0.1", ""), ("0.0.0.0", ""), ("127.0.0.1", "client-key-1234567")])
def test_status_routes_keys_on_the_real_server(upstream, host, client_key):
    with running_proxy(upstream.url, host=host, anthropic_api_key=client_key) as server:
        client = Client(server)
        html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        allowed = host == "127.0.0.1" and not client_key
        for path in ("/status.json", "/metrics"):
            response, payload = client.call("GET", path)
            assert response.status == (200 if allowed else 401 if client_key else 403), (path, payload)
            if not allowed:
                assert json.loads(payload)["type"] == "error"
        response, page = client.call("GET", "/", headers=html)
        # with a key the page itself (no data in it) is served, and asks for the key
        assert response.status == (403 if host == "0.0.0.0" else 200)
        if response.status == 200:
            assert response.getheader("Content-Type") == "text/html; charset=utf-8"
            assert "default-src 'none'" in response.getheader("Content-Security-Policy")
            assert b"/status.json" in page and b"sessionStorage" in page
            assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page), "an external asset"
        # Claude Code's probes and curl still get the health answer
        assert client.json("GET", "/")[2]["status"] == "ok"
        response, payload = client.call("HEAD", "/", headers=html)
        assert response.status == 200 and payload == b""
        if client_key:
            for headers in ({"Authorization": "Bearer " + client_key}, {"x-api-key": client_key}):
                assert client.call("GET", "/metrics", headers=headers)[0].status == 200
                assert client.json("GET", "/status.json", headers=headers)[2]["settings"]
            assert client_key not in json.dumps(client.json("GET", "/status.json", headers=headers)[2])


def test_models_list_each_tier_under_a_claude_id_with_its_upstream_model(proxy):
    listing = Client(proxy).json("GET", "/v1/models")[2]["data"]
    tiers = [m for m in listing if m["id"].startswith("claude")]
    assert [(m["id"], m["display_name"]) for m in tiers] == [
        ("claude-opus", "claude-opus (served by gpt-4o)"), ("claude-sonnet", "claude-sonnet (served by gpt-4o)"),
        ("claude-haiku", "claude-haiku (served by gpt-4o-mini)")]


@pytest.mark.parametrize("provider,cache_key,expected", [
    ("openai", "sess-1", "sess-1"), ("openai", "", None), ("generic", "sess-1", None), ("deepseek", "sess-1", None)])
def test_session_id_is_the_openai_prompt_cache_key(provider, cache_key, expected):
    settings = cp.Settings(provider=provider)
    request = req()
    body = cp.to_openai(request, settings, cache_key=cache_key)
    assert body.get("prompt_cache_key") == expected and request == req()


def test_session_id_logged_and_sent_upstream_end_to_end(upstream, caplog):
    with running_proxy(upstream.url, provider="openai") as server:
        with caplog.at_level(logging.INFO, logger="claude_proxy"):
            client = Client(server)          # one connection: each line is written before the next request
            client.json("POST", "/v1/messages", req(), {"x-claude-code-session-id": "0d5c-sess"})
            client.json("POST", "/v1/messages", req())
            client.json("GET", "/health")
    assert upstream.requests[0]["body"]["prompt_cache_key"] == "0d5c-sess"
    assert "prompt_cache_key" not in upstream.requests[1]["body"]
    with running_proxy(upstream.url, provider="openai", openai_api="responses") as server:
        Client(server).json("POST", "/v1/messages", req(), {"x-claude-code-session-id": "0d5c-sess"})
    assert upstream.requests[-1]["path"] == "/v1/responses"
    assert upstream.requests[-1]["body"]["prompt_cache_key"] == "0d5c-sess"      # /responses takes it too
    lines = [r for r in caplog.records if "POST /v1/messages 200" in r.getMessage()]
    assert "session=0d5c-sess" in lines[0].getMessage() and lines[0].access["session"] == "0d5c-sess"
    assert "session=" not in lines[1].getMessage()


@pytest.mark.parametrize("argv,proxy_args,claude_args", [
    (["--port", "9", "--check"], ["--port", "9", "--check"], None),
    (["claude"], [], []),
    (["--big-model", "claude", "claude", "-p", "claude"], ["--big-model", "claude"], ["-p", "claude"]),
    (["--big-model=x", "--check", "claude", "--model", "opus"], ["--big-model=x", "--check"], ["--model", "opus"]),
    (["--", "claude"], ["--", "claude"], None)])
def test_launcher_argv_split(argv, proxy_args, claude_args):
    assert cp.split_launcher_argv(argv) == (proxy_args, claude_args)


FAKE_CLAUDE = """#!%s
import json, os, sys, urllib.request
request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/models",
                                 headers={"Authorization": "Bearer " + os.environ["ANTHROPIC_AUTH_TOKEN"]})
models = json.load(urllib.request.urlopen(request, timeout=10))
print(json.dumps({"args": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith("ANTHROPIC_")},
                  "first_model": models["data"][0]["id"], "tty_stdin": os.isatty(0)}))
sys.exit(int(os.environ.get("FAKE_CLAUDE_EXIT", "0")))
"""


def run_launcher(tmp_path, path, *args, env=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    return subprocess.run([sys.executable, os.path.join(HERE, "claude_proxy.py")] + list(args),
                          env=dict(base, PATH=path, TMPDIR=str(tmp_path), **(env or {})), cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


@pytest.mark.parametrize("client_key", ["", "client-launch-key-123456"])
def test_launcher_runs_claude_against_the_proxy_and_ends_with_its_status(upstream, tmp_path, client_key):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").write_text(FAKE_CLAUDE % sys.executable)
    (bin_dir / "claude").chmod(0o755)
    flags = ["--anthropic-api-key", client_key] if client_key else []
    done = run_launcher(tmp_path, str(bin_dir) + os.pathsep + os.environ.get("PATH", ""), "--openai-base-url",
                        upstream.url, "--port", "8082", *flags, "claude", "-p", "say hi", "--model", "opus",
                        env={"FAKE_CLAUDE_EXIT": "7", "ANTHROPIC_API_KEY": "env-key-would-be-asked-about",
                             "ANTHROPIC_AUTH_TOKEN": "old-token"})
    assert done.returncode == 7, done.stderr
    seen = json.loads(done.stdout)
    assert seen["args"] == ["-p", "say hi", "--model", "opus"] and seen["first_model"] == "claude-opus"
    port = int(re.match(r"http://127\.0\.0\.1:(\d+)\Z", seen["env"].pop("ANTHROPIC_BASE_URL")).group(1))
    assert port != 8082            # a free port, whatever PORT says
    # without the flag, the environment's ANTHROPIC_API_KEY is the proxy's client key, passed on as the token
    assert seen["env"] == {"ANTHROPIC_AUTH_TOKEN": client_key or "env-key-would-be-asked-about"}
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    log_path = re.match(r"claude-code-proxy: serving Claude Code on http://127\.0\.0\.1:%d; log in (\S+)\Z" % port,
                        lines[0]).group(1)
    assert os.path.dirname(log_path) == str(tmp_path)
    with open(log_path) as handle:
        log_text = handle.read()
    assert "listening on http://127.0.0.1:%d" % port in log_text and "GET /v1/models 200" in log_text
    assert not client_key or client_key not in log_text


def test_launcher_without_claude_is_one_line_and_127(tmp_path):
    done = run_launcher(tmp_path, str(tmp_path), "--openai-base-url", "http://127.0.0.1:9/v1", "claude", "-p", "x")
    assert done.returncode == 127 and done.stdout == b""
    assert done.stderr.decode().count("\n") == 1 and "no `claude` command on PATH" in done.stderr.decode()
    assert os.listdir(str(tmp_path)) == []          # no log file either


class DevTools:
    """Just enough of the Chrome DevTools protocol over a WebSocket (RFC 6455) for a test: one
    page target, commands sent as masked text frames, answers matched by id (events skipped)."""

    def __init__(self, port):
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as conn:
            conn.request("GET", "/json/list")
            targets = json.loads(conn.getresponse().read())
        url = [t for t in targets if t["type"] == "page"][0]["webSocketDebuggerUrl"]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           % (url.split(str(port), 1)[1], port, key)).encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id = 0

    def _recv(self):
        data = self.sock.recv(65536)
        assert data, "DevTools closed the connection"
        return data

    def _read(self, n):
        while len(self.buffer) < n:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _message(self):
        parts = []
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if first & 0x0F in (0x0, 0x1):
                parts.append(payload)
                if first & 0x80:
                    return json.loads(b"".join(parts))

    def call(self, method, **params):
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        length = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else
                                bytes([0x80 | 126]) + struct.pack("!H", length) if length < 65536 else
                                bytes([0x80 | 127]) + struct.pack("!Q", length))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            message = self._message()
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        self.sock.close()


def test_status_page_in_headless_chromium_shows_a_new_request_without_a_reload(upstream, proxy, tmp_path):
    import shutil
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    assert os.path.exists(chromium), "install Debian's chromium package (apt-get install -y chromium)"
    profile = tmp_path / "profile"
    browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                "--user-data-dir=%s" % profile, "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    devtools = None
    try:
        active = profile / "DevToolsActivePort"
        assert wait_for(lambda: active.exists() and len(active.read_text().split("\n")) >= 2, 30), "no DevTools port"
        devtools = DevTools(int(active.read_text().split("\n")[0]))
        devtools.call("Page.navigate", url="http://127.0.0.1:%d/" % proxy.server_address[1])
        rendered = "document.getElementById('main') && document.getElementById('main').style.display === ''"
        assert wait_for(lambda: devtools.evaluate(rendered), 20), devtools.evaluate("document.body.innerText")
        assert devtools.evaluate("document.getElementById('recent').textContent.indexOf('<b>') < 0")
        devtools.evaluate("window.loadedOnce = 42")
        model = 'claude-sonnet-<b>bold</b>-"browser"'
        upstream.script.append(json_reply(completion({"content": "seen"}, usage={"prompt_tokens": 31, "completion_tokens": 4})))
        assert Client(proxy).json("POST", "/v1/messages", req(model=model))[0] == 200
        row = ("Array.from(document.querySelectorAll('#recent tr')).map(function (r) { return r.textContent; })"
               ".filter(function (t) { return t.indexOf(%s) >= 0; })[0] || ''" % json.dumps(model))
        assert wait_for(lambda: devtools.evaluate(row), 20), devtools.evaluate("document.body.innerText")
        assert devtools.evaluate("window.loadedOnce") == 42              # the same page: no reload
        text = devtools.evaluate(row)
        assert "/v1/messages" in text and "\u2192 default/gpt-4o" in text and "31" in text and "200" in text
        assert devtools.evaluate("document.querySelectorAll('#recent b').length") == 0   # text, never markup
        assert devtools.evaluate("document.getElementById('totals').textContent.indexOf('gpt-4o') >= 0")
        assert devtools.evaluate("document.querySelectorAll('#chart rect').length") >= 1
    finally:
        if devtools is not None:
            devtools.close()
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(10)
