"""The HTTP judge against an OpenAI-compatible server started on 127.0.0.1 by the test: normal answers,
429 with Retry-After, 5xx, a stall past the timeout, garbage bodies, unparsable verdicts, a dead endpoint,
a rejected key; retries counted, results checked, the cache makes a rerun free, concurrency is bounded.
Untrusted servers: responses past max_response_bytes (declared or streamed) fail their item without being
read to the end, and a server that echoes the API key back cannot make it appear in anything preftune
writes, prints or logs through `preftune label` and `preftune winrate`."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.config import ConfigError
from preftune.feedback.judges import JudgeError, build_judge
from preftune.feedback.judges.http_client import RetryPolicy, parse_retry_after

# the instruction is "prompt|first|second" (pairwise) or "prompt|completion" (pointwise); the prompt picks
# how the server behaves, so concurrent requests of different scenarios do not disturb each other
PAIRWISE = "{prompt}|{first}|{second}"
POINTWISE = "{prompt}|{completion}"
# generous against a loaded machine: an "ok" answer must never look like a stall
STALL_S, TIMEOUT_S = 2.5, 1.0
HUGE_BYTES = 64 << 20  # what the "huge" scenario sends if the client keeps reading


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
        self.streamed: dict[str, int] = {}  # instruction text -> bytes the server managed to send
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def total(self) -> int:
        return sum(self.attempts.values())

    def answer(self, text: str, attempt: int, authorization: str = "") -> tuple[int, dict, bytes | str | Iterator[bytes]]:
        scenario, *parts = text.split("|")
        echoes = {  # a server that quotes the Authorization header it got
            "echo401": (401, {}, json.dumps({"error": f"invalid api key {authorization}"})),
            "echo400": (400, {}, f"bad request from {authorization}"),
            "echo500": (500, {}, f"overloaded; you sent {authorization}"),
            "echogarbage": (200, {"Content-Type": "text/html"}, f"<html>{authorization}</html>"),
        }
        if scenario in echoes:
            return echoes[scenario]
        if scenario == "huge":  # a chunk quoting the key, again and again, up to HUGE_BYTES
            chunk = (authorization + " ").encode() * (65536 // (len(authorization) + 1))
            return 200, {}, (chunk for _ in range(HUGE_BYTES // len(chunk)))
        if scenario == "declared":
            return 200, {"Content-Length": str(HUGE_BYTES)}, "{}"
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
        elif scenario == "echoreply":
            reply = f"I will not judge, {authorization}"
        elif len(parts) == 2:
            reply = "A" if len(parts[0]) > len(parts[1]) else "B"
        else:
            reply = "n/a" if parts[0] == "?" else f"Score: {len(parts[0])}"
        padding = "x" * 3000 if scenario == "padded" else ""  # under the 4 KiB bound the size test sets
        return 200, {}, json.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
                                    "padding": padding})

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
                    status, headers, payload = fake.answer(text, attempt, self.headers.get("Authorization") or "")
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    if isinstance(payload, (str, bytes)):
                        data = payload.encode() if isinstance(payload, str) else payload
                        if "Content-Length" not in headers:
                            self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    else:  # no Content-Length: the body runs until the connection closes
                        self.end_headers()
                        fake.streamed[text] = self._send_until_closed(payload)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send_until_closed(self, chunks: Iterator[bytes]) -> int:
                sent = 0
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading and hung up
                    pass
                return sent

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


def test_a_key_written_into_the_judge_config_or_a_non_http_address_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_TEST_KEY", "sk-test-in-config")
    with pytest.raises(ConfigError, match="value of PREFTUNE_TEST_KEY is written in the judge's config") as info:
        make_judge(server, tmp_path, api_key_env="PREFTUNE_TEST_KEY", extra_body={"user": "sk-test-in-config"})
    assert "sk-test-in-config" not in str(info.value)
    with pytest.raises(ConfigError, match="'judge.base_url': expected an http"):
        make_judge(server, tmp_path, base_url="file:///etc/passwd")


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


def test_responses_past_the_bound_fail_their_item_unread(server, tmp_path):
    """Bound 4 KiB: a 3 KiB reply passes; a body declaring 64 MiB is refused on its header; a body streamed
    without a length is cut off after 4 KiB, so the server cannot push its 64 MiB (what it got out is what
    the sockets buffer). Neither is retried."""
    waits: list[float] = []
    judge = make_judge(server, tmp_path, waits, mode="pointwise", template=POINTWISE, max_response_bytes=4096,
                       cache_file=None)
    started = time.perf_counter()
    assert judge.score(["huge", "declared", "padded"], ["abc", "abcd", "abcde"]) == [None, None, 5.0]
    assert time.perf_counter() - started < 5.0
    summary = judge.summary()
    assert summary["too_large"] == 2 and summary["failed"] == 2 and "retries" not in summary and waits == []
    assert server.attempts["huge|abc"] == 1 and server.attempts["declared|abcd"] == 1
    time.sleep(0.2)  # the server's handler notices the hang-up
    assert server.streamed["huge|abc"] < HUGE_BYTES // 4
    judge.close()


SECRET = "sk-preftune-test-SECRET-1234"


def _secret_judge(server, tmp_path, **overrides) -> dict:
    return {"type": "http", "base_url": server.base_url, "model": "judge-1", "api_key_env": "PREFTUNE_SECRET_TEST_KEY",
            "timeout_s": TIMEOUT_S, "max_retries": 1, "backoff_s": 0.001, "max_backoff_s": 0.01,
            "max_response_bytes": 4096, "cache_file": str(tmp_path / "cache" / "replies.sqlite"), **overrides}


def _generations(path: Path, prompts: list[str], completions: list[str]) -> str:
    path.write_text("".join(json.dumps({"index": i, "prompt": p, "completions": completions}) + "\n"
                            for i, p in enumerate(prompts)))
    return str(path)


def _cli(capsys, command: str, recipe: Path, config: dict) -> tuple[int, str]:
    recipe.write_text(yaml.safe_dump(config))
    code = main([command, str(recipe)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_api_key_appears_in_nothing_written_printed_or_logged(server, tmp_path, monkeypatch, capsys, caplog):
    """A server that quotes the key in error bodies, garbage bodies, a reply and a 64 MiB stream, behind
    `preftune label` and `preftune winrate` (a run that finishes with failures counted, and one stopped by a
    401): the key reaches the server, and is found in no file under tmp_path, no output, no log record.
    Counts, label (2 completions per prompt, 1 retry): 429 succeeds on its retry; echo500, echo400,
    echogarbage, huge, declared fail: 5 x 2 = 10 failed, of which huge and declared 2 x 2 = 4 too_large;
    echoreply 2 unparsable. winrate (both orders: 2 requests per prompt): 4 too_large; only ok and 429 judged."""
    monkeypatch.setenv("PREFTUNE_SECRET_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    outputs = []
    scenarios = ["ok", "429", "echo500", "echo400", "echogarbage", "echoreply", "huge", "declared"]
    label = {"input_file": _generations(tmp_path / "gen.jsonl", scenarios, ["aa", "b"]), "progress_bar": False,
             "output_file": str(tmp_path / "labelled" / "pairs.jsonl"),
             "judge": _secret_judge(server, tmp_path, mode="pointwise", template=POINTWISE)}
    code, out = _cli(capsys, "label", tmp_path / "label.yaml", label)
    summary = json.loads((tmp_path / "labelled" / "pairs.summary.json").read_text())["judge"]
    assert code == 0 and summary["too_large"] == 4 and summary["unparsable"] == 2 and summary["failed"] == 10
    outputs.append(out)
    label["input_file"] = _generations(tmp_path / "gen401.jsonl", ["echo401"], ["aa", "b"])
    code, out = _cli(capsys, "label", tmp_path / "label.yaml", label)
    assert code == 1 and "HTTP 401" in out and "Bearer [redacted]" in out  # the echo was there, redacted
    outputs.append(out)

    winrate = {"model_file": _generations(tmp_path / "model.jsonl", scenarios, ["a longer answer"]),
               "baseline_file": _generations(tmp_path / "base.jsonl", scenarios, ["short"]), "progress_bar": False,
               "output_file": str(tmp_path / "eval" / "winrate.json"), "lengths": {"enabled": False},
               "judge": _secret_judge(server, tmp_path, template=PAIRWISE)}
    code, out = _cli(capsys, "winrate", tmp_path / "winrate.yaml", winrate)
    report = json.loads((tmp_path / "eval" / "winrate.json").read_text())
    assert code == 0 and report["judge"]["too_large"] == 4 and report["win_rate"]["prompts"] == 2
    outputs.append(out)
    winrate["model_file"] = _generations(tmp_path / "model401.jsonl", ["echo401"], ["a longer answer"])
    winrate["baseline_file"] = _generations(tmp_path / "base401.jsonl", ["echo401"], ["short"])
    code, out = _cli(capsys, "winrate", tmp_path / "winrate.yaml", winrate)
    assert code == 1 and "Bearer [redacted]" in out
    outputs.append(out)

    assert server.authorization == {f"Bearer {SECRET}"}  # every request carried it
    assert server.streamed  # the 64 MiB stream was tried
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files) and len(files) > 10
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    for text in outputs + [caplog.text] + [repr((r.msg, r.args)) for r in caplog.records]:
        assert SECRET not in text
