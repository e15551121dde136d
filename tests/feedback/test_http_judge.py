"""The HTTP judge against an OpenAI-compatible server started on 127.0.0.1 by the test: normal answers,
429 with Retry-After, 5xx, a stall past the timeout, garbage bodies, unparsable verdicts, a dead endpoint,
a rejected key; retries counted, results checked, the cache makes a rerun free, concurrency is bounded."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from preftune.config import ConfigError
from preftune.feedback.judges import JudgeError, build_judge
from preftune.feedback.judges.http_client import RetryPolicy, parse_retry_after

# the instruction is "prompt|first|second" (pairwise) or "prompt|completion" (pointwise); the prompt picks
# how the server behaves, so concurrent requests of different scenarios do not disturb each other
PAIRWISE = "{prompt}|{first}|{second}"
POINTWISE = "{prompt}|{completion}"
STALL_S, TIMEOUT_S = 0.6, 0.2


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a stalled handler writes to a socket the client has closed: expected, not a failure


class FakeOpenAI:
    """Answers a pairwise instruction with the letter of the longer response and a pointwise one with the
    completion's length, after the failures its scenario calls for (per distinct instruction text)."""

    def __init__(self):
        self.attempts: Counter[str] = Counter()  # instruction text -> requests received
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.authorization: set[str | None] = set()
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def total(self) -> int:
        return sum(self.attempts.values())

    def answer(self, text: str, attempt: int) -> tuple[int, dict, bytes | str]:
        scenario, *parts = text.split("|")
        fail = {"429": 1, "500": 2, "stall": 1, "nonjson": 1, "nochoices": 1}.get(scenario, 0)
        if scenario == "down" or attempt <= fail:
            if scenario == "429":
                return 429, {"Retry-After": "0.25"}, "slow down"
            if scenario in ("500", "down"):
                return random.choice([500, 502, 503]), {}, "overloaded"
            if scenario == "stall":
                time.sleep(STALL_S)
            if scenario == "nonjson":
                return 200, {"Content-Type": "text/html"}, "<html>bad gateway</html>"
            if scenario == "nochoices":
                return 200, {}, json.dumps({"error": {"message": "try again"}})
        if scenario == "badkey":
            return 401, {}, json.dumps({"error": "invalid api key"})
        if scenario == "slow":
            time.sleep(0.05)
        if scenario == "unparsable":
            reply = "Both responses have merit."
        elif len(parts) == 2:
            reply = "A" if len(parts[0]) > len(parts[1]) else "B"
        else:
            reply = "n/a" if parts[0] == "?" else f"Score: {len(parts[0])}"
        return 200, {}, json.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["model"] == "judge-1"
                text = body["messages"][-1]["content"]
                with fake.lock:
                    fake.attempts[text] += 1
                    attempt = fake.attempts[text]
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.authorization.add(self.headers.get("Authorization"))
                try:
                    status, headers, payload = fake.answer(text, attempt)
                    data = payload.encode() if isinstance(payload, str) else payload
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def log_message(self, *args):  # keep the test output clean
                pass

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


def make_judge(server, tmp_path, waits: list | None = None, **overrides):
    config = {"type": "http", "base_url": server.base_url, "model": "judge-1", "api_key_env": None,
              "template": PAIRWISE, "timeout_s": TIMEOUT_S, "max_retries": 3, "backoff_s": 0.001,
              "max_backoff_s": 1.0, "concurrency": 4, "cache_file": str(tmp_path / "cache.sqlite"), **overrides}
    judge = build_judge(config)
    if waits is not None:  # record the back-off instead of sleeping it: the test stays fast
        judge.client.sleep = waits.append
    return judge


SCENARIOS = ["ok", "429", "500", "stall", "nonjson", "nochoices"]


