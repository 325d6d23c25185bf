"""The describe stage against a real OpenAI-compatible server: `transformers serve` (the
transformers[serving] extra) serving the converted SmolLM2-135M-Instruct folder, offline, on
127.0.0.1.

What that server does (transformers 5.24): /v1/chat/completions ignores `logprobs`/`top_logprobs`
(no logprobs in the answer), /v1/completions ignores `echo`/`logprobs` (only the generated text),
and it answers 422 to fields it does not know (vLLM's `prompt_logprobs`). So the simulator probes
all at once once, falls back to line-per-token chat, and reads the written values ("text"); a
135M model often answers in prose, which must come back as counted failures carrying the raw text.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tools.core.config import compose
from tools.describe import stage
from tools.describe.synthetic import fires_on, write_features

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list[str]:
    exe = shutil.which("transformers")
    if exe:
        return [exe, "serve"]
    return [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; "
            "sys.argv[0] = 'transformers'; main()", "serve"]


@pytest.fixture(scope="module")
def served(smollm2_data_dir, tmp_path_factory):
    model = str(Path(smollm2_data_dir) / "models" / "smollm2-135m-instruct")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        cmd = [*_serve_command(), model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "float32"]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up (exit {proc.poll()}):\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_describe_against_transformers_serve(tmp_path, served):
    url, model = served
    write_features(tmp_path, "l1", [fires_on(" thou")], n_ctx=60, length=8, extra={" thou": 0.1})
    (tmp_path / "sae" / "l1").mkdir(parents=True)
    (tmp_path / "sae" / "l1" / "cfg.json").write_text("{}")
    cfg = compose([
        f"run_dir={tmp_path}", "describe=openai", "describe.site=false", f"describe.base_url={url}/v1",
        f"describe.model={model}", "describe.api_key_env=MONOSEMANTIC_NO_KEY", "describe.timeout=120",
        "describe.max_retries=1", "describe.concurrency=1", "describe.controls=false",
        "describe.explain_top=3", "describe.explain_per_bin=0", "describe.explain_random=0",
        "describe.score_top=2", "describe.score_per_bin=0", "describe.score_random=0",
        "describe.score_uniform=0", "describe.explain_max_tokens=30"])
    figures = stage.run(cfg)
    path = tmp_path / "descriptions/l1/descriptions.jsonl"
    (rec,) = [json.loads(line) for line in path.read_text().splitlines()]
    print("record:", json.dumps({k: rec.get(k) for k in ("status", "description", "simulator_mode",
                                                         "failed_contexts", "reason", "raw")}))
    assert rec["model"] == model and rec["status"] in ("ok", "failed")
    assert figures["llm_calls"] >= 2 and figures["tokens"] > 0  # the server really answered
    if rec["description"] is None:  # the explanation itself was unusable: raw text kept
        assert rec["status"] == "failed" and rec["raw"] is not None
        return
    # the server returns no logprobs and ignores echo: written values only, or failures
    assert rec["simulator_mode"] in ("text", None)
    if rec["status"] == "failed":
        assert rec["failed_contexts"] > 0 and rec["raw"], rec
        assert "simulator failed on" in rec["reason"]
    else:
        assert rec["simulator_mode"] == "text" and rec["scores"] is not None
    cached = list((tmp_path / "descriptions/l1/cache").rglob("*.json"))
    bodies = [json.loads(p.read_text())["request"] for p in cached]
    assert not any("prompt" in b for b in bodies)  # the ignored echo probe was not cached as usable
