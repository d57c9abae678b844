#!/usr/bin/env python3
"""claude-code-proxy: the Anthropic Messages API in front of any OpenAI-compatible provider.

One file, Python 3.8+ standard library only. It accepts ``POST /v1/messages`` (streaming and
not) as sent by Claude Code and the Anthropic SDKs, translates it to ``POST
{OPENAI_BASE_URL}/chat/completions`` (or OpenAI's ``/responses``), and translates the answer
back: text, tool calls, reasoning, stop reasons, usage and errors. Each model tier may go to its
own provider, with failover along a chain of them.

Run it::

    OPENAI_API_KEY=sk-... python3 claude_proxy.py
    ANTHROPIC_BASE_URL=http://127.0.0.1:8082 ANTHROPIC_AUTH_TOKEN=x claude
    OPENAI_API_KEY=sk-... python3 claude_proxy.py claude     # or both in one command

Settings come from flags, then the environment, then a ``.env`` file in the working
directory (the first that sets a value wins); ``python3 claude_proxy.py --help`` lists them,
and the table is the ``Settings`` class below.

Routes: ``POST /v1/messages`` (any query string), ``POST /v1/messages/count_tokens``,
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET``/``HEAD`` ``/`` and ``/health``; for
people and monitoring, the live status page (``GET /`` from a browser), its data
(``GET /status.json``) and Prometheus metrics (``GET /metrics``).

Layout (each section under a banner; data flows down the list once):
Configuration (Settings, providers and tier chains), Errors, Request (to_openai), Response
(to_anthropic, ThinkSplitter, TextToolCalls), Stream (ToolCalls, StreamTranslator, encode_sse),
Responses API (to_responses, ResponsesStreamTranslator), Tokens, Upstream I/O (Upstream,
Router), Exchange (one request, translate_sse), Web search (run_web_search,
run_provider_search), Status, HTTP server (Handler), Speed-ups (install_speedups), Command line.
Nothing above "Upstream I/O" touches sockets, the environment, the clock or random ids, and
`import claude_proxy` changes nothing in the process (main() installs the speed-ups).
"""

from __future__ import annotations

import argparse
import ast
import base64
import collections
import contextlib
import dataclasses
import email.parser
import http.client
import http.server
import io
import json
import logging
import os
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from bisect import bisect_left, bisect_right
from itertools import accumulate, repeat
from operator import add
from typing import Any, Callable, Deque, Dict, FrozenSet, Iterable, Iterator, List, Mapping, NoReturn, Optional, Tuple

__version__ = "0.1.0"

log = logging.getLogger("claude_proxy")
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# =============================================================================================
# Configuration
# =============================================================================================
# Every setting is one field below: its environment variable, its default and its help text.
# The command-line flag is the field name with dashes (--big-model). Precedence: flag, then the
# real environment, then the .env file, then the default.


def _setting(default: Any, env: str, help: str, aliases: Tuple[str, ...] = ()) -> Any:
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "aliases": aliases})


@dataclasses.dataclass(frozen=True)
class Settings:
    openai_api_key: str = _setting("", "OPENAI_API_KEY", "key sent upstream as Authorization: Bearer")
    openai_base_url: str = _setting(
        "https://api.openai.com/v1", "OPENAI_BASE_URL",
        "upstream base URL; /chat/completions is appended", aliases=("OPENAI_API_BASE",))
    anthropic_api_key: str = _setting(
        "", "ANTHROPIC_API_KEY", "if set, clients must send this key (x-api-key or Bearer)")
    big_model: str = _setting("gpt-4o", "BIG_MODEL", "upstream model for names containing 'opus'")
    middle_model: str = _setting(
        "", "MIDDLE_MODEL", "upstream model for names containing 'sonnet' (default: BIG_MODEL)")
    small_model: str = _setting("gpt-4o-mini", "SMALL_MODEL", "upstream model for names containing 'haiku'")
    host: str = _setting("127.0.0.1", "HOST", "address to listen on")
    port: int = _setting(8082, "PORT", "port to listen on (0 picks a free one)")
    log_level: str = _setting("INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting("text", "LOG_FORMAT", "text, or json: one JSON object a line")
    max_tokens_limit: int = _setting(0, "MAX_TOKENS_LIMIT", "cap on max_tokens sent upstream (0: none)")
    request_timeout: float = _setting(
        600.0, "REQUEST_TIMEOUT", "seconds to wait for the upstream to answer or send more")
    connect_timeout: float = _setting(10.0, "CONNECT_TIMEOUT", "seconds to open an upstream connection")
    ca_bundle: str = _setting(
        "", "CA_BUNDLE", "PEM file of extra certificate authorities to trust for the upstream, added "
        "to the system's (as is SSL_CERT_FILE)")
    max_request_bytes: int = _setting(
        32 * 1024 * 1024, "MAX_REQUEST_BYTES", "largest request body accepted (413 above it)")
    max_concurrency: int = _setting(
        256, "MAX_CONCURRENCY", "requests handled at once; more get 529 overloaded_error (and "
        "connections beyond twice this many are refused the same way)")
    shutdown_grace: float = _setting(
        30.0, "SHUTDOWN_GRACE", "seconds SIGTERM/SIGINT waits for requests in flight (a second signal "
        "exits at once)")
    ping_interval: float = _setting(
        5.0, "PING_INTERVAL", "seconds of upstream silence before a stream gets a ping")
    provider: str = _setting(
        "auto", "PROVIDER", "upstream dialect: auto (from the base URL and model) or one of "
        "openai, azure, gemini, deepseek, openrouter, mistral, groq, ollama, vllm, llamacpp, "
        "lmstudio, generic")
    azure_api_version: str = _setting(
        "2024-10-21", "AZURE_API_VERSION", "api-version for Azure OpenAI deployment URLs")
    upstream_streaming: str = _setting(
        "on", "UPSTREAM_STREAMING", "off: ask the upstream for whole answers and stream them to the "
        "client (for servers that lose tool calls when streaming, as some Ollama builds do)")
    workers: int = _setting(
        1, "WORKERS", "processes serving the port, each with its own threads and upstream "
        "connections (Linux and macOS); one Python process uses about one core")
    pin_cpu: str = _setting(
        "auto", "PIN_CPU", "auto: keep the proxy on one CPU where there are several (Linux): one "
        "Python process runs on one core at a time, and its threads handing the interpreter lock "
        "across cores cost about half its CPU under load; off: any CPU; N: CPU number N")
    reasoning_replay: str = _setting(
        "auto", "REASONING_REPLAY", "assistant field that carries earlier reasoning back upstream: "
        "auto (DeepSeek: reasoning_content), off, reasoning_content or reasoning")
    openai_api: str = _setting(
        "auto", "OPENAI_API", "wire format of the default provider: chat (/chat/completions), responses "
        "(/responses), or auto: responses for models served only there (codex, and -pro on OpenAI and "
        "Azure); NAME_API does the same for provider NAME")
    text_tool_calls: str = _setting(
        "on", "TEXT_TOOL_CALLS", "on: a tool call a model wrote as text (<tool_call>, [TOOL_CALLS], "
        "<|python_tag|>, or an answer that is only such JSON) to an offered tool becomes a tool_use "
        "block, as local servers without a tool parser leave them; off: text stays text")
    failover_timeout: float = _setting(
        60.0, "FAILOVER_TIMEOUT", "seconds a streamed request waits for a provider to start answering "
        "when another provider follows it in the model's chain (0: REQUEST_TIMEOUT)")
    keepalive_timeout: float = _setting(
        60.0, "KEEPALIVE_TIMEOUT", "seconds an idle kept-alive client connection is kept open")
    web_search: str = _setting(
        "", "WEB_SEARCH", "backend the proxy runs Anthropic's web_search tool against: searxng:URL, "
        "brave (BRAVE_API_KEY), tavily (TAVILY_API_KEY), or upstream: the provider's own search "
        "(OpenRouter, OpenAI search models and /responses, Perplexity); unset: searches answer unavailable")
    brave_api_key: str = _setting("", "BRAVE_API_KEY", "Brave Search API key (WEB_SEARCH=brave)")
    tavily_api_key: str = _setting("", "TAVILY_API_KEY", "Tavily API key (WEB_SEARCH=tavily)")
    web_search_timeout: float = _setting(
        15.0, "WEB_SEARCH_TIMEOUT", "seconds one search may take before it answers unavailable")
    brave_base_url: str = _setting("https://api.search.brave.com", "BRAVE_BASE_URL", "Brave Search API base URL")
    tavily_base_url: str = _setting("https://api.tavily.com", "TAVILY_BASE_URL", "Tavily API base URL")
    # Not settings of their own: the providers named by NAME_BASE_URL / NAME_API_KEY and the
    # CUSTOM_HEADER_* headers, read from the environment and .env by load_settings().
    providers: Tuple["ProviderConfig", ...] = ()
    custom_headers: Tuple[Tuple[str, str], ...] = ()

    @property
    def middle(self) -> str:
        return self.middle_model or self.big_model


SETTING_FIELDS = tuple(f for f in dataclasses.fields(Settings) if "env" in f.metadata)
_CONVERTERS: Dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


def parse_dotenv(text: str) -> Dict[str, str]:
    """KEY=VALUE lines; `export ` prefixes, comments and surrounding quotes are allowed."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, value = line.split("=", 1)
        key, value = key.strip(), value.strip()
        if value[:1] in ("'", '"') and value.find(value[0], 1) > 0:
            value = value[1:value.find(value[0], 1)]      # a quoted value; anything after is a comment
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line saying what to fix, not argparse's usage block."""
        self.exit(2, "claude-code-proxy: %s (see --help)\n" % message)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="claude-code-proxy",
        epilog="providers: a model setting may be NAME/model, NAME defined by NAME_BASE_URL, NAME_API_KEY, "
        "NAME_PROVIDER and NAME_HEADER_* (deepseek, openrouter, groq, mistral and gemini need only "
        "their NAME_API_KEY; ollama and lmstudio nothing); several, comma-separated, are a failover "
        "chain (BIG_MODEL=gpt-5,deepseek/deepseek-v4-pro). Several keys, comma-separated, are used "
        "in turn. CUSTOM_HEADER_X_CORP_TEAM=v sends X-Corp-Team: v upstream.",
        description="Anthropic Messages API proxy for OpenAI-compatible providers. Every setting "
        "is a flag, an environment variable or a line in .env; flags win over the environment, "
        "which wins over .env.")
    for f in SETTING_FIELDS:
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.metadata["env"],
            help=f.metadata["help"] + ("" if "default" in f.metadata["help"] else " (default: %r)" % f.default))
    parser.add_argument("--env-file", default=".env", help="the .env file to read (default: .env)")
    parser.add_argument("--check", action="store_true",
                        help="check the setup and exit: the effective settings (keys masked), then "
                        "DNS, connection, TLS, the model list and a one-token answer from each "
                        "mapped model, each step with what to fix when it fails (exit status 0 "
                        "when all pass)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def load_settings(environ: Dict[str, str], argv: List[str], dotenv_text: str = "") -> Settings:
    """Settings from flags, then `environ`, then the .env text. Raises ValueError on bad values."""
    args = build_arg_parser().parse_args(argv)
    dotenv = parse_dotenv(dotenv_text)
    values = {}
    for f in SETTING_FIELDS:
        raw = getattr(args, f.name)
        if raw is None:
            for name in (f.metadata["env"],) + f.metadata["aliases"]:
                raw = environ.get(name)
                if raw is None:
                    raw = dotenv.get(name)
                if raw is not None:
                    break
        if raw is None:
            continue
        raw = raw.strip()
        if "\n" in raw or "\r" in raw:
            raise ValueError("%s contains a line break" % f.metadata["env"])
        if raw == "" and f.type != "str":
            continue
        try:
            values[f.name] = _CONVERTERS[f.type](raw)
        except ValueError:
            raise ValueError("%s must be a %s, got %r" % (
                f.metadata["env"], "whole number" if f.type == "int" else "number", raw)) from None
    merged = dict(dotenv)
    merged.update(environ)
    values["custom_headers"] = header_settings(merged, "CUSTOM_HEADER_")
    settings = Settings(**values)
    settings = dataclasses.replace(settings, providers=provider_configs(merged, settings))
    check_settings(settings)
    check_providers(settings, (k for k, v in merged.items() if k.endswith("_API_KEY") and v.strip()))
    return settings


CHOICES = {"log_level": ("DEBUG", "INFO", "WARNING", "ERROR"), "log_format": ("text", "json"),
           "openai_api": ("chat", "responses", "auto"),
           "upstream_streaming": ("on", "off"), "text_tool_calls": ("on", "off"),
           "reasoning_replay": ("auto", "off", "reasoning_content", "reasoning")}


def check_settings(settings: Settings) -> None:
    """Values that cannot work stop start-up here, with one line naming the setting."""
    for name, choices in CHOICES.items():
        value = getattr(settings, name)
        if value.lower() not in (c.lower() for c in choices):
            raise ValueError("%s must be one of %s, got %r" % (
                name.upper(), ", ".join(choices), value))
    url = urllib.parse.urlsplit(settings.openai_base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("OPENAI_BASE_URL must start with https:// or http:// and name a host, got %r"
                         % settings.openai_base_url)
    try:
        url.port
    except ValueError:
        raise ValueError("OPENAI_BASE_URL has a bad port: %r" % settings.openai_base_url) from None
    if not 0 <= settings.port <= 65535:
        raise ValueError("PORT must be between 0 and 65535, got %d" % settings.port)
    for name in ("request_timeout", "connect_timeout", "ping_interval", "max_request_bytes",
                 "max_concurrency", "workers", "web_search_timeout"):
        if getattr(settings, name) <= 0:
            raise ValueError("%s must be more than 0, got %s" % (name.upper(), getattr(settings, name)))
    if settings.pin_cpu.lower() not in ("auto", "off", "-1") and not DIGITS.match(settings.pin_cpu):
        raise ValueError("PIN_CPU must be auto, off or a CPU number, got %r" % settings.pin_cpu)
    if settings.shutdown_grace < 0 or settings.max_tokens_limit < 0:
        raise ValueError("SHUTDOWN_GRACE and MAX_TOKENS_LIMIT cannot be negative")
    if settings.ca_bundle:
        if not os.path.isfile(settings.ca_bundle):
            raise ValueError("CA_BUNDLE: no such file: %r" % settings.ca_bundle)
        try:
            ssl.create_default_context().load_verify_locations(cafile=settings.ca_bundle)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError("CA_BUNDLE %r is not a PEM file of certificates (%s)" % (
                settings.ca_bundle, getattr(exc, "reason", None) or exc)) from None
    check_web_search(settings)
    resolve_dialect(settings, "")


def describe_settings(settings: Settings) -> str:
    """One line per setting, secrets masked: for --check and the debug log."""
    lines = []
    for f in SETTING_FIELDS:
        value = getattr(settings, f.name)
        if f.name.endswith("api_key"):
            value = ("set (%d characters)" % len(value)) if value else "not set"
        elif f.name == "middle_model" and not value:
            value = "%s (BIG_MODEL)" % settings.big_model
        elif f.name == "provider" and value == "auto":
            value = "auto: %s" % resolve_dialect(settings, "").name
        elif value is None or isinstance(value, (str, tuple, list)) and not value:
            value = "not set"           # (CA_BUNDLE printed as a blank)
        lines.append("%-19s %s" % (f.metadata["env"], value))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Providers: every way an upstream bends the Chat Completions format is named here, once.
# The stream translator copes with the response-side bends of all of them at once (they do
# not conflict); the request side is shaped by the dialect below.


@dataclasses.dataclass(frozen=True)
class Dialect:
    name: str
    api_key_header: bool = False           # Azure: `api-key: KEY` instead of Bearer
    completion_tokens_field: bool = False  # OpenAI: max_completion_tokens for every model
    clean_schemas: bool = False            # Gemini: rejects JSON-schema keywords outside OpenAPI 3.0
    short_tool_ids: bool = False           # Mistral: tool call ids of exactly 9 [a-zA-Z0-9]
    reasoning_replay: str = ""             # field that carries earlier reasoning back, or ""
    reasoning_object: bool = False         # OpenRouter: reasoning: {effort} for every model
    thinking_toggle: bool = False          # DeepSeek: thinking: {type} and reasoning_effort up to max
    thought_signatures: bool = False       # Gemini 3: replayed tool calls need a thought_signature
    accepts_pdf: bool = True               # takes {"type": "file"} parts with a PDF
    prompt_cache_key: bool = False         # OpenAI: prompt_cache_key keeps a session on one cache


DIALECTS = {d.name: d for d in (
    Dialect("openai", completion_tokens_field=True, prompt_cache_key=True),
    Dialect("azure", api_key_header=True),
    Dialect("gemini", clean_schemas=True, thought_signatures=True),
    # DeepSeek (thinking mode with tools): 400 unless earlier reasoning comes back.
    Dialect("deepseek", reasoning_replay="reasoning_content", thinking_toggle=True, accepts_pdf=False),
    Dialect("openrouter", reasoning_object=True),
    Dialect("mistral", short_tool_ids=True, accepts_pdf=False),
    Dialect("groq", accepts_pdf=False),
    Dialect("ollama", accepts_pdf=False),
    Dialect("vllm", accepts_pdf=False),
    Dialect("llamacpp", accepts_pdf=False),
    Dialect("lmstudio", accepts_pdf=False),
    Dialect("generic"),
)}

# (substring of the base URL's host name, dialect), first match wins; then default ports
PROVIDER_HOSTS = (
    (".openai.azure.com", "azure"), (".cognitiveservices.azure.com", "azure"),
    (".services.ai.azure.com", "azure"), ("generativelanguage.googleapis.com", "gemini"),
    ("api.deepseek.com", "deepseek"), ("openrouter.ai", "openrouter"), ("api.mistral.ai", "mistral"),
    ("api.groq.com", "groq"), ("api.openai.com", "openai"),
)
PROVIDER_PORTS = {11434: "ollama", 1234: "lmstudio"}
# Mistral's chat templates (mlx-lm, llama.cpp) enforce its 9-character ids on any server.
MISTRAL_MODELS = re.compile(r"mistral|mixtral|codestral|devstral|magistral|ministral|pixtral", re.I)


def resolve_dialect(settings: Settings, model: str, config: Optional["ProviderConfig"] = None) -> Dialect:
    """The dialect for an upstream model: PROVIDER (or NAME_PROVIDER) if set, else from the base
    URL's host, else the provider's name when it is a dialect's (VLLM_BASE_URL), then adjusted by
    the model name (a Gemini model needs clean schemas wherever it runs)."""
    name = (config.provider if config is not None else settings.provider).lower()
    if name == "auto":
        url = urllib.parse.urlsplit(config.base_url if config is not None else settings.openai_base_url)
        hostname = (url.hostname or "").lower()
        try:
            port = url.port
        except ValueError:
            port = None
        name = next((d for host, d in PROVIDER_HOSTS if host in hostname), PROVIDER_PORTS.get(port, "generic"))
        if name == "generic" and config is not None and config.name in DIALECTS:
            name = config.name
    if name not in DIALECTS:
        raise ValueError("PROVIDER must be auto or one of %s, got %r" % (", ".join(DIALECTS), name))
    dialect = DIALECTS[name]
    lower = model.lower()
    if "gemini" in lower and not dialect.clean_schemas and name != "openrouter":
        dialect = dataclasses.replace(dialect, clean_schemas=True, thought_signatures=True)
    if MISTRAL_MODELS.search(lower) and name in ("generic", "vllm", "llamacpp", "lmstudio", "ollama"):
        dialect = dataclasses.replace(dialect, short_tool_ids=True)
    replay = settings.reasoning_replay.lower()
    if replay != "auto":
        dialect = dataclasses.replace(dialect, reasoning_replay="" if replay == "off" else replay)
    return dialect


# ---------------------------------------------------------------------------------------------
# Providers and tiers. The provider behind OPENAI_BASE_URL / OPENAI_API_KEY is the default
# one. Another is named NAME by NAME_BASE_URL (and NAME_API_KEY, NAME_PROVIDER, NAME_HEADER_*);
# the well-known ones below need only their key, and the local ones nothing. A model setting
# `NAME/model` sends that tier to provider NAME; a prefix that names no provider is part of the
# model name (`Qwen/Qwen3-Coder` goes to the default provider unchanged). Several entries,
# comma-separated, are a failover chain. Keys may be several, comma-separated: used in turn.

DEFAULT_PROVIDER = "default"
WELL_KNOWN_PROVIDERS = {        # name -> (base URL, whether it needs a key)
    "deepseek": ("https://api.deepseek.com", True),
    "openrouter": ("https://openrouter.ai/api/v1", True),
    "groq": ("https://api.groq.com/openai/v1", True),
    "mistral": ("https://api.mistral.ai/v1", True),
    "gemini": ("https://generativelanguage.googleapis.com/v1beta/openai", True),
    "ollama": ("http://127.0.0.1:11434/v1", False),
    "lmstudio": ("http://127.0.0.1:1234/v1", False),
}
# Prefixes that never name a provider: ANTHROPIC_* configures the client side, and OPENAI_* is
# the default provider, whose model names (OpenRouter's `openai/gpt-5`) may start that way.
NOT_PROVIDERS = ("anthropic", "openai", "custom")
PROVIDER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,40}\Z")


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: str
    api_keys: Tuple[str, ...] = ()
    provider: str = "auto"                       # its dialect, or auto
    headers: Tuple[Tuple[str, str], ...] = ()    # extra headers for this provider only
    api: str = "auto"                            # chat, responses or auto (NAME_API)


def split_list(value: str) -> Tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def header_name(words: str) -> str:
    """X_CORP_TEAM -> X-Corp-Team."""
    return "-".join(word.capitalize() for word in words.split("_") if word)


def header_settings(environ: Dict[str, str], prefix: str) -> Tuple[Tuple[str, str], ...]:
    """The headers of every PREFIX* variable, sorted by name (so the order is stable)."""
    return tuple(sorted((header_name(name[len(prefix):]), value.strip()) for name, value in environ.items()
                        if name.startswith(prefix) and len(name) > len(prefix) and value.strip()))


def provider_configs(environ: Dict[str, str], settings: Settings) -> Tuple[ProviderConfig, ...]:
    """The default provider, then every provider the environment defines (NAME_BASE_URL, or a
    well-known NAME with its key, or a local one), sorted by name."""
    providers = [ProviderConfig(DEFAULT_PROVIDER, settings.openai_base_url, split_list(settings.openai_api_key),
                                settings.provider, (), settings.openai_api)]
    names = set(WELL_KNOWN_PROVIDERS)
    names.update(n[:-9].lower() for n in environ if n.endswith("_BASE_URL") and PROVIDER_NAME.match(n[:-9]))
    for name in sorted(names):
        if name in NOT_PROVIDERS:
            continue
        upper = name.upper()
        base_url = environ.get(upper + "_BASE_URL", "").strip()
        keys = split_list(environ.get(upper + "_API_KEY", ""))
        if not base_url:
            known = WELL_KNOWN_PROVIDERS.get(name)
            if known is None or (known[1] and not keys):
                continue
            base_url = known[0]
        providers.append(ProviderConfig(name, base_url, keys, (environ.get(upper + "_PROVIDER") or "auto").strip(),
                                        header_settings(environ, upper + "_HEADER_"),
                                        (environ.get(upper + "_API") or "auto").strip()))
    return tuple(providers)


@dataclasses.dataclass(frozen=True)
class ChainEntry:
    provider: str           # a ProviderConfig name
    model: str              # the model name sent to it


def model_chain(value: str, provider_names: Iterable[str]) -> Tuple[ChainEntry, ...]:
    """A model setting (or a model a client names) -> its failover chain."""
    names = set(provider_names)
    chain = []
    for entry in split_list(value) or (value,):
        prefix, slash, rest = entry.partition("/")
        if slash and rest and prefix.lower() in names:     # (default/… names the default one)
            chain.append(ChainEntry(prefix.lower(), rest))
        else:
            chain.append(ChainEntry(DEFAULT_PROVIDER, entry))
    return tuple(chain)


def check_providers(settings: Settings, environ_keys: Iterable[str] = ()) -> None:
    """Provider definitions that cannot work stop start-up with one line."""
    names = {p.name for p in settings.providers}
    for config in settings.providers:
        label = "OPENAI_BASE_URL" if config.name == DEFAULT_PROVIDER else config.name.upper() + "_BASE_URL"
        url = urllib.parse.urlsplit(config.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("%s must start with https:// or http:// and name a host, got %r" % (label, config.base_url))
        try:
            url.port
        except ValueError:
            raise ValueError("%s has a bad port: %r" % (label, config.base_url)) from None
        if config.provider.lower() != "auto" and config.provider.lower() not in DIALECTS:
            raise ValueError("%s_PROVIDER must be auto or one of %s, got %r" % (
                config.name.upper(), ", ".join(DIALECTS), config.provider))
        if config.api.lower() not in ("chat", "responses", "auto"):
            raise ValueError("%s_API must be chat, responses or auto, got %r" % (
                "OPENAI" if config.name == DEFAULT_PROVIDER else config.name.upper(), config.api))
    keyed = set(environ_keys)
    for setting in ("big_model", "middle_model", "small_model"):
        for entry in split_list(getattr(settings, setting)):
            prefix, slash, rest = entry.partition("/")
            name = prefix.upper()
            if slash and prefix.lower() not in names and name + "_API_KEY" in keyed \
                    and prefix.lower() not in NOT_PROVIDERS:
                raise ValueError("%s names provider %r: %s_API_KEY is set but %s_BASE_URL is not (set it "
                                 "to the provider's OpenAI-compatible URL)" % (
                                     setting.upper(), prefix, name, name))


# =============================================================================================
# Errors
# =============================================================================================
# ProxyError is raised anywhere and turned into a response in exactly one place (the handler):
# an HTTP error before a stream has started, an `event: error` after. The Anthropic SDKs retry
# 408/409/429/5xx and Claude Code retries on top of them, so a fault that a retry cannot fix
# is never a 5xx and carries `x-should-retry: false`.


class ProxyError(Exception):
    def __init__(self, status: int, error_type: str, message: str,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})
        self.upstream_status = 0                 # set for errors the upstream answered
        self.kind = ""                           # "connect" or "timeout" for transport faults
        self.param: Any = None
        self.upstream_message = ""
        if status < 500 and status not in (408, 409, 429):
            self.headers.setdefault("x-should-retry", "false")


def json_bytes(value: Any) -> bytes:
    """Compact JSON as ASCII bytes: non-ASCII text goes out as \\uXXXX escapes. That is about
    twice as fast as UTF-8 output for a large body, and a lone surrogate (a string the client
    cut mid-emoji, which has no UTF-8 form) goes back out as the escape it came in as."""
    return _encode_json(value).encode("ascii")


# json.dumps with any argument builds a new JSONEncoder per call; this one is made once.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def error_body(error_type: str, message: str) -> Dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


# upstream HTTP status -> (status for the client, Anthropic error type)
UPSTREAM_STATUS_TO_ERROR = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    402: (402, "billing_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    408: (408, "timeout_error"),
    409: (409, "api_error"),
    413: (413, "request_too_large"),
    422: (400, "invalid_request_error"),
    429: (429, "rate_limit_error"),
    500: (500, "api_error"),
    502: (502, "api_error"),
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
    529: (529, "overloaded_error"),
}

# Anthropic error types for an error object an upstream sends inside a 200 stream
STREAM_ERROR_CODES = {429: "rate_limit_error", "rate_limit_exceeded": "rate_limit_error",
                      503: "overloaded_error", 529: "overloaded_error", "overloaded": "overloaded_error"}


def upstream_error_message(payload: Any, fallback: str) -> str:
    """The human message in an upstream error body: OpenAI's {"error": {...}}, Gemini's list
    of those, {"message"}, {"detail"}, or the first 300 characters of an HTML or text page."""
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, str):
            return inner
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail") or inner.get("msg")
            if isinstance(message, str) and message:
                failed = inner.get("failed_generation")
                # Groq: a malformed tool call comes back as 400 tool_use_failed with the text.
                return message + ("\nfailed_generation: " + failed if isinstance(failed, str) else "")
            return json.dumps(inner)[:300]
    text = re.sub(r"<[^>]+>", " ", str(payload if payload is not None else fallback))
    return " ".join(text.split())[:300] or fallback


def _error_object(payload: Any) -> Optional[Dict[str, Any]]:
    """The error object of an upstream error body ({"error": {...}}, Gemini's list of those, or
    the body itself), or None."""
    inner = payload[0] if isinstance(payload, list) and payload else payload
    inner = inner.get("error", inner) if isinstance(inner, dict) else None
    return inner if isinstance(inner, dict) else None


def _room(context: Any, prompt: Any) -> int:
    """Output tokens left in a context window, less 1 % (some providers count approximately)."""
    return int(context) - int(prompt) - int(context) // 100


# Context-window wordings, each provider its own: (pattern, how to get (prompt tokens, context
# tokens) from its groups, whether the output the request asked for counted too). When it did
# and the prompt leaves room, the fault is max_tokens, which fix_from_error lowers; otherwise the
# prompt itself does not fit, and Claude Code compacts the conversation when told so in
# Anthropic's words.
def _prompt_context(g: Any) -> Tuple[int, int]:
    return int(g[0]), int(g[1])


def _context_prompt(g: Any) -> Tuple[int, int]:
    return int(g[1]), int(g[0])


def _total_less_output(g: Any) -> Tuple[int, int]:
    return int(g[1]) - int(g[2]), int(g[0])


CONTEXT_WINDOW_PATTERNS = (
    # OpenAI (and Azure, Groq): "...is N tokens. However, your messages resulted in M tokens."
    (re.compile(r"maximum context length is (\d{1,12}) tokens\. However, your messages resulted in (\d{1,12}) tokens"),
     _context_prompt, False),
    # vLLM: "...is N tokens. However, your request has M input tokens. Please reduce..."
    (re.compile(r"maximum context length is (\d{1,12}) tokens\. However, your request has (\d{1,12}) input tokens"),
     _context_prompt, False),
    # vLLM: "'max_tokens' ... is too large: X. ...is N tokens and your request has M input tokens (X > N - M)"
    (re.compile(r"maximum context length is (\d{1,12}) tokens and your request has (\d{1,12}) input"),
     _context_prompt, True),
    # vLLM (newer): "...However, you requested X output tokens and your prompt contains at least M input tokens"
    (re.compile(r"maximum context length is (\d{1,12}) tokens\. However, you requested \d{1,12} output tokens "
                r"and your prompt contains at least (\d{1,12}) input"), _context_prompt, True),
    # OpenAI (older), DeepSeek, vLLM (older): "However, you requested T tokens (P in the messages,
    # [F in the functions, and] C in the completion)": the prompt is T - C.
    (re.compile(r"maximum context length is (\d{1,12}) tokens\. However, you requested (\d{1,12}) tokens "
                r"\([^)]*?(\d{1,12}) in the completion\)"), _total_less_output, True),
    # OpenRouter: "However, you requested about T tokens (A of text input, [B of tool input,] C in the output)"
    (re.compile(r"maximum context length is (\d{1,12}) tokens\. However, you requested about (\d{1,12}) tokens "
                r"\([^)]*?(\d{1,12}) in the output\)"), _total_less_output, True),
    # OpenAI (old completions): "...is N tokens, however you requested T tokens (P in your prompt; C for the completion)"
    (re.compile(r"maximum context length is (\d{1,12}) tokens, however you requested \d{1,12} tokens "
                r"\((\d{1,12}) in your prompt"), _context_prompt, True),
    # Gemini: "The input token count (N) exceeds the maximum number of tokens allowed (M)."
    (re.compile(r"input token count \((\d{1,12})\) exceeds the maximum number of tokens allowed \((\d{1,12})\)"),
     _prompt_context, False),
    # llama.cpp server: "request (N tokens) exceeds the available context size (M tokens), try increasing it"
    (re.compile(r"request \((\d{1,12}) tokens\) exceeds (?:the available )?context size \((\d{1,12}) tokens\)"),
     _prompt_context, False),
    # Mistral: "Prompt contains N tokens[ and 0 draft tokens], too large for model with M maximum context length"
    (re.compile(r"prompt contains (\d{1,12}) tokens[^.]{0,80}?too large for model with (\d{1,12}) maximum context length",
                re.I), _prompt_context, False),
    # LM Studio: "Trying to keep the first N tokens when context the overflows. However, the model is
    # loaded with context length of only M tokens, which is not enough."
    (re.compile(r"keep the first (\d{1,12}) tokens when context the overflows\. However, the model is loaded "
                r"with context length of only (\d{1,12}) tokens"), _prompt_context, False),
    # LM Studio (llama.cpp engine): "Cannot truncate prompt with n_keep (N) >= n_ctx (M)"
    (re.compile(r"n_keep \((\d{1,12})\) >= n_ctx \((\d{1,12})\)"), _prompt_context, False),
    # vLLM (engine): "The decoder prompt (length N) is longer than the maximum model length of M."
    # and "Prompt length of N is longer than the maximum model length of M."
    (re.compile(r"prompt (?:\(length |length of )(\d{1,12})\)? is longer than the maximum model length of (\d{1,12})",
                re.I), _prompt_context, False),
    # Anthropic-compatible upstreams (OpenRouter in front of Claude): already Anthropic's words
    (re.compile(r"prompt is too long: (\d{1,12}) tokens > (\d{1,12}) maximum"), _prompt_context, False),
)
# Overflows said without both numbers: llama.cpp (older builds), Ollama ("prompt too long;
# exceeded max context length by N tokens"), LM Studio (its own wording, and its MLX engine's).
CONTEXT_OVERFLOW_WORDS = ("exceeds the available context size", "prompt too long; exceeded",
                          "tokens to keep from the initial prompt is greater than the context length",
                          "context size has been exceeded")
# Error codes and types that say so whatever the message: OpenAI's and Groq's code (Groq's
# message is only "Please reduce the length of the messages or completion."), llama.cpp's type
# (which also carries n_prompt_tokens and n_ctx).
CONTEXT_OVERFLOW_CODES = ("context_length_exceeded", "exceed_context_size_error")


def context_window(message: str) -> Optional[Tuple[int, int, bool]]:
    """(prompt tokens, context tokens, whether the requested output counted too) from a
    context-window wording of CONTEXT_WINDOW_PATTERNS, or None."""
    if "context" not in message and "maximum" not in message and "n_ctx" not in message:
        return None
    for pattern, numbers, with_output in CONTEXT_WINDOW_PATTERNS:
        match = pattern.search(message)
        if match:
            prompt, context = numbers(match.groups())
            return prompt, context, with_output
    return None


def context_overflow(message: str, payload: Any = None) -> Optional[str]:
    """Anthropic's message for an upstream error that says the prompt does not fit the model's
    context window ("prompt is too long: N tokens > M maximum", or "prompt is too long: " and
    the upstream's words when it gives no numbers), or None for any other error, including a
    prompt that fits with room to spare when only the output asked for is too long (a retry
    with a smaller max_tokens fixes that). `message` is the upstream's message
    (upstream_error_message), `payload` its parsed error body or stream chunk."""
    inner = _error_object(payload) or {}
    window = context_window(message)
    if window is None and inner.get("type") == "exceed_context_size_error":
        # llama.cpp: the numbers are fields of the error object too.
        prompt, context = inner.get("n_prompt_tokens"), inner.get("n_ctx")
        if isinstance(prompt, int) and isinstance(context, int):
            window = prompt, context, False
    if window is not None:
        prompt, context, with_output = window
        if with_output and _room(context, prompt) > 0:
            return None
        if prompt > context:
            return "prompt is too long: %d tokens > %d maximum" % (prompt, context)
        return "prompt is too long: " + message
    lower = message.lower()
    if any(words in lower for words in CONTEXT_OVERFLOW_WORDS) \
            or inner.get("code") in CONTEXT_OVERFLOW_CODES or inner.get("type") in CONTEXT_OVERFLOW_CODES:
        return "prompt is too long: " + message
    return None


