"""A small client for OpenAI-compatible ``/chat/completions`` endpoints that survives a flaky server.

Standard library only. Retried, with exponential back-off and jitter: 408, 429 and 5xx answers (a 429's
``Retry-After`` is honoured, up to ``max_backoff_s``), timeouts, dropped connections, and 200 answers whose
body is not a chat completion (proxies return HTML error pages with status 200). Not retried: 400-class
answers about the request itself (it would fail again: that item fails) and 401/403/404, which mean every
request will fail: those stop the job with ``JudgeError``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

from . import JudgeError

FATAL_STATUS = {401: "the API key was rejected", 403: "access is forbidden", 404: "no such endpoint or model"}


class RequestFailed(Exception):
    """This request got no usable reply (retries exhausted, or the server rejected the request itself)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    backoff_s: float = 1.0  # the first wait; doubled after each failed attempt
    max_backoff_s: float = 60.0

    def wait(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        # "equal jitter": half the exponential step plus a random half, so that clients that failed together
        # do not all come back at the same instant, yet every client waits at least half the step
        step = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        jittered = step / 2 + rng.uniform(0, step / 2)
        if retry_after is not None:
            return max(jittered, min(retry_after, self.max_backoff_s))
        return jittered


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` is seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def reply_content(body: bytes) -> str | None:
    """The first choice's message text of a chat-completion body, or None when the body is not one."""
    try:
        data = json.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, policy: RetryPolicy,
                 count: Callable[[str], None], sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s, self.policy, self.count, self.sleep = timeout_s, policy, count, sleep
        self.rng = random.Random()

    def _post(self, payload: bytes) -> tuple[int, Message, bytes]:
        """(status, headers, body); the headers look names up case-insensitively."""
        request = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:  # a non-2xx answer: still an answer, with a status and a body
            with exc:
                return exc.code, exc.headers or Message(), exc.read()

    def _attempt(self, payload: bytes) -> tuple[str | None, str, float | None]:
        """(reply, "", None) on success, else (None, why, Retry-After) for a retryable failure."""
        try:
            status, headers, body = self._post(payload)
        except TimeoutError:
            return None, "timeout", None
        except urllib.error.URLError as exc:
            return None, "timeout" if isinstance(exc.reason, TimeoutError) else "connection", None
        except (ConnectionError, http.client.HTTPException, OSError):
            return None, "connection", None
        snippet = body[:200].decode("utf-8", "replace")
        if status in FATAL_STATUS:
            raise JudgeError(f"{self.url} answered HTTP {status} ({FATAL_STATUS[status]}): {snippet}")
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            return None, "5xx" if status >= 500 else str(status), retry_after
        if status >= 300:
            raise RequestFailed(f"HTTP {status}: {snippet}")
        content = reply_content(body)
        return (content, "", None) if content is not None else (None, "malformed", None)

    def complete(self, body: dict) -> str:
        """The reply text; raises ``RequestFailed`` when there is none after every retry."""
        payload = json.dumps(body).encode("utf-8")
        self.count("requests")
        for attempt in range(self.policy.max_retries + 1):
            content, why, retry_after = self._attempt(payload)
            if content is not None:
                return content
            if attempt == self.policy.max_retries:
                break
            self.count("retries")
            self.count(f"retries/{why}")
            self.sleep(self.policy.wait(attempt, retry_after, self.rng))
        raise RequestFailed(f"no usable reply after {self.policy.max_retries + 1} attempts (last: {why})")
