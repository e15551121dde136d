"""An OpenAI-compatible chat-completions endpoint as a judge (the GPT-4-style judge of the DPO papers).

``mode: pairwise`` asks which of two responses is better and reads "A" or "B"; with ``both_orders`` (the
default) every pair is asked twice with the responses swapped, and the two verdicts are averaged, so a
judge that always answers "A" scores 0.5 instead of favouring whichever completion came first.
``mode: pointwise`` asks for a number per completion (``compare`` then follows from the scores).

The API key is read from the environment variable named by ``api_key_env``, never from the config file,
and its value appears in nothing preftune writes or logs (``http_client`` redacts it from what the server
sends back). Requests run on ``concurrency`` threads, each with ``timeout_s`` per socket operation, retried as
``http_client`` describes; a response is read up to ``max_response_bytes``; replies are cached on disk
(``cache_file``). Replies that cannot be parsed and requests that fail after every retry return None and are
counted in ``summary()``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from ...config import ConfigError
from . import JudgeError, PointwiseJudge, Prompt, check_lengths, render_prompt
from .cache import ReplyCache, cache_key
from .http_client import ChatClient, RequestFailed, RetryPolicy
from .templates import PAIRWISE_TEMPLATE, POINTWISE_TEMPLATE, check_template, parse_score, parse_verdict

log = logging.getLogger("preftune")
MAX_WARNINGS = 5  # per kind of problem; the rest are only counted


@dataclass
class HttpJudgeConfig:
    base_url: str = "https://api.openai.com/v1"  # the part before /chat/completions
    model: str = ""
    api_key_env: str | None = "OPENAI_API_KEY"  # null: send no key (a local server)
    api_key: str | None = None  # refused: keys do not belong in config files (they end up in run folders)
    mode: Literal["pairwise", "pointwise"] = "pairwise"
    template: str | None = None  # null: the default of the mode (feedback/judges/templates.py)
    system: str | None = None  # an optional system message
    both_orders: bool = True  # pairwise: ask A/B and B/A, average the verdicts
    temperature: float = 0.0
    max_tokens: int = 16
    extra_body: dict[str, Any] = field(default_factory=dict)  # more request fields, e.g. {seed: 0}
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    concurrency: int = 8
    max_response_bytes: int = 1 << 20  # a longer response fails its item (a reply is a few hundred bytes)
    cache_file: str | None = "~/.cache/preftune/judge_replies.sqlite"  # null: no cache


def _check(config: HttpJudgeConfig) -> None:
    if config.api_key is not None:
        raise ConfigError("config key 'judge.api_key': do not put API keys in config files; export the key in an "
                          "environment variable and name it in judge.api_key_env")
    if not config.model:
        raise ConfigError("config key 'judge.model': the model name to send to the endpoint is not set")
    if urlsplit(config.base_url).scheme not in ("http", "https"):
        raise ConfigError(f"config key 'judge.base_url': expected an http(s):// address, got {config.base_url!r}")
    for key in ("timeout_s", "max_tokens", "concurrency", "backoff_s", "max_backoff_s", "max_response_bytes"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"config key 'judge.{key}': must be > 0, got {getattr(config, key)}")
    if config.max_retries < 0:
        raise ConfigError(f"config key 'judge.max_retries': must be >= 0, got {config.max_retries}")
    if config.template is not None:
        check_template(config.template, config.mode, "judge.template")


def _api_key(config: HttpJudgeConfig) -> str | None:
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ConfigError(
            f"config key 'judge.api_key_env': the environment variable {config.api_key_env} is not set; export "
            "the key there (or set judge.api_key_env: null for a server without authentication)"
        )
    if key in json.dumps(dataclasses.asdict(config)):  # the config is saved with runs and reports
        raise ConfigError(f"config key 'judge': the value of {config.api_key_env} is written in the judge's "
                          "config; keys do not belong in config files")
    url = urlsplit(config.base_url)
    if url.scheme == "http" and url.hostname not in ("localhost", "127.0.0.1", "::1"):
        log.warning("judge.base_url %s is plain http: the API key crosses the network unencrypted", config.base_url)
    return key


class HttpJudge(PointwiseJudge):
    Config = HttpJudgeConfig

    def __init__(self, config: HttpJudgeConfig, sleep: Callable[[float], None] | None = None):
        super().__init__()
        _check(config)
        self.config = config
        self.pointwise = config.mode == "pointwise"
        self.template = config.template or (POINTWISE_TEMPLATE if self.pointwise else PAIRWISE_TEMPLATE)
        policy = RetryPolicy(config.max_retries, config.backoff_s, config.max_backoff_s)
        extra = {"sleep": sleep} if sleep else {}
        self.client = ChatClient(config.base_url, _api_key(config), config.timeout_s, policy, self.count, **extra,
                                 max_response_bytes=config.max_response_bytes, connections=config.concurrency)
        self.cache = ReplyCache(config.cache_file) if config.cache_file else None
        self._warned: dict[str, int] = {}

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        self._warned[kind] = self._warned.get(kind, 0) + 1
        if self._warned[kind] <= MAX_WARNINGS:
            log.warning(message + ("" if self._warned[kind] < MAX_WARNINGS else " (further ones only counted)"), *args)

    def _body(self, text: str) -> dict:
        messages = ([{"role": "system", "content": self.config.system}] if self.config.system else [])
        messages.append({"role": "user", "content": text})
        c = self.config
        return {**c.extra_body, "model": c.model, "messages": messages, "temperature": c.temperature,
                "max_tokens": c.max_tokens}

    def ask(self, text: str) -> str | None:
        """The reply to one instruction: from the cache, else from the endpoint (then cached); None if the
        request failed after every retry."""
        body = self._body(text)
        key = cache_key(self.config.base_url.rstrip("/"), body)
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            self.count("cache_hits")
            return cached
        try:
            reply = self.client.complete(body)
        except RequestFailed as exc:
            self.count("failed", example=str(exc))
            self._warn("failed", "judge request failed: %s", exc)
            return None
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply

    def _ask_all(self, texts: list[str]) -> list[str | None]:
        if len(texts) <= 1 or self.config.concurrency == 1:
            return [self.ask(t) for t in texts]
        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(texts))) as pool:
            return list(pool.map(self.ask, texts))  # map keeps the order; a JudgeError propagates

    def _parsed(self, replies: list[str | None], parse: Callable[[str], Any]) -> list[Any]:
        values = []
        for reply in replies:
            value = None if reply is None else parse(reply)
            if reply is not None and value is None:
                self.count("unparsable", example=reply)
                self._warn("unparsable", "unparsable judge reply: %r", reply[:200])
            values.append(value)
        return values

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float | None]:
        if not self.pointwise:
            raise JudgeError("a pairwise HTTP judge (judge.mode: pairwise) gives no scores; set judge.mode: pointwise")
        check_lengths(prompts, completions)
        texts = [self.template.format(prompt=render_prompt(p), completion=c) for p, c in zip(prompts, completions, strict=True)]
        return self.tally(self._parsed(self._ask_all(texts), parse_score))

    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float | None]:
        if self.pointwise:
            return super().compare(prompts, firsts, seconds)
        check_lengths(prompts, firsts, seconds)
        n = len(firsts)
        texts = [self.template.format(prompt=render_prompt(p), first=a, second=b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
        if self.config.both_orders:
            texts += [self.template.format(prompt=render_prompt(p), first=b, second=a) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
        verdicts = self._parsed(self._ask_all(texts), parse_verdict)
        results: list[float | None] = []
        for i in range(n):
            # P(first better): its votes are "A" in the given order and "B" in the swapped one
            answers = [verdicts[i], verdicts[n + i]] if self.config.both_orders else [verdicts[i]]
            if None in answers:
                results.append(None)
                continue
            wins = [answers[0] == "A", *(a == "B" for a in answers[1:])]
            results.append(sum(wins) / len(wins))
        return self.tally(results)

    def close(self) -> None:
        self.client.close()
        if self.cache is not None:
            self.cache.close()