def upstream_error(status: int, body: bytes, retry_after: Optional[str]) -> ProxyError:
    """The ProxyError for an upstream's error answer (or an error object in a 200 body): its
    status mapped by UPSTREAM_STATUS_TO_ERROR and its message after "upstream: ", except a
    context overflow, which is Anthropic's own 400 (context_overflow)."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = body.decode("utf-8", "replace")
    message = upstream_error_message(payload, "upstream returned HTTP %d" % status)
    overflow = context_overflow(message, payload)
    if overflow is not None:
        error = ProxyError(400, "invalid_request_error", overflow)
    else:
        if status in UPSTREAM_STATUS_TO_ERROR:
            client_status, error_type = UPSTREAM_STATUS_TO_ERROR[status]
        elif status >= 500:
            client_status, error_type = 502, "api_error"
        else:
            client_status, error_type = 400, "invalid_request_error"
        headers = {"retry-after": retry_after} if retry_after else {}
        error = ProxyError(client_status, error_type, "upstream: " + message, headers)
    # OpenAI's "insufficient_quota" is a 429 that no retry fixes.
    if status == 429 and "quota" in message.lower():
        error.headers["x-should-retry"] = "false"
    inner = _error_object(payload)
    error.upstream_status = status
    error.param = inner.get("param") if isinstance(inner, dict) else None
    error.upstream_message = message
    return error


# =============================================================================================
# Request: Anthropic Messages request -> Chat Completions request (pure)
# =============================================================================================
# Rules:
# - `system` (string or text blocks) becomes the first message, the blocks joined by a blank
#   line. Claude Code's first block, `x-anthropic-billing-header: cc_version=...`, changes on
#   every request and would defeat the upstream's prefix cache, so it is left out.
# - A `system` message inside `messages` (Claude Code's mid-conversation system messages) becomes
#   user text at its place, wrapped in <system-reminder>, merged into the neighbouring user turn:
#   many chat templates reject a second system message.
# - An assistant turn becomes one message: text joined, `tool_use` -> `tool_calls`.
# - A user turn's `tool_result`s become `tool` messages first, in the order of the calls of the
#   assistant message before them; a call with no result gets a synthetic one (the upstream
#   rejects a call left unanswered), a result with no call becomes user text. The turn's other
#   blocks (text, images, and images from inside tool results, which `tool` messages cannot
#   carry) follow as one user message.
# - Consecutive user messages are merged; text-only content is sent as a string.
# - Fields with no counterpart (top_k, metadata, cache_control, thinking, output_config,
#   context_management, service_tier, ...) are ignored.

BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
THINKING_SIGNATURE_PREFIX = "ccp1."
INTERRUPTED_RESULT = "[The tool call was interrupted; it produced no result.]"
IMAGE_IN_NEXT_MESSAGE = "[image attached in the next message]"


def thinking_signature(thinking: str) -> str:
    """The signature of a thinking block this proxy made: it marks the block as ours and binds
    it to its text, so the reasoning can be replayed upstream when the client sends it back."""
    # A stream may cut a surrogate pair between chunks: pair them up again, as the client does.
    import hashlib                         # (only for thinking blocks and short tool ids: imported then)
    paired = thinking.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return THINKING_SIGNATURE_PREFIX + hashlib.sha256(paired.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def is_proxy_signature(signature: Any, thinking: Any) -> bool:
    return (isinstance(signature, str) and signature.startswith(THINKING_SIGNATURE_PREFIX)
            and isinstance(thinking, str) and signature == thinking_signature(thinking))


def map_model(model: str, settings: Settings) -> str:
    """haiku -> SMALL_MODEL, sonnet -> MIDDLE_MODEL, opus -> BIG_MODEL; other names unchanged."""
    lower = model.lower()
    if "haiku" in lower:
        return settings.small_model
    if "sonnet" in lower:
        return settings.middle
    if "opus" in lower:
        return settings.big_model
    return model


def _invalid(message: str) -> ProxyError:
    return ProxyError(400, "invalid_request_error", message)


@contextlib.contextmanager
def wrong_types_are_400() -> Iterator[None]:
    """A request whose fields have unexpected types (a dict where text belongs, ...) is the
    client's mistake: a 400, never a 500 the client would retry."""
    try:
        yield
    except (TypeError, AttributeError, KeyError, ValueError, IndexError, RecursionError) as exc:
        raise _invalid("a field of the request has an unexpected type or value (%s)" % exc.__class__.__name__) from None


def loaded_tool_names(messages: List[Any]) -> FrozenSet[str]:
    """Tools a tool_reference block in the conversation has loaded (Claude Code's ToolSearch)."""
    names = set()
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            inner = block.get("content") if isinstance(block, dict) else None
            for part in [block] + (inner if isinstance(inner, list) else []):
                if isinstance(part, dict) and part.get("type") == "tool_reference":
                    names.add(part.get("tool_name"))
    return frozenset(names)


def history_tool_ids(messages: List[Any]) -> FrozenSet[str]:
    """The tool_use ids already in the conversation (an answer must not reuse one)."""
    return frozenset(
        block["id"] for message in messages
        if isinstance(message, dict) and message.get("role") == "assistant" and isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("id"), str))


def _blocks(content: Any, where: str) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        return content
    raise _invalid("%s: content must be a string or a list of content blocks" % where)


def text_of(content: Any) -> str:
    """The text of a string or a list of blocks (non-text blocks skipped), joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b["text"] for b in content
                         if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
    return ""


def _text_part(text: str) -> Dict[str, Any]:
    return {"type": "text", "text": text}


def _image_part(block: Dict[str, Any], where: str) -> Dict[str, Any]:
    source = block.get("source") or {}
    kind = source.get("type")
    if kind == "base64":
        url = "data:%s;base64,%s" % (source.get("media_type") or "image/png", source.get("data") or "")
    elif kind == "url" and source.get("url"):
        url = source["url"]
    else:
        raise _invalid("%s: image source type %r is not supported (use base64 or url)" % (where, kind))
    return {"type": "image_url", "image_url": {"url": url}}


def _document_parts(block: Dict[str, Any], where: str) -> List[Dict[str, Any]]:
    source = block.get("source") or {}
    kind = source.get("type")
    title = block.get("title")
    heading = [_text_part("Document: %s" % title)] if title else []
    if kind == "text":
        return heading + [_text_part(source.get("data") or "")]
    if kind == "content":
        return heading + [_text_part(text_of(source.get("content")))]
    if kind == "base64" and source.get("media_type") == "application/pdf":
        return [{"type": "file", "file": {
            "filename": (title or "document") + ".pdf",
            "file_data": "data:application/pdf;base64,%s" % (source.get("data") or "")}}]
    raise _invalid("%s: document source %r (%s) is not supported; send base64 PDF or text"
                   % (where, kind, source.get("media_type")))


def _search_result_text(block: Dict[str, Any]) -> str:
    lines = [block.get("title") or "", str(block.get("source") or ""), text_of(block.get("content"))]
    return "\n".join(line for line in lines if line)


def _user_block_parts(block: Dict[str, Any], where: str) -> List[Dict[str, Any]]:
    """OpenAI content parts for one user block other than tool_result (table below)."""
    handler = USER_BLOCK_PARTS.get(block.get("type"))
    if handler is None:
        # Server-tool results and blocks we do not know: keep any text they carry, so
        # nothing the model should see is dropped without a trace.
        text = block.get("text") or text_of(block.get("content"))
        if text:
            return [_text_part(text)]
        if block.get("type") not in _DROPPED_BLOCK_TYPES:   # once per type: histories repeat
            _DROPPED_BLOCK_TYPES.add(block.get("type"))
            log.warning("dropped a %r block the upstream cannot take", block.get("type"))
        return []
    return handler(block, where)


_DROPPED_BLOCK_TYPES: set = set()


USER_BLOCK_PARTS: Dict[str, Callable[[Dict[str, Any], str], List[Dict[str, Any]]]] = {
    "text": lambda b, w: [_text_part(b["text"])] if isinstance(b.get("text"), str) and b["text"] else [],
    "image": lambda b, w: [_image_part(b, w)],
    "document": _document_parts,
    "search_result": lambda b, w: [_text_part(_search_result_text(b))],
    # A replayed web search (run by this proxy): its results, from encrypted_content, as text.
    "web_search_tool_result": lambda b, w: [_text_part(web_search_history_text(b))],
    # Claude Code's ToolSearch answers with these; the tool itself joins `tools` (to_openai).
    "tool_reference": lambda b, w: [_text_part("Tool loaded: %s" % b.get("tool_name"))],
    "thinking": lambda b, w: [],
    "redacted_thinking": lambda b, w: [],
}


def _tool_result(block: Dict[str, Any], where: str) -> Tuple[str, List[Dict[str, Any]]]:
    """(text for the tool message, image parts that must travel in a user message)."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        text, images = content or "", []
    else:
        texts, images = [], []
        for part in _blocks(content, where):
            for converted in _user_block_parts(part, where):
                if converted["type"] == "text":
                    texts.append(converted["text"])
                else:
                    images.append(converted)
        if images:
            texts.append(IMAGE_IN_NEXT_MESSAGE)
        text = "\n".join(texts)
    if block.get("is_error") and not text.lstrip().lower().startswith(("error", "<tool_use_error>")):
        text = "Error: " + text
    return text, images


def _tool_call(block: Dict[str, Any]) -> Dict[str, Any]:
    arguments = block.get("input")
    return {"id": block.get("id") or "", "type": "function", "function": {
        "name": block.get("name") or "",
        "arguments": json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)}}


def _assistant_message(content: Any, where: str, reasoning_field: str) -> Optional[Dict[str, Any]]:
    texts, calls, reasoning = [], [], []
    for block in _blocks(content, where):
        kind = block.get("type")
        if kind == "text":
            if block.get("text"):
                texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block))
        elif kind == "thinking":
            # Only reasoning this proxy produced goes back, and only to providers that want it.
            if reasoning_field and is_proxy_signature(block.get("signature"), block.get("thinking")):
                reasoning.append(block["thinking"])
        elif kind in ("redacted_thinking", "server_tool_use"):
            continue  # meaningful to Anthropic only; server tools cannot run upstream
        else:
            texts.extend(p["text"] for p in _user_block_parts(block, where) if p["type"] == "text")
    if not texts and not calls:
        return None
    message: Dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    if reasoning_field:
        # DeepSeek wants the field on every assistant message once thinking is on.
        message[reasoning_field] = "\n\n".join(reasoning)
    return message


def _append_user(messages: List[Dict[str, Any]], parts: List[Dict[str, Any]]) -> None:
    """Add user parts, merged into the last message when that is a user message already."""
    if not parts:
        return
    if messages and messages[-1]["role"] == "user":
        messages[-1] = {"role": "user", "content": messages[-1]["content"] + parts}
    else:
        messages.append({"role": "user", "content": list(parts)})


def _answer_calls(messages: List[Dict[str, Any]], pending: List[str],
                  results: Dict[str, str]) -> None:
    """One tool message per pending call, in call order; unanswered calls get a synthetic one."""
    for call_id in pending:
        if call_id not in results:
            log.debug("history repair: tool call %s had no result", call_id)
        messages.append({"role": "tool", "tool_call_id": call_id,
                         "content": results.get(call_id, INTERRUPTED_RESULT)})


def _system_reminder(text: str) -> str:
    if text.lstrip().startswith("<system-reminder>"):
        return text
    return "<system-reminder>\n%s\n</system-reminder>" % text


def _merged_turns(messages: List[Any]) -> List[Tuple[Any, Any, str]]:
    """(role, content, where) with consecutive user turns, and consecutive assistant turns,
    merged as the Anthropic API merges them: results sent in separate user turns still answer
    the calls before them."""
    turns: List[Tuple[Any, Any, str]] = []
    for position, message in enumerate(messages):
        where = "messages.%d" % position
        if not isinstance(message, dict):
            raise _invalid("%s: must be an object" % where)
        role, content = message.get("role"), message.get("content")
        if turns and role in ("user", "assistant") and turns[-1][0] == role:
            previous = turns[-1]
            turns[-1] = (role, _blocks(previous[1], previous[2]) + _blocks(content, where), previous[2])
        else:
            turns.append((role, content, where))
    return turns


def convert_messages(messages: List[Any], reasoning_field: str = "") -> List[Dict[str, Any]]:
    """Anthropic `messages` -> OpenAI messages (the leading system message is added elsewhere)."""
    out: List[Dict[str, Any]] = []
    pending: List[str] = []        # tool call ids of the last assistant message, not yet answered
    for role, content, where in _merged_turns(messages):
        if role == "assistant":
            if pending:
                _answer_calls(out, pending, {})
            converted = _assistant_message(content, where, reasoning_field)
            pending = [c["id"] for c in converted.get("tool_calls", ())] if converted else []
            if converted:
                out.append(converted)
        elif role == "user":
            results: Dict[str, str] = {}
            orphans: List[Dict[str, Any]] = []
            images: List[Dict[str, Any]] = []
            parts: List[Dict[str, Any]] = []
            for block in _blocks(content, where):
                if block.get("type") == "tool_result":
                    text, result_images = _tool_result(block, where)
                    call_id = block.get("tool_use_id") or ""
                    images.extend(result_images)
                    if call_id in pending and call_id not in results:
                        results[call_id] = text
                    else:
                        log.debug("history repair: tool result %s has no call before it", call_id)
                        orphans.append(_text_part("[Result of tool call %s]\n%s" % (call_id, text)))
                else:
                    parts.extend(_user_block_parts(block, where))
            if pending:
                _answer_calls(out, pending, results)
                pending = []
            _append_user(out, orphans + images + parts)
        elif role == "system":
            text = text_of(content)
            if text:
                if pending:        # keep the tool messages right after their calls
                    _answer_calls(out, pending, {})
                    pending = []
                _append_user(out, [_text_part(_system_reminder(text))])
        else:
            raise _invalid("%s: role must be 'user', 'assistant' or 'system', got %r" % (where, role))
    for message in out:
        if message["role"] == "user":
            content = message["content"]
            if all(part["type"] == "text" for part in content):
                message["content"] = "\n\n".join(part["text"] for part in content)
    return out


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n\n".join(
            b["text"] for b in system
            if isinstance(b, dict) and isinstance(b.get("text"), str) and b["text"]
            and not b["text"].startswith(BILLING_HEADER_PREFIX))
    return ""


def _function_tool(tool: Dict[str, Any]) -> Dict[str, Any]:
    function = {"name": tool["name"],
                "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _is_function_tool(tool: Any) -> bool:
    # Server tools (web_search_20250305, ...) run at Anthropic only.
    return isinstance(tool, dict) and tool.get("type") in (None, "custom") and bool(tool.get("name"))


def upstream_tools(request: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The request's tools as the function tools sent upstream (before a dialect cleans their
    schemas): no server tool, and no defer_loading tool until a tool_reference in the
    conversation has loaded it, as at Anthropic. Shared by to_openai and estimate_tokens, so
    the estimate counts what is sent."""
    tools = request.get("tools") or ()
    deferred = any(isinstance(tool, dict) and tool.get("defer_loading") for tool in tools)
    loaded = loaded_tool_names(request.get("messages") or ()) if deferred else frozenset()
    return [_function_tool(tool) for tool in tools
            if _is_function_tool(tool) and not (tool.get("defer_loading") and tool["name"] not in loaded)]


def text_tools(request: Dict[str, Any]) -> Dict[str, Any]:
    """Name -> input schema of the tools the model is offered, whose calls may come back written
    as text (none when tool_choice is none)."""
    choice = request.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        return {}
    return {t["function"]["name"]: t["function"]["parameters"] for t in upstream_tools(request)}


def _tool_choice(choice: Dict[str, Any]) -> Any:
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name") or ""}}
    return TOOL_CHOICE.get(kind, "auto")


TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}


def validate_request(request: Any) -> Dict[str, Any]:
    """The checks Anthropic makes that we must make too, as 400s."""
    if not isinstance(request, dict):
        raise _invalid("the request body must be a JSON object")
    if not isinstance(request.get("model"), str) or not request["model"]:
        raise _invalid("model: a model name is required")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: at least one message is required")
    max_tokens = request.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise _invalid("max_tokens: must be a positive integer")
    tools = request.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise _invalid("tools: must be a list of tool objects")
    return request


def reasoning_effort(request: Dict[str, Any]) -> Optional[str]:
    """Claude's effort (output_config.effort) or thinking budget as an OpenAI reasoning_effort."""
    thinking = request.get("thinking") if isinstance(request.get("thinking"), dict) else {}
    if thinking.get("type") == "disabled":
        return None
    config = request.get("output_config") if isinstance(request.get("output_config"), dict) else {}
    if config.get("effort") in EFFORT_LEVELS:
        return EFFORT_LEVELS[config["effort"]]
    budget = thinking.get("budget_tokens")
    if thinking.get("type") == "enabled" and isinstance(budget, int):
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    return None


EFFORT_LEVELS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
THINKING_TOGGLE = {"enabled": "enabled", "adaptive": "enabled", "disabled": "disabled"}
# Models known to take reasoning_effort; others get it only through OpenRouter's `reasoning`.
REASONING_EFFORT_MODELS = re.compile(r"(^|/)(o[134]([-.]|$)|gpt-5|gpt-oss|gemini-(2\.5|3))", re.I)


def to_openai(request: Dict[str, Any], settings: Settings,
              dialect: Optional[Dialect] = None, model: str = "", cache_key: str = "") -> Dict[str, Any]:
    """A validated Anthropic Messages request -> a Chat Completions request (a new dict) for
    upstream `model` (default: the first of the tier's chain). `cache_key` (Claude Code's
    session id) goes upstream where the provider routes by one."""
    model = model or model_chain(map_model(request["model"], settings), (p.name for p in settings.providers))[0].model
    dialect = dialect or resolve_dialect(settings, model)
    messages = adapt_messages(convert_messages(request["messages"], dialect.reasoning_replay), dialect)
    system = _system_text(request.get("system"))
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body: Dict[str, Any] = {"model": model, "messages": messages}

    max_tokens = request.get("max_tokens")
    if max_tokens is not None:
        if settings.max_tokens_limit:
            max_tokens = min(max_tokens, settings.max_tokens_limit)
        body["max_completion_tokens" if dialect.completion_tokens_field else "max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if request.get(name) is not None:
            body[name] = request[name]
    stop = request.get("stop_sequences")
    if stop:
        body["stop"] = list(stop[:4])   # OpenAI takes at most 4
    if request.get("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if cache_key and dialect.prompt_cache_key:
        body["prompt_cache_key"] = cache_key
    effort = reasoning_effort(request)
    if dialect.thinking_toggle:
        # DeepSeek V4: thinking is on by default; it takes Claude's effort names up to "max".
        thinking_type = (request.get("thinking") or {}).get("type")
        if thinking_type in THINKING_TOGGLE:
            body["thinking"] = {"type": THINKING_TOGGLE[thinking_type]}
        if effort:
            body["reasoning_effort"] = (request.get("output_config") or {}).get("effort") or effort
    elif effort:
        if dialect.reasoning_object:
            body["reasoning"] = {"effort": effort}
        elif REASONING_EFFORT_MODELS.search(model):
            body["reasoning_effort"] = effort

    config = request.get("output_config") if isinstance(request.get("output_config"), dict) else {}
    output_format = config.get("format") or request.get("output_format")
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema" \
            and isinstance(output_format.get("schema"), dict):
        # Structured output (Claude Code asks for its session titles this way).
        schema = output_format["schema"]
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": clean_schema(schema) if dialect.clean_schemas else schema}}

    for tool in request.get("tools") or ():
        if not _is_function_tool(tool):
            log.info("server tool %r dropped: the upstream cannot run it", tool.get("type"))
    tools = upstream_tools(request)
    if dialect.clean_schemas:
        for function_tool in tools:
            function_tool["function"]["parameters"] = clean_schema(function_tool["function"]["parameters"])
    choice = request.get("tool_choice")
    if tools:
        body["tools"] = tools
        if isinstance(choice, dict):
            body["tool_choice"] = _tool_choice(choice)
            if choice.get("disable_parallel_tool_use") and choice.get("type") != "none":
                body["parallel_tool_calls"] = False
    return body


# ---------------------------------------------------------------------------------------------
# Dialect adaptations of the translated messages and tools


def _hashed_id(tool_id: str, length: int) -> str:
    """`length` base62 characters derived from the id: the same id always maps the same way,
    so a call and its result still pair up."""
    import hashlib
    number = int.from_bytes(hashlib.sha256(tool_id.encode("utf-8", "surrogatepass")).digest(), "big")
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(chars)


def short_tool_id(tool_id: str) -> str:
    """Mistral: a tool call id of exactly 9 [a-zA-Z0-9]. Ids already of that form are kept."""
    if len(tool_id) == 9 and tool_id.isalnum() and tool_id.isascii():
        return tool_id
    return _hashed_id(tool_id, 9)


# OpenAI (and gateways in front of it) reject tool call ids over 40 characters; a history can
# hold longer ones from another provider.
MAX_TOOL_ID_LENGTH = 40


# Gemini documents this value for tool calls whose thought signature it never issued.
GEMINI_SKIP_SIGNATURE = "skip_thought_signature_validator"
# Gemini 3 signs its tool calls (extra_content.google.thought_signature) and wants the
# signature back on the call in the next request. It travels through the client inside the
# tool_use id, after this mark, base64url-encoded (ids stay within [A-Za-z0-9_-]).
SIGNATURE_MARK = "_ccpts_"


def id_with_signature(call_id: str, call: Dict[str, Any]) -> str:
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    if not isinstance(signature, str) or not signature or SIGNATURE_MARK in call_id:
        return call_id
    return call_id + SIGNATURE_MARK + base64.urlsafe_b64encode(signature.encode("utf-8")).decode("ascii").rstrip("=")


def split_signature(call_id: str) -> Tuple[str, Optional[str]]:
    """(the upstream's own id, the thought signature carried in it or None)."""
    if SIGNATURE_MARK not in call_id:
        return call_id, None
    base, encoded = call_id.split(SIGNATURE_MARK, 1)
    try:
        return base, base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return base, None


def _upstream_call_id(base: str, dialect: Dialect) -> str:
    """The id as this upstream takes it, from the id without a carried signature."""
    if dialect.short_tool_ids:
        return short_tool_id(base)
    return base if len(base) <= MAX_TOOL_ID_LENGTH else "call_" + _hashed_id(base, 24)


def adapt_messages(messages: List[Dict[str, Any]], dialect: Dialect) -> List[Dict[str, Any]]:
    """Tool call ids as the upstream knows them (a carried thought signature split off; 9
    characters for Mistral), thought signatures for Gemini, a clear 400 for a PDF the
    provider cannot take. Returns new message dicts where something changed."""
    adapted = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                base, signature = split_signature(call["id"])
                call = dict(call, id=_upstream_call_id(base, dialect))
                if dialect.thought_signatures:
                    call["extra_content"] = {"google": {"thought_signature": signature or GEMINI_SKIP_SIGNATURE}}
                calls.append(call)
            message = dict(message, tool_calls=calls)
        elif role == "tool":
            upstream_id = _upstream_call_id(split_signature(message["tool_call_id"])[0], dialect)
            if upstream_id != message["tool_call_id"]:
                message = dict(message, tool_call_id=upstream_id)
        elif role == "user" and not dialect.accepts_pdf and isinstance(message["content"], list) and any(
                part["type"] == "file" for part in message["content"]):
            raise _invalid("the upstream provider (%s) does not take PDF documents; send the text "
                           "of the document instead, or use a provider that reads PDFs (openai, "
                           "azure, openrouter, gemini)" % dialect.name)
        adapted.append(message)
    return adapted


# Gemini takes an OpenAPI 3.0 subset of JSON Schema and answers 400 "Unknown name" to the rest.
GEMINI_DROPPED_KEYWORDS = frozenset((
    "$schema", "$id", "$comment", "$defs", "definitions", "additionalProperties", "propertyNames",
    "patternProperties", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
    "default", "readOnly", "writeOnly", "examples", "unevaluatedProperties", "unevaluatedItems",
    "contains", "minContains", "maxContains", "dependentRequired", "dependentSchemas", "if", "then",
    "else", "not", "deprecated", "contentEncoding", "contentMediaType"))
GEMINI_FORMATS = ("enum", "date-time")
SCHEMA_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")


def clean_schema(schema: Any, definitions: Optional[Dict[str, Any]] = None, depth: int = 0,
                 expanding: FrozenSet[str] = frozenset()) -> Any:
    """A copy of a JSON schema that Gemini accepts: unknown keywords dropped, `const` as a
    one-value `enum`, `$ref` inlined, `type: [x, "null"]` as `type: x` + `nullable`. A `$ref`
    that refers back to a schema being inlined (a tree) becomes a plain object there."""
    if not isinstance(schema, dict):
        return schema
    if depth > 32:
        return {"type": "object"}
    if definitions is None:
        definitions = dict(schema.get("definitions") or {}, **(schema.get("$defs") or {}))
    if isinstance(schema.get("$ref"), str):
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = definitions.get(name)
        if name in expanding or not isinstance(target, dict):
            return {"type": "object"}
        merged = dict(target)
        merged.update((k, v) for k, v in schema.items() if k != "$ref")
        return clean_schema(merged, definitions, depth + 1, expanding | {name})
    cleaned: Dict[str, Any] = {}
    for key, value in schema.items():
        if key in GEMINI_DROPPED_KEYWORDS or key == "$ref":
            continue
        if key == "const":
            if isinstance(value, str):           # Gemini takes enum for strings only
                cleaned["enum"] = [value]
        elif key == "format":
            if value in GEMINI_FORMATS:
                cleaned[key] = value
        elif key == "type" and isinstance(value, list):
            types = [t for t in value if t != "null"]
            cleaned["type"] = types[0] if types else "string"
            if len(types) < len(value):
                cleaned["nullable"] = True
        elif key == "properties" and isinstance(value, dict):
            cleaned[key] = {name: clean_schema(sub, definitions, depth + 1, expanding) for name, sub in value.items()}
        elif key == "items":
            cleaned[key] = clean_schema(value, definitions, depth + 1, expanding)
        elif key in SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            cleaned["anyOf" if key == "oneOf" else key] = [
                clean_schema(v, definitions, depth + 1, expanding) for v in value]
        else:
            cleaned[key] = value
    if isinstance(cleaned.get("required"), list) and isinstance(cleaned.get("properties"), dict):
        cleaned["required"] = [name for name in cleaned["required"] if name in cleaned["properties"]]
    return cleaned


# ---------------------------------------------------------------------------------------------
# Parameter negotiation: what each model accepts. Name rules where they are certain; the rest
# is learned from the upstream's 400 naming a parameter or a limit, fixed in one retry, and
# remembered for the model for the life of the process.


@dataclasses.dataclass(frozen=True)
class ModelFixes:
    drop: FrozenSet[str] = frozenset()        # parameters the model rejects
    completion_tokens_field: bool = False     # max_tokens must be sent as max_completion_tokens
    max_output: int = 0                       # the model's output limit, when known

    def merge(self, other: "ModelFixes") -> "ModelFixes":
        limits = [n for n in (self.max_output, other.max_output) if n]
        return ModelFixes(self.drop | other.drop,
                          self.completion_tokens_field or other.completion_tokens_field,
                          min(limits) if limits else 0)


NO_FIXES = ModelFixes()
# OpenAI reasoning models reject max_tokens, temperature and top_p.
OPENAI_REASONING_MODELS = re.compile(r"(^|/)(o[134]([-.]|$)|gpt-5(?!-chat)|codex-mini)", re.I)
# Parameters a model may reject that the request can do without.
DROPPABLE_PARAMETERS = ("temperature", "top_p", "stop", "stream_options", "parallel_tool_calls",
                        "reasoning_effort", "reasoning", "tool_choice", "response_format", "include")
REJECTION_WORDS = ("unsupported", "not supported", "unrecognized", "unknown", "not permitted",
                   "extra inputs", "not allowed", "does not support", "invalid", "unavailable")
# (pattern, how to get the model's output limit from its groups). A limit derived from the
# context window minus this request's input (CONTEXT_WINDOW_PATTERNS) holds for this request
# only: it is used for the retry and never remembered.
OUTPUT_LIMIT_PATTERNS = (
    (re.compile(r"supports at most (\d{1,12}) completion tokens"), lambda g: int(g[0])),      # OpenAI
    (re.compile(r"valid range of max_tokens is \[\d+, ?(\d{1,12})\]"), lambda g: int(g[0])),  # DeepSeek
    (re.compile(r"max_tokens`? must be less than or equal to `?(\d{1,12})"), lambda g: int(g[0])),  # Groq
    (re.compile(r"max_tokens\W*:?\s*\d{1,12} > (\d{1,12}), which is the maximum allowed"), lambda g: int(g[0])),
)


def fixes_by_name(model: str) -> ModelFixes:
    if OPENAI_REASONING_MODELS.search(model):
        return ModelFixes(frozenset(("temperature", "top_p")), completion_tokens_field=True)
    return NO_FIXES


def apply_fixes(body: Dict[str, Any], fixes: ModelFixes) -> Dict[str, Any]:
    """The request with a model's fixes applied (a new dict; the same one if nothing applies)."""
    if fixes == NO_FIXES:
        return body
    body = {k: v for k, v in body.items() if k not in fixes.drop}
    if fixes.completion_tokens_field and "max_tokens" in body:
        body["max_completion_tokens"] = body.pop("max_tokens")
    if fixes.max_output:
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(key), int) and body[key] > fixes.max_output:
                body[key] = fixes.max_output
    return body


def _names_parameter(message: str, name: str) -> bool:
    """Does the message name the parameter? A name with an underscore cannot be an ordinary
    word; "stop", "temperature" and "reasoning" count only quoted or after a label."""
    if "_" in name:
        return re.search(r"\b%s\b" % name, message) is not None
    return re.search(r"(['\"`\[]|supplied: |parameter: |argument: |\bbody\W+)%s\b" % name, message) is not None


def fix_from_error(body: Dict[str, Any], message: str, param: Any = None) -> Tuple[Optional[ModelFixes], bool]:
    """(the fix an upstream 400 asks for, whether it holds for the model beyond this request),
    or (None, False) if the error names no parameter or limit we can fix."""
    lower = message.lower()
    current = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
    if isinstance(current, int):
        for pattern, limit_of in OUTPUT_LIMIT_PATTERNS:
            match = pattern.search(message)
            if match:
                limit = limit_of(match.groups())
                return (ModelFixes(max_output=limit), True) if 0 < limit < current else (None, False)
        window = context_window(message)
        if window is not None:
            # Room left by this prompt: a fix for this request only. No room: an overflow
            # (context_overflow), which no parameter fixes.
            prompt, context, with_output = window
            limit = _room(context, prompt) if with_output else 0
            return (ModelFixes(max_output=limit), False) if 0 < limit < current else (None, False)
    if "include" in body and "encrypted content is not supported" in lower:
        # Responses API, a model without encrypted reasoning: the message names no parameter.
        return ModelFixes(drop=frozenset(("include",))), True
    if not any(w in lower for w in REJECTION_WORDS):
        return None, False
    if "max_tokens" in body and "max_completion_tokens" in message and param in (None, "max_tokens"):
        return ModelFixes(completion_tokens_field=True), True
    for name in DROPPABLE_PARAMETERS:
        # OpenAI names the parameter in `param`: trusted alone, since its message may quote a
        # tool property ("In context=('properties', 'temperature')") that is no parameter.
        if name in body and (param == name if param else _names_parameter(message, name)):
            return ModelFixes(drop=frozenset((name,))), True
    return None, False


# =============================================================================================
# Response: Chat Completion -> Anthropic message (pure)
# =============================================================================================
# Rules:
# - Reasoning (`reasoning_content` or `reasoning`) becomes a `thinking` block first, then the
#   text, then one `tool_use` block per call (id kept, generated when missing).
# - Tool arguments: an object is taken as is; "" is {}; invalid JSON is repaired leniently
#   (code fences, trailing commas, Python-style quotes). If repair fails the call is still
#   returned, with the raw text under "_raw_arguments": the call keeps its place in the
#   history and Claude Code answers it with a validation error the model can act on, instead
#   of the arguments vanishing into a silent {}.
# - finish_reason -> stop_reason by the table; any tool call means `tool_use` (providers send
#   "stop" after tool calls), except `length`, which stays `max_tokens`.
# - Usage: cached prompt tokens are reported as cache_read_input_tokens, not in input_tokens.
# - Content that opens with <think>…</think> is reasoning (ThinkSplitter); a tool call the model
#   wrote as text, to an offered tool, is a tool call (TextToolCalls, TEXT_TOOL_CALLS).

FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "function_call": "tool_use", "content_filter": "refusal"}


@dataclasses.dataclass(frozen=True)
class ResponseContext:
    """What translating an answer back needs to know about the request."""
    model: str                                  # the model name the client asked for
    message_id: str
    stop_sequences: Tuple[str, ...] = ()
    input_tokens: int = 0                       # estimate, until the upstream reports usage
    history_tool_ids: FrozenSet[str] = frozenset()   # tool_use ids already in the conversation
    text_tools: Optional[Mapping[str, Any]] = None   # name -> schema of tools whose calls may come as text


def _repair_json(raw: str) -> Any:
    text = raw.strip()
    if text.startswith("```"):
        text = text.strip("`")
        if text.startswith("json"):
            text = text[4:]
    text = re.sub(r",\s*([}\]])", r"\1", text)
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def parse_tool_arguments(arguments: Any) -> Dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = _repair_json(raw)
    if isinstance(parsed, dict):
        return parsed
    log.warning("tool arguments are not a JSON object; passing them on as _raw_arguments")
    return {"_raw_arguments": raw}


def _count(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_to_anthropic(usage: Any, estimate: int = 0) -> Dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    prompt = _count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:
        cached = _count(usage.get("prompt_cache_hit_tokens")) or 0     # DeepSeek
    if prompt is None:
        prompt, cached = estimate, 0
    return {"input_tokens": max(prompt - cached, 0),
            "output_tokens": _count(usage.get("completion_tokens")) or 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": min(cached, prompt)}


def stop_reason_for(finish_reason: Optional[str], has_tool_calls: bool, text_tail: str,
                    stop_sequences: Tuple[str, ...], matched: Any = None) -> Tuple[str, Optional[str]]:
    """(stop_reason, stop_sequence). `matched` is vLLM's choice.stop_reason, when sent."""
    if finish_reason == "length":
        return "max_tokens", None
    if has_tool_calls:
        return "tool_use", None
    reason = FINISH_TO_STOP.get(finish_reason or "stop", "end_turn")
    if reason == "tool_use":
        reason = "end_turn"                      # "tool_calls" with no call (Ollama lost them)
    if reason == "end_turn" and stop_sequences:
        if isinstance(matched, str) and matched in stop_sequences:
            return "stop_sequence", matched
        for sequence in stop_sequences:
            if sequence and text_tail.endswith(sequence):
                return "stop_sequence", sequence
    return reason, None


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _content_text(content: Any) -> str:
    return content if isinstance(content, str) else content_parts(content)[1]


def _part_text(value: Any) -> str:
    """A part's text: a string, or (Mistral's thinking) a list of {"type": "text"} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_string(p.get("text")) for p in value if isinstance(p, dict))
    return ""


# Typed content parts -> where their text goes. Mistral's Magistral models send content as a
# list: reasoning as {"type": "thinking", "thinking": [{"type": "text", "text": ...}]}, the
# answer as {"type": "text"} parts; others use "reasoning", "output_text" or "refusal" parts.
CONTENT_PART_ROLES = {"thinking": ("reasoning", "thinking"), "reasoning": ("reasoning", "text"),
                      "reasoning_text": ("reasoning", "text"), "text": ("text", "text"),
                      "output_text": ("text", "text"), "refusal": ("refusal", "refusal")}


def content_parts(content: Any) -> Tuple[str, str, str]:
    """(reasoning, text, refusal) of a message's content: a string is text; a list of typed
    parts is sorted by CONTENT_PART_ROLES (a part without a known type counts as text)."""
    if isinstance(content, str):
        return "", content, ""
    found = {"reasoning": [], "text": [], "refusal": []}
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict):
            role, field = CONTENT_PART_ROLES.get(part.get("type"), ("text", "text"))
            found[role].append(_part_text(part.get(field)) or (_part_text(part.get("text")) if field != "text" else ""))
    return "".join(found["reasoning"]), "".join(found["text"]), "".join(found["refusal"])


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Content text in, ("thinking" | "text", text) pieces out: a leading <think>…</think>
    section is thinking, the rest text. Local servers without a reasoning parser leave the
    model's reasoning in the content that way. Used by the whole answer (split_think_tags) and
    the stream, where a tag may be split across chunks: what may still turn out to be part of a
    tag is held until more text comes, `release()` or `flush()`. Its state::

        start ── "<think>" ──▶ inside ── "</think>" ──▶ done
          └──────── any other text, release() ─────────▶ done
    """

    __slots__ = ("state", "held")

    def __init__(self) -> None:
        self.state = "start"
        self.held = ""

    def feed(self, text: str) -> List[Tuple[str, str]]:
        if self.state == "done":
            return [("text", text)] if text else []
        held, self.held = self.held + text, ""
        if self.state == "start":
            stripped = held.lstrip()
            if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                self.held = held
                return []
            if not stripped.startswith(THINK_OPEN):
                self.state = "done"
                return [("text", held)]
            self.state = "inside"
            held = stripped[len(THINK_OPEN):]
        end = held.find(THINK_CLOSE)
        if end >= 0:
            self.state = "done"
            pieces = [("thinking", held[:end]), ("text", held[end + len(THINK_CLOSE):].lstrip("\n"))]
            return [piece for piece in pieces if piece[1]]
        keep = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1) if held.endswith(THINK_CLOSE[:n])), 0)
        self.held = held[len(held) - keep:]
        return [("thinking", held[:len(held) - keep])] if len(held) > keep else []

    def release(self) -> str:
        """Another block opens (real reasoning, a tool call) before the content showed a tag:
        the content held so far is text, returned unless it is only whitespace, and content
        from now on is only content. Nothing changes once a tag was seen."""
        if self.state != "start":
            return ""
        held, self.held, self.state = self.held, "", "done"
        return held if held.strip() else ""

    def flush(self) -> List[Tuple[str, str]]:
        """The content ended: what was held, as what it turned out to be."""
        if self.state == "start":
            held = self.release()
            return [("text", held)] if held else []
        held, self.held = self.held, ""
        return [("thinking" if self.state == "inside" else "text", held)] if held else []


