"""The LLM path end to end against the scripted OpenAI-compatible server of
tests/helpers/scripted_server.py (faults it scripts: 429, 5xx, timeouts, context-length 400,
garbage, 401). tests/tools/describe/test_describe_serve.py runs a real server.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers.scripted_server import KEY_ENV, SECRET, FakeLLM, handler
from tools.core.config import UserError, compose
from tools.describe import stage
from tools.describe.client import ChatClient, ServerUnreachable
from tools.describe.simulators import LLMSimulator
from tools.describe.synthetic import fires_after, fires_on, fires_randomly, write_features


@pytest.fixture
def fake(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(KEY_ENV, SECRET)
    llm = FakeLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(llm))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    llm.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield llm
    server.shutdown()
    server.server_close()


RULES = [fires_on(" thou"), fires_randomly(), fires_after(" the")]


def llm_cfg(run_dir: Path, url: str, *extra: str):
    (run_dir / "sae" / "l1").mkdir(parents=True, exist_ok=True)  # how the SAE's name is found
    (run_dir / "sae" / "l1" / "cfg.json").write_text("{}")
    return compose([
        f"run_dir={run_dir}", "describe=openai", "describe.site=false", f"describe.base_url={url}",
        "describe.model=fake-1", f"describe.api_key_env={KEY_ENV}", "describe.backoff=0.01",
        "describe.timeout=5", "describe.score_top=3", "describe.score_random=4", "describe.score_per_bin=1",
        *extra])


def records(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "descriptions/l1/descriptions.jsonl"
    return {r["index"]: r for r in map(json.loads, path.read_text().splitlines())}


def assert_secret_not_written(run_dir: Path):
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key written to {path}"


def test_llm_end_to_end_all_at_once_cache_and_key(tmp_path, fake, capsys):
    write_features(tmp_path, "l1", RULES, extra={" thou": 0.04})
    figures = stage.run(llm_cfg(tmp_path, fake.url))
    recs = records(tmp_path)
    assert [r["status"] for r in recs.values()] == ["ok"] * 3
    thou = recs[0]
    assert thou["description"] == 'the token " thou".' and thou["explainer"] == "llm"
    assert thou["simulator_mode"] == "all_at_once" and thou["model"] == "fake-1"
    sims = [b for b, p in zip(fake.bodies, fake.paths, strict=True) if p == "completions"]
    assert sims and all(b["echo"] is True and b["logprobs"] == 5 and b["max_tokens"] == 1 for b in sims)
    assert all(not b["messages"][0]["content"].startswith("You predict")
               for b, p in zip(fake.bodies, fake.paths, strict=True) if p == "chat")  # no chat simulation
    assert thou["scores"]["simulation_all"] > 0.9 and thou["scores"]["detection"] == 1.0
    # shuffled, predictions put back in place: a token-identity description keeps its score
    assert thou["controls"]["shuffled_tokens"]["simulation_all"] > 0.9
    n_requests = len(fake.bodies)
    assert figures["llm_calls"] == n_requests and figures["tokens"] == 15 * n_requests
    assert all(b.get("top_logprobs") == 5 for b in fake.bodies if "messages" in b and "logprobs" in b)
    assert all(a == f"Bearer {SECRET}" for a in fake.auth)  # the key was used ...
    summary = json.loads((tmp_path / "descriptions/l1/summary.json").read_text())
    assert summary["usage"]["prompt_tokens"] == 10 * n_requests
    assert summary["simulator_modes"] == {"all_at_once": 3}
    # one cache entry per distinct request: uniform windows are shared by every unit, so a unit's
    # random-description control can ask exactly what that other unit's own scoring asked
    cache = list((tmp_path / "descriptions/l1/cache").rglob("*.json"))
    assert len(cache) == len({json.dumps(b, sort_keys=True) for b in fake.bodies}) > 0.9 * n_requests
    # a rerun from scratch costs nothing: every answer comes from the disk cache
    figures2 = stage.run(llm_cfg(tmp_path, fake.url, "describe.overwrite=true"))
    assert len(fake.bodies) == n_requests and figures2["llm_calls"] == 0
    assert {i: r["scores"] for i, r in records(tmp_path).items()} == {i: r["scores"] for i, r in recs.items()}
    # identical requests (same description, same context) are answered once, also across units
    usage2 = json.loads((tmp_path / "descriptions/l1/summary.json").read_text())["usage"]
    assert usage2["cached"] == summary["usage"]["calls"] + summary["usage"]["cached"] and usage2["calls"] == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err  # ... and never printed or written
    assert_secret_not_written(tmp_path)


def test_retries_on_429_500_timeout_and_garbage_body(tmp_path, fake):
    write_features(tmp_path, "l1", RULES[:1], extra={" thou": 0.04})
    fake.faults = ["429", "500", "timeout", "garbage_body", "429"]
    fake.sleep_for_timeout = 1.5
    figures = stage.run(llm_cfg(tmp_path, fake.url, "describe.timeout=0.5", "describe.max_retries=5",
                                "describe.concurrency=1", "describe.controls=false"))
    rec = records(tmp_path)[0]
    assert rec["status"] == "ok" and rec["scores"]["simulation_all"] > 0.9
    assert rec["usage"]["retries"] == 5
    assert figures["llm_calls"] == len(fake.bodies) - 5


def test_malformed_answers_are_failures_with_raw_text(tmp_path, fake):
    write_features(tmp_path, "l1", RULES[:2], extra={" thou": 0.04})
    fake.simulate_text = "I think the unit likes old English."
    fake.echo = "ignore"  # the line-per-token chat path
    figures = stage.run(llm_cfg(tmp_path, fake.url, "describe.controls=false"))
    recs = records(tmp_path)
    assert {r["status"] for r in recs.values()} == {"failed"}
    assert "line 1: expected index<TAB>value" in recs[0]["reason"] and recs[0]["raw"] == fake.simulate_text
    assert recs[0]["scores"] is None and figures["failed"] == 2 and figures["simulation_all_mean"] is None
    # unusable answers are not cached: once the server behaves, retry_failed redoes just those units
    fake.simulate_text = None
    n = len(fake.bodies)
    figures = stage.run(llm_cfg(tmp_path, fake.url, "describe.controls=false", "describe.retry_failed=true"))
    assert figures["described"] == 2 and len(fake.bodies) > n
    assert records(tmp_path)[0]["scores"]["simulation_all"] > 0.9
    assert len((tmp_path / "descriptions/l1/descriptions.jsonl").read_text().splitlines()) == 2
    # an explainer answer with no sentence is a failure too, recorded before any simulation
    fake.explain_text = "Explanation:   "
    stage.run(llm_cfg(tmp_path, fake.url, "describe.overwrite=true", "describe.controls=false",
                      "describe.temperature=0.5"))
    rec = records(tmp_path)[0]
    assert rec["status"] == "failed" and "no usable sentence" in rec["reason"]
    assert rec["raw"] == "Explanation:   "


def test_garbage_body_after_all_retries_is_a_unit_failure(tmp_path, fake):
    write_features(tmp_path, "l1", RULES[:1], extra={" thou": 0.04})
    fake.faults = ["garbage_body"] * 3
    stage.run(llm_cfg(tmp_path, fake.url, "describe.max_retries=2", "describe.controls=false"))
    rec = records(tmp_path)[0]
    assert rec["status"] == "failed" and "not a chat completion" in rec["reason"]
    assert rec["raw"] == "<html>not json</html>"


def test_lexical_simulator_cannot_read_prose_counts_as_failure(tmp_path, fake):
    write_features(tmp_path, "l1", RULES[:1], extra={" thou": 0.04})
    fake.explain_text = "Explanation: archaic second-person pronouns."
    figures = stage.run(llm_cfg(tmp_path, fake.url, "describe.simulator=baseline"))
    rec = records(tmp_path)[0]
    assert rec["status"] == "failed" and "no quoted token" in rec["reason"]
    assert figures["failed"] == 1 and figures["simulation_all_mean"] is None


@pytest.mark.parametrize("mode", [False, "reject"])
def test_text_fallback_without_logprobs(tmp_path, fake, mode):
    write_features(tmp_path, "l1", RULES[:1], extra={" thou": 0.04})
    fake.logprobs = mode
    fake.echo = "ignore" if mode is False else "reject"
    stage.run(llm_cfg(tmp_path, fake.url, "describe.controls=false"))
    rec = records(tmp_path)[0]
    assert rec["status"] == "ok" and rec["simulator_mode"] == "text"
    assert fake.paths.count("completions") == 1  # all at once was tried once, then never again
    assert rec["scores"]["simulation_all"] > 0.9


def test_bounded_concurrency(tmp_path, fake):
    write_features(tmp_path, "l1", RULES + [fires_on(" king"), fires_on(" lord")], extra={" thou": 0.04})
    fake.delay = 0.05
    stage.run(llm_cfg(tmp_path, fake.url, "describe.concurrency=3", "describe.controls=false",
                      "describe.score_random=1", "describe.min_score_random=1", "describe.score_top=2",
                      "describe.score_per_bin=0"))
    assert 2 <= fake.max_inflight <= 3
    assert len(records(tmp_path)) == 5


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_keeps_done_units(tmp_path, fake):
    write_features(tmp_path, "l1", RULES, extra={" thou": 0.04})
    stage.run(llm_cfg(tmp_path, fake.url, "describe.max_units=1", "describe.controls=false"))
    done = records(tmp_path)
    dead = f"http://127.0.0.1:{_dead_port()}/v1"
    with pytest.raises(ServerUnreachable, match=r"after 2 attempts.*1 finished units are kept"):
        stage.run(llm_cfg(tmp_path, dead, "describe.max_retries=1", "describe.controls=false"))
    assert records(tmp_path) == done
    summary = json.loads((tmp_path / "descriptions/l1/summary.json").read_text())
    assert summary["complete"] is False and summary["pending"] == 2
    # the server is back: the rerun finishes only the missing units
    n = len(fake.bodies)
    stage.run(llm_cfg(tmp_path, fake.url, "describe.controls=false"))
    assert len(records(tmp_path)) == 3 and records(tmp_path)[0] == done[0] and len(fake.bodies) > n


def test_api_key_missing_or_rejected(tmp_path, fake, monkeypatch):
    write_features(tmp_path, "l1", RULES[:1], extra={" thou": 0.04})
    monkeypatch.delenv(KEY_ENV)
    # OpenAI itself always needs a key: refused before any request is made
    with pytest.raises(UserError, match=KEY_ENV):
        stage.run(llm_cfg(tmp_path, "null"))
    fake.require_key = True
    with pytest.raises(UserError, match=rf"HTTP 401.*set the environment variable \${KEY_ENV}"):
        stage.run(llm_cfg(tmp_path, fake.url))
    monkeypatch.setenv(KEY_ENV, SECRET)
    stage.run(llm_cfg(tmp_path, fake.url, "describe.controls=false"))
    assert records(tmp_path)[0]["status"] == "ok"
    assert_secret_not_written(tmp_path)


def test_cli_run_writes_no_key_anywhere(tmp_path, fake):
    """The command line adds Hydra's logs under run_dir; the key must not reach those either."""
    import os
    import subprocess
    import sys

    write_features(tmp_path, "l1", RULES[:1], extra={" thou": 0.04})
    llm_cfg(tmp_path, fake.url)  # creates the SAE folder the name is resolved from
    cmd = [sys.executable, "-m", "tools.describe", f"run_dir={tmp_path}", "describe=openai",
           f"describe.base_url={fake.url}", "describe.model=fake-1", f"describe.api_key_env={KEY_ENV}",
           "describe.site=false", "describe.controls=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "describe: 1 described" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    assert any((tmp_path / "logs").rglob("config.yaml"))
    assert_secret_not_written(tmp_path)
    assert all(a == f"Bearer {SECRET}" for a in fake.auth)


def test_llm_candidates_from_exemplar_subsets_chosen_on_validation(tmp_path, fake, monkeypatch):
    """Transluce-style selection with the LLM explainer: candidate k is sampled with seed + k from its
    own exemplar subset, the one with the better validation score is kept, and it is scored on test
    windows that no candidate was rated on."""
    write_features(tmp_path, "l1", RULES[:1], extra={" thou": 0.04})
    answers = {0: 'Explanation: the token " king".', 1: 'Explanation: the token " thou".'}
    real = fake.explain
    monkeypatch.setattr(fake, "explain", lambda body: answers.get(body.get("seed") - 1337) or real(body))
    windows: list[set] = []
    real_sim = stage.Describer.simulate

    def spy(self, description, contexts, usage):
        windows.append({tuple(c) for c in contexts})
        return real_sim(self, description, contexts, usage)

    monkeypatch.setattr(stage.Describer, "simulate", spy)
    stage.run(llm_cfg(tmp_path, fake.url, "describe.candidates=2", "describe.controls=false"))
    rec = records(tmp_path)[0]
    assert rec["description"] == 'the token " thou".'
    cands = rec["candidates"]
    assert [c["description"] for c in cands] == ['the token " king".', 'the token " thou".']
    assert cands[1]["chosen"] and cands[1]["validation"]["simulation_all"] > cands[0]["validation"][
        "simulation_all"]
    assert cands[0]["exemplars"] != cands[1]["exemplars"]
    explains = [b for b in fake.bodies
                if "messages" in b and b["messages"][0]["content"].startswith("You are")]
    assert {b.get("seed") for b in explains} == {1337, 1338}
    # the two validation simulations ran on the same windows; the test scoring on other ones
    # (the first candidate's test score is measured too, on the test windows)
    assert windows[0] == windows[1] and windows[0].isdisjoint(windows[2])
    assert rec["selection"]["first_candidate_test_simulation_all"] is not None


def test_context_length_400_and_repeated_5xx_fail_one_unit_not_the_stage(tmp_path, fake):
    write_features(tmp_path, "l1", RULES[:2], extra={" thou": 0.04})
    fake.faults = ["ctx400"]  # the first request: unit 0's explanation
    stage.run(llm_cfg(tmp_path, fake.url, "describe.controls=false", "describe.concurrency=1",
                      "describe.max_retries=2"))
    recs = records(tmp_path)
    assert recs[0]["status"] == "failed" and "too long" in recs[0]["reason"]
    assert "maximum context length" in recs[0]["raw"] and recs[1]["status"] == "ok"
    fake.faults = ["500"] * 3  # every attempt of unit 0's explanation: that unit fails, unit 1 goes on
    figures = stage.run(llm_cfg(tmp_path, fake.url, "describe.controls=false", "describe.concurrency=1",
                                "describe.max_retries=2", "describe.overwrite=true", "describe.cache=false"))
    recs = records(tmp_path)
    assert recs[0]["status"] == "failed" and "HTTP 500" in recs[0]["reason"] and "boom" in recs[0]["raw"]
    assert recs[1]["status"] == "ok" and figures["failed"] == 1


# ---------------------------------------------------------------------------------------------
# The simulator itself, against the scripted server (real ChatClient, real HTTP)

THOU = 'the token " thou".'


def simulator(fake, **kw) -> LLMSimulator:
    client = ChatClient(base_url=fake.url, model="fake-1", api_key_env=KEY_ENV, timeout=5, max_retries=2,
                        backoff=0.01, concurrency=2, cache_dir=None)
    return LLMSimulator(client, top_logprobs=5, **kw)


def test_ten_split_into_digits_is_never_read_as_p_of_one(fake):
    """Labels 0-10 on a Llama tokenizer: "10" comes back as "1", "0", so the written value is used
    (and p("1") elsewhere may be the start of "10", so no expected values at all)."""
    fake.echo = "ignore"
    sim = simulator(fake, labels=[str(i) for i in range(11)])
    out = sim(THOU, [[" thou", " art", " thou"]])
    assert out.preds == [[10.0, 0.0, 10.0]] and out.mode == "text"
    chat = fake.bodies[-1]
    assert chat["top_logprobs"] == 5 and "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10" in chat["messages"][1]["content"]


def test_default_labels_0_to_9_use_expected_values(fake):
    fake.echo = "ignore"
    out = simulator(fake)(THOU, [[" thou", " art"]])
    # "9" (p .9) / "0" (p .1) -> 8.1 of 9 -> 9.0; "0" (p .9) / "1" (p .1) -> 0.1 of 9
    assert out.mode == "logprobs" and out.preds[0] == pytest.approx([9.0, 1 / 9], abs=1e-4)


def test_mixed_when_only_some_answers_show_ten_as_one_token(fake):
    """A vocabulary with "10" as one token (cl100k-like): an answer writing it confirms p("1") is 1,
    an answer that never writes it leaves that open, so its values are taken as written."""
    fake.echo, fake.digits = "ignore", "whole"
    out = simulator(fake, labels=[str(i) for i in range(11)])(THOU, [[" thou", " art"], [" art", " is"]])
    assert out.preds[0] == pytest.approx([9.0, 0.1]) and out.preds[1] == [0.0, 0.0]
    assert out.mode == "mixed"


@pytest.mark.parametrize("text, reason", [
    ("0\t9\n2\t0\n1\t9\n", "line 2: expected index 1, got 2"),
    ("0\t9\n1\t0\n", "ends after 2 of 3 lines (missing index 2)"),
    ("0\t9\n1\t0\n2\t9\n3\t0\n", "line 4: index 3 after the last token (index 2)"),
    ("0\t9\n1\t10\n2\t9\n", "line 2: value '10' of index 1 is not a label (0..9)"),
    ("Sure! Here you go:\n0\t9\n1\t0\n2\t9", "line 1: expected index<TAB>value"),
])
def test_misaligned_answers_fail_that_context_with_reason_and_raw(fake, text, reason):
    fake.echo, fake.simulate_text = "ignore", text
    out = simulator(fake)(THOU, [[" thou", " art", " thou"]])
    assert out.preds == [None] and out.mode is None
    assert reason in out.failures[0]["reason"] and out.failures[0]["raw"] == text


def test_harmless_answer_decoration_is_accepted(fake):
    fake.echo, fake.simulate_text = "ignore", "```\n 0\t9 \n1:\t0\n\n2  9\n```\n\n"
    out = simulator(fake)(THOU, [[" thou", " art", " thou"]])
    assert out.preds == [[10.0, 0.0, 10.0]] and out.mode == "text"  # logprobs do not spell this text


def test_all_at_once_reads_the_prompt_logprobs_at_each_slot(fake):
    sim = simulator(fake)
    out = sim(THOU, [[" thou", " art", "\t", " thou"], [" a"]])
    # at a slot: the rule's label p .8, a neighbour .1, "unknown" .1 (not a label: renormalised away)
    hi, lo = (9 * 0.8 + 8 * 0.1) / 0.9 * 10 / 9, (1 * 0.1) / 0.9 * 10 / 9
    assert out.mode == "all_at_once" and out.failures == []
    assert out.preds[0] == pytest.approx([hi, lo, lo, hi], abs=1e-4)
    assert out.preds[1] == pytest.approx([lo], abs=1e-4)
    assert fake.paths == ["completions", "completions"]
    body = fake.bodies[0]
    assert body["echo"] is True and body["logprobs"] == 5 and body["max_tokens"] == 1
    assert body["prompt"].endswith(' thou\tunknown\n art\tunknown\n\\t\tunknown\n thou\tunknown\n')
    # described as the local all-at-once simulator describes it: one prompt text for both
    assert "Explanation of unit 2 behavior: the token \" thou\"." in body["prompt"]


@pytest.mark.parametrize("echo", ["ignore", "reject"])
def test_server_without_prompt_logprobs_is_probed_once_then_chat(fake, echo):
    fake.echo = echo
    sim = simulator(fake)
    first = sim(THOU, [[" thou", " art"], [" art"]])
    second = sim(THOU, [[" is"]])
    assert first.mode == second.mode == "logprobs"
    assert fake.paths == ["completions", "chat", "chat", "chat"]


def test_prompt_logprobs_false_never_asks_for_completions(fake):
    out = simulator(fake, prompt_logprobs=False)(THOU, [[" thou"]])
    assert out.mode == "logprobs" and fake.paths == ["chat"]


def test_placeholder_glued_to_the_tab_is_a_named_failure(fake):
    fake.merge_tab = True
    out = simulator(fake)(THOU, [[" thou", " art"]])
    assert out.preds == [None]
    assert "slot 0: no prompt token starts at its placeholder" in out.failures[0]["reason"]
    assert "\\tunknown" in out.failures[0]["reason"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_context_length_and_repeated_5xx_fail_one_context_on_both_endpoints(fake, endpoint):
    if endpoint == "chat":
        fake.echo = "ignore"
        fake.faults = ["", "ctx400"]  # the probe is ignored; the first chat simulation is too long
    else:
        fake.faults = ["ctx400"]
    sim = simulator(fake)
    out = sim(THOU, [[" thou"], [" art"]])
    assert out.preds[0] is None and out.preds[1] is not None
    assert "too long" in out.failures[0]["reason"] and "maximum context length" in out.failures[0]["raw"]
    fake.faults = ["500"] * 3  # every attempt (max_retries=2) of the next request
    out = sim(THOU, [[" thou"], [" art"]])
    assert out.preds[0] is None and out.preds[1] is not None
    assert "HTTP 500" in out.failures[0]["reason"] and "boom" in out.failures[0]["raw"]
    assert fake.paths[-1] == endpoint
