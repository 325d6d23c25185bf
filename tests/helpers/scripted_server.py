"""A scripted OpenAI-compatible server on 127.0.0.1 for the LLM path's tests.

stdlib http.server in a thread. Its "model" is a tiny lexical one (explains a unit by its most common
marked span, simulates by quoted tokens) so good descriptions score high; it cuts text as a Llama
tokenizer does (every digit and whitespace character a token: "10" is "1", "0"), answers
/v1/completions with echo + logprobs as vLLM does (or ignores/rejects them as `transformers serve`
does), and faults (429, 5xx, timeouts, context-length 400, garbage, 401) are scripted per request.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

SECRET = "sk-test-SECRET-4f9a1c77"
KEY_ENV = "MONOSEMANTIC_TEST_LLM_KEY"


def llama_split(text: str, digits: str = "split", merge_tab: bool = False) -> list[str]:
    """Tokens as a Llama/SmolLM2/Mistral/Qwen tokenizer cuts numbers: every digit one token (digits=
    "whole": a digit run is one token, as in cl100k), every whitespace character its own token."""
    num = r"\d" if digits == "split" else r"\d+"
    tab = r"\t[^\d\s]+|" if merge_tab else ""
    return re.findall(rf"{tab}{num}|\s|[^\d\s]+", text)


def quoted(desc: str) -> set[str]:
    return {json.loads(q).strip() for q in re.findall(r'"(?:[^"\\]|\\.)*"', desc)}


class FakeLLM:
    def __init__(self):
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.inflight = 0
        self.max_inflight = 0
        self.faults: list[str] = []  # consumed one per request ("" = none): 429, 500, timeout, ctx400, ...
        self.delay = 0.0
        self.logprobs = True  # chat: False = ignore the logprobs request; "reject" = answer 400
        self.echo = "vllm"  # /v1/completions: vllm = echo + logprobs; ignore (transformers serve); reject
        self.digits = "split"
        self.merge_tab = False  # a tokenizer that glues "\tunknown" into one token
        self.explain_text: str | None = None
        self.simulate_text: str | None = None
        self.require_key = False
        self.sleep_for_timeout = 1.0

    # -- the "model": explains by the most common marked span, fires on quoted tokens --
    def explain(self, body: dict) -> str:
        spans = re.findall(r"<<(.*?)>>", body["messages"][1]["content"])
        word = Counter(spans).most_common(1)[0][0] if spans else "?"
        return self.explain_text if self.explain_text is not None else \
            f'Explanation: the token {json.dumps(word)}.'

    def simulate(self, body: dict) -> tuple[list[str], list[str]]:
        user = body["messages"][1]["content"]
        want = quoted(re.search(r"Description of the unit: (.*)", user).group(1))
        labels = re.search(r"\(maximally active\): (.*)", user).group(1).split(", ")
        toks = [json.loads(t) for t in re.findall(r"^\d+\t(\".*\")$", user, flags=re.M)]
        return [labels[-1] if t.strip() in want else labels[0] for t in toks], labels

    def tokens(self, text: str) -> list[str]:
        return llama_split(text, self.digits, self.merge_tab)

    def chat(self, body: dict) -> dict:
        system = body["messages"][0]["content"]
        logprobs = None
        if system.startswith("You are studying"):
            text = self.explain(body)
        elif self.simulate_text is not None:
            text = self.simulate_text
        else:
            values, labels = self.simulate(body)
            text = "\n".join(f"{i}\t{v}" for i, v in enumerate(values)) + "\n"
            if body.get("logprobs") and self.logprobs is True:
                content, prev = [], ""
                for tok in self.tokens(text):
                    alts = [{"token": tok, "logprob": 0.0}]
                    if prev == "\t" and tok[0].isdigit():  # the first token of a value
                        other = labels[1] if tok == labels[0] else labels[0]
                        alts = [{"token": tok, "logprob": math.log(0.9)},
                                {"token": other, "logprob": math.log(0.1)}]
                    content.append({"token": tok, "logprob": alts[0]["logprob"], "top_logprobs": alts})
                    prev = tok
                logprobs = {"content": content}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

    def completion(self, body: dict) -> dict:
        """vLLM's legacy completion with echo + logprobs: the prompt's tokens, each with its top
        alternatives; at every `\tunknown` slot the labels, weighted by the quoted-token rule."""
        prompt = body["prompt"]
        choice = {"index": 0, "finish_reason": "length", "text": "0", "logprobs": None}
        if self.echo == "vllm" and body.get("echo") and body.get("logprobs"):
            want = quoted(re.search(r"Explanation of unit 2 behavior: (.*)", prompt).group(1))
            lo, hi = re.search(r"from (\d+) \(not active\) to (\d+) \(most active\)", prompt).groups()
            labels = [str(i) for i in range(int(lo), int(hi) + 1)]
            toks = self.tokens(prompt) + ["0"]
            offsets, at = [], 0
            for t in toks:
                offsets.append(at)
                at += len(t)
            tops: list[dict | None] = [None]
            for j in range(1, len(toks)):
                top = {toks[j]: 0.0}
                if toks[j] == "unknown" and toks[j - 1] == "\t":
                    start = prompt.rfind("\n", 0, offsets[j]) + 1
                    word = json.loads('"' + prompt[start:offsets[j] - 1] + '"')
                    v = labels[-1] if word.strip() in want else labels[0]
                    other = labels[1] if v == labels[0] else labels[-2]
                    top = {v: math.log(0.8), other: math.log(0.1), "unknown": math.log(0.1)}
                tops.append(top)
            choice.update(text=prompt + "0", logprobs={
                "tokens": toks, "token_logprobs": [None] + [max(t.values()) for t in tops[1:]],
                "top_logprobs": tops, "text_offset": offsets})
        return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def handler(fake: FakeLLM):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def send(self, status: int, payload: bytes, headers: dict | None = None):
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            chat = self.path.endswith("/chat/completions")
            with fake.lock:
                fake.bodies.append(body)
                fake.paths.append("chat" if chat else "completions")
                fake.auth.append(self.headers.get("Authorization"))
                fault = fake.faults.pop(0) if fake.faults else None
                fake.inflight += 1
                fake.max_inflight = max(fake.max_inflight, fake.inflight)
            try:
                time.sleep(fake.delay)
                if fake.require_key and self.headers.get("Authorization") != f"Bearer {SECRET}":
                    return self.send(401, b'{"error": {"message": "invalid api key"}}')
                if fault == "429":
                    return self.send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
                if fault == "500":
                    return self.send(500, b'{"error": {"message": "boom"}}')
                if fault == "ctx400":  # as vLLM words it
                    return self.send(400, b'{"error": {"message": "This model\'s maximum context length is '
                                     b'2048 tokens. However, you requested 4100 tokens."}}')
                if fault == "timeout":
                    time.sleep(fake.sleep_for_timeout)
                if fault == "garbage_body":
                    return self.send(200, b"<html>not json</html>")
                if chat and body.get("logprobs") and fake.logprobs == "reject":
                    return self.send(400, b'{"error": {"message": "logprobs is not supported"}}')
                if not chat and fake.echo == "reject":  # as transformers serve answers vLLM's fields
                    return self.send(422, b'{"detail": "Unexpected fields in the request: {\'echo\'}"}')
                self.send(200, json.dumps(fake.chat(body) if chat else fake.completion(body)).encode())
            finally:
                with fake.lock:
                    fake.inflight -= 1

    return Handler