def split_think_tags(text: str) -> Tuple[str, str]:
    """(reasoning, text) of a whole answer, by ThinkSplitter."""
    splitter = ThinkSplitter()
    pieces = splitter.feed(text) + splitter.flush()
    return "".join(t for kind, t in pieces if kind == "thinking"), "".join(t for kind, t in pieces if kind == "text")


# Tool calls written as text. Local servers without a tool parser (Ollama, LM Studio, llama.cpp,
# vLLM) leave the call in the content as the model printed it: Hermes and Qwen
# `<tool_call>{"name", "arguments"}</tool_call>` (Qwen3-Coder: `<function=NAME><parameter=KEY>
# value</parameter></function>` inside), Mistral `[TOOL_CALLS][{…}]` or `[TOOL_CALLS]NAME[ARGS]{…}`,
# Llama `<|python_tag|>{"name", "parameters"}`, or an answer that is nothing but such a JSON
# object. Only a call to an offered tool whose arguments parse counts; anything else stays text.

TEXT_CALL_OPENERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
TEXT_CALL_CLOSERS = {"<tool_call>": "</tool_call>"}
_CALL_KEYS = frozenset(("name", "arguments", "parameters", "type", "id", "function"))
_SPECIAL_TOKENS = re.compile(r"(?:<\|eom_id\|>|<\|eot_id\|>|<\|im_end\|>|</s>)\s*$")
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)</parameter>", re.S)
_FIRST_KEY = re.compile(r'\{\s*"([^"\\]*)"\s*:')
TextCall = Tuple[str, Dict[str, Any]]


def _call_arguments(value: Any) -> Optional[Dict[str, Any]]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def _json_calls(text: str, tools: Mapping[str, Any], bare: bool = False) -> Optional[List[TextCall]]:
    """Calls in JSON text: {"name", "arguments" | "parameters"} (or {"function": {…}}), or a list
    of them. Bare JSON (no marker around it) must carry nothing else, arguments included."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or (bare and not (set(item) <= _CALL_KEYS)):
            return None
        function = item["function"] if isinstance(item.get("function"), dict) else item
        if bare and "arguments" not in function and "parameters" not in function:
            return None
        name = function.get("name")
        arguments = _call_arguments(function.get("arguments", function.get("parameters")))
        if not isinstance(name, str) or name not in tools or arguments is None:
            return None
        calls.append((name, arguments))
    return calls or None


def _xml_value(raw: str, schema: Any) -> Any:
    raw = raw[1:] if raw.startswith("\n") else raw
    raw = raw[:-1] if raw.endswith("\n") else raw
    if isinstance(schema, dict) and schema.get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _xml_calls(text: str, tools: Mapping[str, Any]) -> Optional[List[TextCall]]:
    """Qwen3-Coder's calls: <function=NAME><parameter=KEY>value</parameter>…</function>; a value
    is JSON unless the tool's schema says the parameter is a string."""
    matches = list(_XML_FUNCTION.finditer(text))
    if not matches or _XML_FUNCTION.sub("", text).strip():
        return None
    calls = []
    for match in matches:
        name = match.group(1)
        if name not in tools:
            return None
        schema = tools[name] if isinstance(tools[name], dict) else {}
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        calls.append((name, {p.group(1): _xml_value(p.group(2), properties.get(p.group(1)))
                             for p in _XML_PARAMETER.finditer(match.group(2))}))
    return calls


def _mistral_calls(text: str, tools: Mapping[str, Any]) -> Optional[List[TextCall]]:
    """After [TOOL_CALLS]: a JSON list of calls, or NAME[ARGS]{…} (newer tokenizers, perhaps
    with [CALL_ID]ID before [ARGS]), several of them each after its own [TOOL_CALLS]."""
    if text.lstrip()[:1] in ("[", "{"):
        return _json_calls(text.strip(), tools)
    calls = []
    for part in text.split("[TOOL_CALLS]"):
        name, found, arguments = part.partition("[ARGS]")
        name = name.split("[CALL_ID]")[0].strip()
        parsed = _call_arguments(arguments.strip()) if found and arguments.strip() else None
        if name not in tools or parsed is None:
            return None
        calls.append((name, parsed))
    return calls


def parse_text_calls(opener: str, body: str, tools: Mapping[str, Any]) -> Optional[List[TextCall]]:
    """The calls between an opener and its closer (or the end), or None if it is not that."""
    body = _SPECIAL_TOKENS.sub("", body).strip()
    if opener == "[TOOL_CALLS]":
        return _mistral_calls(body, tools)
    if opener == "<tool_call>" and body.startswith("<function="):
        return _xml_calls(body, tools)
    return _json_calls(body, tools)


class TextToolCalls:
    """Content text in, ("text", str) and ("call", (name, arguments)) pieces out, for tool calls
    a model wrote as text (see above). Streams as ThinkSplitter does: text goes out as it comes,
    except what may be the start of an opener (held until it is clear), a call up to its closer
    (or the end, for openers without one), and an answer that opens with "{" naming a call key
    (held to the end: it is either a call or given back as the text it was). An opener inside a
    ``` code block is text. Its state::

        start ── "{" + a call key ──▶ bare ── end ──▶ calls, or the text
          └── anything else ──▶ text ── opener ──▶ call ── closer or end ──▶ text
    """

    def __init__(self, tools: Mapping[str, Any]) -> None:
        self.tools = tools
        self.state = "start"
        self.held = ""
        self.opener = ""
        self.fences = 0            # ``` sent as text: odd means inside a code block
        self.ticks = 0             # backticks that ended the text sent (a fence may go on)
        self.after_call = False    # whitespace right after a call is dropped

    def feed(self, text: str) -> List[Tuple[str, Any]]:
        out: List[Tuple[str, Any]] = []
        if self.state == "text" and not self.held and "<" not in text and "[" not in text:
            self._text(out, text)                 # the common case: plain text, nothing to hold
            return out
        self.held += text
        self._scan(out, False)
        return out

    def flush(self) -> List[Tuple[str, Any]]:
        out: List[Tuple[str, Any]] = []
        self._scan(out, True)
        return out

    def _text(self, out: List[Tuple[str, Any]], text: str) -> None:
        if self.after_call:
            text = text.lstrip()
            self.after_call = bool(not text)
        if text:
            if "`" in text:                      # a fence may be split across pieces
                joined = "`" * self.ticks + text
                self.fences += joined.count("```")
                ticks = len(joined) - len(joined.rstrip("`"))
                self.ticks = ticks if ticks < 3 else 0
            else:
                self.ticks = 0
            if out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + text)
            else:
                out.append(("text", text))

    def _calls(self, out: List[Tuple[str, Any]], calls: List[TextCall]) -> None:
        out.extend(("call", call) for call in calls)
        self.after_call = True

    def _scan(self, out: List[Tuple[str, Any]], final: bool) -> None:
        while True:
            if self.state == "start":
                stripped = self.held.lstrip()
                if not stripped:
                    if final:
                        self._text(out, self.held)
                        self.held = ""
                    return
                key = _FIRST_KEY.match(stripped)
                if stripped[0] == "{" and not key and not final and len(stripped) < 64 and ":" not in stripped:
                    return                                   # too early to tell
                self.state = "bare" if key and key.group(1) in _CALL_KEYS else "text"
            elif self.state == "bare":
                if not final:
                    return
                calls = _json_calls(self.held.strip(), self.tools, bare=True)
                if calls:
                    self.held = ""
                    return self._calls(out, calls)
                self.state = "text"
            elif self.state == "text":
                found = [(self.held.find(o), o) for o in TEXT_CALL_OPENERS if o in self.held]
                if not found:
                    # Only a tail that starts at the last "<" or "[" can begin an opener (no opener
                    # has either character after its first).
                    start = max(self.held.rfind("<"), self.held.rfind("["))
                    tail = self.held[start:] if start >= 0 and not final else ""
                    if not any(o.startswith(tail) for o in TEXT_CALL_OPENERS):
                        tail = ""
                    self._text(out, self.held[:len(self.held) - len(tail)])
                    self.held = tail
                    return
                at, opener = min(found)
                self._text(out, self.held[:at])
                self.held = self.held[at + len(opener):]
                if self.fences % 2:
                    self._text(out, opener)                  # inside a code block
                    continue
                self.state, self.opener = "call", opener
            else:                                            # call
                closer = TEXT_CALL_CLOSERS.get(self.opener, "")
                end = self.held.find(closer) if closer else -1
                if end < 0 and not final:
                    return
                body, rest = (self.held[:end], self.held[end + len(closer):]) if end >= 0 else (self.held, "")
                calls = parse_text_calls(self.opener, body, self.tools)
                if calls:
                    self._calls(out, calls)
                else:
                    self._text(out, self.opener + body + (closer if end >= 0 else ""))
                self.held, self.state = rest, "text"


def split_text_calls(text: str, tools: Mapping[str, Any]) -> Tuple[str, List[TextCall]]:
    """(the text left, the calls) of a whole answer, by TextToolCalls."""
    if "<" not in text and "[" not in text and not text.lstrip().startswith("{"):
        return text, []                          # no opener, no bare JSON: nothing to look for
    splitter = TextToolCalls(tools)
    pieces = splitter.feed(text) + splitter.flush()
    return "".join(p for kind, p in pieces if kind == "text"), [p for kind, p in pieces if kind == "call"]


def _reasoning_of(message: Dict[str, Any]) -> str:
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return reasoning if isinstance(reasoning, str) else ""