def test_pairwise_judge_survives_errors_stalls_and_garbage(server, tmp_path):
    waits: list[float] = []
    judge = make_judge(server, tmp_path, waits)
    # each pair asked in both orders: 2 instructions per scenario; the longer response wins both times
    prompts = SCENARIOS + ["unparsable"]
    firsts = ["a longer answer", "short", "a longer answer", "short", "a longer answer", "short", "x"]
    seconds = ["short", "a longer answer", "short", "a longer answer", "short", "a longer answer", "y"]
    results = judge.compare(prompts, firsts, seconds)
    assert results == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, None]
    summary = judge.summary()
    # per scenario, failures before success x 2 orders
    assert summary["retries/429"] == 2 and summary["retries/5xx"] == 4 and summary["retries/timeout"] == 2
    assert summary["retries/malformed"] == 4  # nonjson + nochoices
    assert summary["retries"] == 2 + 4 + 2 + 4
    assert summary["unparsable"] == 2 and summary["no_result"] == 1 and summary["judged"] == 7
    assert summary["requests"] == 14 and "failed" not in summary
    assert server.total == 14 + summary["retries"]
    assert waits.count(0.25) == 2  # Retry-After honoured (the jittered back-off alone is ~0.001 s)
    assert all(w <= 1.0 for w in waits)
    judge.close()

    before = server.total
    rerun = make_judge(server, tmp_path)
    assert rerun.compare(prompts, firsts, seconds) == results
    assert server.total == before  # every reply, the unparsable ones too, came from the cache
    assert rerun.summary()["cache_hits"] == 14 and rerun.summary()["unparsable"] == 2
    rerun.close()


def test_a_dead_endpoint_gives_none_counted_as_failed(server, tmp_path):
    waits: list[float] = []
    judge = make_judge(server, tmp_path, waits, max_retries=2, both_orders=False)
    assert judge.compare(["down", "ok"], ["long answer", "long answer"], ["b", "b"]) == [None, 1.0]
    summary = judge.summary()
    assert summary["failed"] == 1 and summary["no_result"] == 1 and summary["retries/5xx"] == 2
    assert server.attempts["down|long answer|b"] == 3  # 1 + max_retries, then given up
    assert len(waits) == 2 and waits[1] > waits[0] / 2  # back-off grows (0.001 then 0.002, jittered by half)
    judge.close()
    rerun = make_judge(server, tmp_path, [], max_retries=0, both_orders=False)
    rerun.compare(["down"], ["long answer"], ["b"])
    assert server.attempts["down|long answer|b"] == 4  # failures are not cached: a rerun tries again
    rerun.close()


def test_pointwise_scores_and_unparsable_numbers(server, tmp_path):
    judge = make_judge(server, tmp_path, [], mode="pointwise", template=POINTWISE)
    assert judge.pointwise
    assert judge.score(["ok", "500", "ok"], ["four", "seven!!", "?"]) == [4.0, 7.0, None]
    # compare follows from the scores: len 5 > len 3
    assert judge.compare(["ok"], ["fives"], ["thr"]) == [1.0]
    summary = judge.summary()
    assert summary["unparsable"] == 1 and summary["retries/5xx"] == 2
    judge.close()


def test_bounded_concurrency_and_the_api_key_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_TEST_KEY", "sk-test-123")
    judge = make_judge(server, tmp_path, [], concurrency=2, api_key_env="PREFTUNE_TEST_KEY", cache_file=None)
    firsts = [f"answer number {i}" for i in range(8)]
    assert judge.compare(["slow"] * 8, firsts, ["b"] * 8) == [1.0] * 8
    assert 1 < server.max_in_flight <= 2
    assert server.authorization == {"Bearer sk-test-123"}
    judge.close()


def test_key_problems_stop_with_a_message(server, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFTUNE_TEST_MISSING", raising=False)
    with pytest.raises(ConfigError, match="environment variable PREFTUNE_TEST_MISSING is not set"):
        make_judge(server, tmp_path, api_key_env="PREFTUNE_TEST_MISSING")
    judge = make_judge(server, tmp_path, [])
    with pytest.raises(JudgeError, match="HTTP 401 .*rejected"):
        judge.compare(["badkey"], ["a"], ["b"])
    judge.close()


def test_back_off_is_exponential_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(max_retries=5, backoff_s=1.0, max_backoff_s=5.0)
    rng = random.Random(0)
    for attempt, step in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):  # doubled, capped at max_backoff_s
        waits = [policy.wait(attempt, None, rng) for _ in range(50)]
        assert all(step / 2 <= w <= step for w in waits) and len(set(waits)) > 1
    assert policy.wait(0, 3.0, rng) == 3.0  # Retry-After above the back-off wins
    assert policy.wait(0, 100.0, rng) == 5.0  # ... up to max_backoff_s
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
