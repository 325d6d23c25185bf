"""Debian chromium driven by playwright: a module-scoped browser and a page that records every error."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


class Watch:
    """A page with every console message, page error and request recorded."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.console: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def clean(self) -> None:
        assert not self.errors, self.errors
        assert not [c for c in self.console if c.startswith(("error", "warning"))], self.console
        assert all(u.startswith("file:") for u in self.requests), self.requests
        assert self.page.evaluate("typeof window.__pwned") == "undefined"