def to_anthropic(completion: Dict[str, Any], ctx: ResponseContext,
                 new_tool_id: Callable[[], str]) -> Dict[str, Any]:
    """A Chat Completion -> an Anthropic message. Raises ProxyError for an unusable answer."""
    if completion.get("error"):
        # An error in a 200 body: classified by its code when that is an HTTP status.
        code = completion["error"].get("code") if isinstance(completion["error"], dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 502
        raise upstream_error(status, json_bytes(completion), None)
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ProxyError(502, "api_error", "upstream answer has no choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: List[Dict[str, Any]] = []
    part_reasoning, text, part_refusal = content_parts(message.get("content"))
    reasoning = _reasoning_of(message) or part_reasoning
    if not reasoning:
        reasoning, text = split_think_tags(text)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": thinking_signature(reasoning)})
    tool_calls = message.get("tool_calls")
    calls = [c for c in tool_calls if isinstance(c, dict)] if isinstance(tool_calls, list) else []
    text_calls: List[TextCall] = []
    if ctx.text_tools and not calls:
        text, text_calls = split_text_calls(text, ctx.text_tools)
    stop_reason, stop_sequence = stop_reason_for(
        _string(choice.get("finish_reason")) or None, bool(calls or text_calls), text, ctx.stop_sequences,
        choice.get("stop_reason"))
    if stop_sequence and text.endswith(stop_sequence):
        text = text[:-len(stop_sequence)]
    if text.strip():                         # whitespace alone makes no block, as in a stream
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    refusal = refusal if isinstance(refusal, str) and refusal else part_refusal
    if refusal:
        content.append({"type": "text", "text": refusal})
        stop_reason = "refusal"
    used_ids = set(ctx.history_tool_ids)
    for call in calls:
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        name, arguments = _string(function.get("name")), function.get("arguments")
        if not name:
            if arguments in (None, "", {}):
                continue
            raise ProxyError(502, "api_error", "upstream returned a tool call without a function name")
        call_id = _string(call.get("id"))
        if not call_id or call_id in used_ids:   # missing, or reused from an earlier turn
            call_id = new_tool_id()
        call_id = id_with_signature(call_id, call)
        used_ids.add(call_id)
        content.append({"type": "tool_use", "id": call_id, "name": name,
                        "input": parse_tool_arguments(arguments)})
    for name, arguments in text_calls:
        content.append({"type": "tool_use", "id": new_tool_id(), "name": name, "input": arguments})
    return {"id": ctx.message_id, "type": "message", "role": "assistant", "model": ctx.model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": usage_to_anthropic(completion.get("usage"), ctx.input_tokens)}


# =============================================================================================
# Stream: Chat Completion chunks -> Anthropic events (a pure state machine)
# =============================================================================================
# Three jobs, three pieces: ThinkSplitter (above) tells <think> content from the answer,
# ToolCalls reassembles tool-call fragments into calls, and StreamTranslator, the content-block
# machine, turns both into Anthropic events.


_JSON_STRUCTURE = re.compile(r'[{}\[\]"\\]')


class JsonScan:
    """Whether fragments of JSON text add up to a complete value yet. Each fragment is scanned
    once (brackets outside strings), so asking after every fragment stays linear."""

    __slots__ = ("scanned", "depth", "in_string", "escaped", "started")

    def __init__(self) -> None:
        self.scanned = 0            # fragments scanned so far
        self.depth = 0              # bracket depth outside strings
        self.in_string = False
        self.escaped = False        # the last fragment ended in a backslash inside a string
        self.started = False        # a bracket was seen

    def complete(self, fragments: List[str]) -> bool:
        depth, in_string, escaped, started = self.depth, self.in_string, self.escaped, self.started
        for fragment in fragments[self.scanned:]:
            i = 1 if escaped else 0
            escaped = False
            while True:
                match = _JSON_STRUCTURE.search(fragment, i)
                if match is None:
                    break
                char, i = match.group(), match.end()
                if in_string:
                    if char == "\\":
                        if i >= len(fragment):
                            escaped = True
                        i += 1
                    elif char == '"':
                        in_string = False
                elif char == '"':
                    in_string = True
                elif char in "{[":
                    depth, started = depth + 1, True
                elif char in "}]":
                    depth -= 1
        self.scanned = len(fragments)
        self.depth, self.in_string, self.escaped, self.started = depth, in_string, escaped, started
        if started and depth <= 0 and not in_string:
            try:
                json.loads("".join(fragments))
                return True
            except ValueError:
                return False
        return False


class _ToolCall:
    __slots__ = ("id", "key", "name", "block", "pending", "arguments", "sent", "closed", "scan", "extra")

    def __init__(self, call_id: str, key: str, name: str) -> None:
        self.id = call_id                   # the id the client sees
        self.key = key                      # the id the upstream gave it ("" if none yet)
        self.name = name
        self.block: Optional[int] = None    # its content block index once opened
        self.pending: List[str] = []        # argument fragments not yet sent
        self.arguments: List[str] = []      # every fragment, to tell when the JSON is complete
        self.sent = False                   # a non-empty fragment went out
        self.closed = False
        self.scan = JsonScan()
        self.extra: Dict[str, Any] = {}     # the fragment's extra_content (Gemini's signature)

    def complete(self) -> bool:
        """Do the arguments so far form a complete JSON value?"""
        return self.scan.complete(self.arguments)


def _loads_or_none(fragments: List[str]) -> Any:
    try:
        return json.loads("".join(fragments))
    except ValueError:
        return None


class ToolCalls:
    """Tool-call fragments (`delta.tool_calls[]`) -> the calls they make up. No events.

    A fragment belongs to the call with its id, else to the call at its `index` (else to the
    last call). A different upstream id at a known index starts a new call (Gemini sends
    parallel calls all at index 0), as does a fragment with neither index nor id that names
    another function, or names one after the last call's arguments are complete. A new call
    keeps the upstream's id when it is unique in the conversation, else gets a fresh one."""

    def __init__(self, history_ids: FrozenSet[str], new_tool_id: Callable[[], str]) -> None:
        self.history_ids = history_ids
        self.new_tool_id = new_tool_id
        self.calls: List[_ToolCall] = []
        self.by_index: Dict[Any, _ToolCall] = {}
        self.by_key: Dict[str, _ToolCall] = {}

    def find(self, key: str, index: Any, name: str) -> Optional[_ToolCall]:
        """The call a fragment continues, or None when it starts a new one."""
        if key and key in self.by_key:
            return self.by_key[key]
        call = self.by_index.get(index) if index is not None else (self.calls[-1] if self.calls else None)
        if call is None:
            return None
        if key:
            if call.key and (name or call.complete()):
                return None                      # Gemini: another call at a repeated index
            if not call.key:                     # the upstream's id arrived after the name
                call.key = key
                if call.block is None and key not in self.history_ids:
                    call.id = key
            self.by_key[key] = call              # (some servers send a new id on every fragment)
        elif name and call.name and (name != call.name or call.complete()):
            return None                          # a new call although neither id nor index says so
        return call

    def take(self, fragment: Dict[str, Any]) -> Optional[Tuple[_ToolCall, str]]:
        """(the call, the argument text) a fragment brings; None for metadata of no known call."""
        index = fragment.get("index")
        if not isinstance(index, (int, str)):
            index = None
        key = _string(fragment.get("id"))
        function = fragment.get("function") if isinstance(fragment.get("function"), dict) else {}
        name = _string(function.get("name"))
        arguments = function.get("arguments")
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):
            arguments = json.dumps(arguments)        # some servers send the arguments as an object
        call = self.find(key, index, name)
        if call is None:
            if not name and not arguments:
                return None
            unique = key and key not in self.history_ids and key not in self.by_key
            call = _ToolCall(key if unique else self.new_tool_id(), key, name)
            self.calls.append(call)
            if index is not None:
                self.by_index[index] = call
            if key:
                self.by_key[key] = call
        elif name and not call.name:
            call.name = name
        if isinstance(fragment.get("extra_content"), dict) and call.block is None:
            call.extra = {"extra_content": fragment["extra_content"]}
        return call, arguments


@dataclasses.dataclass
class StreamEnd:
    """How a translated stream ended, for whoever drives a translator (no list positions)."""
    stop_reason: Optional[str] = None           # set when the answer ended normally
    stop_sequence: Optional[str] = None
    usage: Optional[Dict[str, int]] = None      # the Anthropic usage of the message_delta
    error: Optional[Dict[str, str]] = None      # {"type", "message"} when it ended with an error


class StreamTranslator:
    """Parsed Chat Completion chunks in, Anthropic SSE events (dicts) out. No I/O.

    ``start()`` gives message_start and a ping; ``feed(chunk)`` the events one chunk causes;
    ``finish()`` the closing events at ``[DONE]`` or end of stream; ``fail(type, msg)`` an
    ``error`` event. After finish or fail, ``ended`` is true, ``result`` says how it ended, and
    nothing more comes out.

    The state is one variable, ``self.state``: the kind of the one open content block, or
    "idle" between blocks, or "ended"::

        idle ──┬── reasoning ──▶ thinking ┐   from a block state, content of another kind
               ├── content ────▶ text     ├─  opens its block (the open one is closed first:
               └── tool call ──▶ tool ────┘   thinking with a signature_delta, a call that
                                              sent no arguments with "{}"); tool ── the next
                                              call ──▶ tool
        idle, thinking, text, tool ── finish ──▶ close the open block, message_delta,
                                                 message_stop ──▶ ended
        any ── error chunk / cut stream / fail ──▶ error event (no message_stop) ──▶ ended

    Exactly one block is open at a time and indices go 0, 1, 2. Content goes through a
    ThinkSplitter (a leading <think>…</think> is thinking), then, when tools were offered,
    TextToolCalls (calls a model wrote as text); tool-call fragments go through ToolCalls. The open call's fragments go out as they arrive. A call that starts while
    another is still open (interleaved parallel calls) waits, buffered, until the open call's
    arguments form complete JSON or the stream ends; so does text or reasoning that arrives in
    the middle of a call's arguments (``deferred``), since opening its block would cut the call
    short. A call is opened only once it has a name and either its id or some arguments.
    """

    def __init__(self, ctx: ResponseContext, new_tool_id: Callable[[], str]) -> None:
        self.ctx = ctx
        self.state = "idle"                        # idle, thinking, text, tool or ended
        self.ended = False                         # state == "ended", read once per chunk
        self.next_index = 0
        self.current: Optional[_ToolCall] = None   # the open call, in state "tool"
        self.thinking: List[str] = []              # the open thinking block's text, for its signature
        self.think = ThinkSplitter()
        self.text_calls = TextToolCalls(ctx.text_tools) if ctx.text_tools else None
        self.text_call_count = 0                   # tool_use blocks made from calls written as text
        self.tools = ToolCalls(ctx.history_tool_ids, new_tool_id)
        self.deferred: List[Tuple[str, str]] = []  # text/reasoning held while a call is incomplete
        self.finish_reason: Optional[str] = None
        self.matched_stop: Any = None
        self.usage: Optional[Dict[str, Any]] = None
        self.text_tail = ""
        self.tail_length = max((len(s) for s in ctx.stop_sequences), default=0)
        self.output_chars = 0
        self.result: Optional[StreamEnd] = None    # set once ended
        self.chunks_seen = 0
        self.usage_last = False                    # the last chunk carried usage and no choices

    # -- events ---------------------------------------------------------------------------

    def start(self) -> List[Dict[str, Any]]:
        usage = {"input_tokens": self.ctx.input_tokens, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        return [{"type": "message_start", "message": {
            "id": self.ctx.message_id, "type": "message", "role": "assistant",
            "model": self.ctx.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage}}, {"type": "ping"}]

    def feed(self, chunk: Dict[str, Any]) -> List[Dict[str, Any]]:
        if self.state == "ended":
            return []
        self.chunks_seen += 1
        error = chunk.get("error")
        if error:
            message = upstream_error_message(chunk, "error in stream")
            overflow = context_overflow(message, chunk)
            if overflow is not None:             # in Anthropic's words, so that Claude Code compacts
                return self.fail("invalid_request_error", overflow)
            code = error.get("code") if isinstance(error, dict) else None
            return self.fail(STREAM_ERROR_CODES.get(code if isinstance(code, (int, str)) else None, "api_error"),
                             "upstream: " + message)
        usage = chunk.get("usage")
        if not isinstance(usage, dict) or not usage:
            groq = chunk.get("x_groq")       # Groq: usage only in x_groq.usage of the last chunk
            usage = groq.get("usage") if isinstance(groq, dict) else None
        if usage and isinstance(usage, dict):
            self.usage = usage               # cumulative when sent on every chunk: keep the last
        choices = chunk.get("choices")
        self.usage_last = bool(usage) and not choices and self.chunks_seen > 1
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return []                        # usage chunk; Azure's prompt_filter_results chunk
        choice = choices[0]
        delta = choice.get("delta")
        events: List[Dict[str, Any]] = []
        if delta and isinstance(delta, dict):
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                self._reasoning(reasoning, events)
            content = delta.get("content")
            if content:
                if isinstance(content, str):
                    self._content(content, events)
                else:                                # typed parts (Mistral's Magistral)
                    part_reasoning, part_text, part_refusal = content_parts(content)
                    if part_reasoning:
                        self._reasoning(part_reasoning, events)
                    if part_text or part_refusal:
                        self._content(part_text + part_refusal, events)
            tool_calls = delta.get("tool_calls")
            if tool_calls and isinstance(tool_calls, list):
                for fragment in tool_calls:
                    if isinstance(fragment, dict) and self.state != "ended":
                        self._tool_fragment(fragment, events)
        finish_reason = choice.get("finish_reason")
        if finish_reason and isinstance(finish_reason, str):
            self.finish_reason = finish_reason
            self.matched_stop = choice.get("stop_reason")
        return events

    def finish(self, done: bool = True) -> List[Dict[str, Any]]:
        """Closing events at the end of the upstream stream ([DONE] or the connection's end)."""
        if self.state == "ended":
            return []
        if self.finish_reason == "error":
            return self.fail("api_error", "upstream ended the answer with finish_reason 'error'")
        if self.finish_reason is None and not ((done or self.usage_last) and self.chunks_seen):
            # A cut connection must not look like a finished answer: that would poison the
            # conversation with a truncated turn. ([DONE], or a closing usage-only chunk, after
            # no finish_reason is an ended answer: OpenRouter relaying Kimi K2, Snowflake Cortex.)
            return self.fail("api_error", "the upstream closed the stream after %d events, before the answer "
                             "ended" % self.chunks_seen)
        events: List[Dict[str, Any]] = []
        for kind, text in self.think.flush():    # held text joins the open block where it can
            (self._thinking if kind == "thinking" else self._answer)(text, events)
        if self.text_calls is not None:
            self._text_pieces(self.text_calls.flush(), events)
        self._close(events)
        self._flush_deferred(events)
        self._close(events)
        for call in self.tools.calls:
            if call.block is not None:
                continue
            if not call.name:
                if "".join(call.arguments).strip():
                    return self.fail("api_error", "upstream sent a tool call without a function name")
                continue                          # a metadata-only fragment: nothing to call
            self._open_tool(call, events)
            self._close(events)
        for call in self.tools.calls:
            if call.block is not None and call.sent and not isinstance(_loads_or_none(call.arguments), dict):
                # Its fragments went out already; ending normally would hand the client tool
                # input that is not a JSON object. An error makes the client ask again.
                return self.fail("api_error", "upstream sent tool call %s arguments that are not a "
                                 "complete JSON object" % call.id)
        stop_reason, stop_sequence = stop_reason_for(
            self.finish_reason, self.text_call_count > 0 or any(c.block is not None for c in self.tools.calls),
            self.text_tail,
            self.ctx.stop_sequences, self.matched_stop)
        usage = usage_to_anthropic(self.usage, self.ctx.input_tokens)
        if not self.usage or _count(self.usage.get("completion_tokens")) is None:
            usage["output_tokens"] = max(self.output_chars // 4, 1)
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                       "usage": usage})
        events.append({"type": "message_stop"})
        self.state, self.ended = "ended", True
        self.result = StreamEnd(stop_reason, stop_sequence, usage)
        return events

    def fail(self, error_type: str, message: str) -> List[Dict[str, Any]]:
        if self.state == "ended":
            return []
        self.state, self.ended = "ended", True
        error = {"type": error_type, "message": message}
        self.result = StreamEnd(error=error)
        return [{"type": "error", "error": error}]

    # -- transitions ----------------------------------------------------------------------

    def _open(self, kind: str, content_block: Dict[str, Any], events: List[Dict[str, Any]]) -> int:
        self._close(events)
        index = self.next_index
        self.next_index += 1
        self.state = kind
        events.append({"type": "content_block_start", "index": index, "content_block": content_block})
        return index

    def _close(self, events: List[Dict[str, Any]]) -> None:
        if self.state == "idle":
            return
        index = self.next_index - 1
        if self.state == "thinking":
            signature = thinking_signature("".join(self.thinking))
            self.thinking = []
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": signature}})
        elif self.state == "tool":
            if not self.current.sent:
                # The arguments must add up to a JSON object; a call without any is {}.
                events.append({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": "{}"}})
            self.current.closed = True
            self.current = None
        events.append({"type": "content_block_stop", "index": index})
        self.state = "idle"

    def _tool_incomplete(self) -> bool:
        return self.state == "tool" and not self.current.complete()

    def _release_held(self, events: List[Dict[str, Any]]) -> None:
        """Content held back as a possible <think> tag is text after all, since another block
        opens: it goes first."""
        self._text(self.think.release(), events)

    def _flush_deferred(self, events: List[Dict[str, Any]]) -> None:
        deferred, self.deferred = self.deferred, []
        for kind, text in deferred:
            (self._content if kind == "text" else self._reasoning)(text, events)

    def _reasoning(self, text: str, events: List[Dict[str, Any]]) -> None:
        if self.deferred or self._tool_incomplete():
            self.deferred.append(("reasoning", text))
        else:
            self._release_held(events)
            self._thinking(text, events)

    def _content(self, text: str, events: List[Dict[str, Any]]) -> None:
        if self.deferred or self._tool_incomplete():
            self.deferred.append(("text", text))
            return
        if self.think.state == "done":           # the common case: no <think> section to find
            if self.text_calls is None:
                return self._text(text, events)
            return self._text_pieces(self.text_calls.feed(text), events)
        for kind, piece in self.think.feed(text):
            (self._thinking if kind == "thinking" else self._answer)(piece, events)

    def _answer(self, text: str, events: List[Dict[str, Any]]) -> None:
        """Answer text, with tool calls written as text taken out when tools were offered."""
        if self.text_calls is None:
            self._text(text, events)
        else:
            self._text_pieces(self.text_calls.feed(text), events)

    def _text_pieces(self, pieces: List[Tuple[str, Any]], events: List[Dict[str, Any]]) -> None:
        for kind, piece in pieces:
            if kind == "text":
                self._text(piece, events)
                continue
            name, arguments = piece
            call = _ToolCall(self.tools.new_tool_id(), "", name)
            self._open_tool(call, events)
            self._send_arguments(call, json.dumps(arguments, ensure_ascii=False), events)
            self._close(events)
            self.text_call_count += 1

    def _thinking(self, text: str, events: List[Dict[str, Any]]) -> None:
        if self.state != "thinking":
            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, events)
        self.output_chars += len(text)
        self.thinking.append(text)
        events.append({"type": "content_block_delta", "index": self.next_index - 1,
                       "delta": {"type": "thinking_delta", "thinking": text}})

    def _text(self, text: str, events: List[Dict[str, Any]]) -> None:
        if not text:
            return
        if self.state != "text":
            self._open("text", {"type": "text", "text": ""}, events)
        self.output_chars += len(text)
        if self.tail_length:
            self.text_tail = (self.text_tail + text)[-self.tail_length:]
        events.append({"type": "content_block_delta", "index": self.next_index - 1,
                       "delta": {"type": "text_delta", "text": text}})

    def _tool_fragment(self, fragment: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
        taken = self.tools.take(fragment)
        if taken is None:
            return
        call, arguments = taken
        if arguments:
            if call.closed:
                if arguments.strip():
                    events.extend(self.fail("api_error", "upstream sent more arguments for tool call %s "
                                                         "after they were complete" % call.id))
                return
            call.arguments.append(arguments)
            if call is self.current:
                self._send_arguments(call, arguments, events)
                if self.deferred and call.complete():
                    self._flush_deferred(events)
                return
            call.pending.append(arguments)
        # Opened once it has a name and either its id or some arguments (an id that comes
        # after the name is then still the one the client sees).
        if call.block is None and call.name and (call.key or call.arguments) and \
                not self.deferred and not self._tool_incomplete():
            self._open_tool(call, events)

    def _open_tool(self, call: _ToolCall, events: List[Dict[str, Any]]) -> None:
        self._release_held(events)
        call.id = id_with_signature(call.id, call.extra)
        call.block = self._open("tool", {"type": "tool_use", "id": call.id, "name": call.name,
                                         "input": {}}, events)
        self.current = call
        if call.pending:
            self._send_arguments(call, "".join(call.pending), events)
            call.pending = []

    def _send_arguments(self, call: _ToolCall, arguments: str, events: List[Dict[str, Any]]) -> None:
        self.output_chars += len(arguments)
        call.sent = True
        events.append({"type": "content_block_delta", "index": call.block,
                       "delta": {"type": "input_json_delta", "partial_json": arguments}})


def encode_sse(event: Dict[str, Any]) -> bytes:
    """One SSE event: `event:` line named after data.type, one `data:` line, blank line."""
    kind = event["type"]
    if kind == "content_block_delta" and len(event) == 3:
        # Most events of a stream: the same bytes json_bytes() makes, from a template.
        delta = event["delta"]
        template = _DELTA_TEMPLATES.get(delta["type"])
        if template is not None and len(delta) == 2 and type(event["index"]) is int:
            text = delta[template[1]]
            if type(text) is str:
                return template[0] % (event["index"], _json_string(text).encode("ascii"))
    return b"event: " + kind.encode("ascii") + b"\ndata: " + json_bytes(event) + b"\n\n"


# The JSON string encoder json_bytes() uses (compact, ASCII with \\uXXXX escapes).
_json_string = json.encoder.encode_basestring_ascii
_DELTA_TEMPLATES = {
    kind: (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
           b'"delta":{"type":"' + kind.encode("ascii") + b'","' + field.encode("ascii") + b'":%s}}\n\n', field)
    for kind, field in (("text_delta", "text"), ("thinking_delta", "thinking"),
                        ("input_json_delta", "partial_json"))}


def message_to_events(message: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The events that stream a finished message (for an upstream that answered a stream
    request with one JSON body)."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None)
    events: List[Dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "text":
            shell, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
        elif kind == "thinking":
            shell = {"type": "thinking", "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": block["thinking"]}
        else:
            shell = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            delta = {"type": "input_json_delta",
                     "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        events.append({"type": "content_block_start", "index": index, "content_block": shell})
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
        if kind == "thinking":
            events.append({"type": "content_block_delta", "index": index, "delta": {
                "type": "signature_delta", "signature": block["signature"]}})
        events.append({"type": "content_block_stop", "index": index})
    events.append({"type": "message_delta", "delta": {
        "stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
        "usage": message["usage"]})
    events.append({"type": "message_stop"})
    return events


def assemble_message(events: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """The message a stream of events adds up to, as an SDK accumulates it. Raises ProxyError
    if the stream carried an error event."""
    message: Dict[str, Any] = {}
    partial: Dict[int, List[str]] = {}
    for event in events:
        kind = event["type"]
        if kind == "message_start":
            message = dict(event["message"], content=[])
        elif kind == "content_block_start":
            message["content"].append(dict(event["content_block"]))
            partial[event["index"]] = []
        elif kind == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            field = DELTA_FIELDS[delta["type"]]
            if field == "input":
                partial[event["index"]].append(delta["partial_json"])
            elif field == "signature":
                block["signature"] = delta["signature"]
            else:
                block[field] += delta[field]
        elif kind == "content_block_stop":
            block = message["content"][event["index"]]
            if block["type"] in ("tool_use", "server_tool_use"):
                block["input"] = parse_tool_arguments("".join(partial[event["index"]]))
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"] = dict(message.get("usage") or {}, **event["usage"])
        elif kind == "error":
            raise ProxyError(502, event["error"]["type"], event["error"]["message"])
    return message


DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "input",
                "signature_delta": "signature"}


# =============================================================================================
# Responses API: the same translation for upstreams served at POST /v1/responses (pure)
# =============================================================================================
# OpenAI's codex and -pro models answer only at /v1/responses (Azure, vLLM, Ollama and
# OpenRouter serve it too). The request and the answer are shaped differently from Chat
# Completions, but the conversation rules above hold: merged turns, calls answered in call
# order (a call with no result gets a synthetic one, a result with no call becomes user text),
# mid-conversation system messages as <system-reminder> user text, server tools dropped.
# Rules of this wire format:
# - `system` -> `instructions`; messages -> `input` items: `message` items (`input_text`,
#   `input_image`, `input_file` parts; assistant text as `output_text`), `function_call` /
#   `function_call_output` items paired by `call_id`, `reasoning` items.
# - Requests are stateless: `store: false` and `include: ["reasoning.encrypted_content"]`.
#   Each reasoning item of an answer then comes back whole (id, summary, encrypted_content)
#   and travels to the client inside the `signature` of its thinking block (prefix "ccpr1.",
#   then the item as base64url JSON); Claude Code sends the block back unchanged and the item
#   goes upstream again, byte for byte, at its place in the turn. Thinking blocks that carry
#   no item are dropped (the upstream cannot take reasoning text).
# - Tools are flat ({"type": "function", "name", ...}) and `strict: false`: the Responses API
#   makes function tools strict by default, which rejects most of Claude Code's schemas.
# - No stop sequences: the Responses API has no `stop` parameter.
# - The answer: `reasoning` items -> thinking, `message` items -> text (refusal too, with
#   stop_reason "refusal"), `function_call` items -> tool_use (id = call_id). An answer ends
#   with `status` completed, incomplete (incomplete_details.reason) or failed (error.code).

RESPONSES_SIGNATURE_PREFIX = "ccpr1."
# Models served only by /v1/responses. "-pro" names are OpenAI's (o1-pro, o3-pro, gpt-5-pro):
# elsewhere (OpenRouter, local servers) such a name may be served at /chat/completions.
RESPONSES_ONLY_MODELS = re.compile(r"codex", re.I)
PRO_MODELS = re.compile(r"-pro($|[-.@:])", re.I)
RESPONSES_API_SETTINGS = ("chat", "responses", "auto")


def uses_responses_api(model: str, dialect_name: str, api_setting: str) -> bool:
    """Does the upstream model (the name sent upstream) take POST /responses? `api_setting`
    is NAME_API: chat, responses, or auto (the Responses API for models served only there)."""
    setting = api_setting.lower()
    if setting not in RESPONSES_API_SETTINGS:
        raise ValueError("the API setting must be one of %s, got %r" % (", ".join(RESPONSES_API_SETTINGS), api_setting))
    if setting != "auto":
        return setting == "responses"
    return bool(RESPONSES_ONLY_MODELS.search(model)) or (
        dialect_name in ("openai", "azure") and PRO_MODELS.search(model) is not None)


def reasoning_signature(item: Dict[str, Any]) -> str:
    """The thinking-block signature that carries a Responses reasoning item to the client."""
    encoded = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return RESPONSES_SIGNATURE_PREFIX + base64.urlsafe_b64encode(encoded).decode("ascii").rstrip("=")


def reasoning_item_of(signature: Any) -> Optional[Dict[str, Any]]:
    """The reasoning item a signature made by reasoning_signature() carries, else None (an
    Anthropic signature, ours from the Chat path, or anything damaged)."""
    if not isinstance(signature, str) or not signature.startswith(RESPONSES_SIGNATURE_PREFIX):
        return None
    encoded = signature[len(RESPONSES_SIGNATURE_PREFIX):]
    try:
        decoded = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        item = json.loads(decoded.decode("utf-8", "surrogatepass"))
    except (ValueError, UnicodeDecodeError):     # (binascii.Error is a ValueError)
        return None
    return item if isinstance(item, dict) and item.get("type") == "reasoning" else None


def _replayable(item: Dict[str, Any]) -> bool:
    """Can the item go upstream again without server-side storage? OpenAI needs its
    encrypted_content; vLLM's reasoning items carry their text as `content` instead."""
    encrypted, content = item.get("encrypted_content"), item.get("content")
    return (isinstance(encrypted, str) and bool(encrypted)) or (isinstance(content, list) and bool(content))


def reasoning_text(item: Dict[str, Any]) -> str:
    """The readable reasoning of an item: its summary parts, else its reasoning_text content
    (vLLM, gpt-oss), joined by a blank line."""
    for field in ("summary", "content"):
        parts = item.get(field)
        texts = [_string(p.get("text")) for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []
        if any(texts):
            return "\n\n".join(t for t in texts if t)
    return ""


def _thinking_block(item: Dict[str, Any], text: str) -> Optional[Dict[str, Any]]:
    """The thinking block for a reasoning item: the item rides in the signature when it can
    be replayed; otherwise the block is ours from the Chat path (dropped on the way back)."""
    if _replayable(item):
        return {"type": "thinking", "thinking": text, "signature": reasoning_signature(item)}
    if text:
        return {"type": "thinking", "thinking": text, "signature": thinking_signature(text)}
    return None


RESPONSES_PARTS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "text": lambda p: {"type": "input_text", "text": p["text"]},
    # OpenAI's input_image requires `detail`.
    "image_url": lambda p: {"type": "input_image", "image_url": p["image_url"]["url"], "detail": "auto"},
    "file": lambda p: {"type": "input_file", "filename": p["file"]["filename"], "file_data": p["file"]["file_data"]},
}


def _input_parts(parts: List[Dict[str, Any]], dialect: Dialect) -> List[Dict[str, Any]]:
    """Chat content parts (from the shared block handlers) as Responses input parts."""
    if not dialect.accepts_pdf and any(p["type"] == "file" for p in parts):
        # Ollama's /v1/responses: "file inputs are not currently supported".
        raise _invalid("the upstream provider (%s) does not take PDF documents; send the text of the "
                       "document instead, or use a provider that reads PDFs" % dialect.name)
    return [RESPONSES_PARTS[p["type"]](p) for p in parts]


def _add_user_parts(items: List[Dict[str, Any]], parts: List[Dict[str, Any]]) -> None:
    """Add a user message, merged into the last item when that is a user message already."""
    if not parts:
        return
    last = items[-1] if items else None
    if last is not None and last.get("type") == "message" and last["role"] == "user":
        items[-1] = dict(last, content=last["content"] + parts)
    else:
        items.append({"type": "message", "role": "user", "content": list(parts)})


def _call_id(tool_use_id: str, dialect: Dialect) -> str:
    return _upstream_call_id(split_signature(tool_use_id)[0], dialect)


def _answer_function_calls(items: List[Dict[str, Any]], pending: List[str], results: Dict[str, str],
                           dialect: Dialect) -> None:
    """One function_call_output per pending call, in call order; an unanswered call gets a
    synthetic one (OpenAI: 400 "No tool output found for function call call_...")."""
    for call_id in pending:
        if call_id not in results:
            log.debug("history repair: tool call %s had no result", call_id)
        items.append({"type": "function_call_output", "call_id": _call_id(call_id, dialect),
                      "output": results.get(call_id, INTERRUPTED_RESULT)})


def _assistant_items(content: Any, where: str, dialect: Dialect) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(input items of one assistant turn in block order, the tool_use ids it calls)."""
    items: List[Dict[str, Any]] = []
    texts: List[str] = []
    calls: List[str] = []

    def flush_text() -> None:
        if texts:
            # Azure and vLLM validate output_text strictly: `annotations` is required there.
            items.append({"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "\n\n".join(texts), "annotations": []}]})
            del texts[:]

    for block in _blocks(content, where):
        kind = block.get("type")
        if kind == "text":
            if block.get("text"):
                texts.append(block["text"])
        elif kind == "tool_use":
            flush_text()
            call = _tool_call(block)
            calls.append(call["id"])
            items.append({"type": "function_call", "call_id": _call_id(call["id"], dialect),
                          "name": call["function"]["name"], "arguments": call["function"]["arguments"]})
        elif kind == "thinking":
            item = reasoning_item_of(block.get("signature"))
            if item is not None:                  # reasoning this upstream format produced
                flush_text()
                items.append(item)
        elif kind in ("redacted_thinking", "server_tool_use"):
            continue
        else:
            texts.extend(p["text"] for p in _user_block_parts(block, where) if p["type"] == "text")
    flush_text()
    while items and items[-1]["type"] == "reasoning":
        # OpenAI: 400 "Item rs_... of type reasoning was provided without its required following
        # item" (an answer cut after its reasoning, or whose other blocks were dropped).
        items.pop()
    return items, calls


def responses_input(messages: List[Any], dialect: Dialect) -> List[Dict[str, Any]]:
    """Anthropic `messages` -> Responses `input` items (the conversation rules of to_openai)."""
    items: List[Dict[str, Any]] = []
    pending: List[str] = []        # tool_use ids of the last assistant turn, not yet answered
    for role, content, where in _merged_turns(messages):
        if role == "assistant":
            if pending:
                _answer_function_calls(items, pending, {}, dialect)
            turn, pending = _assistant_items(content, where, dialect)
            items.extend(turn)
        elif role == "user":
            results: Dict[str, str] = {}
            orphans: List[Dict[str, Any]] = []
            images: List[Dict[str, Any]] = []
            parts: List[Dict[str, Any]] = []
            for block in _blocks(content, where):
                if block.get("type") == "tool_result":
                    text, result_images = _tool_result(block, where)
                    call_id = block.get("tool_use_id") or ""
                    images.extend(result_images)
                    if call_id in pending and call_id not in results:
                        results[call_id] = text
                    else:
                        # OpenAI: 400 "No tool call found for function call output with call_id".
                        log.debug("history repair: tool result %s has no call before it", call_id)
                        orphans.append(_text_part("[Result of tool call %s]\n%s" % (call_id, text)))
                else:
                    parts.extend(_user_block_parts(block, where))
            if pending:
                _answer_function_calls(items, pending, results, dialect)
                pending = []
            _add_user_parts(items, _input_parts(orphans + images + parts, dialect))
        elif role == "system":
            text = text_of(content)
            if text:
                if pending:
                    _answer_function_calls(items, pending, {}, dialect)
                    pending = []
                _add_user_parts(items, [{"type": "input_text", "text": _system_reminder(text)}])
        else:
            raise _invalid("%s: role must be 'user', 'assistant' or 'system', got %r" % (where, role))
    if pending:
        _answer_function_calls(items, pending, {}, dialect)
    return items


def _responses_tools(request: Dict[str, Any], dialect: Dialect) -> List[Dict[str, Any]]:
    tools = []
    loaded = loaded_tool_names(request["messages"])
    for tool in request.get("tools") or ():
        if tool.get("type") not in (None, "custom") or not tool.get("name"):
            log.info("server tool %r dropped: the upstream cannot run it", tool.get("type"))
            continue
        if tool.get("defer_loading") and tool["name"] not in loaded:
            continue        # as at Anthropic: hidden from the model until a tool_reference loads it
        function = _function_tool(tool)["function"]
        if dialect.clean_schemas:
            function["parameters"] = clean_schema(function["parameters"])
        tools.append(dict(function, type="function", strict=False))
    return tools


def _responses_tool_choice(choice: Dict[str, Any]) -> Any:
    if choice.get("type") == "tool":
        return {"type": "function", "name": choice.get("name") or ""}
    return TOOL_CHOICE.get(choice.get("type"), "auto")


def to_responses(request: Dict[str, Any], settings: Settings, dialect: Dialect, model: str = "") -> Dict[str, Any]:
    """A validated Anthropic Messages request -> a Responses API request (a new dict) for
    upstream `model` (default: the first of the tier's chain)."""
    model = model or model_chain(map_model(request["model"], settings), (p.name for p in settings.providers))[0].model
    body: Dict[str, Any] = {"model": model}
    instructions = _system_text(request.get("system"))
    if instructions:
        body["instructions"] = instructions
    body["input"] = responses_input(request["messages"], dialect)
    # Stateless: nothing is kept upstream, and each reasoning item comes back whole.
    body["store"] = False
    body["include"] = ["reasoning.encrypted_content"]

    max_tokens = request.get("max_tokens")
    if max_tokens is not None:
        if settings.max_tokens_limit:
            max_tokens = min(max_tokens, settings.max_tokens_limit)
        body["max_output_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if request.get(name) is not None:
            body[name] = request[name]
    if request.get("stream"):
        body["stream"] = True
    effort = reasoning_effort(request)
    thinking = request.get("thinking") if isinstance(request.get("thinking"), dict) else {}
    if effort or thinking.get("type") in ("enabled", "adaptive"):
        body["reasoning"] = dict({"effort": effort} if effort else {}, summary="auto")

    config = request.get("output_config") if isinstance(request.get("output_config"), dict) else {}
    output_format = config.get("format") or request.get("output_format")
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema" \
            and isinstance(output_format.get("schema"), dict):
        schema = output_format["schema"]
        body["text"] = {"format": {"type": "json_schema", "name": "output",
                                   "schema": clean_schema(schema) if dialect.clean_schemas else schema}}

    tools = _responses_tools(request, dialect)
    choice = request.get("tool_choice")
    if tools:
        body["tools"] = tools
        if isinstance(choice, dict):
            body["tool_choice"] = _responses_tool_choice(choice)
            if choice.get("disable_parallel_tool_use") and choice.get("type") != "none":
                body["parallel_tool_calls"] = False
    return body


# error.code of a failed response or an `error` event -> the HTTP status it stands for
RESPONSES_ERROR_STATUS = {
    "rate_limit_exceeded": 429, "insufficient_quota": 429, "server_error": 500,
    "server_is_overloaded": 503, "overloaded": 503, "slow_down": 503,
    "context_length_exceeded": 400, "invalid_prompt": 400, "invalid_encrypted_content": 400,
    "invalid_request_error": 400, "vector_store_timeout": 504,
}
# (prefix of an error code, status): OpenAI's image errors and other refusals of the input
RESPONSES_ERROR_PREFIXES = (("invalid_", 400), ("image_", 400), ("empty_image", 400),
                            ("unsupported_", 400), ("failed_to_download", 400))
INCOMPLETE_TO_STOP = {"max_output_tokens": "max_tokens", "content_filter": "refusal"}


def responses_error(error: Any, fallback: str) -> ProxyError:
    """The ProxyError for a Responses error object ({"code", "message"}), by its code."""
    code = error.get("code") if isinstance(error, dict) else None
    status = RESPONSES_ERROR_STATUS.get(code) if isinstance(code, str) else code
    if not isinstance(status, int) or not 400 <= status < 600:
        status = next((s for prefix, s in RESPONSES_ERROR_PREFIXES
                       if isinstance(code, str) and code.startswith(prefix)), 502)
    payload = {"error": error if isinstance(error, dict) else {"message": fallback}}
    return upstream_error(status, json_bytes(payload), None)


def responses_usage(usage: Any) -> Any:
    """Responses usage in the Chat Completions shape usage_to_anthropic() reads."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = {"cached_tokens": details.get("cached_tokens")} if isinstance(details, dict) else None
    return {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": cached}


def _message_text(item: Dict[str, Any]) -> Tuple[str, bool]:
    """(the text of a message item, whether any of it is a refusal)."""
    texts, refused = [], False
    for part in item.get("content") if isinstance(item.get("content"), list) else ():
        if isinstance(part, dict):
            if part.get("type") == "refusal":
                texts.append(_string(part.get("refusal")))
                refused = True
            else:
                texts.append(_string(part.get("text")))
    return "".join(texts), refused


def responses_to_anthropic(response: Dict[str, Any], ctx: ResponseContext,
                           new_tool_id: Callable[[], str]) -> Dict[str, Any]:
    """A Responses API answer -> an Anthropic message. Raises ProxyError for a failed one."""
    status = response.get("status")
    if response.get("error") or status == "failed":
        raise responses_error(response.get("error"), "upstream response failed")
    if status in ("cancelled", "queued", "in_progress"):
        raise ProxyError(502, "api_error", "upstream response is %s, not finished" % status)
    output = response.get("output")
    if not isinstance(output, list):
        raise ProxyError(502, "api_error", "upstream answer has no output")
    content: List[Dict[str, Any]] = []
    used_ids = set(ctx.history_tool_ids)
    refused = has_calls = False
    for item in output:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "reasoning":
            block = _thinking_block(item, reasoning_text(item))
            if block:
                content.append(block)
        elif kind == "message":
            text, refusal = _message_text(item)
            refused = refused or refusal
            if text.strip():
                content.append({"type": "text", "text": text})
        elif kind == "function_call":
            name, arguments = _string(item.get("name")), item.get("arguments")
            if not name:
                if arguments in (None, "", {}):
                    continue
                raise ProxyError(502, "api_error", "upstream returned a function call without a name")
            call_id = _string(item.get("call_id"))
            if not call_id or call_id in used_ids:   # missing, or reused from an earlier turn
                call_id = new_tool_id()
            used_ids.add(call_id)
            has_calls = True
            content.append({"type": "tool_use", "id": call_id, "name": name,
                            "input": parse_tool_arguments(arguments)})
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    if status == "incomplete":
        stop_reason = INCOMPLETE_TO_STOP.get(reason, "end_turn")
    else:
        stop_reason = "tool_use" if has_calls else "refusal" if refused else "end_turn"
    return {"id": ctx.message_id, "type": "message", "role": "assistant", "model": ctx.model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage_to_anthropic(responses_usage(response.get("usage")), ctx.input_tokens)}


class _OutputItem:
    """One item of a streamed answer (by output_index), and what of it went to the client."""
    __slots__ = ("index", "kind", "item", "done", "block", "pending", "fragments", "sent",
                 "thinking", "source", "summary_index", "held")

    def __init__(self, index: Any, item: Dict[str, Any]) -> None:
        self.index = index
        self.kind = item.get("type")            # "reasoning", "message", "function_call", other
        self.item = item                        # the latest whole item (complete at .done)
        self.done = False                       # output_item.done (or the response's end) seen
        self.block: Optional[int] = None        # its content block index once opened
        self.pending: List[Tuple[str, str, Any]] = []   # deltas held while another item streams
        self.fragments: List[str] = []          # function_call arguments received
        self.sent = 0                           # of which sent to the client
        self.thinking: List[str] = []           # reasoning text sent
        self.source: Optional[str] = None       # "summary" or "content": the reasoning text used
        self.summary_index: Any = None
        self.held = ""                          # leading whitespace of a message, not yet sent


class ResponsesStreamTranslator:
    """Parsed Responses API stream events in, Anthropic SSE events (dicts) out. No I/O.

    The same interface as StreamTranslator: ``start()``, ``feed(event)`` (the parsed `data` of
    each SSE event; its name is in `type`), ``finish(done)``, ``fail(type, message)``,
    ``ended``, ``result`` (a StreamEnd) and ``chunks_seen``. The answer ends at the upstream's
    terminal event (``response.completed`` / ``response.incomplete`` / ``response.failed`` /
    ``error``), inside ``feed``; ``finish`` after that adds nothing, and without one it is a
    cut (an error event). OpenAI sends no [DONE] (some gateways send one after the end), so
    ``done`` changes nothing here.

    The upstream streams output items, each opened by ``response.output_item.added`` and
    closed by ``response.output_item.done``, which carries the whole item. One item at a time
    owns the client's stream (``self.active``); an item added while another is active
    (parallel calls interleaved) waits in ``self.queue`` with its deltas held, and goes out
    whole, in order, once the active one is done::

                         output_item.added                  output_item.done
        (no active) ───────────────────────▶ active item ────────────────────▶ (no active)
              ▲              reasoning: open thinking         reasoning: signature_delta
              │              function_call: open tool_use     (the item, encrypted_content
              │              message: (text block opens at    and all), then close
              │                        its first text)        call: "{}" if no arguments
              │                                               next queued item becomes active
              └── deltas of the active item go out at once; others wait with their item
        any state ── response.completed / incomplete ──▶ every item closed in order,
                                                           message_delta, message_stop
        any state ── response.failed / error / finish() before the end ──▶ error event

    Deltas: output_text and refusal -> text_delta (a refusal makes stop_reason "refusal");
    reasoning_summary_text (a blank line between summary parts) or reasoning_text (vLLM's raw
    reasoning; the first of the two an item sends is used) -> thinking_delta;
    function_call_arguments -> input_json_delta. What an item never streamed but has at its
    .done (LM Studio sends a call's arguments only in .done; some servers send whole items)
    goes out then. Items that appear only in the response of ``response.completed`` go out
    at the end, as do items whose .done never came (taken from that response when there).
    A call whose arguments do not add up to a JSON object ends the stream in an error, as
    in StreamTranslator: its fragments went out already.
    """

    def __init__(self, ctx: ResponseContext, new_tool_id: Callable[[], str]) -> None:
        self.ctx = ctx
        self.new_tool_id = new_tool_id
        self.items: Dict[Any, _OutputItem] = {}       # by output_index
        self.items_by_id: Dict[str, _OutputItem] = {}
        self.active: Optional[_OutputItem] = None
        self.queue: List[_OutputItem] = []
        self.open: Optional[str] = None               # kind of the open block: thinking, text, tool
        self.next_index = 0
        self.used_ids = set(ctx.history_tool_ids)
        self.has_calls = False
        self.refused = False
        self.output_chars = 0
        self.chunks_seen = 0
        self.ended = False
        self.result: Optional[StreamEnd] = None

    # -- events ---------------------------------------------------------------------------

    def start(self) -> List[Dict[str, Any]]:
        usage = {"input_tokens": self.ctx.input_tokens, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        return [{"type": "message_start", "message": {
            "id": self.ctx.message_id, "type": "message", "role": "assistant",
            "model": self.ctx.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage}}, {"type": "ping"}]

    def feed(self, event: Dict[str, Any]) -> List[Dict[str, Any]]:
        self.chunks_seen += 1
        if self.ended:
            return []
        handler = self.HANDLERS.get(event.get("type")) if isinstance(event, dict) else None
        events: List[Dict[str, Any]] = []
        if handler is not None:
            handler(self, event, events)
        return events

    def finish(self, done: bool = True) -> List[Dict[str, Any]]:
        """At the end of the upstream stream: nothing if the answer ended, else an error."""
        if self.ended:
            return []
        # A cut connection must not look like a finished answer.
        return self.fail("api_error", "the upstream closed the stream after %d events, before the "
                                      "answer ended" % self.chunks_seen)

    def fail(self, error_type: str, message: str) -> List[Dict[str, Any]]:
        if self.ended:
            return []
        self.ended = True
        error = {"type": error_type, "message": message}
        self.result = StreamEnd(error=error)
        return [{"type": "error", "error": error}]

    # -- upstream events ------------------------------------------------------------------

    def _item_for(self, event: Dict[str, Any]) -> Optional[_OutputItem]:
        index = event.get("output_index")
        if isinstance(index, (int, str)) and index in self.items:
            return self.items[index]
        item_id = event.get("item_id")
        return self.items_by_id.get(item_id) if isinstance(item_id, str) else None

    def _register(self, index: Any, item: Dict[str, Any]) -> _OutputItem:
        if not isinstance(index, (int, str)) or index in self.items:
            index = "auto%d" % len(self.items)
        out = _OutputItem(index, item)
        self.items[index] = out
        if isinstance(item.get("id"), str):
            self.items_by_id[item["id"]] = out
        if out.kind in ("reasoning", "message", "function_call"):
            self.queue.append(out)              # other kinds (server tools) are not shown
        return out

    def _added(self, event: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
        item = event.get("item")
        if isinstance(item, dict):
            self._register(event.get("output_index"), item)
            self._advance(events)

    def _delta(self, event: Dict[str, Any], kind: str, events: List[Dict[str, Any]]) -> None:
        text = event.get("delta")
        if not isinstance(text, str) or not text:
            return
        out = self._item_for(event)
        if out is None:
            if kind == "arguments":
                return                          # a call we never saw named: nothing to call
            # A server that streams deltas without output_item.added.
            out = self._register(event.get("output_index"), {
                "type": "message" if kind in ("text", "refusal") else "reasoning"})
            self._advance(events)
        if out is self.active:
            self._emit(out, kind, text, event.get("summary_index"), events)
        elif out in self.queue:
            out.pending.append((kind, text, event.get("summary_index")))

    def _arguments_done(self, event: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
        out = self._item_for(event)
        arguments = event.get("arguments")
        if out is not None and not out.fragments and not any(p[0] == "arguments" for p in out.pending) \
                and isinstance(arguments, str) and arguments:
            # LM Studio: the arguments come whole, only here.
            self._delta(dict(event, delta=arguments), "arguments", events)

    def _done(self, event: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
        item = event.get("item")
        out = self._item_for(event) or (self._item_for(dict(event, item_id=item.get("id")))
                                        if isinstance(item, dict) else None)
        if out is None:
            if not isinstance(item, dict):
                return
            out = self._register(event.get("output_index"), item)   # a whole item, never added
        elif isinstance(item, dict):
            out.item = item
        out.done = True
        if out is self.active:
            self._finish_item(out, events)
        self._advance(events)

    def _end(self, event: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
        response = event.get("response") if isinstance(event.get("response"), dict) else {}
        output = response.get("output") if isinstance(response.get("output"), list) else []
        if any(not isinstance(key, int) for key in self.items):
            output = []                          # items seen without an output_index: no telling which is which
        for index, item in enumerate(output):
            if not isinstance(item, dict):
                continue
            out = self.items.get(index)
            if out is None:
                out = self._register(index, item)
            elif not out.done and out.kind == item.get("type"):
                out.item = item                  # the whole item, encrypted_content included
        for out in self.items.values():
            out.done = True
        if self.active is not None:
            self._finish_item(self.active, events)
        self._advance(events)
        if self.ended:
            return
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        if event.get("type") == "response.incomplete":
            stop_reason = INCOMPLETE_TO_STOP.get(reason, "end_turn")
        else:
            stop_reason = "tool_use" if self.has_calls else "refusal" if self.refused else "end_turn"
        usage = usage_to_anthropic(responses_usage(response.get("usage")), self.ctx.input_tokens)
        upstream_usage = response.get("usage")
        if not isinstance(upstream_usage, dict) or _count(upstream_usage.get("output_tokens")) is None:
            usage["output_tokens"] = max(self.output_chars // 4, 1)
        events.append({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                       "usage": usage})
        events.append({"type": "message_stop"})
        self.ended = True
        self.result = StreamEnd(stop_reason, None, usage)

    def _failed(self, event: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
        response = event.get("response") if isinstance(event.get("response"), dict) else {}
        self._error(response.get("error"), events)

    def _error_event(self, event: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
        # OpenAI: {"type": "error", "code", "message", "param"}; some servers nest {"error": {...}}.
        self._error(event["error"] if isinstance(event.get("error"), dict) else event, events)

    def _error(self, error: Any, events: List[Dict[str, Any]]) -> None:
        exc = responses_error(error, "upstream response failed")
        events.extend(self.fail(exc.error_type, exc.message))

    # -- transitions ----------------------------------------------------------------------

    def _advance(self, events: List[Dict[str, Any]]) -> None:
        """Make the next queued item active while none is; a done one goes out whole."""
        while self.active is None and self.queue and not self.ended:
            out = self.queue.pop(0)
            self.active = out
            self._begin(out, events)
            pending, out.pending = out.pending, []
            for kind, text, summary_index in pending:
                if kind == "arguments" and out.kind == "function_call":
                    out.fragments.append(text)  # held arguments go out as one delta
                else:
                    self._emit(out, kind, text, summary_index, events)
            if out.block is not None and out.kind == "function_call":
                self._send_arguments(out, events)
            if out.done:
                self._finish_item(out, events)

    def _begin(self, out: _OutputItem, events: List[Dict[str, Any]]) -> None:
        if out.kind == "reasoning":
            out.block = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, events)
        elif out.kind == "function_call" and _string(out.item.get("name")):
            self._open_call(out, events)

    def _open_call(self, out: _OutputItem, events: List[Dict[str, Any]]) -> None:
        call_id = _string(out.item.get("call_id"))
        if not call_id or call_id in self.used_ids:   # missing, or reused from an earlier turn
            call_id = self.new_tool_id()
        self.used_ids.add(call_id)
        self.has_calls = True
        out.block = self._open("tool", {"type": "tool_use", "id": call_id, "name": out.item["name"],
                                        "input": {}}, events)
        self._send_arguments(out, events)

    def _send_arguments(self, out: _OutputItem, events: List[Dict[str, Any]]) -> None:
        if out.sent < len(out.fragments):
            fragment = "".join(out.fragments[out.sent:])
            out.sent = len(out.fragments)
            self.output_chars += len(fragment)
            events.append({"type": "content_block_delta", "index": out.block,
                           "delta": {"type": "input_json_delta", "partial_json": fragment}})

    def _emit(self, out: _OutputItem, kind: str, text: str, summary_index: Any,
              events: List[Dict[str, Any]]) -> None:
        """One delta of the active item to the client."""
        if kind == "arguments":
            if out.kind == "function_call":
                out.fragments.append(text)
                if out.block is not None:
                    self._send_arguments(out, events)
        elif kind in ("text", "refusal"):
            if out.kind != "message":
                return
            if kind == "refusal":
                self.refused = True
            if out.block is None:
                out.held += text                # whitespace alone makes no block
                if not out.held.strip():
                    return
                text, out.held = out.held, ""
                out.block = self._open("text", {"type": "text", "text": ""}, events)
            self.output_chars += len(text)
            events.append({"type": "content_block_delta", "index": out.block,
                           "delta": {"type": "text_delta", "text": text}})
        elif out.kind == "reasoning":           # "summary" or "content"
            if out.source is None:
                out.source = kind
            elif out.source != kind:
                return                          # the same reasoning told twice: keep one
            if kind == "summary" and out.thinking and summary_index != out.summary_index:
                text = "\n\n" + text            # the next summary part
            out.summary_index = summary_index
            out.thinking.append(text)
            self.output_chars += len(text)
            events.append({"type": "content_block_delta", "index": out.block,
                           "delta": {"type": "thinking_delta", "thinking": text}})

    def _finish_item(self, out: _OutputItem, events: List[Dict[str, Any]]) -> None:
        """Close the active item's block, sending first what only its final form holds."""
        self.active = None
        final = out.item
        if out.kind == "reasoning":
            if not out.thinking:
                text = reasoning_text(final)
                if text:
                    self._emit(out, "summary", text, None, events)
            signature = reasoning_signature(final) if _replayable(final) else \
                thinking_signature("".join(out.thinking))
            events.append({"type": "content_block_delta", "index": out.block,
                           "delta": {"type": "signature_delta", "signature": signature}})
        elif out.kind == "function_call":
            if out.block is None:
                if not _string(final.get("name")):
                    if _string(final.get("arguments")).strip() or "".join(out.fragments).strip():
                        events.extend(self.fail("api_error", "upstream sent a function call without a name"))
                    return
                self._open_call(out, events)
            if not out.fragments:
                arguments = final.get("arguments")
                out.fragments.append(arguments if isinstance(arguments, str) and arguments else "{}")
                self._send_arguments(out, events)
            if not isinstance(_loads_or_none(out.fragments), dict):
                # Sent already; ending normally would hand the client input that is no object.
                events.extend(self.fail("api_error", "upstream sent function call arguments that are "
                                                     "not a complete JSON object"))
                return
        elif out.kind == "message":
            if out.block is None and not out.held:
                text, refusal = _message_text(final)
                if text:
                    self._emit(out, "refusal" if refusal else "text", text, None, events)
            if out.block is None:
                return
        self._close(events)

    def _open(self, kind: str, content_block: Dict[str, Any], events: List[Dict[str, Any]]) -> int:
        index = self.next_index
        self.next_index += 1
        self.open = kind
        events.append({"type": "content_block_start", "index": index, "content_block": content_block})
        return index

    def _close(self, events: List[Dict[str, Any]]) -> None:
        if self.open is not None:
            events.append({"type": "content_block_stop", "index": self.next_index - 1})
            self.open = None

    HANDLERS: Dict[str, Callable[..., None]] = {
        "response.output_item.added": _added,
        "response.output_item.done": _done,
        "response.output_text.delta": lambda self, e, ev: self._delta(e, "text", ev),
        "response.refusal.delta": lambda self, e, ev: self._delta(e, "refusal", ev),
        "response.reasoning_summary_text.delta": lambda self, e, ev: self._delta(e, "summary", ev),
        "response.reasoning_text.delta": lambda self, e, ev: self._delta(e, "content", ev),
        "response.function_call_arguments.delta": lambda self, e, ev: self._delta(e, "arguments", ev),
        "response.function_call_arguments.done": _arguments_done,
        "response.completed": _end,
        "response.incomplete": _end,
        "response.failed": _failed,
        "error": _error_event,
    }


# =============================================================================================
# Tokens
# =============================================================================================
# An estimate, used for count_tokens and the input_tokens of message_start (the final
# message_delta always carries the upstream's real counts).
#
# The request is counted as the upstream sees it after to_openai(): the system text
# (_system_text), each message's text, tool-call arguments as JSON, tool results, and the tools
# to_openai sends (upstream_tools: no server tools, no tools deferred and not loaded) as JSON (what the
# chat templates of vLLM, llama.cpp, Ollama... render), plus the chat format's per-message
# tokens. The text is classified byte by byte (its UTF-8 bytes translated to class bits, then
# counted with big-integer masks and popcounts, all at C speed) into counts of characters by class
# and of runs (words, numbers, punctuation, spaces), which are what BPE tokenizers split on. A
# linear model over those counts gives the tokens; its weights were fitted by bounded least
# squares to o200k_base (GPT-4o) counts of English, code, Markdown, JSON schemas, CJK and other
# text. A text longer than 16 K characters is not classified whole: evenly spaced slices of it
# (1/8 of it, 8-32 K characters) are, and the counts scaled up.

IMAGE_TOKENS = 1600
MESSAGE_TOKENS = 4      # per chat message: start, role, separator, end (OpenAI's "3 + role")
CALL_TOKENS = 3         # per tool call, besides its name and arguments
REPLY_TOKENS = 3        # the assistant turn the prompt ends with
REMINDER_TOKENS = 11    # "<system-reminder>\n" ... "\n</system-reminder>" around a system message

# Tokens per unit of each count. Text: bytes (UTF-8), ASCII upper-case letters, digits,
# newlines, tabs, ASCII punctuation, backslashes; non-ASCII characters by UTF-8 lead byte (C2-DF:
# Latin, Greek, Cyrillic...; E0-E2: Indic, symbols, general punctuation; E3: kana, CJK
# punctuation; E4-E9: CJK ideographs; EA-ED: Hangul; EE-EF: full-width forms; F0-F4: emoji);
# runs: letters after a space, letters after anything else, camelCase humps, digit runs,
# punctuation runs, space runs, runs of 2+ spaces. JSON: keys, string values, other scalars,
# newlines inside strings (escaped as \n).
TEXT_WEIGHTS = {"bytes": 0.03467, "upper": 0.05111, "digit": 0.143, "newline": 0.9778,
                "tab": 0.6434, "punct": 0.089, "backslash": 0.4768,
                "latin2": 0.1978, "symbols3": 1.2, "kana": 0.5817,
                "cjk": 0.6508, "hangul": 0.6154, "fullwidth": 1.2,
                "astral": 2.0, "words_after_space": 0.6847,
                "words_other": 0.6893, "camel": 0.5486, "digit_runs": 0.9334,
                "punct_runs": 0.6499, "space_runs": 0.176,
                "space_runs2": 0.04631, "digit_after_space": 0.8598,
                "digits_past_3": 0.45}
JSON_WEIGHTS = {"keys": 1.362, "strings": 1.967, "scalars": 3.589, "newlines": 1.858}


def _table(pairs: Any, default: int = 0) -> bytes:
    table = bytearray([default] * 256)
    for chars, value in pairs:
        for ch in chars:
            table[ch] = value
    return bytes(table)


_LET, _UP, _DIG, _PUN, _SPC, _NL, _TAB = 1, 2, 4, 8, 16, 32, 64   # class bits, a byte per byte
_CLASS_BITS = _table([(b"abcdefghijklmnopqrstuvwxyz", _LET), (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", _LET | _UP),
                      (b"0123456789", _DIG), (b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", _PUN),
                      (b" ", _SPC), (b"\n\r", _NL), (b"\t", _TAB)])
_LEAD_BYTES = _table([(range(0xC2, 0xE0), 1), (range(0xE0, 0xE3), 2), (b"\xe3", 3), (range(0xE4, 0xEA), 4),
                      (range(0xEA, 0xEE), 5), (range(0xEE, 0xF0), 6), (range(0xF0, 0xF8), 7)])

if hasattr(int, "bit_count"):                   # Python 3.10+
    def _ones(v: int, bit: int, n: int) -> int:
        """How many of the n bytes of v have `bit` set; v has no other bits."""
        return v.bit_count()
else:                                           # Python 3.8, 3.9
    def _ones(v: int, bit: int, n: int) -> int:
        return (v >> bit).to_bytes(n, "little").count(1)


def _text_counts(b: bytes) -> List[int]:
    """The counts of TEXT_WEIGHTS, in its order, of UTF-8 bytes."""
    n = len(b)
    if not n:
        return [0] * len(TEXT_WEIGHTS)
    x = int.from_bytes(b.translate(_CLASS_BITS), "little")
    p = x << 8                                  # each byte's class bits moved onto the next byte
    m = int.from_bytes(b"\x01" * n, "little")   # bit 0 of every byte
    starts = x & ~p                             # class bits set here and not on the byte before
    counts = [n, _ones(x & m << 1, 1, n), _ones(x & m << 2, 2, n), _ones(x & m << 5, 5, n),
              _ones(x & m << 6, 6, n), _ones(x & m << 3, 3, n), b.count(b"\\")]
    if b.isascii():
        counts += (0, 0, 0, 0, 0, 0, 0)
    else:
        lead = b.translate(_LEAD_BYTES).count
        counts += (lead(1), lead(2), lead(3), lead(4), lead(5), lead(6), lead(7))
    after_space = _ones(x & p >> 4 & m, 0, n)
    counts += (after_space,                                 # words after a space
               _ones(starts & m, 0, n) - after_space,       # words after anything else
               _ones(x >> 1 & p & ~(p >> 1) & m, 0, n),     # upper after lower: camelCase
               _ones(starts & m << 2, 2, n),                # digit runs
               _ones(starts & m << 3, 3, n),                # punctuation runs
               _ones(starts & m << 4, 4, n),                # space runs
               _ones(starts & x >> 8 & m << 4, 4, n),       # runs of 2+ spaces
               _ones(x & p >> 2 & m << 2, 2, n),            # digits after a space
               _ones(x & p & x << 16 & x << 24 & m << 2, 2, n))  # digits after 3 digits
    return counts


SAMPLE_WIDTH = 128      # characters per slice
SAMPLE_MIN = 64         # slices: at least 64 (8 K characters), at most 256 (32 K), and in
SAMPLE_MAX = 256        # between as many as cover 1/8 of the text
SAMPLE_FRACTION = 8


def _sample(pieces: List[str], sep: str) -> Tuple[str, float]:
    """(text, scale): sep.join(pieces), or when that is long, evenly spaced slices of it, with the
    factor from counts in the slices to counts in the whole. The join is never built."""
    lsep = len(sep)
    ends = list(accumulate(map(add, map(len, pieces), repeat(lsep))))   # piece i + sep end here
    total = ends[-1] - lsep
    width = SAMPLE_WIDTH
    windows = min(max(total // (SAMPLE_FRACTION * width), SAMPLE_MIN), SAMPLE_MAX)
    if total <= 2 * windows * width:
        return sep.join(pieces), 1.0
    step = (total - width) / (windows - 1)
    last = len(pieces) - 1
    out: List[str] = []
    for i in range(windows):
        start = int(i * step)
        j = bisect_right(ends, start)           # the piece (or the separator after it) at start
        pos = start - (ends[j] - lsep - len(pieces[j]))
        need = width
        while need > 0:
            piece = pieces[j]
            if pos < len(piece):
                segment = piece[pos:pos + need]
                out.append(segment)
                need -= len(segment)
                pos = len(piece)
            if need <= 0 or j == last:
                break
            gap = sep[pos - len(piece):][:need]
            out.append(gap)
            need -= len(gap)
            j, pos = j + 1, 0
    text = "".join(out)
    return text, total / max(len(text), 1)


def _json_strings(value: Any, strings: List[str]) -> List[int]:
    """[keys, string values, other scalars] of a JSON value; its keys and strings go to strings."""
    keys = texts = scalars = 0
    stack = [value]
    pop, push, append, extend = stack.pop, stack.append, strings.append, strings.extend
    while stack:
        v = pop()
        kind = type(v)
        if kind is dict:
            keys += len(v)
            extend(v)
            items = v.values()
        elif kind is list or kind is tuple:
            items = v
        elif kind is str:
            texts += 1
            append(v)
            continue
        else:
            scalars += 1
            continue
        for item in items:
            if type(item) is str:
                texts += 1
                append(item)
            else:
                push(item)
    return [keys, texts, scalars]


def _counts(texts: List[str], value: Any = None) -> Tuple[List[float], List[int]]:
    """(counts of TEXT_WEIGHTS, counts of JSON_WEIGHTS) of texts (each a separate message's
    text) and of json.dumps(value, ensure_ascii=False); a list counts as its items, each
    serialized apart (the tools, the tool calls' arguments)."""
    pieces = list(texts)
    structure = [0, 0, 0, 0]
    if value is not None:
        strings: List[str] = []
        structure = _json_strings(value, strings)
        joined = '"'.join(strings)
        structure.append(joined.count("\n"))
        pieces.append(joined)
    if not pieces:
        return [0.0] * len(TEXT_WEIGHTS), structure
    text, scale = _sample(pieces, "\n")
    counts = [c * scale for c in _text_counts(text.encode("utf-8", "surrogatepass"))]
    # the newlines that join the pieces are not sent; those in JSON strings are counted apart
    counts[3] = max(counts[3] - (len(pieces) - 1) - structure[3], 0.0)
    return counts, structure


def _estimate(texts: List[str], value: Any = None) -> float:
    counts, structure = _counts(texts, value)
    return (sum(c * w for c, w in zip(counts, TEXT_WEIGHTS.values()))
            + sum(c * w for c, w in zip(structure, JSON_WEIGHTS.values())))


def _tool_result_texts(content: Any, add: Callable[[str], None]) -> int:
    """Adds the texts of a tool result's content; returns how many images it holds."""
    if isinstance(content, str):
        add(content)
        return 0
    images = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    add(part["text"])
                elif part.get("type") in ("image", "document"):
                    images += 1
    return images


def estimate_tokens(request: Dict[str, Any]) -> int:
    texts: List[str] = []
    add = texts.append
    arguments: List[Any] = []
    messages = calls = images = 0
    fixed = REPLY_TOKENS
    system = _system_text(request.get("system"))
    if system:
        add(system)
        messages += 1
    for message in request.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        own = False                             # has content besides tool results
        if isinstance(content, str):
            add(content)
            own = True
        elif isinstance(content, list):
            for block in content:
                if not isinstance(block, dict):
                    continue
                kind = block.get("type")
                if kind == "tool_result":
                    messages += 1               # a "tool" message of its own
                    images += _tool_result_texts(block.get("content"), add)
                elif kind == "tool_use":
                    calls += 1
                    add(str(block.get("name") or ""))
                    arguments.append(block.get("input") or {})      # sent as JSON text
                elif kind in ("thinking", "redacted_thinking"):
                    continue                    # not replayed upstream
                elif isinstance(block.get("text"), str):
                    add(block["text"])
                    own = True
                elif kind == "image":
                    images += 1
                    own = True
                elif kind == "document":
                    source = block.get("source")
                    if isinstance(source, dict) and source.get("type") == "text" \
                            and isinstance(source.get("data"), str):
                        add(source["data"])
                    else:
                        images += 1
                    own = True
        if own:
            messages += 1
            if message.get("role") == "system":
                fixed += REMINDER_TOKENS
    tools = upstream_tools(request)
    fixed += MESSAGE_TOKENS * messages + CALL_TOKENS * calls + IMAGE_TOKENS * images
    return max(int(fixed + _estimate(texts, (tools + arguments) or None) + 0.5), 1)


# =============================================================================================
# Upstream I/O
# =============================================================================================
# Every transport fault becomes a ProxyError here: nothing above this section sees OSError.
# Connections are kept alive and reused (a small pool per upstream); a pooled connection the
# upstream closed while idle is retried once on a fresh one. HTTPS uses the default SSL context
# (SSL_CERT_FILE / SSL_CERT_DIR select a private CA); HTTPS_PROXY / HTTP_PROXY / NO_PROXY are
# honoured, never for loopback hosts.

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                           ConnectionAbortedError, http.client.BadStatusLine, ssl.SSLEOFError)
IDLE_TTL = 60.0     # seconds a pooled connection may sit idle (NATs drop silent connections)


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection is usable if nothing is waiting to be read on it: a
    readable idle socket means the upstream closed it (or sent something unexpected)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):              # select() fails for descriptors >= 1024
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


# Timeouts (REQUEST_TIMEOUT on upstream connections and on client connections) are Python
# socket timeouts here; the speed-ups make them the kernel's where it can keep them.


def set_io_timeout(sock: socket.socket, seconds: float) -> bool:
    """Reads and writes on `sock` fail with socket.timeout after `seconds` without progress.
    True when the kernel keeps the timeout (see the speed-ups), False for settimeout()."""
    return _io_timeout(sock, seconds)


def python_io_timeout(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    return False


_io_timeout: Callable[[socket.socket, float], bool] = python_io_timeout


def environment_proxies() -> Dict[str, str]:
    """urllib.request.getproxies(), without importing urllib.request (and hashlib with it) when
    it would find nothing: where it reads only the environment (not macOS, not Windows), no
    variable named *_proxy in any case means no proxy."""
    if sys.platform != "darwin" and os.name != "nt" and not any(
            name[-6:].lower() == "_proxy" for name in os.environ):
        return {}
    import urllib.request
    return urllib.request.getproxies()


def public_url(url: str) -> str:
    """A URL as the banner shows it: scheme, host, port and path; never credentials or query."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = "[%s]" % host
    port = ":%d" % parts.port if parts.port else ""
    return "%s://%s%s%s" % (parts.scheme, host, port, parts.path)


def upstream_ssl_context(ca_bundle: str = "") -> ssl.SSLContext:
    """The system's trust, plus SSL_CERT_FILE and CA_BUNDLE. (OpenSSL alone would let
    SSL_CERT_FILE replace the system's file; a private CA is meant to be added to it.)"""
    context = ssl.create_default_context()
    if os.environ.get("SSL_CERT_FILE"):
        defaults = ssl.get_default_verify_paths()
        with contextlib.suppress(OSError):
            if defaults.openssl_cafile and os.path.isfile(defaults.openssl_cafile):
                context.load_verify_locations(cafile=defaults.openssl_cafile)
            if defaults.openssl_capath and os.path.isdir(defaults.openssl_capath):
                context.load_verify_locations(capath=defaults.openssl_capath)
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class UpstreamPool:
    """http.client connections to one upstream, kept alive and reused across requests."""

    # (the speed-ups replace both: connections that send a request in one send())
    connection_classes: Tuple[Any, Any] = (http.client.HTTPConnection, http.client.HTTPSConnection)

    def send_request(self, conn: http.client.HTTPConnection, target: str, headers: Dict[str, str],
                     body: bytes) -> None:
        conn.request("POST", target, body, headers)

    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float,
                 max_idle: int = 128, proxies: Optional[Dict[str, str]] = None, ca_bundle: str = "") -> None:
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("OPENAI_BASE_URL must be an http:// or https:// URL, got %r" % base_url)
        self.https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.https else 80)
        self.base_path = url.path
        self.base_query = url.query
        self.origin = "%s://%s%s" % (url.scheme, "[%s]" % self.host if ":" in self.host else self.host,
                                     ":%d" % url.port if url.port else "")   # never credentials
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.ssl_context = upstream_ssl_context(ca_bundle) if self.https else None
        self.proxy = self._proxy_for(proxies if proxies is not None else environment_proxies())
        self.via = " via proxy %s" % public_url(self.proxy.geturl()) if self.proxy is not None else ""
        self._idle: List[Tuple[http.client.HTTPConnection, float]] = []
        self._lock = threading.Lock()
        self.encoded_headers: Dict[int, Tuple[Dict[str, str], bytes]] = {}   # (for the speed-ups)

    def _proxy_for(self, proxies: Dict[str, str]) -> Optional[urllib.parse.SplitResult]:
        proxy = proxies.get("https" if self.https else "http")
        if not proxy or self.host in LOOPBACK_HOSTS:
            return None
        import urllib.request
        if urllib.request.proxy_bypass(self.host):
            return None
        if "://" not in proxy:
            proxy = "http://" + proxy
        return urllib.parse.urlsplit(proxy)

    def url_path(self, path: str) -> str:
        target = self.base_path + path
        if self.base_query:
            target += ("&" if "?" in target else "?") + self.base_query
        if self.proxy is not None and not self.https:
            target = self.origin + target        # a plain-HTTP proxy takes the absolute URL
        return target

    def _connect(self) -> http.client.HTTPConnection:
        if self.proxy is not None:
            host, port = self.proxy.hostname, self.proxy.port or 8080
        else:
            host, port = self.host, self.port
        if self.https:
            conn: http.client.HTTPConnection = self.connection_classes[1](
                host, port, timeout=self.connect_timeout, context=self.ssl_context)
        else:
            conn = self.connection_classes[0](host, port, timeout=self.connect_timeout)
        if self.proxy is not None and self.https:
            headers = {}
            if self.proxy.username:
                credentials = "%s:%s" % (urllib.parse.unquote(self.proxy.username),
                                         urllib.parse.unquote(self.proxy.password or ""))
                headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
            conn.set_tunnel(self.host, self.port, headers)
        try:
            conn.connect()
        except socket.timeout:
            conn.close()
            error = ProxyError(504, "timeout_error", "could not connect to upstream %s within %gs "
                               "(CONNECT_TIMEOUT)" % (self.origin, self.connect_timeout))
            error.kind = "connect"
            raise error from None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_io_timeout(conn.sock, self.read_timeout)
        return conn

    def _acquire(self, fresh: bool) -> Tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        while not fresh:
            with self._lock:
                if not self._idle:
                    break
                conn, released = self._idle.pop()
            if now - released < IDLE_TTL and _still_open(conn):
                return conn, True
            conn.close()
        return self._connect(), False

    def release(self, conn: http.client.HTTPConnection) -> None:
        """Give back a connection whose response was read to the end."""
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def finish(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Back to the pool if its answer was read to the end and it stays open; else closed."""
        if response.isclosed() and not response.will_close and conn.sock is not None:
            self.release(conn)
        else:
            conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def post(self, path: str, body: bytes, headers: Dict[str, str],
             on_sent: Optional[Callable[[http.client.HTTPConnection], None]] = None,
             abandoned: Callable[[], bool] = lambda: False, head_timeout: float = 0.0
             ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a POST and read the status line and headers. Raises ProxyError.
        `on_sent(conn)` runs each time the request is sent, while the upstream works on it;
        `abandoned()` says the client left (and we closed the connection ourselves);
        `head_timeout` (when shorter than the read timeout) bounds the wait for the head."""
        target = self.url_path(path)
        for attempt in (1, 2):
            conn = None
            reused = False
            try:
                conn, reused = self._acquire(fresh=attempt == 2)
                self.send_request(conn, target, headers, body)
                if on_sent is not None:
                    on_sent(conn)
                if 0 < head_timeout < self.read_timeout:
                    set_io_timeout(conn.sock, head_timeout)
                    try:
                        response = conn.getresponse()
                    except socket.timeout:
                        conn.close()
                        error = ProxyError(504, "timeout_error", "upstream %s had not started to answer after %gs "
                                           "(FAILOVER_TIMEOUT)" % (self.origin, head_timeout))
                        error.kind = "timeout"
                        raise error from None
                    set_io_timeout(conn.sock, self.read_timeout)
                    return conn, response
                return conn, conn.getresponse()
            except STALE_CONNECTION_ERRORS as exc:
                if conn is not None:
                    conn.close()
                if reused and attempt == 1 and not abandoned():
                    continue                     # closed by the upstream while idle: once more
                raise transport_error(exc, self.origin, self.via) from None
            except (OSError, http.client.HTTPException) as exc:   # (TLS errors included)
                if conn is not None:
                    conn.close()
                raise transport_error(exc, self.origin, self.via) from None
            except ValueError:                   # http.client refuses a header value
                if conn is not None:
                    conn.close()
                raise ProxyError(500, "api_error", "the upstream request has an invalid header; check "
                                 "OPENAI_API_KEY for stray characters", {"x-should-retry": "false"}) from None
        raise AssertionError("unreachable")


FAILOVER_STATUSES = frozenset((429, 500, 502, 503, 504, 529))
COOL_DOWN = 30.0            # seconds a failed provider (or a 429'd key) rests without Retry-After
_SECONDS = re.compile(r"\s*([0-9]{1,9})(\.[0-9]*)?\s*\Z")


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> float:
    """Retry-After as seconds from now: a number of seconds or an HTTP date; COOL_DOWN else."""
    if value:
        match = _SECONDS.match(value)
        if match:
            return min(float(match.group(1)), 3600.0)
        import email.utils
        parsed = email.utils.parsedate_tz(value)
        if parsed is not None:
            seconds = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
            return min(max(seconds, 0.0), 3600.0)
    return COOL_DOWN


def failover_kind(error: ProxyError) -> str:
    """Why the next provider of a chain should be tried ("" if it should not): the provider
    could not be reached, timed out before answering, or answered 429/500/502/503/504/529. A
    bad request (any other 4xx) fails the same way everywhere."""
    if error.upstream_status:
        return str(error.upstream_status) if error.upstream_status in FAILOVER_STATUSES else ""
    return error.kind


class KeyRing:
    """A provider's keys, used in turn; a key answered with 429 rests for its Retry-After."""

    def __init__(self, keys: Tuple[str, ...]) -> None:
        self.keys = keys or ("",)
        self.resting = [0.0] * len(self.keys)
        self.turn = 0
        self.lock = threading.Lock()

    def pick(self, now: float) -> int:
        """The index of the next key that is not resting (the one resting least, if all are)."""
        count = len(self.keys)
        if count == 1:
            return 0
        with self.lock:
            for step in range(count):
                index = (self.turn + step) % count
                if self.resting[index] <= now:
                    self.turn = (index + 1) % count
                    return index
            return min(range(count), key=self.resting.__getitem__)

    def rest(self, index: int, until: float) -> None:
        with self.lock:
            self.resting[index] = max(self.resting[index], until)

    def ready(self, now: float) -> int:
        return sum(1 for until in self.resting if until <= now)


CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|cookie|password|signature", re.I)


class Upstream:
    """One provider: base URL, keys, dialect, connection pool, request headers, chat path, the
    fixes its models were found to need, and its health. `send()` holds the one fix-and-retry
    loop; nothing outside this class reaches its pool."""

    def __init__(self, config: ProviderConfig, settings: Settings) -> None:
        self.name = config.name
        self.config = config
        self.settings = settings
        self.pool = UpstreamPool(config.base_url, settings.connect_timeout, settings.request_timeout,
                                 ca_bundle=settings.ca_bundle)
        self.origin = self.pool.origin
        self.dialect = resolve_dialect(settings, "", config)
        self.keys = KeyRing(config.api_keys)
        self.paths = {"chat": self.path("/chat/completions"), "responses": self.path("/responses")}
        self.headers = [self._headers(key) for key in self.keys.keys]
        self.cool_until = 0.0
        self.last_error = ""
        self.dialects: Dict[str, Dialect] = {}
        self.learned: Dict[str, ModelFixes] = {}
        self.lock = threading.Lock()

    def label(self) -> str:
        """How the banner and --check show it: name, URL without credentials, dialect, proxy."""
        return "%s %s (%s)%s" % (self.name, public_url(self.config.base_url), self.dialect.name, self.pool.via)

    def path(self, path: str) -> str:
        pool = self.pool
        if self.dialect.name == "azure" and "api-version=" not in pool.base_query and "/openai/v1" not in pool.base_path:
            # Azure deployment URLs (…/openai/deployments/NAME) require an api-version.
            path += "?api-version=" + urllib.parse.quote(self.settings.azure_api_version)
        return path

    def _headers(self, key: str) -> Dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "User-Agent": "claude-code-proxy/" + __version__}
        if self.dialect.api_key_header:
            headers["api-key"] = key
        elif key:
            headers["Authorization"] = "Bearer " + key
        # CUSTOM_HEADER_* then NAME_HEADER_*: each replaces a header of the same name.
        for name, value in self.settings.custom_headers + self.config.headers:
            for existing in [h for h in headers if h.lower() == name.lower()]:
                del headers[existing]
            headers[name] = value
        return headers

    def secrets(self) -> List[str]:
        return _config_secrets(self.config, self.settings)

    # -- models ---------------------------------------------------------------------------

    def dialect_for(self, model: str) -> Dialect:
        dialect = self.dialects.get(model)
        if dialect is None:
            dialect = self.dialects[model] = resolve_dialect(self.settings, model, self.config)
        return dialect

    def fixes_for(self, model: str) -> ModelFixes:
        return fixes_by_name(model).merge(self.learned.get(model, NO_FIXES))

    def learn(self, model: str, fix: ModelFixes, reason: str) -> None:
        with self.lock:
            before = self.learned.get(model, NO_FIXES)
            self.learned[model] = before.merge(fix)
        if self.learned[model] != before:
            log.info("model %s: %s from now on (upstream said: %s)", model, describe_fix(fix), reason[:200])

    def wire(self, model: str) -> str:
        """The wire format `model` is reached by here: "chat" or "responses" (NAME_API)."""
        return "responses" if uses_responses_api(model, self.dialect_for(model).name, self.config.api) else "chat"

    def build(self, request: Dict[str, Any], model: str, stream: bool = True,
              cache_key: str = "") -> Tuple[str, Dict[str, Any]]:
        """(wire format, the request as this provider's `model` takes it). stream=False: ask for
        a whole answer even when the client streams (UPSTREAM_STREAMING=off). `cache_key`
        (Claude Code's session id): see to_openai."""
        wire = self.wire(model)
        dialect = self.dialect_for(model)
        if wire == "responses":
            body = to_responses(request, self.settings, dialect, model)
            if cache_key and dialect.prompt_cache_key:     # OpenAI's /responses takes it too
                body["prompt_cache_key"] = cache_key
        else:
            body = to_openai(request, self.settings, dialect, model, cache_key)
        body = apply_fixes(body, self.fixes_for(model))
        if not stream and "stream" in body:
            body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        return wire, body

    # -- health ---------------------------------------------------------------------------

    def cooling(self, now: float) -> bool:
        return self.cool_until > now

    def failed(self, kind: str, error: ProxyError, now: float) -> None:
        """Rest for the upstream's Retry-After, else COOL_DOWN seconds."""
        self.cool_until = now + retry_after_seconds(error.headers.get("retry-after"))
        self.last_error = "%s: %s" % (kind, error.message[:300])

    # -- the exchange with it ---------------------------------------------------------------

    def send(self, body: Dict[str, Any], on_sent: Callable[[Optional[http.client.HTTPConnection]], None],
             abandoned: Callable[[], bool] = lambda: False, wire: str = "chat", head_timeout: float = 0.0
             ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST the request; an answer other than 200 becomes a ProxyError. When the upstream
        answers 400 naming a parameter or a limit the model cannot take, the request is fixed
        and sent once more; once that succeeds the fix is remembered for the model (unless it
        depended on this request, like a limit of context window minus this input). A 429 on
        one of several keys is tried again at once with the next key that is not resting.
        `on_sent(conn)` runs once the request is sent, and `on_sent(None)` before a connection
        goes back to the pool."""
        model = body.get("model")
        learned: Optional[Tuple[ModelFixes, str]] = None
        fixed = False
        keys_tried = 1
        while True:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("upstream request: %s%s", "" if self.name == DEFAULT_PROVIDER else "(%s) " % self.name,
                          describe_request(body))
            key = self.keys.pick(time.monotonic())
            conn, response = self.pool.post(self.paths[wire], json_bytes(body), self.headers[key], on_sent, abandoned,
                                            head_timeout)
            if response.status == 200:
                if learned is not None:          # remembered only once the fix worked
                    self.learn(str(model), *learned)
                return conn, response
            try:
                error = upstream_error(response.status, read_body(response, self.origin),
                                       response.getheader("retry-after"))
            finally:
                on_sent(None)
                self.pool.finish(conn, response)
            if response.status == 429 and len(self.keys.keys) > 1:
                now = time.monotonic()
                self.keys.rest(key, now + retry_after_seconds(response.getheader("retry-after")))
                if keys_tried < len(self.keys.keys) and self.keys.ready(now) and not abandoned():
                    keys_tried += 1
                    continue
            fix, model_wide = None, False
            if not fixed and response.status in (400, 422):
                fix, model_wide = fix_from_error(body, error.upstream_message, error.param)
            if fix is None:                      # (after a retry, its fix is forgotten)
                raise error
            fixed = True
            if model_wide:
                learned = (fix, error.upstream_message)
            body = apply_fixes(body, fix)

    def get(self, path: str) -> Tuple[int, bytes]:
        """A GET of a whole answer on a fresh connection (--check's model list)."""
        conn = self.pool._connect()
        try:
            conn.request("GET", self.pool.url_path(self.path(path)), headers=self.headers[0])
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise transport_error(exc, self.origin, self.pool.via) from None
        finally:
            conn.close()

    def close(self) -> None:
        self.pool.close()


class Router:
    """Every provider, and each model's failover chain of (upstream, model)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configs = settings.providers or provider_configs({}, settings)
        self.configs = {c.name: c for c in configs}
        self.upstreams: Dict[str, Upstream] = {}
        self.chains: Dict[str, Tuple[Tuple[Upstream, str], ...]] = {}
        self.lock = threading.Lock()
        self.default = self.upstream(DEFAULT_PROVIDER)

    def upstream(self, name: str) -> Upstream:
        upstream = self.upstreams.get(name)
        if upstream is None:
            with self.lock:
                upstream = self.upstreams.get(name)
                if upstream is None:             # made on first use: an unused provider costs nothing
                    upstream = self.upstreams[name] = Upstream(self.configs[name], self.settings)
        return upstream

    def chain(self, client_model: str) -> Tuple[Tuple[Upstream, str], ...]:
        chain = self.chains.get(client_model)
        if chain is None:
            entries = model_chain(map_model(client_model, self.settings), self.configs)
            chain = tuple((self.upstream(e.provider), e.model) for e in entries)
            if len(self.chains) < 1000:          # (clients may name any model)
                self.chains[client_model] = chain
        return chain

    def tiers(self) -> List[Tuple[str, Tuple[Tuple[Upstream, str], ...]]]:
        return [(tier, self.chain("claude-" + tier)) for tier in ("opus", "sonnet", "haiku")]

    def close(self) -> None:
        for upstream in list(self.upstreams.values()):
            upstream.close()


def settings_secrets(settings: Settings) -> List[str]:
    """What must never be logged: every provider's keys and credential-like header values, and
    the client key."""
    configs = settings.providers or provider_configs({}, settings)
    return [secret for config in configs for secret in _config_secrets(config, settings)] + [
        settings.anthropic_api_key, settings.brave_api_key, settings.tavily_api_key]


def _config_secrets(config: ProviderConfig, settings: Settings) -> List[str]:
    """A provider's keys, and the values of its headers whose names say they carry credentials."""
    found = [key for key in config.api_keys if key]
    for name, value in settings.custom_headers + config.headers:
        if CREDENTIAL_HEADER.search(name):
            found.append(value)
            found.extend(value.split(None, 1)[1:])       # "Token abc": abc alone too
    return found


def chain_text(chain: Tuple[Tuple[Upstream, str], ...]) -> str:
    return ", ".join(model if upstream.name == DEFAULT_PROVIDER else "%s/%s" % (upstream.name, model)
                     for upstream, model in chain)


def describe_request(body: Dict[str, Any]) -> str:
    """What a debug line shows of an upstream request: every parameter, the roles of the
    messages, the tool names and the start of the last message (not the whole prompt)."""
    shown = {k: v for k, v in body.items() if k not in ("messages", "tools")}
    messages = body.get("messages") or []
    shown["messages"] = "%d: %s" % (len(messages), " ".join(m.get("role", "?") for m in messages))
    if body.get("tools"):
        shown["tools"] = [t["function"]["name"] for t in body["tools"]]
    if messages:
        last = messages[-1].get("content")
        shown["last"] = (last if isinstance(last, str) else json.dumps(last))[:300] if last else None
    return json.dumps(shown, ensure_ascii=False)


def describe_fix(fix: ModelFixes) -> str:
    parts = ["without %s" % name for name in sorted(fix.drop)]
    if fix.completion_tokens_field:
        parts.append("max_completion_tokens instead of max_tokens")
    if fix.max_output:
        parts.append("at most %d output tokens" % fix.max_output)
    return ", ".join(parts)


def transport_error(exc: BaseException, origin: str, via: str = "") -> ProxyError:
    if isinstance(exc, socket.timeout):
        error = ProxyError(504, "timeout_error", "upstream %s sent nothing for longer than "
                           "REQUEST_TIMEOUT allows" % origin)
        error.kind = "timeout"
        return error
    if isinstance(exc, ssl.SSLCertVerificationError):
        error = ProxyError(502, "api_error", "TLS certificate of %s not trusted (%s); set CA_BUNDLE or "
                           "SSL_CERT_FILE to a PEM file with your CA" % (origin, exc.verify_message))
    else:
        hint = " (check HTTPS_PROXY / HTTP_PROXY)" if via else ""
        error = ProxyError(502, "api_error", "upstream %s unreachable%s: %s%s" % (
            origin, via, exc.__class__.__name__ + (": %s" % exc if str(exc) else ""), hint))
    error.kind = "connect"
    return error


def cut_stream_error(origin: str, events: int) -> ProxyError:
    """The upstream was reached and had answered in part: say so, not "unreachable"."""
    return ProxyError(502, "api_error", "upstream %s closed the stream after %d events, before the answer "
                      "ended" % (origin, events))


def read_body(response: http.client.HTTPResponse, origin: str) -> bytes:
    try:
        return response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise transport_error(exc, origin) from None


def response_lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The lines of a response body as they arrive, without their b"\\n". Read a block at a
    time (read1 returns what one chunk holds, without waiting for more): http.client's own
    readline() goes through its chunked decoding twice per line, which costs more than the
    translation of the event."""
    read1 = response.read1
    rest = b""
    while True:
        block = read1(65536)
        if not block:
            break
        if rest:
            block = rest + block
        lines = block.split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def iter_sse_data(lines: Iterable[bytes], origin: str = "upstream") -> Iterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines); comments and
    other fields skipped, `data:` with or without a space. A transport fault -> ProxyError."""
    data: List[str] = []
    try:
        for raw in lines:
            line = raw.rstrip(b"\r\n")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
                data.append(value.decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise transport_error(exc, origin) from None
    if data:
        yield "\n".join(data)   # lenient: a last event without its blank line still counts


# =============================================================================================
# Exchange: one /v1/messages request, from the client's request to the translated answer
# =============================================================================================
# Rules:
# - The request goes to the first upstream of its tier's chain that is not cooling down (the
#   first of all when every one is). A connection failure, a timeout before the answer's head,
#   or 429/500/502/503/504/529 send it to the next, translated again for that provider; never
#   after the answer has begun, never on another 4xx. A provider that failed rests for its
#   Retry-After (else COOL_DOWN seconds).
# - The exchange owns the upstream connection: close() (the end of its `with` block) is the one
#   place where it goes back to the pool or is closed.
# - translate_sse() turns an upstream SSE body into Anthropic events for both the stream and
#   the whole-answer paths; a cut connection or a bug ends it with an error event.


def translate_sse(lines: Iterable[bytes], translator: Any, origin: str = "upstream") -> Iterator[List[Dict[str, Any]]]:
    """Batches of Anthropic events, one per upstream event, from message_start to the end. The
    translator's `ended` is true once the last batch has been made, and its `result` says how."""
    yield translator.start()
    done = False
    try:
        for data in iter_sse_data(lines, origin):
            if data == "[DONE]":
                done = True
                break
            events = translator.feed(parse_chunk(data))
            if events:
                yield events
            if translator.ended:             # an error chunk ends it
                return
    except ProxyError as err:
        if err.kind == "connect" and translator.chunks_seen:     # reached, then cut
            err = cut_stream_error(origin, translator.chunks_seen)
        yield translator.fail(err.error_type, err.message)
        return
    except Exception:                        # a bug: the client still gets a proper end
        log.exception("unexpected error translating the upstream stream")
        yield translator.fail("api_error", "internal proxy error")
        return
    yield translator.finish(done)


def is_event_stream(response: http.client.HTTPResponse) -> bool:
    return "text/event-stream" in (response.getheader("Content-Type") or "").lower()


class Exchange:
    """One /v1/messages request: the chain of (upstream, model) it may go to, the attempt(s),
    the upstream connection, and the translator. Used as a context manager."""

    def __init__(self, server: "ProxyServer", request: Dict[str, Any], client: socket.socket,
                 session: str = "") -> None:
        self.server = server
        self.request = request
        self.session = session          # Claude Code's session id: the upstream cache key
        self.client = client
        self.stream = bool(request.get("stream"))
        # UPSTREAM_STREAMING=off: the whole answer is turned into a stream for the client.
        self.upstream_stream = self.stream and server.settings.upstream_streaming.lower() != "off"
        self.chain = server.router.chain(request["model"])
        self.upstream, self.model = self.chain[0]
        self.wire = "chat"                              # the wire format of the attempt
        self.failed: List[Tuple[str, str]] = []        # (provider, kind) of each that failed
        self.conn: Optional[http.client.HTTPConnection] = None
        self.response: Optional[http.client.HTTPResponse] = None
        self.watch: Optional[Watched] = None
        self.writer: Optional[SSEWriter] = None        # a stream already started (web search): pings
        # WEB_SEARCH=upstream: (upstream, model, wire, body) -> body, and the raw answer kept
        self.adjust: Optional[Callable[["Upstream", str, str, Dict[str, Any]], Dict[str, Any]]] = None
        self.raw: Dict[str, Any] = {}
        self.left = False                               # the heartbeat found the client gone
        self.input_estimate: Optional[int] = None
        self.translator: Any = None
        self.ended: Optional[StreamEnd] = None
        self.ctx = ResponseContext(
            model=request["model"], message_id=new_id("msg_"),
            stop_sequences=tuple(s for s in request.get("stop_sequences") or () if isinstance(s, str)),
            history_tool_ids=history_tool_ids(request["messages"]),
            text_tools=text_tools(request) if server.settings.text_tool_calls.lower() == "on" else None)

    def __enter__(self) -> "Exchange":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def client_gone(self) -> bool:
        return self.left or (self.watch is not None and self.watch.gone)

    def unwatch(self) -> None:
        """The heartbeat stops watching (before the connection serves another request)."""
        watch, self.watch = self.watch, None
        if watch is not None:
            self.server.heartbeat.unwatch(watch)
            self.left = self.left or watch.gone

    def _on_sent(self, conn: Optional[http.client.HTTPConnection]) -> None:
        self.unwatch()
        if conn is None:
            return
        # From here the heartbeat watches for the client leaving while the upstream works.
        self.watch = self.server.heartbeat.watch(self.client, conn, self.writer)
        if self.stream and self.input_estimate is None:
            # message_start carries an input estimate: made while the upstream reads.
            self.input_estimate = estimate_tokens(self.request)

    def open(self) -> None:
        """Send the request along the chain until an upstream answers 200. Raises the last
        ProxyError when none does."""
        now = time.monotonic()
        candidates = [entry for entry in self.chain if not entry[0].cooling(now)] or list(self.chain[:1])
        for position, (upstream, model) in enumerate(candidates):
            self.upstream, self.model = upstream, model
            with wrong_types_are_400():
                self.wire, body = upstream.build(self.request, model, self.upstream_stream, self.session)
            if self.adjust is not None:
                body = self.adjust(upstream, model, self.wire, body)
            try:
                # A streamed answer starts at once; a provider that has not started within
                # FAILOVER_TIMEOUT gives way to the next one in the chain.
                head_timeout = self.server.settings.failover_timeout \
                    if self.upstream_stream and position < len(candidates) - 1 else 0.0
                self.conn, self.response = upstream.send(body, self._on_sent, lambda: self.client_gone, self.wire,
                                                         head_timeout)
                return
            except ProxyError as err:
                kind = failover_kind(err)
                if not kind or self.client_gone:
                    raise
                upstream.failed(kind, err, time.monotonic())
                self.failed.append((upstream.name, kind))
                if position == len(candidates) - 1:
                    raise

    def abort(self) -> None:
        """The client left: wake the thread reading the upstream (from any thread)."""
        if self.conn is not None:
            _shutdown_upstream(self.conn)

    def _context(self) -> ResponseContext:
        estimate = self.input_estimate if self.input_estimate is not None else estimate_tokens(self.request)
        return dataclasses.replace(self.ctx, input_tokens=estimate)

    def events(self) -> Iterator[List[Dict[str, Any]]]:
        """The answer as batches of Anthropic events, as the upstream sends it. `finished` is
        true once the last batch has been made; `ended` then says how it ended."""
        if is_event_stream(self.response):
            self.translator = self._translator()
            for events in translate_sse(response_lines(self.response), self.translator, self.upstream.origin):
                if self.translator.ended:
                    self.ended = self.translator.result
                yield events
        else:
            message = self._whole_answer(self.ctx)
            self.ended = StreamEnd(message["stop_reason"], message["stop_sequence"], message["usage"])
            yield message_to_events(message)

    @property
    def finished(self) -> bool:
        return self.ended is not None

    def message(self) -> Dict[str, Any]:
        """The whole answer as one Anthropic message. Raises ProxyError."""
        if is_event_stream(self.response):     # a server that streams although we did not ask
            self.translator = self._translator()
            events: List[Dict[str, Any]] = []
            for batch in translate_sse(response_lines(self.response), self.translator, self.upstream.origin):
                events.extend(batch)
            self.ended = self.translator.result
            return assemble_message(events)
        message = self._whole_answer(self.ctx)
        self.ended = StreamEnd(message["stop_reason"], message["stop_sequence"], message["usage"])
        return message

    def _translator(self) -> Any:
        translator = ResponsesStreamTranslator if self.wire == "responses" else StreamTranslator
        return translator(self._context(), new_tool_id)

    def _whole_answer(self, ctx: ResponseContext) -> Dict[str, Any]:
        body = read_body(self.response, self.upstream.origin)
        try:
            completion = json.loads(body)
        except ValueError:
            raise ProxyError(502, "api_error", "upstream answer is not JSON: " +
                             upstream_error_message(body.decode("utf-8", "replace"), "")) from None
        if not isinstance(completion, dict):
            raise ProxyError(502, "api_error", "upstream answer is not a JSON object")
        self.raw = completion
        usage = completion.get("usage")
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens", usage.get("input_tokens")), int):
            ctx = self._context()
        try:
            if self.wire == "responses":
                return responses_to_anthropic(completion, ctx, new_tool_id)
            return to_anthropic(completion, ctx, new_tool_id)
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
            raise ProxyError(502, "api_error", "upstream answer has an unexpected shape (%s)"
                             % exc.__class__.__name__) from None

    def close(self) -> None:
        """The one place the upstream connection ends: back to the pool when its answer was
        read to the end (after [DONE], the rest of the body is read briefly first), else closed."""
        self.unwatch()
        conn, response = self.conn, self.response
        self.conn = self.response = None
        if conn is None or response is None:
            return
        if not response.isclosed() and self.ended is not None and self.ended.error is None:
            drain(conn, response, self.upstream.pool.read_timeout)
        if self.ended is not None and self.ended.error is not None:
            _close_upstream(conn)
        else:
            self.upstream.pool.finish(conn, response)


DRAIN_TIMEOUT = 1.0      # seconds to read the end of an upstream body after [DONE]


def drain(conn: http.client.HTTPConnection, response: http.client.HTTPResponse, read_timeout: float) -> None:
    """After [DONE], read the end of the chunked body (briefly) so the connection can be
    reused; an upstream that keeps the body open loses the connection instead."""
    sock = conn.sock
    if sock is None:
        return
    deadline = time.monotonic() + DRAIN_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            set_io_timeout(sock, remaining)
            if not response.read1(65536):
                break
        set_io_timeout(sock, read_timeout)
    except (OSError, http.client.HTTPException, ValueError):
        _close_upstream(conn)


_BASE62_BYTES = bytes(ord(_BASE62[b % 62]) for b in range(248)) + bytes(8)
_OVER_248 = bytes(range(248, 256))


def new_id(prefix: str) -> str:
    """prefix + 22 random base-62 characters (131 bits): random bytes mapped by a table, the
    8 byte values that would bias it dropped (28 bytes leave fewer than 22 once in 10^6)."""
    while True:
        chars = os.urandom(28).translate(_BASE62_BYTES, _OVER_248)
        if len(chars) >= 22:
            return prefix + chars[:22].decode("ascii")


def new_tool_id() -> str:
    return new_id("toolu_")


# =============================================================================================
# Web search
# =============================================================================================
# Anthropic's server tool `web_search_*` (issue 13), run by the proxy: the upstream model gets a
# client-style `web_search(query)` tool; each call is searched on the backend chosen by
# WEB_SEARCH and answered as a tool result; the client gets `server_tool_use` and
# `web_search_tool_result` blocks, then the model's answer. Backends get their I/O injected (an
# UpstreamPool each, so the proxy and CA settings apply) and raise only SearchError.
# WEB_SEARCH=upstream instead lets the provider search (run_provider_search, below).

SEARCH_ERROR_CODES = ("unavailable", "too_many_requests", "max_uses_exceeded", "query_too_long",
                      "invalid_tool_input")
MAX_QUERY_CHARS = 400       # Brave's documented limit on q (400 characters, 50 words)
SEARCH_RESULTS = 10
DEFAULT_MAX_USES = 10       # when the tool names no max_uses
WEB_SEARCH_BACKENDS = ("searxng:URL", "brave", "tavily", "upstream")
WEB_SEARCH_TOOL = {
    "name": "web_search",
    "description": "Search the web. Returns numbered results, each with its URL, title and a snippet "
                   "of the page. Cite the URLs you use.",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string", "description":
                     "the search query"}}, "required": ["query"]},
}
TURN_SEARCH_ON = ("Web search is not set up on this proxy, so no search was run. To turn it on, "
                  "start the proxy with WEB_SEARCH=searxng:http://HOST:PORT (a SearXNG instance), "
                  "WEB_SEARCH=brave with BRAVE_API_KEY, or WEB_SEARCH=tavily with TAVILY_API_KEY.")


class SearchError(Exception):
    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(message)
        assert error_code in SEARCH_ERROR_CODES, error_code
        self.error_code = error_code
        self.message = message


@dataclasses.dataclass(frozen=True)
class SearchResult:
    url: str
    title: str
    snippet: str
    page_age: Optional[str] = None


def check_web_search(settings: Settings) -> None:
    """WEB_SEARCH and the key it needs, checked at start-up (one line naming what to fix)."""
    value = settings.web_search.strip()
    kind = value.split(":", 1)[0].lower()
    if not value:
        return
    if kind == "searxng":
        url = urllib.parse.urlsplit(value.split(":", 1)[1] if ":" in value else "")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("WEB_SEARCH=searxng:URL needs the instance's http(s) URL, got %r" % value)
    elif kind == "upstream" and ":" not in value:
        return
    elif kind in ("brave", "tavily") and ":" not in value:
        if not getattr(settings, kind + "_api_key"):
            raise ValueError("WEB_SEARCH=%s needs %s_API_KEY" % (kind, kind.upper()))
    else:
        raise ValueError("WEB_SEARCH must be one of %s, got %r" % (", ".join(WEB_SEARCH_BACKENDS), value))


def _host_in(host: str, domains: Iterable[str]) -> bool:
    host = host.lower().rstrip(".")
    for domain in domains:
        domain = domain.lower().strip().lstrip(".")
        if "://" in domain:
            domain = urllib.parse.urlsplit(domain).hostname or ""
        domain = domain.split("/", 1)[0]
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def filter_results(results: Iterable[SearchResult], allowed: Iterable[str] = (),
                   blocked: Iterable[str] = ()) -> List[SearchResult]:
    """Only results on an allowed domain (when any are given) and on no blocked one; a domain
    covers its subdomains."""
    kept = []
    for result in results:
        host = urllib.parse.urlsplit(result.url).hostname or ""
        if not host or (allowed and not _host_in(host, allowed)) or _host_in(host, blocked):
            continue
        kept.append(result)
    return kept


def _result(url: Any, title: Any, snippet: Any, age: Any) -> Optional[SearchResult]:
    if not isinstance(url, str) or not url:
        return None
    return SearchResult(url, title if isinstance(title, str) else url,
                        re.sub(r"<[^>]*>", "", snippet) if isinstance(snippet, str) else "",
                        age if isinstance(age, str) and age else None)


class HttpSearch:
    """One search backend's HTTP: a whole JSON answer, errors as SearchError."""

    name = "search"

    def __init__(self, base_url: str, timeout: float, ca_bundle: str = "") -> None:
        self.pool = UpstreamPool(base_url, timeout, timeout, ca_bundle=ca_bundle)
        self.timeout = timeout

    def fetch(self, method: str, path: str, headers: Dict[str, str], body: Optional[bytes] = None) -> Any:
        conn = None
        try:
            conn = self.pool._connect()
            conn.request(method, self.pool.url_path(path), body, dict(headers, Accept="application/json"))
            response = conn.getresponse()
            data = response.read()
        except ProxyError:
            raise SearchError("unavailable", "%s: could not connect within %gs" % (self.name, self.timeout)) from None
        except socket.timeout:
            raise SearchError("unavailable", "%s: no answer within %gs (WEB_SEARCH_TIMEOUT)" % (
                self.name, self.timeout)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise SearchError("unavailable", "%s: %s" % (self.name, exc.__class__.__name__)) from None
        finally:
            if conn is not None:
                conn.close()
        if response.status == 429:
            raise SearchError("too_many_requests", "%s: rate limited (429)" % self.name)
        if response.status != 200:
            raise SearchError("unavailable", "%s: HTTP %d" % (self.name, response.status))
        try:
            return json.loads(data)
        except ValueError:
            raise SearchError("unavailable", "%s: the answer is not JSON" % self.name) from None


class SearxngSearch(HttpSearch):
    """SearXNG's JSON API: GET /search?q=...&format=json -> results[].url/title/content/publishedDate
    (the instance must list json under search.formats in settings.yml, else it answers 403)."""

    name = "SearXNG"

    def __call__(self, query: str, allowed: Iterable[str] = (), blocked: Iterable[str] = ()) -> List[SearchResult]:
        payload = self.fetch("GET", "/search?" + urllib.parse.urlencode({"q": query, "format": "json"}), {})
        items = payload.get("results") if isinstance(payload, dict) else None
        found = [_result(i.get("url"), i.get("title"), i.get("content"), i.get("publishedDate"))
                 for i in items or () if isinstance(i, dict)]
        return filter_results([r for r in found if r], allowed, blocked)[:SEARCH_RESULTS]


class BraveSearch(HttpSearch):
    """Brave Search API: GET /res/v1/web/search?q=... with X-Subscription-Token ->
    web.results[].url/title/description/age (or page_age)."""

    name = "Brave Search"

    def __init__(self, api_key: str, timeout: float, ca_bundle: str = "",
                 base_url: str = "https://api.search.brave.com") -> None:
        super().__init__(base_url, timeout, ca_bundle)
        self.api_key = api_key

    def __call__(self, query: str, allowed: Iterable[str] = (), blocked: Iterable[str] = ()) -> List[SearchResult]:
        params = {"q": query, "count": str(SEARCH_RESULTS)}
        payload = self.fetch("GET", "/res/v1/web/search?" + urllib.parse.urlencode(params),
                             {"X-Subscription-Token": self.api_key})
        web = payload.get("web") if isinstance(payload, dict) else None
        items = web.get("results") if isinstance(web, dict) else None
        found = [_result(i.get("url"), i.get("title"), i.get("description"), i.get("age") or i.get("page_age"))
                 for i in items or () if isinstance(i, dict)]
        return filter_results([r for r in found if r], allowed, blocked)


class TavilySearch(HttpSearch):
    """Tavily: POST /search {query, max_results, include_domains, exclude_domains}, the key as
    Bearer -> results[].url/title/content/published_date."""

    name = "Tavily"

    def __init__(self, api_key: str, timeout: float, ca_bundle: str = "",
                 base_url: str = "https://api.tavily.com") -> None:
        super().__init__(base_url, timeout, ca_bundle)
        self.api_key = api_key

    def __call__(self, query: str, allowed: Iterable[str] = (), blocked: Iterable[str] = ()) -> List[SearchResult]:
        body: Dict[str, Any] = {"query": query, "max_results": SEARCH_RESULTS}
        if allowed:
            body["include_domains"] = list(allowed)
        if blocked:
            body["exclude_domains"] = list(blocked)
        payload = self.fetch("POST", "/search", {"Authorization": "Bearer " + self.api_key,
                                                 "Content-Type": "application/json"}, json_bytes(body))
        items = payload.get("results") if isinstance(payload, dict) else None
        found = [_result(i.get("url"), i.get("title"), i.get("content"), i.get("published_date"))
                 for i in items or () if isinstance(i, dict)]
        return filter_results([r for r in found if r], allowed, blocked)


def make_search(settings: Settings) -> Optional[Callable[[str, Iterable[str], Iterable[str]], List[SearchResult]]]:
    """The backend WEB_SEARCH names, or None when it is unset."""
    value = settings.web_search.strip()
    kind, _, rest = value.partition(":")
    kind = kind.lower()
    if kind == "searxng":
        return SearxngSearch(rest, settings.web_search_timeout, settings.ca_bundle)
    if kind == "brave":
        return BraveSearch(settings.brave_api_key, settings.web_search_timeout, settings.ca_bundle,
                           settings.brave_base_url)
    if kind == "tavily":
        return TavilySearch(settings.tavily_api_key, settings.web_search_timeout, settings.ca_bundle,
                            settings.tavily_base_url)
    return None


def is_web_search_tool(tool: Any) -> bool:
    return isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search_")


def web_search_spec(request: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The request's web_search_* server tool, if it has one."""
    for tool in request.get("tools") or ():
        if is_web_search_tool(tool):
            return tool
    return None


def encode_page(result: SearchResult) -> str:
    """encrypted_content: opaque to clients; the proxy reads it back when the block is replayed."""
    return base64.urlsafe_b64encode(json_bytes({"u": result.url, "t": result.title, "s": result.snippet})).decode()


def decode_page(encrypted: Any) -> Optional[Dict[str, str]]:
    try:
        page = json.loads(base64.urlsafe_b64decode(str(encrypted).encode()))
    except (ValueError, TypeError):
        return None
    return page if isinstance(page, dict) else None


def search_results_text(query: str, results: List[SearchResult]) -> str:
    """What the upstream model reads as the search's result."""
    if not results:
        return "No results for %r." % query
    lines = ["Results for %r:" % query]
    for n, r in enumerate(results, 1):
        lines.append("%d. %s\n   URL: %s%s\n   %s" % (n, r.title, r.url,
                     "\n   Published: %s" % r.page_age if r.page_age else "", r.snippet))
    return "\n".join(lines)


def web_search_history_text(block: Dict[str, Any]) -> str:
    """A replayed `web_search_tool_result` block as text the upstream model can read."""
    content = block.get("content")
    if isinstance(content, dict):
        return "Web search failed: %s" % content.get("error_code", "unavailable")
    pages = []
    for item in content if isinstance(content, list) else ():
        if isinstance(item, dict):
            page = decode_page(item.get("encrypted_content")) or {}
            pages.append(SearchResult(str(item.get("url", page.get("u", ""))),
                                      str(item.get("title", page.get("t", ""))),
                                      str(page.get("s", "")), item.get("page_age")))
    return search_results_text("", pages).replace("Results for '':", "Web search results:", 1)


def _search_one(query: Any, used: int, max_uses: int, allowed: Iterable[str], blocked: Iterable[str],
                search: Optional[Callable[..., List[SearchResult]]]) -> Tuple[Any, str, bool]:
    """(block content, text for the model, whether the backend was asked)."""
    try:
        if not isinstance(query, str) or not query.strip():
            raise SearchError("invalid_tool_input", "the query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise SearchError("query_too_long", "the query is longer than %d characters" % MAX_QUERY_CHARS)
        if used >= max_uses:
            raise SearchError("max_uses_exceeded", "no more than %d searches in one request" % max_uses)
        if search is None:
            raise SearchError("unavailable", "web search is not set up on this proxy")
        try:
            results = filter_results(search(query, allowed, blocked), allowed, blocked)
        except SearchError as exc:
            exc.asked = True
            raise
    except SearchError as exc:
        return ({"type": "web_search_tool_result_error", "error_code": exc.error_code},
                "Web search error: %s (%s)" % (exc.error_code, exc.message), getattr(exc, "asked", False))
    content = [{"type": "web_search_result", "url": r.url, "title": r.title,
                "encrypted_content": encode_page(r), "page_age": r.page_age} for r in results]
    return content, search_results_text(query, results), True


def run_web_search(request: Dict[str, Any], call_model: Callable[[Dict[str, Any]], Dict[str, Any]],
                   search: Optional[Callable[..., List[SearchResult]]], new_id: Callable[[str], str],
                   on_block: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Answer a request that carries a web_search_* tool: ask the model (non-streaming, through
    `call_model`, Anthropic in and out) with a client-style web_search tool, run each call on
    `search` (None: WEB_SEARCH unset, every search answers unavailable), feed the results back and
    ask again, until the model answers without searching. One Anthropic message out."""
    spec = web_search_spec(request) or {}
    max_uses = spec.get("max_uses") if isinstance(spec.get("max_uses"), int) else DEFAULT_MAX_USES
    allowed = tuple(spec.get("allowed_domains") or ())
    blocked = tuple(spec.get("blocked_domains") or ())
    tools = [dict(WEB_SEARCH_TOOL) if is_web_search_tool(t) else t for t in request.get("tools") or ()]
    messages = list(request.get("messages") or ())
    usage = {"input_tokens": 0, "output_tokens": 0}
    blocks: List[Dict[str, Any]] = []
    asked = 0
    answer: Dict[str, Any] = {}

    def emit(block: Dict[str, Any]) -> None:
        blocks.append(block)
        if on_block is not None:
            on_block(block)

    for round_ in range(max_uses + 2):
        last = round_ == max_uses + 1              # the model keeps searching: no tool this time
        body = dict(request, messages=messages, stream=False,
                    tools=[t for t in tools if not (last and t.get("name") == "web_search")])
        if last:
            body.pop("tool_choice", None)
        answer = call_model(body)
        for key in usage:
            usage[key] += int((answer.get("usage") or {}).get(key) or 0)
        content = answer.get("content") or []
        calls = [b for b in content if b.get("type") == "tool_use" and b.get("name") == "web_search"]
        if not calls:
            break
        results = []
        for call in calls:
            query = (call.get("input") or {}).get("query")
            server_id = new_id("srvtoolu_")
            emit({"type": "server_tool_use", "id": server_id, "name": "web_search", "input": {"query": query}})
            found, text, was_asked = _search_one(query, asked, max_uses, allowed, blocked, search)
            asked += was_asked
            emit({"type": "web_search_tool_result", "tool_use_id": server_id, "content": found})
            results.append({"type": "tool_result", "tool_use_id": call.get("id"), "content": text})
        client_calls = [b for b in content if b.get("type") == "tool_use" and b.get("name") != "web_search"]
        if client_calls:                           # the client must answer those first
            break
        messages = messages + [{"role": "assistant", "content": content}, {"role": "user", "content": results}]
    final = [b for b in answer.get("content") or []
             if not (b.get("type") == "tool_use" and b.get("name") == "web_search")]
    if search is None:
        final.insert(0, {"type": "text", "text": TURN_SEARCH_ON})
    for block in final:
        emit(block)
    has_calls = any(b.get("type") == "tool_use" for b in final)
    stop = "tool_use" if has_calls else (answer.get("stop_reason") or "end_turn")
    if stop == "tool_use" and not has_calls:
        stop = "end_turn"
    return {"id": answer.get("id") or new_id("msg_"), "type": "message", "role": "assistant",
            "model": request.get("model", answer.get("model", "")), "content": blocks,
            "stop_reason": stop, "stop_sequence": answer.get("stop_sequence"),
            "usage": dict(usage, server_tool_use={"web_search_requests": asked})}


# WEB_SEARCH=upstream: the provider searches. One model call, with the provider's own search
# switched on in the translated request (provider_search_body), and its citations turned into
# the server blocks: OpenRouter's openrouter:web_search tool and OpenAI's search models give
# `message.annotations` of url_citation; Perplexity gives `search_results` (and `citations`);
# the Responses API's web_search tool gives web_search_call items and url_citation annotations.

QUERY_PREFIX = "Perform a web search for the query: "


def search_query(request: Dict[str, Any]) -> str:
    """What the client asked to search: the last user message's text (Claude Code's wording
    "Perform a web search for the query: …" gives just the query)."""
    for message in reversed(request.get("messages") or ()):
        if isinstance(message, dict) and message.get("role") == "user":
            text = text_of(message.get("content")).strip()
            return text[len(QUERY_PREFIX):].strip() if text.startswith(QUERY_PREFIX) else text
    return ""


def provider_search_body(body: Dict[str, Any], dialect: str, model: str, wire: str, origin: str,
                         spec: Dict[str, Any]) -> Dict[str, Any]:
    """A translated request with the provider's own web search turned on."""
    allowed = [d for d in spec.get("allowed_domains") or () if isinstance(d, str)]
    blocked = [d for d in spec.get("blocked_domains") or () if isinstance(d, str)]
    body = dict(body)
    if wire == "responses":
        tool: Dict[str, Any] = {"type": "web_search"}
        if allowed:
            tool["filters"] = {"allowed_domains": allowed[:100]}
        body["tools"] = list(body.get("tools") or ()) + [tool]
    elif dialect == "openrouter":
        parameters: Dict[str, Any] = {}
        if allowed:
            parameters["allowed_domains"] = allowed
        elif blocked:
            parameters["excluded_domains"] = blocked
        body["tools"] = list(body.get("tools") or ()) + [{"type": "openrouter:web_search", "parameters": parameters}]
    elif "perplexity" in origin or model.startswith("sonar") or "/sonar" in model:
        domains = allowed or ["-" + d for d in blocked]          # Perplexity searches always
        if domains:
            body["search_domain_filter"] = domains[:20]
    else:                                                          # OpenAI's search models
        body["web_search_options"] = {}
    return body


def provider_citations(raw: Dict[str, Any]) -> Tuple[List[SearchResult], List[str]]:
    """(the pages a provider's answer cites, the queries it says it ran) from a Chat Completion
    or a Responses API answer."""
    found: List[Optional[SearchResult]] = []
    queries: List[str] = []
    for item in raw.get("search_results") or () if isinstance(raw.get("search_results"), list) else ():
        if isinstance(item, dict):
            found.append(_result(item.get("url"), item.get("title"), item.get("snippet"), item.get("date")))
    for url in raw.get("citations") if isinstance(raw.get("citations"), list) else ():   # Perplexity
        found.append(_result(url, None, None, None))
    annotations: List[Any] = []
    for choice in raw.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("annotations"), list):
            annotations += message["annotations"]
    for item in raw.get("output") or ():                       # Responses API
        if not isinstance(item, dict):
            continue
        if item.get("type") == "web_search_call":
            action = item.get("action") if isinstance(item.get("action"), dict) else {}
            if isinstance(action.get("query"), str):
                queries.append(action["query"])
        for part in item.get("content") or () if item.get("type") == "message" else ():
            if isinstance(part, dict) and isinstance(part.get("annotations"), list):
                annotations += part["annotations"]
    for note in annotations:
        if isinstance(note, dict) and note.get("type") == "url_citation":
            cited = note.get("url_citation") if isinstance(note.get("url_citation"), dict) else note
            found.append(_result(cited.get("url"), cited.get("title"), cited.get("content"), None))
    results, seen = [], set()
    for result in found:
        if result is not None and result.url not in seen:
            seen.add(result.url)
            results.append(result)
    return results, queries


def run_provider_search(request: Dict[str, Any],
                        call_model: Callable[[Dict[str, Any]], Tuple[Dict[str, Any], Dict[str, Any]]],
                        new_id: Callable[[str], str],
                        on_block: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Answer a request that carries a web_search_* tool with the provider's own search:
    `call_model(body)` gives (the Anthropic message, the provider's raw answer). The client
    gets a server_tool_use and web_search_tool_result per query the provider reports (one for
    the client's query when it reports none), then the answer."""
    spec = web_search_spec(request) or {}
    body = dict(request, stream=False, tools=[t for t in request.get("tools") or () if not is_web_search_tool(t)])
    if not body["tools"]:
        body.pop("tools")
        body.pop("tool_choice", None)
    answer, raw = call_model(body)
    results, queries = provider_citations(raw)
    results = filter_results(results, spec.get("allowed_domains") or (), spec.get("blocked_domains") or ())
    blocks: List[Dict[str, Any]] = []

    def emit(block: Dict[str, Any]) -> None:
        blocks.append(block)
        if on_block is not None:
            on_block(block)

    queries = queries or [search_query(request)]
    for n, query in enumerate(queries):
        server_id = new_id("srvtoolu_")
        emit({"type": "server_tool_use", "id": server_id, "name": "web_search", "input": {"query": query}})
        emit({"type": "web_search_tool_result", "tool_use_id": server_id, "content": [
            {"type": "web_search_result", "url": r.url, "title": r.title, "encrypted_content": encode_page(r),
             "page_age": r.page_age} for r in (results if n == len(queries) - 1 else ())]})
    for block in answer.get("content") or ():
        emit(block)
    usage = answer.get("usage") or {}
    return {"id": answer.get("id") or new_id("msg_"), "type": "message", "role": "assistant",
            "model": request.get("model", answer.get("model", "")), "content": blocks,
            "stop_reason": answer.get("stop_reason") or "end_turn", "stop_sequence": answer.get("stop_sequence"),
            "usage": {"input_tokens": int(usage.get("input_tokens") or 0),
                      "output_tokens": int(usage.get("output_tokens") or 0),
                      "server_tool_use": {"web_search_requests": len(queries)}}}


def web_search_block_events(block: Dict[str, Any], index: int) -> List[Dict[str, Any]]:
    """The events that stream one block of a run_web_search message, server blocks as Anthropic
    streams them (server_tool_use: its shell, then input_json_delta; web_search_tool_result:
    the whole block in content_block_start, no delta)."""
    if block["type"] == "web_search_tool_result":
        return [{"type": "content_block_start", "index": index, "content_block": block},
                {"type": "content_block_stop", "index": index}]
    if block["type"] == "server_tool_use":
        return [{"type": "content_block_start", "index": index, "content_block": dict(block, input={})},
                {"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}},
                {"type": "content_block_stop", "index": index}]
    alone = message_to_events({"content": [block], "stop_reason": None, "stop_sequence": None, "usage": {}})
    return [dict(event, index=index) for event in alone[2:-2]]


def web_search_start(message_id: str, model: str) -> List[Dict[str, Any]]:
    """message_start and a ping, sent before the first block (the usage comes at the end)."""
    return [{"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}},
        {"type": "ping"}]


def web_search_end(message: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [{"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                 "stop_sequence": message["stop_sequence"]},
             "usage": message["usage"]}, {"type": "message_stop"}]


def web_search_events(message: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every event of a finished run_web_search message."""
    events = web_search_start(message["id"], message["model"])
    for index, block in enumerate(message["content"]):
        events += web_search_block_events(block, index)
    return events + web_search_end(message)


# =============================================================================================
# Status
# =============================================================================================
# What the proxy did, for people (the page at GET /, its data at GET /status.json) and for
# Prometheus (GET /metrics). Rules:
# - Per request one RequestRecord: names, numbers and the error message; never prompt or
#   answer text. Stats keeps the last 100 records and counters; its memory is bounded (label
#   sets beyond MAX_SERIES fold into "other", the minute series keeps an hour).
# - Counting is one lock and a few dict updates per request: nothing is formatted or sorted
#   until someone asks for the page or the metrics.
# - Access: with a client key (ANTHROPIC_API_KEY) the data and the metrics need it too; without
#   one they are served only when the proxy listens on a loopback address.


@dataclasses.dataclass
class RequestRecord:
    """What is kept of one request (never its prompt or answer)."""
    started: float                 # epoch seconds
    method: str
    path: str
    status: int
    model: str = ""                # the client's model name
    provider: str = ""             # the provider that answered
    upstream_model: str = ""
    stream: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: Optional[float] = None   # seconds to the first content
    duration: float = 0.0
    searches: int = 0              # web searches run for it
    error: str = ""                # the error message of a failure
    failed: Tuple[Tuple[str, str], ...] = ()     # (provider, kind) that failed before, in order
    session: str = ""              # Claude Code's x-claude-code-session-id


# Upper bounds in seconds (Prometheus `le`); a model's answer takes seconds to minutes.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
MAX_SERIES = 500           # distinct label sets per counter; more fold into "other"
RECENT_REQUESTS = 100
SERIES_MINUTES = 60


class Histogram:
    """Counts per bucket (not cumulative: the exposition adds them up), sum and count."""

    def __init__(self, bounds: Tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)        # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1    # le: a value equal to a bound is in it
        self.sum += value
        self.count += 1


def _bump(counter: Dict[Any, Any], key: Any, amount: int = 1) -> None:
    if key not in counter and len(counter) >= MAX_SERIES:
        key = tuple("other" for _ in key) if isinstance(key, tuple) else "other"
    counter[key] = counter.get(key, 0) + amount


class Stats:
    """Counters of what the proxy did, shared by every request thread (one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.recent: Deque[RequestRecord] = collections.deque(maxlen=RECENT_REQUESTS)
        # (provider, upstream model) -> [requests, errors, input, output, cached]
        self.totals: Dict[Tuple[str, str], List[int]] = {}
        # (client model, upstream model, provider, status) -> requests
        self.requests: Dict[Tuple[str, str, str, Any], int] = {}
        self.failures: Dict[Tuple[str, str], int] = {}      # (provider, kind) -> attempts that failed
        self.failovers: Dict[Tuple[str, str], int] = {}     # (provider, kind) -> times the next one was tried
        self.last_failure: Dict[str, Tuple[float, str, str]] = {}   # provider -> (time, kind, error)
        self.searches = 0
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        # minute (epoch // 60) -> [requests, errors, duration sum, input, output]; an hour kept
        self.minutes: Dict[int, List[float]] = {}

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def record(self, rec: RequestRecord) -> None:
        failed = rec.status >= 400 or bool(rec.error)
        minute = int(rec.started // 60)
        # a request no provider answered counts for the last one tried
        key = (rec.provider or (rec.failed[-1][0] if rec.failed else ""), rec.upstream_model)
        with self.lock:
            self.recent.append(rec)
            if rec.upstream_model:
                total = self.totals.get(key)
                if total is None:
                    if len(self.totals) >= MAX_SERIES:
                        total = self.totals.setdefault(("other", "other"), [0, 0, 0, 0, 0])
                    else:
                        total = self.totals[key] = [0, 0, 0, 0, 0]
                total[0] += 1
                total[1] += failed
                total[2] += rec.input_tokens
                total[3] += rec.output_tokens
                total[4] += rec.cached_tokens
            labels = (rec.model, rec.upstream_model, rec.provider, rec.status)
            count = self.requests.get(labels)
            if count is not None:
                self.requests[labels] = count + 1
            else:
                _bump(self.requests, labels)
            if rec.failed:
                for i, (provider, kind) in enumerate(rec.failed):
                    _bump(self.failures, (provider, kind))
                    self.last_failure[provider] = (rec.started, kind, rec.error)
                    if i < len(rec.failed) - 1 or rec.provider:      # another provider was tried next
                        _bump(self.failovers, (provider, kind))
            self.searches += rec.searches
            self.duration.observe(rec.duration)
            if rec.ttft is not None:
                self.ttft.observe(rec.ttft)
            row = self.minutes.get(minute)
            if row is None:
                row = self.minutes[minute] = [0, 0, 0.0, 0, 0]
                for old in [m for m in self.minutes if m <= minute - SERIES_MINUTES]:
                    del self.minutes[old]
            row[0] += 1
            row[1] += failed
            row[2] += rec.duration
            row[3] += rec.input_tokens
            row[4] += rec.output_tokens

    def last_errors(self) -> Dict[str, str]:
        """provider -> the error message of its last failed attempt."""
        with self.lock:
            return {provider: error for provider, (_, _, error) in self.last_failure.items()}

    def snapshot(self, now: float, health: List[Dict[str, Any]], tiers: List[Dict[str, Any]],
                 settings_lines: List[str], version: str, started: float) -> Dict[str, Any]:
        """The status page's data: JSON-ready, a copy taken under the lock."""
        this_minute = int(now // 60)
        with self.lock:
            recent = [dataclasses.asdict(r) for r in reversed(self.recent)]
            totals = [{"provider": p, "upstream_model": m, "requests": t[0], "errors": t[1],
                       "input_tokens": t[2], "output_tokens": t[3], "cached_tokens": t[4]}
                      for (p, m), t in sorted(self.totals.items())]
            series = []
            for minute in range(this_minute - SERIES_MINUTES + 1, this_minute + 1):
                row = self.minutes.get(minute)
                series.append({"minute": minute * 60, "requests": row[0] if row else 0,
                               "errors": row[1] if row else 0,
                               "mean_duration": round(row[2] / row[0], 3) if row else None,
                               "input_tokens": row[3] if row else 0, "output_tokens": row[4] if row else 0})
            failures = [{"provider": p, "kind": k, "count": c} for (p, k), c in sorted(self.failures.items())]
            requests = sum(self.requests.values())
            errors = sum(t[1] for t in self.totals.values())
            in_flight = self.in_flight
            searches = self.searches
        # requests per minute over the last five minutes of the series (or since start)
        since = max(started, (this_minute - 4) * 60.0)
        per_minute = sum(s["requests"] for s in series[-5:]) * 60.0 / max(now - since, 60.0)
        return {"version": version, "now": now, "started": started, "uptime": round(now - started, 1),
                "in_flight": in_flight, "requests": requests, "errors": errors, "searches": searches,
                "requests_per_minute": round(per_minute, 2),
                "recent": recent, "totals": totals, "series": series, "failures": failures,
                "providers": health, "tiers": tiers, "settings": settings_lines}

    def render_metrics(self, health: List[Dict[str, Any]]) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out: List[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, help_text, name, kind))

        def sample(name: str, labels: Tuple[Tuple[str, str], ...], value: Any) -> None:
            text = ",".join('%s="%s"' % (k, prom_label_value(v)) for k, v in labels)
            out.append("%s%s %s\n" % (name, "{%s}" % text if text else "", prom_number(value)))

        with self.lock:
            requests = sorted(self.requests.items(), key=lambda item: tuple(map(str, item[0])))
            tokens = sorted(((provider, model, kind), total[index]) for (provider, model), total in self.totals.items()
                            for kind, index in (("input", 2), ("output", 3), ("cached", 4)) if total[index])
            failures = sorted(self.failures.items())
            failovers = sorted(self.failovers.items())
            histograms = [(h, list(h.counts), h.sum, h.count) for h in (self.duration, self.ttft)]
            in_flight, searches = self.in_flight, self.searches
        family("claude_proxy_requests_total", "counter", "Requests answered, by client model, upstream "
               "model, provider and HTTP status.")
        for (model, upstream_model, provider, status), count in requests:
            sample("claude_proxy_requests_total", (("model", model), ("upstream_model", upstream_model),
                                                   ("provider", provider), ("status", str(status))), count)
        family("claude_proxy_tokens_total", "counter", "Tokens by provider, upstream model and kind "
               "(input: not from cache, output, cached: prompt tokens read from the provider's cache).")
        for (provider, upstream_model, kind), count in tokens:
            sample("claude_proxy_tokens_total", (("provider", provider), ("upstream_model", upstream_model),
                                                 ("kind", kind)), count)
        for name, help_text, (hist, counts, total, count) in zip(
                ("claude_proxy_request_duration_seconds", "claude_proxy_time_to_first_token_seconds"),
                ("Time from the request to the end of its answer.",
                 "Time from the request to the first content of its answer."), histograms):
            family(name, "histogram", help_text)
            cumulative = 0
            for bound, in_bucket in zip(hist.bounds + (float("inf"),), counts):
                cumulative += in_bucket
                sample(name + "_bucket", (("le", prom_number(bound)),), cumulative)
            sample(name + "_sum", (), total)
            sample(name + "_count", (), count)
        family("claude_proxy_requests_in_flight", "gauge", "Messages requests being handled now.")
        sample("claude_proxy_requests_in_flight", (), in_flight)
        family("claude_proxy_upstream_failures_total", "counter", "Upstream attempts that failed, by "
               "provider and kind (connect, timeout, 429, 5xx, ...).")
        for (provider, kind), count in failures:
            sample("claude_proxy_upstream_failures_total", (("provider", provider), ("kind", kind)), count)
        family("claude_proxy_failovers_total", "counter", "Times a request went on to the next provider "
               "of its tier's chain, by the provider that failed and how.")
        for (provider, kind), count in failovers:
            sample("claude_proxy_failovers_total", (("provider", provider), ("kind", kind)), count)
        family("claude_proxy_web_searches_total", "counter", "Web searches run for clients.")
        sample("claude_proxy_web_searches_total", (), searches)
        family("claude_proxy_provider_cooling", "gauge", "1 while a provider is cooling down after "
               "failures (skipped by its chains), else 0.")
        for entry in health:
            if "name" in entry:
                sample("claude_proxy_provider_cooling", (("provider", str(entry["name"])),),
                       1 if entry.get("state") == "cooling" else 0)
        return "".join(out)


def prom_label_value(value: str) -> str:
    """A label value in the text format: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prom_number(value: Any) -> str:
    if isinstance(value, float):
        if value == float("inf"):
            return "+Inf"
        return repr(value)
    return str(value)


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


def status_access_error(client_key: str, bound_host: str, authorization: str, x_api_key: str
                        ) -> Optional[ProxyError]:
    """Who may see the status page's data and the metrics; None when this caller may."""
    if client_key:
        import hmac                             # (only when a client key is set)
        bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if any([hmac.compare_digest(given.encode(), client_key.encode()) for given in (x_api_key, bearer)]):
            return None
        return ProxyError(401, "authentication_error", "the status page and metrics need the proxy's "
                          "ANTHROPIC_API_KEY (x-api-key or Authorization: Bearer)")
    if is_loopback(bound_host):
        return None
    return ProxyError(403, "permission_error", "the status page and metrics are served to other machines "
                      "only when the proxy requires a key: set ANTHROPIC_API_KEY")


def access_record(started: float, method: str, path: str, status: Any, access: Dict[str, Any],
                  note: str, duration: float) -> RequestRecord:
    """A request's record from what its access line knows: the handler's `access` fields,
    its status ("-" when nothing was sent) and its note (the error, if any)."""
    note = note.strip()
    if not isinstance(status, int):
        status = 499 if "client went away" in note else 0     # 499: nginx's "client closed request"
    failed = tuple(access.get("failed") or ())
    provider = access.get("provider") or ""
    if failed and failed[-1][0] == provider and (status >= 500 or status == 429):
        provider = ""                   # the last provider tried failed too: none answered
    return RequestRecord(
        started=started, method=method, path=path[:200], status=status, model=access.get("model") or "",
        provider=provider, upstream_model=access.get("upstream_model") or "",
        stream=bool(access.get("stream")), input_tokens=access.get("input_tokens") or 0,
        output_tokens=access.get("output_tokens") or 0, cached_tokens=access.get("cached_tokens") or 0,
        ttft=access.get("ttft"), duration=duration, searches=access.get("searches") or 0, error=note,
        failed=failed, session=access.get("session") or "")


def router_status(router: Router, now: float, monotonic_now: float
                  ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Each provider's health (URL without credentials, dialect, keys, cooling down until when
    (epoch seconds), last error) and each tier's chain, for snapshot() and render_metrics()."""
    tiers = [{"tier": tier, "chain": ["%s/%s" % (upstream.name, model) for upstream, model in chain]}
             for tier, chain in router.tiers()]
    health = []
    for upstream in list(router.upstreams.values()):
        cooling = upstream.cooling(monotonic_now)
        health.append({"name": upstream.name, "url": public_url(upstream.config.base_url),
                       "dialect": upstream.dialect.name, "api": getattr(upstream.config, "api", "chat"),
                       "keys": sum(1 for key in upstream.config.api_keys if key),
                       "state": "cooling" if cooling else "ok",
                       "until": round(now + upstream.cool_until - monotonic_now, 1) if cooling else None,
                       "last_error": upstream.last_error})
    return health, tiers

STATUS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>claude-code-proxy</title>
<style>
:root{--fg:#1d1d1f;--mute:#6e6e73;--line:#e3e3e8;--bg:#fff;--card:#f7f7f9;--ok:#1a7f37;--bad:#c62828;--warn:#b26a00;--bar:#6c8cd5}
@media (prefers-color-scheme:dark){:root{--fg:#e8e8ea;--mute:#a0a0a8;--line:#33333a;--bg:#141417;--card:#1d1d22;--bar:#7d9be0}}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg);margin:0;padding:16px 20px}
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}
.mute{color:var(--mute)}.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}.card{background:var(--card);border-radius:8px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
td.err{white-space:normal;color:var(--bad);min-width:220px}
.scroll{overflow-x:auto}
th{font-weight:600;color:var(--mute)}td.n,th.n{text-align:right}
pre{background:var(--card);padding:8px 12px;border-radius:8px;overflow:auto}
svg{background:var(--card);border-radius:8px}
#login{display:none;background:var(--card);padding:12px;border-radius:8px;max-width:480px}
#login input{width:70%;padding:4px}
</style></head><body>
<h1>claude-code-proxy <span id="version" class="mute"></span></h1>
<div id="state" class="mute">loading...</div>
<form id="login"><p>This proxy requires its key (ANTHROPIC_API_KEY) to show its status.</p>
<input id="key" type="password" autocomplete="off" placeholder="ANTHROPIC_API_KEY"> <button>Show</button>
<p id="loginmsg" class="bad"></p></form>
<div id="main" style="display:none">
<div class="cards" id="cards"></div>
<h2>Providers</h2><table id="providers"></table>
<h2>Tiers</h2><table id="tiers"></table>
<h2>Per upstream model, since start</h2><table id="totals"></table>
<h2>Last hour <span class="mute">(mean duration per minute, seconds; requests)</span></h2>
<svg id="chart" viewBox="0 0 720 150" width="100%" style="max-width:720px" role="img" aria-label="mean duration per minute"></svg>
<h2>Last requests</h2><div class="scroll"><table id="recent"></table></div>
<h2>Settings</h2><pre id="settings"></pre>
</div>
<script>
"use strict";
var KEY_ITEM = "claude-code-proxy-key";
var SVG = "http://www.w3.org/2000/svg";
function el(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function table(id, head, rows) {
  var t = document.getElementById(id), tr = el("tr");
  t.replaceChildren ? t.replaceChildren() : (t.textContent = "");
  head.forEach(function (h) { tr.appendChild(el("th", h[0], h[1] ? "n" : "")); });
  t.appendChild(tr);
  rows.forEach(function (row) {
    var r = el("tr");
    row.forEach(function (cell, i) {
      var c = cell && typeof cell === "object" ? cell : {text: cell};
      r.appendChild(el("td", c.text, c.cls || (head[i][1] ? "n" : "")));
    });
    t.appendChild(r);
  });
}
function secs(v) { return v === null || v === undefined ? "" : Number(v).toFixed(2) + "s"; }
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], {hour12: false}); }
function span(s) {
  s = Math.floor(s); var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}
function chart(series) {
  var svg = document.getElementById("chart"), w = 720, h = 150, pad = 24;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  var top = 0;
  series.forEach(function (p) { if (p.mean_duration > top) top = p.mean_duration; });
  var bw = (w - pad) / series.length;
  series.forEach(function (p, i) {
    if (!p.requests) return;
    var bh = top ? (h - pad) * p.mean_duration / top : 0, r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", pad + i * bw + 1); r.setAttribute("y", h - pad - bh);
    r.setAttribute("width", Math.max(bw - 2, 1)); r.setAttribute("height", Math.max(bh, 1));
    r.setAttribute("fill", p.errors ? "var(--bad)" : "var(--bar)");
    var tip = document.createElementNS(SVG, "title");
    tip.textContent = clock(p.minute) + ": " + p.requests + " requests, mean " + p.mean_duration + "s, " +
      p.input_tokens + " in / " + p.output_tokens + " out";
    r.appendChild(tip); svg.appendChild(r);
  });
  [[top, 10], [0, h - pad + 4]].forEach(function (a) {
    var t = document.createElementNS(SVG, "text");
    t.setAttribute("x", 2); t.setAttribute("y", a[1] + 4); t.setAttribute("font-size", "10");
    t.setAttribute("fill", "currentColor"); t.textContent = a[0] ? a[0].toPrecision(2) + "s" : "0"; svg.appendChild(t);
  });
  var label = document.createElementNS(SVG, "text");
  label.setAttribute("x", w - 4); label.setAttribute("y", h - 6); label.setAttribute("font-size", "10");
  label.setAttribute("text-anchor", "end"); label.setAttribute("fill", "currentColor");
  label.textContent = "now"; svg.appendChild(label);
}
function render(d) {
  document.getElementById("version").textContent = d.version;
  document.getElementById("state").textContent = "live, up " + span(d.uptime) + ", updated " + clock(d.now);
  var cards = document.getElementById("cards");
  while (cards.firstChild) cards.removeChild(cards.firstChild);
  [["requests", d.requests], ["errors", d.errors], ["in flight", d.in_flight],
   ["per minute", d.requests_per_minute], ["searches", d.searches]].forEach(function (c) {
    var box = el("div", null, "card"); box.appendChild(el("b", c[1])); box.appendChild(el("span", c[0], "mute"));
    cards.appendChild(box);
  });
  table("providers", [["provider"], ["url"], ["dialect"], ["api"], ["keys", 1], ["health"], ["last error"]],
    d.providers.map(function (p) {
      var cooling = p.state === "cooling";
      return [p.name, p.url, p.dialect, p.api, p.keys,
        {text: cooling ? "cooling down until " + (p.until ? clock(p.until) : "?") : "ok", cls: cooling ? "warn" : "ok"},
        {text: p.last_error || "", cls: "err"}];
    }));
  table("tiers", [["tier"], ["chain (tried in order)"]], d.tiers.map(function (t) {
    return [t.tier, t.chain.join(" \\u2192 ")];
  }));
  table("totals", [["provider"], ["upstream model"], ["requests", 1], ["errors", 1], ["tokens in", 1],
    ["out", 1], ["cached", 1]], d.totals.map(function (t) {
      return [t.provider, t.upstream_model, t.requests, {text: t.errors, cls: t.errors ? "n bad" : "n"},
        t.input_tokens, t.output_tokens, t.cached_tokens];
    }));
  chart(d.series);
  table("recent", [["time"], ["request"], ["model"], ["stream"], ["status", 1], ["in", 1], ["out", 1],
    ["cached", 1], ["ttft", 1], ["duration", 1], ["searches", 1], ["error"]], d.recent.map(function (r) {
      var via = r.model ? r.model + " \\u2192 " + (r.provider ? r.provider + "/" : "") + r.upstream_model : "";
      var failed = r.failed.map(function (f) { return f[0] + " " + f[1]; }).join(", ");
      var err = r.error + (failed ? (r.error ? " " : "") + "(failed first: " + failed + ")" : "");
      return [clock(r.started), (r.method === "POST" ? "" : r.method + " ") + r.path, via, r.stream ? "stream" : "",
        {text: r.status, cls: r.status >= 400 ? "n bad" : "n"}, r.input_tokens, r.output_tokens,
        r.cached_tokens, secs(r.ttft), secs(r.duration), r.searches || "", {text: err, cls: "err"}];
    }));
  document.getElementById("settings").textContent = d.settings.join("\\n");
  document.getElementById("main").style.display = "";
}
var timer = null;
function poll() {
  var key = sessionStorage.getItem(KEY_ITEM), headers = {Accept: "application/json"};
  if (key) headers.Authorization = "Bearer " + key;
  fetch("/status.json", {headers: headers, cache: "no-store"}).then(function (response) {
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_ITEM);
      document.getElementById("login").style.display = "block";
      document.getElementById("main").style.display = "none";
      document.getElementById("state").textContent = "";
      if (key) document.getElementById("loginmsg").textContent = "That key was refused.";
      return null;
    }
    return response.json().then(function (body) {
      if (!response.ok) throw new Error((body.error && body.error.message) || response.status);
      document.getElementById("login").style.display = "none";
      render(body);
      timer = setTimeout(poll, 1500);
    });
  }).catch(function (err) {
    document.getElementById("state").textContent = "not reachable (" + err.message + "); retrying";
    timer = setTimeout(poll, 3000);
  });
}
document.getElementById("login").addEventListener("submit", function (event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, document.getElementById("key").value);
  document.getElementById("loginmsg").textContent = "";
  clearTimeout(timer); poll();
});
poll();
</script></body></html>
"""
# No external assets and no data in the page itself: it fetches /status.json with the key.
STATUS_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; frame-ancestors 'none'; form-action 'none'",
    "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# =============================================================================================
# HTTP server
# =============================================================================================

DIGITS = re.compile(r"[0-9]{1,12}\Z")
HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{1,12}\Z")


class ClientGone(Exception):
    """The client closed its connection while we were writing to it."""


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b""


class SSEWriter:
    """Writes events to the client as HTTP chunks; shared with the heartbeat under a lock."""

    def __init__(self, wfile: Any, on_client_gone: Callable[[], None], sock: Optional[socket.socket] = None,
                 head: bytes = b"") -> None:
        self.wfile = wfile
        self.sock = sock
        self.lock = threading.Lock()
        self.last_write = time.monotonic()
        self.closed = False
        self.on_client_gone = on_client_gone
        # What the client is owed before the next chunk: the response head, until the first
        # events go out with it; then the part of a ping its socket had no room for.
        self.unsent = head

    def _write(self, payload: bytes) -> None:
        try:
            self.wfile.write(self.unsent + _http_chunk(payload))
            self.unsent = b""
        except OSError:
            self.closed = True
            self.on_client_gone()
            raise ClientGone() from None
        self.last_write = time.monotonic()

    def write(self, events: List[Dict[str, Any]]) -> None:
        if events:
            payload = b"".join(encode_sse(e) for e in events)
            with self.lock:
                if self.closed:
                    raise ClientGone()
                self._write(payload)

    def end(self, events: List[Dict[str, Any]]) -> None:
        """The last events, then the end of the chunked body."""
        with self.lock:
            if self.closed:
                raise ClientGone()
            self.closed = True
            try:
                self.wfile.write(self.unsent + _http_chunk(b"".join(encode_sse(e) for e in events)) + b"0\r\n\r\n")
            except OSError:
                raise ClientGone() from None

    def ping_if_idle(self, now: float, interval: float) -> None:
        """From the heartbeat thread, which must never block on one client: the ping goes out
        only as far as the socket takes it at once; the handler sends any rest first."""
        if now - self.last_write < interval or not self.lock.acquire(blocking=False):
            return
        try:
            if not self.closed and self.sock is not None:
                payload = self.unsent or _http_chunk(PING_BYTES)
                try:
                    sent = self.sock.send(payload, MSG_DONTWAIT)
                except BlockingIOError:      # not reading: no room for a ping, none needed
                    sent = 0
                except OSError:
                    self.closed = True
                    self.on_client_gone()
                    log.info("client went away during a quiet stream; upstream request closed")
                    return
                self.unsent = payload[sent:]
                self.last_write = now
        finally:
            self.lock.release()


PING_BYTES = encode_sse({"type": "ping"})
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)   # (Windows: poll said readable, so no wait)


class Watched:
    """A request in flight as the heartbeat sees it: the client's socket, the upstream
    connection working for it, and the stream writer if it streams."""

    __slots__ = ("client", "upstream", "writer", "gone")

    def __init__(self, client: socket.socket, upstream: http.client.HTTPConnection,
                 writer: Optional[SSEWriter]) -> None:
        self.client = client
        self.upstream = upstream
        self.writer = writer
        self.gone = False


class Heartbeat:
    """One thread for every request in flight. It pings each stream the upstream has left
    silent for `interval` seconds (so idle timeouts between the client and us do not fire while
    a model thinks), and it notices within a quarter of a second a client that closed its
    connection, streaming or waiting for a whole answer: the upstream request is closed at once,
    so a model stops generating for nobody. It sleeps while nothing is in flight."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.tick = max(min(interval / 4, 0.25), 0.01)
        self.watched: Dict[Watched, None] = {}
        self.cond = threading.Condition(threading.Lock())
        self.thread: Optional[threading.Thread] = None

    def watch(self, client: socket.socket, upstream: http.client.HTTPConnection,
              writer: Optional[SSEWriter] = None) -> Watched:
        entry = Watched(client, upstream, writer)
        with self.cond:
            self.watched[entry] = None
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
                self.thread.start()
            elif len(self.watched) == 1:
                self.cond.notify()
        return entry

    def unwatch(self, entry: Optional[Watched]) -> None:
        if entry is not None:
            with self.cond:
                self.watched.pop(entry, None)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.watched:
                    self.cond.wait()
            time.sleep(self.tick)
            with self.cond:
                entries = list(self.watched)
            now = time.monotonic()
            for entry in entries:
                if entry.writer is not None:
                    entry.writer.ping_if_idle(now, self.interval)
            self._find_gone(entries)

    def _find_gone(self, entries: List[Watched]) -> None:
        poller = select.poll() if hasattr(select, "poll") else None
        by_fd = {}
        for entry in entries:
            fd = entry.client.fileno()
            if fd >= 0:
                by_fd[fd] = entry
                if poller is not None:
                    poller.register(fd, select.POLLIN)
        if not by_fd:
            return
        try:
            ready = [fd for fd, _ in poller.poll(0)] if poller is not None else \
                select.select(list(by_fd), [], [], 0)[0]
        except (OSError, ValueError):
            return
        for fd in ready:
            entry = by_fd[fd]
            with self.cond:         # still in flight: its socket and upstream are its own
                if entry not in self.watched:
                    continue
                try:
                    left = entry.client.recv(1, socket.MSG_PEEK | MSG_DONTWAIT) == b""
                except BlockingIOError:
                    left = False
                except OSError:
                    left = True
                if left:            # (readable with data: the client sent more; not gone)
                    entry.gone = True
                    if entry.writer is not None:
                        entry.writer.closed = True
                    _shutdown_upstream(entry.upstream)
                    del self.watched[entry]


def _shutdown_upstream(conn: http.client.HTTPConnection) -> None:
    """Wake a thread blocked reading this connection (safe from another thread)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _close_upstream(conn: http.client.HTTPConnection) -> None:
    """Close an upstream connection now (from the thread that reads it)."""
    _shutdown_upstream(conn)
    conn.close()


class Redactor:
    """The one rule for what is masked: every key and credential-like header value of every
    provider, and the client key, wherever they appear, as ***. Placeholder keys ("ollama",
    "none", "lm-studio") are ordinary words, not secrets: a real key is long, and only strings
    of MIN_SECRET characters or more are masked."""

    MIN_SECRET = 12

    def __init__(self, secrets: Iterable[str]) -> None:
        # longest first, so that a key containing another is masked whole
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= self.MIN_SECRET}, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


class RedactSecrets(logging.Filter):
    """Keys never reach the log, not even inside a traceback."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.redactor.secrets:
            return True
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = self.redactor.redact(message), None
        return True


def _overloaded_response() -> bytes:
    body = json_bytes(error_body("overloaded_error", "the proxy has too many connections open; "
                                 "retry shortly (MAX_CONCURRENCY)"))
    return (b"HTTP/1.1 529 Overloaded\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body))


OVERLOADED_RESPONSE = _overloaded_response()
LINGER_SECONDS = 2.0     # reading what a refused client still sends, so it sees our answer


def json_log_line(created: float, level: str, message: str, fields: Optional[Dict[str, Any]] = None) -> str:
    """LOG_FORMAT=json, for every line: time (UTC, milliseconds), level, message, then the
    line's own fields (an access line's model, tokens, timings...)."""
    second = int(created)
    entry = {"time": "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
                                   int((created - second) * 1000)),
             "level": level, "message": message}
    entry.update(fields or {})
    return json.dumps(entry, ensure_ascii=False)


class AccessLog:
    """The access log line, written straight to the log's file descriptor in the log's format.
    Through the logging module (record, filter, formatter, handler lock) the line cost about
    0.05 ms a request, a sixth of the proxy's CPU for a small request; this costs a tenth of
    that. Keys are redacted as the logging filter would; other log lines still use logging."""

    def __init__(self, fd: int, json_format: bool, redact: Callable[[str], str]) -> None:
        self.fd = fd
        self.json_format = json_format
        self.redact = redact
        self.second = -1
        self.stamp = ""

    def write(self, level: int, line: str, fields: Dict[str, Any]) -> None:
        now = time.time()
        second = int(now)
        millis = int((now - second) * 1000)
        level_name = logging.getLevelName(level)
        if self.json_format:
            text = json_log_line(now, level_name, line, fields)
        else:
            if second != self.second:
                self.second, self.stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            text = "%s,%03d %s %s" % (self.stamp, millis, level_name, line)
        try:
            os.write(self.fd, (self.redact(text) + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


class ProxyServer(http.server.ThreadingHTTPServer):
    handler_class: Any = None          # Handler (set below; the speed-ups use FastHandler)
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, settings: Settings, reuse_port: bool = False, listen: bool = True) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.router = Router(settings)
        self.heartbeat = Heartbeat(settings.ping_interval)
        # Requests in flight are capped (MAX_CONCURRENCY), and so are connections, each of
        # which holds a thread: twice as many, since kept-alive connections sit idle between
        # requests. Beyond either cap the answer is 529 overloaded_error, which clients retry.
        self.slots = threading.BoundedSemaphore(max(settings.max_concurrency, 1))
        self.max_connections = 2 * max(settings.max_concurrency, 1)
        self.handlers: Dict[Handler, None] = {}
        self.open_connections = 0
        self.connections_lock = threading.Lock()
        self.draining = False
        self.access_log: Optional[AccessLog] = None     # set by the command line
        self.stats = Stats()                             # the page's and /metrics' counters
        self.started_at = time.time()                    # for the uptime
        self.redactor = Redactor(settings_secrets(settings))
        self.redact = self.redactor.redact
        self.log_filter = RedactSecrets(self.redactor)
        log.addFilter(self.log_filter)
        super().__init__((settings.host, settings.port), self.handler_class, bind_and_activate=False)
        try:
            self.server_bind()
            if listen:
                self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_bind(self) -> None:
        if self.reuse_port:                 # WORKERS: every worker binds the same port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_close(self) -> None:
        super().server_close()
        log.removeFilter(self.log_filter)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An exception that escaped a connection's handler: one log line (through the
        redacting filter), never socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):        # the client reset or stalled between requests
            log.debug("connection from %s ended: %r", client_address[0], exc)
        else:
            log.exception("unexpected error on a connection from %s", client_address[0])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            full = self.open_connections >= self.max_connections
            if not full:
                self.open_connections += 1
        if full:
            log.warning("%d connections open (twice MAX_CONCURRENCY): one more refused with 529",
                        self.max_connections)
            try:
                request.setblocking(False)
                request.send(OVERLOADED_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:               # no thread could be started
            self._connection_done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_done()

    def _connection_done(self) -> None:
        with self.connections_lock:
            self.open_connections -= 1

    def drain(self, grace: float) -> bool:
        """After the listening socket is closed: close kept-alive connections as they fall
        idle and wait up to `grace` seconds for requests in flight. True if all finished."""
        self.draining = True
        deadline = time.monotonic() + grace
        while True:
            with self.connections_lock:
                handlers = list(self.handlers)
                if not self.open_connections:
                    return True
            for handler in handlers:
                if not handler.busy:
                    handler.hang_up()
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def close_upstreams(self) -> None:
        self.router.close()


class Handler(http.server.BaseHTTPRequestHandler):
    """Thin: reads the request, calls the translation functions, writes the answer."""

    protocol_version = "HTTP/1.1"
    server_version = "claude-code-proxy/" + __version__
    disable_nagle_algorithm = True
    server: ProxyServer

    def setup(self) -> None:
        # A client that stops reading frees its thread after REQUEST_TIMEOUT instead of holding
        # it forever (StreamRequestHandler.setup calls settimeout() unless the kernel keeps the
        # timeout); one that sits idle between requests, after KEEPALIVE_TIMEOUT (each such
        # connection holds a thread and counts against the connection cap).
        settings = self.server.settings
        self.timeout = settings.request_timeout
        self.idle_timeout = settings.keepalive_timeout if settings.keepalive_timeout < self.timeout else 0.0
        first = self.idle_timeout or self.timeout
        self.timeout = None if set_io_timeout(self.request, first) else first
        self.busy = False
        self.linger = False
        super().setup()
        with self.server.connections_lock:
            self.server.handlers[self] = None

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.handlers.pop(self, None)
        try:
            super().finish()
        except OSError:
            pass
        if self.linger:
            self._linger()

    def _linger(self) -> None:
        """We answered before reading the whole request (413, a refused header): read and drop
        what the client still sends for a moment, so that closing does not reset the
        connection and destroy our answer before the client reads it."""
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.connection.settimeout(remaining)
                if not self.connection.recv(262144):
                    return
        except OSError:
            pass

    def hang_up(self) -> None:
        """Close an idle kept-alive connection (from another thread: shutting down)."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if self.idle_timeout and not self.close_connection:     # waiting for the next request
            set_io_timeout(self.connection, self.idle_timeout)

    def parse_request(self) -> bool:
        self.busy = True            # (so that a shutdown does not hang up on this request)
        if self.idle_timeout:       # a request line came: the request's own timeout from here
            set_io_timeout(self.connection, self.server.settings.request_timeout)
        parsed = super().parse_request()
        self.busy = parsed
        return parsed

    def handle_expect_100(self) -> bool:
        length = (self.headers.get("Content-Length") or "").strip()
        if DIGITS.match(length) and int(length) > self.server.settings.max_request_bytes:
            self.send_error(413, "request body over %d bytes (MAX_REQUEST_BYTES)"
                            % self.server.settings.max_request_bytes)
            return False
        return super().handle_expect_100()

    # -- dispatch ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        self.busy = True
        self.started = time.monotonic()
        self.request_id = new_id("req_")
        self.response_started = False
        self.exchange: Optional[Exchange] = None
        self.status: Any = "-"
        self.log_note = ""
        self.access: Dict[str, Any] = {}
        path = self.path.split("?", 1)[0]
        if path.startswith(("http://", "https://")):   # absolute form: only the path counts
            path = urllib.parse.urlsplit(path).path
        server = self.server
        try:
            body = self._read_body()
            route = ROUTES.get((method, path))
            if route is None and method in ("GET", "HEAD") and path.startswith("/v1/models/"):
                route = Handler.get_model
            if route is None:
                if path in ROUTE_METHODS:
                    raise ProxyError(405, "invalid_request_error", "%s %s: use %s" % (
                        method, path, " or ".join(ROUTE_METHODS[path])), {"Allow": ", ".join(ROUTE_METHODS[path])})
                raise ProxyError(404, "not_found_error", "%s %s is not an endpoint of this proxy" % (method, path))
            if path.startswith("/v1/"):
                self._check_auth(body)
            if route is Handler.messages:
                if not server.slots.acquire(blocking=False):
                    raise ProxyError(529, "overloaded_error", "the proxy is handling %d requests already; "
                                     "retry shortly (MAX_CONCURRENCY)" % server.settings.max_concurrency)
                server.stats.begin()             # requests in flight
                try:
                    route(self, body)
                finally:
                    server.stats.end()
                    server.slots.release()
            else:
                route(self, body)
        except ProxyError as err:
            self._send_error(err)
        except (ClientGone, ConnectionError, socket.timeout):   # the client left, or stopped reading
            self.close_connection = True
            self.log_note += " client went away"
        except RecursionError:             # a body nested so deep that re-encoding it fails
            self._send_error(_invalid("request body is nested too deeply"))
        except Exception:  # a bug: log it whole, keep serving, answer in Anthropic's shape
            log.exception("unexpected error handling %s %s", method, path)
            self._send_error(ProxyError(500, "api_error", "internal proxy error"))
        if server.draining:
            self.close_connection = True
        self.busy = False
        self._access_log(method, path)
        if path not in STATUS_PATHS:             # one record per request (not the status polls)
            duration = time.monotonic() - self.started
            server.stats.record(access_record(time.time() - duration, method, path, self.status,
                                              self.access, self.log_note, duration))

    def _read_body(self) -> bytes:
        """The request body, framed strictly: an ambiguous frame could desynchronise the
        kept-alive connection, so it is a 400 and the connection closes."""
        lengths = set(v.strip() for v in self.headers.get_all("Content-Length") or ())
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if len(lengths) > 1 or (lengths and chunked) or any(not DIGITS.match(v) for v in lengths):
            self.close_connection = True
            raise _invalid("the request body's length is ambiguous or not a number")
        if not lengths:
            return self._read_chunked() if chunked else b""
        size = int(lengths.pop())
        if size > self.server.settings.max_request_bytes:
            self.close_connection = self.linger = True
            raise self._too_large()
        return self.rfile.read(size)

    def _too_large(self) -> ProxyError:
        return ProxyError(413, "request_too_large", "request body over %d bytes (MAX_REQUEST_BYTES)"
                          % self.server.settings.max_request_bytes)

    def _read_chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            size_text = self.rfile.readline(64).split(b";", 1)[0].strip()
            if not HEX_DIGITS.match(size_text):
                self.close_connection = True
                raise _invalid("malformed chunked request body")
            size = int(size_text, 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > self.server.settings.max_request_bytes:
                self.close_connection = self.linger = True
                raise self._too_large()
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _check_auth(self, body: bytes = b"") -> None:
        expected = self.server.settings.anthropic_api_key
        if not expected:
            return
        import hmac                             # (only when a client key is set)
        authorization = self.headers.get("Authorization") or ""
        bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        # Some setups send both headers (ANTHROPIC_API_KEY and ANTHROPIC_AUTH_TOKEN): either may match.
        matches = [hmac.compare_digest(given.encode(), expected.encode())
                   for given in (self.headers.get("x-api-key") or "", bearer)]
        if not any(matches):
            with contextlib.suppress(ProxyError, RecursionError):
                request = parse_json(body) if body else None     # the access line names the model
                if isinstance(request, dict) and isinstance(request.get("model"), str):
                    self.access["model"] = request["model"][:200]
            raise ProxyError(401, "authentication_error", "invalid x-api-key")

    # -- responses --------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, headers: Optional[Dict[str, str]] = None) -> None:
        body = json_bytes(payload)
        self.send_response(status)
        if self.request_version != "HTTP/0.9":
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("request-id", self.request_id)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.server.draining:
                self.send_header("Connection", "close")
        self.end_headers()
        self.response_started = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        """The Date header's value, formatted once a second (it names whole seconds)."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        cached = Handler._date
        if cached[0] != second:
            cached = Handler._date = (second, super().date_time_string(second))
        return cached[1]

    _date: Tuple[int, str] = (-1, "")

    def _send_error(self, err: ProxyError) -> None:
        if self.exchange is not None and self.exchange.client_gone:   # our own doing: the client had left
            self.close_connection = True
            self.log_note += " client went away"
            return
        message = self.server.redact(err.message)
        self.log_note = "%s: %s" % (err.error_type, message)
        if self.response_started:
            self.close_connection = True   # a half-written answer cannot be repaired
            return
        payload = error_body(err.error_type, message)
        payload["request_id"] = self.request_id
        try:
            self._send_json(err.status, payload, err.headers)
        except OSError:
            self.close_connection = True

    def _access_log(self, method: str, path: str) -> None:
        """One line per request: method, path, status, client model -> upstream model, stream,
        tokens in and out, time to the first content and in all, and what went wrong."""
        failed = (isinstance(self.status, int) and self.status >= 500) or " stream error: " in self.log_note
        level = logging.WARNING if failed else logging.INFO
        if not log.isEnabledFor(level):
            return
        total = time.monotonic() - self.started
        access = self.access
        parts = [method, path[:200], str(self.status)]
        fields = dict(access, method=method, path=path[:200], status=self.status, total=round(total, 4))
        if "upstream_model" in access:
            provider = access["provider"]
            parts.append("%s -> %s%s%s" % (
                access["model"], access["upstream_model"] if provider == DEFAULT_PROVIDER else
                "%s/%s" % (provider, access["upstream_model"]), " stream" if access["stream"] else "",
                " (upstream whole)" if access.get("upstream_whole") else ""))
            if access.get("api") == "responses":
                parts[-1] += " via /responses"
            if access["failed"]:
                failed_over = ["%s %s" % pair for pair in access["failed"]]
                parts.append("failed: " + ", ".join(failed_over))
                fields["failed"] = failed_over
        elif "model" in access:
            parts.append(str(access["model"]))
        if "input_tokens" in access:
            parts.append("in=%s out=%s" % (access["input_tokens"], access["output_tokens"]))
        if access.get("ttft") is not None:
            parts.append("ttft=%.3fs" % access["ttft"])
            fields["ttft"] = round(access["ttft"], 4)
        if "searches" in access:                 # a request with the web_search tool
            parts.append("searches=%d" % access["searches"])
            fields["searches"] = access["searches"]
        if access.get("session"):                # Claude Code's session id
            parts.append("session=%s" % access["session"][:64])
        parts.append("%.3fs" % total)
        note = self.log_note.strip()
        if note:
            parts.append(note)
            fields["note"] = note
        if self.server.access_log is not None:
            self.server.access_log.write(level, " ".join(parts), fields)
        else:
            log.log(level, " ".join(parts), extra={"access": fields})

    def _note_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.access["input_tokens"] = usage.get("input_tokens")
            self.access["output_tokens"] = usage.get("output_tokens")
            self.access["cached_tokens"] = usage.get("cache_read_input_tokens")

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        self.status = code
        super().send_response(code, message)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (bad request line, unknown method, headers too long) in
        Anthropic's shape; an unknown method is the client's mistake, not a 501 to retry."""
        status = 405 if code == 501 else code
        self.close_connection = self.linger = True
        self.request_id = getattr(self, "request_id", None) or new_id("req_")
        error_type = {404: "not_found_error", 413: "request_too_large"}.get(status, "invalid_request_error")
        text = message or http.server.BaseHTTPRequestHandler.responses.get(status, ("error",))[0]
        payload = dict(error_body(error_type, text), request_id=self.request_id)
        path = (getattr(self, "path", None) or "-").split("?", 1)[0][:100]
        log.info("%s %s %d %s: %s", getattr(self, "command", None) or "-", path, status, error_type, text)
        headers = {"Connection": "close", "x-should-retry": "false"}
        if status == 405 and path in ROUTE_METHODS:
            headers["Allow"] = ", ".join(ROUTE_METHODS[path])
        try:
            self._send_json(status, payload, headers)
        except OSError:
            pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass                                   # the access log line is ours (_access_log)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's own errors
        log.debug("%s - %s", self.address_string(), format % args)

    # -- routes -----------------------------------------------------------------------------

    # the page (GET / from a browser), its data and the metrics --------------------

    def root(self, body: bytes) -> None:
        if "text/html" not in (self.headers.get("Accept") or ""):
            return self.health(body)             # Claude Code's probes, curl, load balancers
        if not self.server.settings.anthropic_api_key:
            # (with a key the page is served to anyone: it holds no data and asks for the key)
            self._check_status_access()
        self._send_bytes(200, "text/html; charset=utf-8", STATUS_PAGE.encode("utf-8"), STATUS_PAGE_HEADERS)

    def status_data(self, body: bytes) -> None:
        self._check_status_access()
        server = self.server
        now = time.time()
        health, tiers = router_status(server.router, now, time.monotonic())
        snapshot = server.stats.snapshot(now, health, tiers, describe_settings(server.settings).splitlines(),
                                         __version__, server.started_at)
        self._send_json(200, snapshot, {"Cache-Control": "no-store"})

    def metrics(self, body: bytes) -> None:
        self._check_status_access()
        server = self.server
        health, _ = router_status(server.router, time.time(), time.monotonic())
        self._send_bytes(200, METRICS_CONTENT_TYPE, server.stats.render_metrics(health).encode("utf-8"),
                         {"Cache-Control": "no-store"})

    def _check_status_access(self) -> None:
        error = status_access_error(self.server.settings.anthropic_api_key, self.server.server_address[0],
                                    self.headers.get("Authorization") or "", self.headers.get("x-api-key") or "")
        if error is not None:
            raise error

    def _send_bytes(self, status: int, content_type: str, body: bytes, headers: Dict[str, str]) -> None:
        self.send_response(status)
        if self.request_version != "HTTP/0.9":
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            if self.server.draining:
                self.send_header("Connection", "close")
        self.end_headers()
        self.response_started = True
        if self.command != "HEAD":
            self.wfile.write(body)

    # ------------------------------------------------------------------------------------------

    def health(self, body: bytes) -> None:
        self._send_json(200, {"status": "ok", "service": "claude-code-proxy", "version": __version__})

    def event_logging(self, body: bytes) -> None:
        self._send_json(200, {})           # Claude Code telemetry: answered here, never forwarded

    def list_models(self, body: bytes) -> None:
        models = model_list(self.server.router)
        self._send_json(200, {"data": models, "has_more": False,
                              "first_id": models[0]["id"], "last_id": models[-1]["id"]})

    def get_model(self, body: bytes) -> None:
        model_id = urllib.parse.unquote(self.path.split("?", 1)[0][len("/v1/models/"):])
        for model in model_list(self.server.router):
            if model["id"] == model_id:
                return self._send_json(200, model)
        if any(tier in model_id.lower() for tier in ("opus", "sonnet", "haiku")):
            return self._send_json(200, model_object(model_id, "%s (served by %s)" % (
                model_id, chain_text(self.server.router.chain(model_id)))))
        raise ProxyError(404, "not_found_error", "model %r not found" % model_id)

    def count_tokens(self, body: bytes) -> None:
        request = parse_json(body)
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            raise _invalid("messages: a list of messages is required")
        with wrong_types_are_400():
            tokens = estimate_tokens(request)
        self._send_json(200, {"input_tokens": tokens})

    def messages(self, body: bytes) -> None:
        with wrong_types_are_400():
            request = validate_request(parse_json(body))
        session = (self.headers.get("x-claude-code-session-id") or "").strip()[:128]
        if session:
            self.access["session"] = session
        if web_search_spec(request) is not None:
            return self._web_search(request, session)
        exchange = self.exchange = Exchange(self.server, request, self.connection, session)
        access = self.access
        access.update(model=request["model"], stream=exchange.stream)
        if exchange.stream and not exchange.upstream_stream:
            access["upstream_whole"] = True
        with exchange:
            try:
                exchange.open()
            finally:
                access.update(provider=exchange.upstream.name, upstream_model=exchange.model,
                              failed=exchange.failed, api=exchange.wire)
            if exchange.stream:
                return self._stream(exchange)
            message = exchange.message()
            self._note_usage(message.get("usage"))
            self._send_json(200, message)

    def _web_search(self, request: Dict[str, Any], session: str) -> None:
        """A request with a web_search_* tool: run_web_search, each model call a fresh Exchange
        on a non-streaming copy (failover and fixes apply). A stream starts with the first
        block (so an error in the first model call keeps its HTTP status); from then on each
        block goes out as soon as it is known, pings keep the stream alive while the model
        works, and an error is an `event: error`."""
        access = self.access
        stream = bool(request.get("stream"))
        access.update(model=request["model"], stream=stream, searches=0)
        message_id = new_id("msg_")
        out: Dict[str, Any] = {"writer": None, "index": 0}

        def start_stream() -> SSEWriter:
            if out["writer"] is None:
                out["writer"] = SSEWriter(self.wfile, lambda: None, self.connection, self._stream_head())
                out["writer"].write(web_search_start(message_id, request["model"]))
            return out["writer"]

        def send_block(block: Dict[str, Any]) -> None:
            if stream:
                start_stream().write(web_search_block_events(block, out["index"]))
                out["index"] += 1
                access.setdefault("ttft", time.monotonic() - self.started)

        def call_model(body: Dict[str, Any], with_raw: bool = False) -> Any:
            with Exchange(self.server, body, self.connection, session) as exchange:
                self.exchange = exchange
                exchange.writer = out["writer"]          # pings while the model works
                if with_raw:                             # WEB_SEARCH=upstream: the provider searches
                    spec = web_search_spec(request) or {}
                    exchange.adjust = lambda upstream, model, wire, sent: provider_search_body(
                        sent, upstream.dialect_for(model).name, model, wire, upstream.origin, spec)
                try:
                    exchange.open()
                finally:
                    access.update(provider=exchange.upstream.name, upstream_model=exchange.model,
                                  failed=exchange.failed, api=exchange.wire)
                message = exchange.message()
                return (message, exchange.raw) if with_raw else message

        try:
            if self.server.settings.web_search.strip().lower() == "upstream":
                message = run_provider_search(request, lambda body: call_model(body, True), new_id, send_block)
            else:
                message = run_web_search(request, call_model, make_search(self.server.settings), new_id, send_block)
        except ProxyError as err:
            if out["writer"] is None or (self.exchange is not None and self.exchange.client_gone):
                raise
            text = self.server.redact(err.message)
            self.log_note = "stream error: %s: %s" % (err.error_type, text)
            out["writer"].end([{"type": "error", "error": {"type": err.error_type, "message": text}}])
            return
        finally:
            self.exchange = None
        message["id"] = message_id
        access["searches"] = message["usage"]["server_tool_use"]["web_search_requests"]
        self._note_usage(message["usage"])
        if not stream:
            return self._send_json(200, message)
        start_stream().end(web_search_end(message))

    def _stream_head(self) -> bytes:
        """Send the head of a streamed response; the bytes the SSE writer must send before the
        first events (none here: the speed-ups send the head with them, in one send)."""
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                            ("Transfer-Encoding", "chunked"), ("X-Accel-Buffering", "no"),
                            ("request-id", self.request_id)):
            self.send_header(name, value)
        if self.server.draining:
            self.send_header("Connection", "close")
        self.end_headers()
        self.response_started = True
        return b""

    def _stream(self, exchange: Exchange) -> None:
        """Write the answer's events to the client as they come; the last batch ends the body.
        After an error event the connection stays usable: the body was ended cleanly, and the
        client's retry (Claude Code retries at once, on the same connection) must not meet a
        closed socket."""
        writer = SSEWriter(self.wfile, exchange.abort, self.connection, self._stream_head())
        try:
            for events in exchange.events():
                if exchange.finished:
                    break
                if exchange.watch is not None:
                    exchange.watch.writer = writer       # pings from now on
                writer.write(events)
                if "ttft" not in self.access and any(e["type"] == "content_block_delta" for e in events):
                    self.access["ttft"] = time.monotonic() - self.started
            else:
                events = []
            exchange.unwatch()
            if writer.closed:                  # the heartbeat found the client gone
                raise ClientGone()
            ended = exchange.ended
            if ended is not None and ended.error is not None:
                ended.error["message"] = self.server.redact(ended.error["message"])
                self.log_note += " stream error: " + ended.error["message"]
            elif ended is not None:
                self._note_usage(ended.usage)
                if "ttft" not in self.access:
                    self.access["ttft"] = time.monotonic() - self.started
            writer.end(events)
        except ClientGone:
            self.close_connection = True
            self.log_note += " client went away"
            exchange.ended = None                # the upstream connection is closed, not reused


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range: %s" % text)
    return value


def _no_constants(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_float=_finite, parse_constant=_no_constants)
    except ValueError as exc:
        raise _invalid("request body is not valid JSON: %s" % exc) from None
    except RecursionError:
        raise _invalid("request body is nested too deeply") from None


def parse_chunk(data: str) -> Dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    return chunk if isinstance(chunk, dict) else {"error": {"message": "malformed chunk: " + data[:200]}}


def model_object(model_id: str, display_name: str) -> Dict[str, Any]:
    return {"type": "model", "id": model_id, "display_name": display_name,
            "created_at": "2025-01-01T00:00:00Z"}


def model_list(router: "Router") -> List[Dict[str, Any]]:
    """Each tier under a claude-… id (Claude Code's gateway model discovery keeps only those),
    its chain in the display name; then each upstream model a tier maps to."""
    tiers = router.tiers()
    models = [model_object("claude-" + tier, "claude-%s (served by %s)" % (tier, chain_text(chain)))
              for tier, chain in tiers]
    for upstream, model in dict.fromkeys(entry for _, chain in tiers for entry in chain):
        model_id = chain_text(((upstream, model),))
        models.append(model_object(model_id, model_id))
    return models


ROUTES: Dict[Tuple[str, str], Callable[[Handler, bytes], None]] = {
    ("POST", "/v1/messages"): Handler.messages,
    ("POST", "/v1/messages/count_tokens"): Handler.count_tokens,
    ("GET", "/v1/models"): Handler.list_models,
    ("GET", "/"): Handler.root,                 # the page for a browser, else health
    ("GET", "/status.json"): Handler.status_data,
    ("GET", "/metrics"): Handler.metrics,
    ("HEAD", "/"): Handler.health,
    ("GET", "/health"): Handler.health,
    ("HEAD", "/health"): Handler.health,
    ("HEAD", "/api/hello"): Handler.health,     # Claude Code's connectivity probe
    ("POST", "/api/event_logging/batch"): Handler.event_logging,
    ("POST", "/api/event_logging/v2/batch"): Handler.event_logging,
}
ProxyServer.handler_class = Handler
STATUS_PATHS = ("/status.json", "/metrics")     # not recorded (the page polls)
ROUTE_METHODS: Dict[str, List[str]] = {}
for _method, _path in ROUTES:
    ROUTE_METHODS.setdefault(_path, []).append(_method)


# =============================================================================================
# Speed-ups: every use of a private attribute of the standard library, in one place
# =============================================================================================
# install_speedups() (called by main(), never by `import claude_proxy`) puts them in place:
# - kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO) instead of Python socket timeouts on Linux, with
#   a socket class swap and a reader built on socket.SocketIO's internals;
# - upstream requests sent in one send(), their headers encoded once (http.client's _buffer);
# - header parsing without the email package for ordinary headers (http.client.parse_headers
#   replaced; http.server looks it up there too);
# - responses whose head is formatted in one string and sent with the body in one write
#   (http.server's _headers_buffer).
# Each was measured (see the commit messages); without them the proxy behaves the same.

# Timeouts (REQUEST_TIMEOUT on upstream connections and on client connections) are the
# kernel's where it can keep them (SO_RCVTIMEO / SO_SNDTIMEO on a blocking socket, Linux, plain
# TCP): a socket with a Python timeout polls before every recv and send, which costs a second
# system call and a second release of the GIL per read of a stream chunk. TLS sockets keep the
# Python timeout (the ssl module retries a read the kernel timed out, forever), as does every
# other platform. A read the kernel timed out fails with EAGAIN, which the socket module's file
# objects take for "no data yet" (read1() and readline() return b"", as at the end of the
# stream): the socket class below turns it into socket.timeout, exactly what the Python
# timeout raised.
KERNEL_TIMEOUTS = (sys.platform.startswith("linux") and hasattr(socket, "SO_RCVTIMEO")
                   and hasattr(socket, "SO_SNDTIMEO") and struct.calcsize("l") == 8)   # (timeval: 2 longs)


class _KernelTimedIO(socket.SocketIO):
    """A socket's raw reader where EAGAIN (the kernel's timeout) is socket.timeout."""

    def readinto(self, b: Any) -> Optional[int]:
        self._checkClosed()
        self._checkReadable()
        if self._timeout_occurred:
            raise OSError("cannot read from timed out object")
        try:
            return self._sock.recv_into(b)
        except BlockingIOError:
            self._timeout_occurred = True
            raise socket.timeout("timed out") from None


class KernelTimedSocket(socket.socket):
    """A blocking socket whose timeouts the kernel keeps: a timed-out read or write raises
    socket.timeout, as with settimeout(). (recv with MSG_DONTWAIT still raises BlockingIOError.)"""

    __slots__ = ()

    def makefile(self, mode: str = "r", buffering: Optional[int] = None, **kwargs: Any) -> Any:
        if mode != "rb" or buffering == 0 or kwargs:
            return super().makefile(mode, buffering, **kwargs)
        raw = _KernelTimedIO(self, "rb")
        self._io_refs += 1
        return io.BufferedReader(raw, buffering if buffering and buffering > 0 else io.DEFAULT_BUFFER_SIZE)

    def sendall(self, data: Any, flags: int = 0) -> None:
        try:
            super().sendall(data, flags)
        except BlockingIOError:
            raise socket.timeout("timed out") from None


def kernel_io_timeout(sock: socket.socket, seconds: float) -> bool:
    """set_io_timeout() with the speed-ups: a kernel timeout on a blocking socket where possible
    (True), settimeout() otherwise. Before the socket's makefile(): the file objects are made
    for the kernel's timeouts."""
    if KERNEL_TIMEOUTS and type(sock) in (socket.socket, KernelTimedSocket):
        seconds = min(seconds, 2.0 ** 31)
        whole = int(seconds)
        timeval = struct.pack("@ll", whole, max(int((seconds - whole) * 1e6), 0 if whole else 1))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.settimeout(None)
        sock.__class__ = KernelTimedSocket
        return True
    sock.settimeout(seconds)
    return False


class _OneSend:
    """http.client sends a request's headers and its body in two send() calls: with
    TCP_NODELAY that is two packets (and two system calls). A bytes body goes out with the
    headers in one."""

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", message_body))
            message = b"\r\n".join(self._buffer)
            del self._buffer[:]
            self.send(message)
        else:
            super()._send_output(message_body, encode_chunked)

    def post(self, url: str, header_lines: bytes, body: bytes) -> None:
        """request("POST", url, body, headers), the same bytes, with the headers encoded
        once beforehand (encode_header_lines): http.client checks and encodes every header
        of every request, which costs more than the rest of sending it."""
        self.putrequest("POST", url)                 # the request line, Host, Accept-Encoding
        self._buffer.append(b"Content-Length: %d\r\n%s" % (len(body), header_lines))
        self.endheaders(body)


def encode_header_lines(headers: Dict[str, str]) -> bytes:
    """The lines putheader() makes of these headers, checked as it checks them (ValueError
    for a name or value it refuses). None of Host, Accept-Encoding, Content-Length and
    Transfer-Encoding: putrequest() and _OneSend.post() add those."""
    scratch = http.client.HTTPConnection("localhost")
    scratch.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
    del scratch._buffer[:]
    for name, value in headers.items():
        if name.lower() in ("host", "accept-encoding", "content-length", "transfer-encoding"):
            raise ValueError("header %s is http.client's to send" % name)
        scratch.putheader(name, value)
    return b"\r\n".join(scratch._buffer)


class UpstreamConnection(_OneSend, http.client.HTTPConnection):
    pass


class UpstreamTLSConnection(_OneSend, http.client.HTTPSConnection):
    pass



def send_encoded(self: UpstreamPool, conn: http.client.HTTPConnection, target: str, headers: Dict[str, str],
                 body: bytes) -> None:
    """UpstreamPool.send_request with the speed-ups: the headers encoded once per headers dict."""
    cached = self.encoded_headers.get(id(headers))
    if cached is None or cached[0] is not headers:
        if len(self.encoded_headers) > 64:
            self.encoded_headers.clear()
        cached = self.encoded_headers[id(headers)] = (headers, encode_header_lines(headers))
    conn.post(target, cached[1], body)


_HEADER_FIELDS = re.compile(r"(?:[!-9;-~]+:[^\r\n]*\r?\n)*\r?\n\Z")
_HEADER_FIELD = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")


def _read_header_lines(fp: Any) -> List[bytes]:
    """The header lines up to the blank one, with http.client's limits (its own helper for
    this is missing before Python 3.8.11)."""
    lines = []
    while True:
        line = fp.readline(65537)
        if len(line) > 65536:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > 100:
            raise http.client.HTTPException("got more than 100 headers")
        if line in (b"\r\n", b"\n", b""):
            return lines


def parse_headers(fp: Any, _class: Any = http.client.HTTPMessage) -> http.client.HTTPMessage:
    """http.client.parse_headers without the email package for ordinary headers (one
    `Name: value` per line, no continuation lines, no multipart type): the same message
    (names, values, order, empty payload) five to six times faster. Anything else goes through
    the email parser as before. http.server and http.client both call it for every request
    and every upstream response."""
    text = b"".join(_read_header_lines(fp)).decode("iso-8859-1")
    lowered = text.lower()
    if not _HEADER_FIELDS.match(text) or "multipart/" in lowered or "message/" in lowered:
        return email.parser.Parser(_class=_class).parsestr(text)
    message = _class()
    message._headers = _HEADER_FIELD.findall(text)
    message._payload = ""
    return message





class FastResponses:
    """Handler responses with the status line and fixed headers formatted in one string, and the
    head sent with the body (or the first events) in one write."""

    def _send_json(self, status: int, payload: Any, headers: Optional[Dict[str, str]] = None) -> None:
        body = json_bytes(payload)
        if self.request_version == "HTTP/0.9":
            self.send_response(status)
            self.end_headers()
            self.response_started = True
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        self._response_head(status, b"Content-Type: application/json\r\nContent-Length: %d\r\nrequest-id: %s\r\n"
                            % (len(body), self.request_id.encode("latin-1")))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.server.draining:
            self.send_header("Connection", "close")
        # end_headers(), with the body in the same write: one send() instead of two
        self._headers_buffer.append(b"\r\n" if self.command == "HEAD" else b"\r\n" + body)
        self.flush_headers()
        self.response_started = True

    def _response_head(self, status: int, lines: bytes) -> None:
        """send_response(status) and then send_header() for each of `lines` (encoded header
        lines, Connection not among them), in one string instead of a dozen: the same bytes.
        Not for HTTP/0.9, which has no headers."""
        self.status = status
        message = self.responses[status][0] if status in self.responses else ""
        if not hasattr(self, "_headers_buffer"):
            self._headers_buffer = []
        self._headers_buffer.append(b"%s %d %s\r\nServer: %s\r\nDate: %s\r\n%s" % (
            self.protocol_version.encode("latin-1"), status, message.encode("latin-1"),
            self.version_string().encode("latin-1"), self.date_time_string().encode("latin-1"), lines))

    def _stream_head(self) -> bytes:
        """The head of a streamed response, for the SSE writer to send with the first events
        (one send, and one wake-up of the client, instead of two)."""
        self._response_head(200, b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
                            b"Transfer-Encoding: chunked\r\nX-Accel-Buffering: no\r\nrequest-id: %s\r\n"
                            % self.request_id.encode("latin-1"))
        if self.server.draining:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        head = b"".join(self._headers_buffer)
        self._headers_buffer = []
        self.response_started = True
        return head



class FastHandler(FastResponses, Handler):
    pass


def install_speedups() -> None:
    """Put the speed-ups in place for the whole process (from main(), before any server)."""
    global _io_timeout
    if KERNEL_TIMEOUTS:
        _io_timeout = kernel_io_timeout
    UpstreamPool.connection_classes = (UpstreamConnection, UpstreamTLSConnection)
    UpstreamPool.send_request = send_encoded       # type: ignore[assignment]
    http.client.parse_headers = parse_headers
    ProxyServer.handler_class = FastHandler


# =============================================================================================
# Command line
# =============================================================================================


class Doctor:
    """--check: each step from name resolution to a one-token answer from every mapped model,
    one line each, and for a step that fails, the likely cause and the setting that fixes it."""

    def __init__(self, settings: Settings, out: Any) -> None:
        self.settings = settings
        self.out = out
        self.redact = Redactor(settings_secrets(settings)).redact
        try:
            "✓✗".encode(getattr(out, "encoding", None) or "ascii")
            self.marks = {True: "✓", False: "✗", None: "!"}
        except (UnicodeError, LookupError):
            self.marks = {True: "ok  ", False: "FAIL", None: "warn"}
        self.failed = 0

    def step(self, ok: Optional[bool], name: str, detail: str, fix: str = "") -> bool:
        detail = self.redact(detail)           # an upstream may echo the key in its message
        self.out.write("%s %-8s %s\n" % (self.marks[ok], name, detail))
        if fix:
            self.out.write("           fix: %s\n" % fix)
        self.out.flush()
        self.failed += ok is False
        return ok is not False

    def run(self) -> bool:
        settings = self.settings
        self.out.write(describe_settings(settings) + "\n")
        try:
            router = Router(settings)
        except (ValueError, OSError) as exc:
            self.out.write("\n")
            return self.step(False, "settings", str(exc), "CA_BUNDLE must be a PEM file of certificates")
        try:
            tiers = router.tiers()
            used = list(dict.fromkeys(upstream for _, chain in tiers for upstream, _ in chain))
            for tier, chain in tiers:
                self.out.write("%-19s %s\n" % (tier, chain_text(chain)))
            self.out.write("\n")
            reached = {}
            for upstream in used:
                if len(used) > 1:
                    self.out.write("%s\n" % upstream.label())
                reached[upstream] = self._reach(upstream) and self._models(
                    upstream, [model for _, chain in tiers for u, model in chain if u is upstream])
            answered = set()
            for tier, chain in tiers:
                for upstream, model in chain:
                    if reached[upstream] and (upstream, model) not in answered:
                        answered.add((upstream, model))
                        self._answer(upstream, tier, model)
        finally:
            router.close()
        self._search()
        return not self.failed

    def _search(self) -> None:
        """WEB_SEARCH set: one search on its backend."""
        search = make_search(self.settings)
        if self.settings.web_search.strip().lower() == "upstream":
            self.step(True, "search", "upstream: the provider's own search, with each model's request")
        if search is None:
            return
        try:
            found = search("claude code proxy", (), ())
        except SearchError as exc:
            self.step(False, "search", "%s: %s" % (exc.error_code, exc.message),
                      "check WEB_SEARCH, the backend's key and WEB_SEARCH_TIMEOUT")
            return
        self.step(True, "search", "%s answered with %d results" % (search.name, len(found)))

    def _reach(self, upstream: Upstream) -> bool:
        """Name resolution, connection (through the proxy, if any) and TLS."""
        pool = upstream.pool
        proxy = pool.proxy
        host, port = (proxy.hostname or "", proxy.port or 8080) if proxy is not None else (pool.host, pool.port)
        base_setting = "OPENAI_BASE_URL" if upstream.name == DEFAULT_PROVIDER else upstream.name.upper() + "_BASE_URL"
        setting = "HTTPS_PROXY / HTTP_PROXY" if proxy is not None else base_setting
        what = "proxy " if proxy is not None else ""
        try:
            address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except (socket.gaierror, UnicodeError) as exc:
            return self.step(False, "dns", "cannot resolve the %sname %s (%s)" % (what, host, exc),
                             "check the host name in %s; where the internet is only reachable through a "
                             "proxy, set HTTPS_PROXY" % setting)
        self.step(True, "dns", "%s%s -> %s" % (what, host, address))
        try:
            socket.create_connection((host, port), timeout=self.settings.connect_timeout).close()
        except socket.timeout:
            return self.step(False, "connect", "no answer from %s%s:%d within %gs" % (
                what, host, port, self.settings.connect_timeout),
                "a firewall may drop the connection: set HTTPS_PROXY to your network's proxy, or raise CONNECT_TIMEOUT")
        except OSError as exc:
            return self.step(False, "connect", "%s%s:%d: %s" % (what, host, port, exc.strerror or exc),
                             "check %s (is the server or proxy running, on that port?)" % setting)
        self.step(True, "connect", "%s%s:%d%s" % (what, host, port, pool.via and " (for %s)" % pool.origin))
        if not pool.https:
            return True
        try:
            conn = pool._connect()
        except ProxyError as err:
            return self.step(False, "tls", err.message, "raise CONNECT_TIMEOUT or check the network")
        except ssl.SSLCertVerificationError as exc:
            return self.step(False, "tls", "certificate of %s not trusted: %s" % (pool.host, exc.verify_message),
                             "set CA_BUNDLE (or SSL_CERT_FILE) to a PEM file with your organisation's CA")
        except ssl.SSLError as exc:
            return self.step(False, "tls", "handshake with %s failed: %s" % (pool.host, exc.reason or exc),
                             "does the server speak https? Try http:// in %s" % base_setting)
        except OSError as exc:
            if proxy is not None and "Tunnel" in str(exc):   # the proxy refused (407, 403...)
                return self.step(False, "proxy", "CONNECT %s:%d refused: %s" % (pool.host, pool.port, exc),
                                 "check HTTPS_PROXY; credentials go in it: http://user:password@host:port")
            return self.step(False, "tls", "connection to %s%s broken during the TLS handshake: %s" % (
                pool.host, pool.via, exc), "a firewall or TLS inspection may be in the way; behind a "
                "corporate proxy set HTTPS_PROXY" if proxy is None else "check HTTPS_PROXY")
        self.step(True, "tls", "%s, certificate of %s trusted" % (conn.sock.version(), pool.host))
        conn.close()
        return True

    def _models(self, upstream: Upstream, wanted: List[str]) -> bool:
        try:
            status, body = upstream.get("/models")
        except ProxyError as err:
            return self.step(False, "models", err.message)
        if status in (401, 403):
            return self.step(False, "models", "the upstream refused the key (%d): %s" % (
                status, upstream_error(status, body, None).upstream_message),
                "check %s (and that it belongs to this provider)" % key_setting(upstream))
        try:
            ids = [m["id"] for m in json.loads(body)["data"]] if status == 200 else None
        except (ValueError, KeyError, TypeError):
            ids = None
        if ids is None:
            return self.step(None, "models", "no model list here (HTTP %d); the answers below tell" % status)
        missing = [m for m in dict.fromkeys(wanted) if m not in ids]
        return self.step(True if not missing else None, "models", "%d listed%s" % (
            len(ids), "; not listed: %s" % ", ".join(missing) if missing else ", the mapped ones among them"))

    def _answer(self, upstream: Upstream, tier: str, model: str) -> None:
        # (the Responses API takes no max_output_tokens below 16)
        request = {"model": "claude-%s" % tier, "max_tokens": 16 if upstream.wire(model) == "responses" else 1,
                   "messages": [{"role": "user", "content": "Reply with the word OK."}]}
        setting = {"opus": "BIG_MODEL", "sonnet": "MIDDLE_MODEL", "haiku": "SMALL_MODEL"}[tier]
        shown = model if upstream.name == DEFAULT_PROVIDER else "%s/%s" % (upstream.name, model)
        started = time.monotonic()
        try:
            wire, body = upstream.build(request, model, stream=False)
            conn, response = upstream.send(body, lambda conn: None, wire=wire)
            read_body(response, upstream.origin)
            conn.close()
            self.step(True, tier, "%s answered in %.1fs" % (shown, time.monotonic() - started))
            return
        except ProxyError as err:
            error = err
        status = error.upstream_status
        if not status:
            self.step(False, tier, "%s: %s" % (shown, error.message))
            return
        lower = error.upstream_message.lower()
        if status == 400 and "output limit" in lower:
            self.step(True, tier, "%s answered (up to its 1-token limit) in %.1fs" % (shown, time.monotonic() - started))
            return
        message = "%s: HTTP %d: %s" % (shown, status, error.upstream_message[:200])
        if status in (401, 403):
            hint = "check %s" % key_setting(upstream)
        elif status == 404 or "model" in lower and ("not found" in lower or "does not exist" in lower
                                                    or "unknown" in lower or "invalid" in lower):
            hint = "the upstream does not know %r: set %s (which serves %s) to a model it has" % (model, setting, tier)
        elif status == 429:
            hint = "rate limited or out of quota: check the account's limits and billing"
        else:
            hint = ""
        self.step(False, tier, message, hint)


def key_setting(upstream: Upstream) -> str:
    return "OPENAI_API_KEY" if upstream.name == DEFAULT_PROVIDER else upstream.name.upper() + "_API_KEY"


class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one object a line; access lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "access", None) or {})
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return json_log_line(record.created, record.levelname, record.getMessage(), fields)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if settings.log_format.lower() == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, settings.log_level.upper()), handlers=[handler])


def attach_access_log(server: ProxyServer) -> ProxyServer:
    """Access lines go straight to stderr, where the logging handler writes too."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):    # no stderr (pythonw): through logging
        return server
    server.access_log = AccessLog(fd, server.settings.log_format.lower() == "json", server.redact)
    return server


def banner(settings: Settings, server: ProxyServer, workers: int = 1) -> str:
    host, port = server.server_address[:2]
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else ("[%s]" % host if ":" in host else host)
    router = server.router
    default = router.default
    key = "<your ANTHROPIC_API_KEY>" if settings.anthropic_api_key else "x"
    tiers = router.tiers()
    others = list(dict.fromkeys(u for _, chain in tiers for u, _ in chain if u is not default))
    return "\n".join([
        "claude-code-proxy %s listening on http://%s:%d%s" % (
            __version__, "[%s]" % host if ":" in host else host, port, " (%d workers)" % workers if workers > 1 else ""),
        "  upstream  %s (%s)%s" % (public_url(settings.openai_base_url), default.dialect.name, default.pool.via)] + [
        "  provider  %s" % upstream.label() for upstream in others] + [
        "  models    %s (other names pass through)" % ", ".join(
            "%s -> %s" % (tier, chain_text(chain)) for tier, chain in tiers),
        "  clients   %s" % ("must send ANTHROPIC_API_KEY" if settings.anthropic_api_key else
                            "no key required (set ANTHROPIC_API_KEY to require one)"),
        "  start Claude Code with:",
        "    ANTHROPIC_BASE_URL=http://%s:%d ANTHROPIC_AUTH_TOKEN=%s claude" % (local, port, key)])


FLAGS_WITHOUT_VALUE = ("--check", "--version", "--help", "-h")


def split_launcher_argv(argv: List[str]) -> Tuple[List[str], Optional[List[str]]]:
    """`[proxy flags] claude [claude's arguments]` -> (the proxy's flags, claude's arguments);
    None for claude's when the word `claude` is not there (a flag's value is never taken for it)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "claude":
            return argv[:i], argv[i + 1:]
        if arg == "--":
            break
        if arg.startswith("-") and "=" not in arg and arg not in FLAGS_WITHOUT_VALUE:
            i += 1                           # the flag's value
        i += 1
    return argv, None


def run_claude(settings: Settings, claude_args: List[str]) -> int:
    """`claude-code-proxy claude [ARGS...]`: the proxy on a free loopback port in this process,
    Claude Code started against it with the terminal, the proxy's log in a file (its path
    printed once), and claude's exit status as ours. The key goes as ANTHROPIC_AUTH_TOKEN, which
    Claude Code uses without asking; ANTHROPIC_API_KEY is removed from its environment, since
    that one it would ask about."""
    import shutil
    import subprocess
    import tempfile
    executable = shutil.which("claude")
    if executable is None:
        print("claude-code-proxy: no `claude` command on PATH; install Claude Code "
              "(npm install -g @anthropic-ai/claude-code) or add its folder to PATH", file=sys.stderr)
        return 127
    settings = dataclasses.replace(settings, host="127.0.0.1", port=0, workers=1)
    fd, log_path = tempfile.mkstemp(prefix="claude-code-proxy-", suffix=".log")
    log_file = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(JsonLogFormatter() if settings.log_format.lower() == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, settings.log_level.upper()))
    limit_malloc_arenas()
    install_speedups()
    try:
        server = ProxyServer(settings)
    except (ValueError, OSError) as exc:
        print("claude-code-proxy: %s" % exc, file=sys.stderr)
        return 2
    server.access_log = AccessLog(log_file.fileno(), settings.log_format.lower() == "json", server.redact)
    port = server.server_address[1]
    log.info("%s", banner(settings, server))
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    print("claude-code-proxy: serving Claude Code on http://127.0.0.1:%d; log in %s" % (port, log_path),
          file=sys.stderr, flush=True)
    env = dict(os.environ)
    env.pop("ANTHROPIC_API_KEY", None)
    env["ANTHROPIC_BASE_URL"] = "http://127.0.0.1:%d" % port
    env["ANTHROPIC_AUTH_TOKEN"] = settings.anthropic_api_key or "claude-code-proxy"
    # Ctrl-C reaches claude and us alike (one process group): claude decides what it means.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    child: Optional[Any] = None

    def on_term(signum: int, frame: Any) -> None:
        if child is not None:
            child.terminate()

    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        child = subprocess.Popen([executable] + claude_args, env=env)
        code = child.wait()
    except OSError as exc:
        print("claude-code-proxy: cannot run %s: %s" % (executable, exc), file=sys.stderr)
        code = 126
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        server.shutdown()
        server.server_close()
        server.close_upstreams()
        root.removeHandler(handler)
        log_file.close()
    return code if code >= 0 else 128 - code      # killed by signal N: 128 + N, as shells say


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv, claude_args = split_launcher_argv(argv)
    args = build_arg_parser().parse_args(argv)
    dotenv_text = ""
    if os.path.isfile(args.env_file):
        with open(args.env_file, encoding="utf-8") as handle:
            dotenv_text = handle.read()
    try:
        settings = load_settings(dict(os.environ), argv, dotenv_text)
    except ValueError as exc:
        print("claude-code-proxy: %s" % exc, file=sys.stderr)
        return 2
    if claude_args is not None:
        return run_claude(settings, claude_args)
    configure_logging(settings)
    limit_malloc_arenas()                # before any thread starts
    install_speedups()
    if args.check:
        try:
            return 0 if Doctor(settings, sys.stdout).run() else 1
        except BrokenPipeError:
            return 1
    workers = settings.workers
    if workers > 1 and not hasattr(os, "fork"):
        print("claude-code-proxy: WORKERS needs fork(), which this platform lacks; running one process",
              file=sys.stderr)
        workers = 1
    # Linux spreads connections over sockets bound with SO_REUSEPORT: each worker binds its own
    # and this one only holds the port (bound, not listening). Elsewhere the workers share this
    # listening socket, non-blocking so that a worker losing the race to accept is not stuck.
    reuse_port = workers > 1 and sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
    try:
        if reuse_port and settings.port:
            # SO_REUSEPORT would let us share a port another server (or a second copy of this
            # proxy) already has: a plain bind first, so that is "address in use" as usual.
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((settings.host, settings.port))
        server = ProxyServer(settings, reuse_port=reuse_port, listen=not reuse_port)
        if workers > 1 and not reuse_port:
            server.socket.setblocking(False)
    except (ValueError, OSError) as exc:
        print("claude-code-proxy: %s" % exc, file=sys.stderr)
        return 2
    attach_access_log(server)

    def announce() -> None:            # once connections are accepted
        print(banner(settings, server, workers), file=sys.stderr, flush=True)
        if not settings.openai_api_key and urllib.parse.urlsplit(settings.openai_base_url).hostname not in LOOPBACK_HOSTS:
            log.warning("OPENAI_API_KEY is not set; the upstream will probably answer 401")
        if settings.host not in LOOPBACK_HOSTS and not settings.anthropic_api_key:
            log.warning("listening on %s without ANTHROPIC_API_KEY: anyone who can reach this port can use "
                        "the upstream key; set ANTHROPIC_API_KEY to require a key from clients", settings.host)

    if workers > 1:
        return run_workers(server, workers, reuse_port, announce)
    announce()
    pin_to_cpu(settings.pin_cpu, 0)
    return serve_until_signalled(server)


def limit_malloc_arenas(count: int = 2) -> None:
    """glibc gives a thread that finds the malloc arenas busy an arena of its own, up to 8 per
    core, and memory freed into one arena serves no other: with 64 requests in flight (90 KB
    bodies) that is ~10 MB more peak RSS. Python allocates holding the GIL, so two arenas cost
    no waiting. MALLOC_ARENA_MAX in the environment, which glibc reads itself, wins."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return
        import ctypes
        ctypes.CDLL(None).mallopt(-8, count)        # M_ARENA_MAX
    except (ImportError, AttributeError, OSError, ValueError):
        pass


def pin_to_cpu(pin_cpu: str, index: int) -> None:
    """PIN_CPU for worker `index`: auto puts worker i on the i-th allowed CPU counted down from
    the last (where interrupts are rarer); N puts it on the i-th counted up from CPU N."""
    setting = pin_cpu.lower()
    if setting in ("off", "-1") or not hasattr(os, "sched_setaffinity"):
        return
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if setting == "auto":
            if len(cpus) < 2:
                return
            cpu = cpus[(len(cpus) - 1 - index) % len(cpus)]
        else:
            wanted = int(setting)
            if wanted not in cpus:
                raise ValueError("CPU %d is not one this process may use (%s)" % (
                    wanted, ", ".join(map(str, cpus))))
            cpu = cpus[(cpus.index(wanted) + index) % len(cpus)]
        os.sched_setaffinity(0, {cpu})
    except (OSError, ValueError) as exc:
        print("claude-code-proxy: PIN_CPU=%s not applied: %s" % (pin_cpu, exc), file=sys.stderr)


def run_workers(server: ProxyServer, count: int, reuse_port: bool, announce: Callable[[], None]) -> int:
    """WORKERS > 1: fork that many workers and watch them. SIGTERM or SIGINT is passed on to
    each as one SIGTERM (each then shuts down gracefully); a second signal kills them. A worker
    that dies on its own is replaced, unless it died within a second of starting."""
    settings = dataclasses.replace(server.settings, port=server.server_address[1])
    children: Dict[int, float] = {}
    stopping: List[int] = []

    parent = os.getpid()
    ready_read, ready_write = os.pipe()     # a byte from each worker once it listens

    def start(index: int, ready: bool = False) -> None:
        # Signals wait until the new worker has its own handlers (it must never run the
        # parent's, which would signal its siblings).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pid = os.fork()
        if pid == 0:                 # the worker
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches it via the parent
                # Until it serves it has nothing in flight: a SIGTERM then is a clean exit.
                signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
                pin_to_cpu(settings.pin_cpu, index)
                worker = attach_access_log(ProxyServer(settings, reuse_port=True)) if reuse_port else server
                if ready:
                    os.close(ready_read)
                    os.write(ready_write, b".")
                    os.close(ready_write)
                code = serve_until_signalled(worker, ("SIGTERM",), parent)
            finally:
                os._exit(code)
        children[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    def on_signal(signum: int, frame: Any) -> None:
        for pid in list(children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL if stopping else signal.SIGTERM)
        if stopping:
            os._exit(1)
        stopping.append(signum)

    for name in ("SIGTERM", "SIGINT"):
        signal.signal(getattr(signal, name), on_signal)
    for index in range(count):
        start(index, ready=True)
    os.close(ready_write)
    started = 0
    while started < count:                  # (a worker that fails at start closes its end too)
        got = os.read(ready_read, count)
        if not got:
            break
        started += len(got)
    os.close(ready_read)
    announce()
    failed = False
    index = count
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        if stopping:
            failed = failed or code != 0
        elif time.monotonic() - started < 1.0:
            log.error("worker %d exited with %d at start; not replaced", pid, code)
            failed = True
        else:
            log.warning("worker %d exited with %d; starting another", pid, code)
            start(index)
            index += 1
    server.server_close()
    return 1 if failed or not stopping else 0


def serve_until_signalled(server: ProxyServer, signals: Tuple[str, ...] = ("SIGTERM", "SIGINT"),
                          parent: int = 0) -> int:
    """Serve until SIGTERM or SIGINT (or, for a worker, until its `parent` is gone); then stop
    accepting, let requests in flight finish for up to SHUTDOWN_GRACE seconds, and return 0.
    A second signal exits at once."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    for name in signals:
        signal.signal(getattr(signal, name), on_signal)
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    # (short waits: Windows delivers Ctrl-C only between them; a worker checks on its parent)
    while not stop.wait(0.5):
        if parent and os.getppid() != parent:
            log.warning("worker %d: the proxy's main process is gone; shutting down", os.getpid())
            break
    with server.connections_lock:
        in_flight = sum(1 for handler in server.handlers if handler.busy)
    log.info("shutting down: no new connections; waiting up to %gs for %d request(s) in flight",
             server.settings.shutdown_grace, in_flight)
    server.shutdown()
    server.socket.close()
    finished = server.drain(server.settings.shutdown_grace)
    if not finished:
        log.warning("shutdown grace period over: requests still in flight were cut")
    server.server_close()
    server.close_upstreams()
    return 0


if __name__ == "__main__":
    sys.exit(main())
