"""A small client for OpenAI-compatible ``/chat/completions`` endpoints that survives a flaky server.

Built on ``httpx2``, the maintained successor of ``httpx``, which huggingface_hub (so transformers) already
installs. Not the standard library's urllib: it opens a new connection (and TLS handshake) per request where
a labelling run sends thousands, and on a redirect it forwards the ``Authorization`` header to whatever host
the redirect names. Not the ``openai`` package: it retries by its own rules, which would hide the retries
counted here per cause, and it offers no cap on the size of a response. httpx2 gives pooled keep-alive
connections shared by the judge's threads, a timeout per socket operation, streamed reads (so the cap holds
while reading, not after), no redirects unless asked, and TLS verification against the system's trust store.

Retried, with exponential back-off and jitter: 408, 429 and 5xx answers (a 429's ``Retry-After`` is
honoured, up to ``max_backoff_s``), timeouts, dropped connections, and 200 answers whose body is not a chat
completion (proxies return HTML error pages with status 200). Not retried: 400-class answers about the
request itself (it would fail again: that item fails), redirects, and 401/403/404, which mean every request
will fail: those stop the job with ``JudgeError``.

What the server sends is untrusted: a body longer than ``max_response_bytes`` (declared or streamed) is cut
off and fails that item, counted as ``too_large`` and not retried (the server would send it again). TLS
verification cannot be turned off (for a private CA, point ``SSL_CERT_FILE`` at its certificate). The API
key goes only into the ``Authorization`` header, and the key's value is replaced by ``[redacted]`` in any
text from the server that preftune keeps or shows (replies, which are cached; error bodies, which are
quoted in messages): a server may echo what it was sent.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx2

from . import JudgeError

FATAL_STATUS = {401: "the API key was rejected", 403: "access is forbidden", 404: "no such endpoint or model"}
REDACTED = "[redacted]"


class RequestFailed(Exception):
    """This request got no usable reply (retries exhausted, or the server rejected the request itself)."""


class ResponseTooLarge(Exception):
    """The server declared or sent more than ``max_response_bytes``."""


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


def read_bounded(response: httpx2.Response, limit: int) -> bytes:
    """The body of a streamed response, or ``ResponseTooLarge`` as soon as it passes ``limit`` bytes."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge(f"declared {declared} bytes")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, policy: RetryPolicy,
                 count: Callable[[str], None], sleep: Callable[[float], None] = time.sleep,
                 max_response_bytes: int = 1 << 20, connections: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        # identity: a compressed body could expand far past the cap within one read
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._secret = api_key
        self.http = httpx2.Client(
            headers=headers, timeout=httpx2.Timeout(timeout_s), follow_redirects=False,
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
        )
        self.max_response_bytes = max_response_bytes
        self.policy, self.count, self.sleep = policy, count, sleep
        self.rng = random.Random()

    def redact(self, text: str) -> str:
        """``text`` without the API key's value (a server may echo the key it was sent)."""
        return text.replace(self._secret, REDACTED) if self._secret else text

    def _post(self, payload: bytes) -> tuple[int, httpx2.Headers, bytes]:
        """(status, headers, body); the headers look names up case-insensitively."""
        with self.http.stream("POST", self.url, content=payload) as response:
            return response.status_code, response.headers, read_bounded(response, self.max_response_bytes)

    def _attempt(self, payload: bytes) -> tuple[str | None, str, float | None]:
        """(reply, "", None) on success, else (None, why, Retry-After) for a retryable failure."""
        try:
            status, headers, body = self._post(payload)
        except httpx2.TimeoutException:
            return None, "timeout", None
        except (httpx2.TransportError, httpx2.DecodingError, OSError):
            return None, "connection", None
        except ResponseTooLarge as exc:
            self.count("too_large")
            raise RequestFailed(f"the response was larger than judge.max_response_bytes "
                                f"({self.max_response_bytes}): {exc}") from None
        snippet = self.redact(body[:200].decode("utf-8", "replace"))
        if status in FATAL_STATUS:
            raise JudgeError(f"{self.url} answered HTTP {status} ({FATAL_STATUS[status]}): {snippet}")
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            return None, "5xx" if status >= 500 else str(status), retry_after
        if 300 <= status < 400:
            raise RequestFailed(f"HTTP {status}: a redirect, not followed (set judge.base_url to where it points)")
        if status >= 400:
            raise RequestFailed(f"HTTP {status}: {snippet}")
        content = reply_content(body)
        return (self.redact(content), "", None) if content is not None else (None, "malformed", None)

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

    def close(self) -> None:
        self.http.close()
