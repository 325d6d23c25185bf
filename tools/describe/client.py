"""A small client for any OpenAI-compatible server (vLLM, llama.cpp, Ollama, OpenAI): chat
completions, and legacy text completions (/v1/completions) for the all-at-once simulator.

Why not the `openai` package's own retries: we need to tell "the server is gone" (abort the stage,
keep finished units) from "this answer is unusable" (record a failure for one unit), honour
Retry-After, count retries and tokens, and cache every answer on disk so a rerun costs nothing.
The API key is read from an environment variable at construction and is never part of a cache
key, a log line, an error message or any file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from tools.core.config import UserError
from tools.core.files import write_json

PLACEHOLDER_KEY = "not-needed"  # local servers ignore the key, but the openai package wants one


class ServerUnreachable(UserError):
    """The server did not answer usefully after every retry: the stage stops, finished units stay."""


class MalformedResponse(Exception):
    """HTTP 200 with a body that is not a chat completion; `raw` holds what came back."""

    def __init__(self, message: str, raw: str):
        super().__init__(message)
        self.raw = raw


class RequestFailed(MalformedResponse):
    """This one request cannot succeed (prompt over the server's context length; a 5xx on every
    attempt): the unit fails with the raw error, the stage goes on."""


_CONTEXT_LENGTH = ("context length", "context_length", "maximum context", "too long", "exceeds", "n_ctx")


class LogprobsUnsupported(Exception):
    """The server rejected a request because it asked for logprobs (or echo)."""


_OPTIONAL = ("logprobs", "top_logprobs", "echo")  # request fields a server may refuse


@dataclass
class Usage:
    """Token and call counts; `add` is thread-safe so one object can be shared by workers."""

    calls: int = 0  # requests that reached the server and got an answer
    cached: int = 0  # answers served from the disk cache
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0  # local simulator: batched forward passes (no generation)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("calls", "cached", "retries", "prompt_tokens",
                                               "completion_tokens", "forwards")}


def needs_key(base_url: str | None) -> bool:
    """OpenAI itself always needs a key; for other servers we only learn it from a 401."""
    return base_url is None or "api.openai.com" in base_url


def request_hash(body: dict[str, Any]) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


class ChatClient:
    def __init__(
        self,
        *,
        base_url: str | None,
        model: str,
        api_key_env: str,
        timeout: float,
        max_retries: int,
        backoff: float,
        concurrency: int,
        cache_dir: str | os.PathLike | None,
        max_backoff: float = 60.0,
    ):
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key and needs_key(base_url):
            raise UserError(
                f"no API key: the server {base_url or 'https://api.openai.com/v1'} needs one; set the "
                f"environment variable named by `describe.api_key_env` ({api_key_env!r})"
            )
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self._key_given = bool(key)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.usage = Usage()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._client = openai.OpenAI(
            api_key=key or PLACEHOLDER_KEY, base_url=base_url, timeout=timeout, max_retries=0
        )

    def _cache_path(self, digest: str) -> Path | None:
        return self.cache_dir / digest[:2] / f"{digest}.json" if self.cache_dir else None

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: int | None = None,
        usage: Usage | None = None,
        usable: Callable[[dict[str, Any]], bool] | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """One chat completion as the server's JSON, cached by a hash of the request body. Answers
        that `usable` rejects are returned but not cached, so `retry_failed` asks again."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        if seed is not None:
            body["seed"] = seed  # also makes sampled candidates distinct cache entries
        return self._cached("chat", body, usage, usable)

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: int | None = None,
        echo: bool = False,
        usage: Usage | None = None,
        usable: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """One legacy text completion (/v1/completions) as the server's JSON; `echo` with `logprobs`
        asks for the prompt's own tokens and their top alternatives. Cached, retried and failed like
        `chat`; LogprobsUnsupported when the server rejects echo or logprobs."""
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": temperature}
        if logprobs:
            body["logprobs"] = logprobs
        if echo:
            body["echo"] = True
        return self._cached("completions", body, usage, usable)

    def _cached(self, endpoint: str, body: dict[str, Any], usage: Usage | None,
                usable: Callable[[dict[str, Any]], bool] | None) -> dict[str, Any]:
        # chat and completion bodies differ ("messages" vs "prompt"), so the body alone is the key
        digest = request_hash(body)
        path = self._cache_path(digest)
        if path is not None and path.is_file():
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                self._count(usage, cached=1)
                return cached["response"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                pass  # a damaged cache entry is simply asked again
        response = self._request(endpoint, body, usage)
        if path is not None and (usable is None or usable(response)):
            write_json(path, {"format": "monosemantic.llm_cache/1", "request": body, "response": response})
        return response

    def _count(self, usage: Usage | None, **counts: int) -> None:
        self.usage.add(**counts)
        if usage is not None:
            usage.add(**counts)

    def _request(self, endpoint: str, body: dict[str, Any], usage: Usage | None) -> dict[str, Any]:
        where = self.base_url or "https://api.openai.com/v1"
        create = (self._client.chat.completions if endpoint == "chat" else self._client.completions
                  ).with_raw_response.create
        asks = [k for k in _OPTIONAL if k in body]
        last, last_5xx = "", False
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(usage, retries=1)
            retry_after: float | None = None
            last_5xx = False
            try:
                with self._slots:
                    raw = create(**body)
                    text = raw.http_response.text
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                hint = (f"the key in ${self.api_key_env} was rejected" if self._key_given
                        else f"set the environment variable ${self.api_key_env}")
                raise UserError(f"server {where} refused the request (HTTP {e.status_code}): {hint}") \
                    from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                said = f"{e} {_raw(e)}".lower()
                if asks and any(k in said for k in ("logprob", "echo")):
                    raise LogprobsUnsupported(_short(e)) from None
                if any(k in said for k in _CONTEXT_LENGTH):
                    self._count(usage, calls=1)
                    raise RequestFailed(f"server {where} refused the prompt as too long (HTTP 400): "
                                        f"{_short(e)}", _raw(e)) from None
                raise UserError(f"server {where} rejected the request (HTTP {e.status_code}): {_short(e)}") \
                    from None
            except openai.NotFoundError as e:
                if endpoint != "chat":  # no /v1/completions here: the caller uses chat instead
                    raise LogprobsUnsupported(f"HTTP 404 on /v1/completions: {_short(e)}") from None
                raise UserError(f"server {where} answered 404 (is `describe.model`={self.model!r} served "
                                f"there, and does base_url end in /v1?): {_short(e)}") from None
            except (openai.RateLimitError, openai.InternalServerError) as e:
                last = f"HTTP {e.status_code}: {_short(e)}"
                retry_after = _retry_after(e)
                last_5xx = e.status_code >= 500
            except openai.APIStatusError as e:
                if endpoint != "chat" and e.status_code == 405:
                    raise LogprobsUnsupported(f"HTTP 405 on /v1/completions: {_short(e)}") from None
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise UserError(f"server {where} answered HTTP {e.status_code}: {_short(e)}") from None
                last = f"HTTP {e.status_code}: {_short(e)}"
                last_5xx = e.status_code >= 500
            except openai.APITimeoutError:
                last = "request timed out"
            except openai.APIConnectionError as e:
                last = f"connection failed ({_short(e)})"
            else:
                try:
                    response = json.loads(text)
                    choice = response["choices"][0]
                    content = choice["message"]["content"] if endpoint == "chat" else choice["text"]
                    if content is not None and not isinstance(content, str):
                        raise TypeError("content is not a string")
                except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                    last = f"malformed response ({type(e).__name__})"
                    if attempt == self.max_retries:
                        self._count(usage, calls=1)
                        kind = "chat completion" if endpoint == "chat" else "text completion"
                        raise MalformedResponse(f"server {where} sent a body that is not a {kind}",
                                                text[:2000]) from None
                else:
                    used = response.get("usage") or {}
                    self._count(usage, calls=1, prompt_tokens=int(used.get("prompt_tokens") or 0),
                                completion_tokens=int(used.get("completion_tokens") or 0))
                    return response
            if attempt < self.max_retries:
                delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                time.sleep(max(delay, retry_after or 0.0))
        if last_5xx:  # the server is there and answered, but not for this request
            raise RequestFailed(f"server {where} answered {last} to this request on all "
                                f"{self.max_retries + 1} attempts", last)
        raise ServerUnreachable(f"server {where} gave no usable answer after {self.max_retries + 1} "
                                f"attempts (last: {last})")


def _raw(e: openai.APIStatusError) -> str:
    try:
        return e.response.text[:2000]
    except Exception:  # noqa: BLE001 - the raw body is best effort
        return str(e)[:2000]


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _retry_after(e: openai.APIStatusError) -> float | None:
    try:
        value = float(e.response.headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return min(value, 60.0)


def content_of(response: dict[str, Any]) -> str:
    """The text of a chat completion (or of a legacy text completion)."""
    choice = response["choices"][0]
    return (choice["message"]["content"] if "message" in choice else choice.get("text")) or ""
