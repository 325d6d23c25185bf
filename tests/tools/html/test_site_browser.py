"""The feature site in a real browser (Debian chromium via playwright), opened from file://.

Checks: no console or page errors, no request leaves file:, sorting / filtering / search change the
rows, arrow keys navigate, keyboard-only token inspection, planted hostile corpus text shows as
text and runs nothing, a multi-byte character split over tokens renders whole. Screenshots of each
page go to the test's tmp dir.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers.browser import Watch
from tools.html.site import embed_json, render_site

HOSTILE_DESC = '<img src=x onerror="window.__pwned=9"> fires on </script> & "quotes" \u202eevil'
SHOWN_DESC = HOSTILE_DESC.replace("\u202e", "<U+202E>")  # the bidi override is shown, not obeyed
HOSTILE_LLM = '<script>alert(1)</script><img src=x onerror="window.__pwned=7"> the " king"'


def _summary(name: str, tag: str | None, explainer: str, model: str, mean: float) -> dict:
    s = {"mean": mean, "median": mean, "n": 2, "ci95": [mean - 0.1, mean + 0.1]}
    return {"name": name, "tag": tag, "explainer": explainer, "simulator": explainer, "model": model,
            "units": 2, "described": 2, "failed": 0, "skipped": 0, "complete": True,
            "simulator_modes": {"all_at_once" if explainer == "llm" else "lexical": 2},
            "scores": {"simulation_all": s, "detection_auc": s},
            "controls": {"random_description": {"simulation_all": {**s, "mean": 0.01}},
                         "shuffled_tokens": {"simulation_all": {**s, "mean": 0.02}}}}


def _more_runs(run_dir: Path) -> None:
    """Beside the baseline: an LLM-tagged run (one description hostile), a negative-side run, and a
    run of another unit set whose name starts like this one's."""
    def write(folder: str, summary: dict, recs: list[dict]) -> None:
        d = run_dir / "descriptions" / folder
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
        (d / "descriptions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")

    ctrl = {"random_description": {"simulation_all": 0.05, "simulation_top": 0.04, "detection_auc": 0.51,
                                   "from": 7},
            "shuffled_tokens": {"simulation_all": 0.33, "simulation_top": 0.3, "detection_auc": 0.6}}
    llm = [{"index": i, "status": "ok", "description": HOSTILE_LLM if i == 3 else "llm says thou",
            "explainer": "llm", "simulator": "llm", "simulator_mode": "all_at_once", "model": "tiny-llm",
            "polarity": "pos",
            "scores": {"simulation_all": 0.42, "simulation_top": 0.61, "detection_auc": 0.77},
            "controls": ctrl} for i in (3, 5)]
    llm.append({"index": 4, "status": "failed", "description": None, "explainer": "llm", "model": "tiny-llm",
                "polarity": "pos", "reason": "no parsable <b>answer</b>", "scores": None, "controls": None})
    write("tiny_sae-llm", _summary("tiny_sae", "llm", "llm", "tiny-llm", 0.4), llm)
    write("tiny_sae-neg", _summary("tiny_sae", None, "baseline", "baseline", 0.2),
          [{"index": 3, "status": "ok", "description": "below zero on commas", "explainer": "baseline",
            "simulator": "baseline", "simulator_mode": "lexical", "polarity": "neg",
            "scores": {"simulation_all": 0.21}}])
    write("tiny_sae-L10", _summary("tiny_sae-L10", None, "baseline", "baseline", 0.9),
          [{"index": 3, "status": "ok", "description": "ANOTHER UNIT SET", "polarity": "pos"}])


def test_embed_json_escapes_markup():
    s = embed_json({"a": "</script><!-- & \u2028"})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"a": "</script><!-- & \u2028"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tests.helpers.features import make_run, overrides
    from tools import top_activations as ta
    from tools.core.config import compose

    root = tmp_path_factory.mktemp("site")
    run_dir, data_dir = make_run(root)
    ta.run(compose(overrides(run_dir, data_dir)))
    # descriptions as the describe stage writes them (one hostile), then the re-render it does
    desc_dir = run_dir / "descriptions" / "tiny_sae"
    desc_dir.mkdir(parents=True)
    lines = [{"index": i, "status": "ok", "description": f"token pattern {i}", "explainer": "baseline",
              "scores": {"simulation_all": round(0.9 - i / 100, 3), "detection": 0.5}} for i in range(10)]
    lines[3]["description"] = HOSTILE_DESC
    lines.append({"index": 12, "status": "failed", "description": None, "reason": "bad json", "scores": {}})
    (desc_dir / "descriptions.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"index": 13, "trunc', encoding="utf-8")
    _more_runs(run_dir)
    index = render_site(run_dir, "tiny_sae")
    feats = run_dir / "features" / "tiny_sae" / "features.jsonl"
    recs = [json.loads(x) for x in feats.open(encoding="utf-8")]
    return index, recs






def _rows(page) -> list[str]:
    return page.eval_on_selector_all("#rows tr td:first-child", "els => els.map(e => e.textContent)")


def test_index_sort_filter_search(site, browser, tmp_path):
    index, recs = site
    w = Watch(browser)
    page = w.page
    page.goto(index.as_uri())
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    assert _rows(page)[:3] == ["0", "1", "2"] and len(_rows(page)) == 64
    assert "64 features (62 alive, 2 dead)" in page.text_content("#summary")
    assert page.locator("svg.hist rect").count() > 0  # the density histogram
    assert "explained_variance" in page.text_content("#metrics")
    # sort by density: descending first, then ascending on a second click
    by_density = sorted(recs, key=lambda r: (-r["density"], r["index"]))
    page.click("th button[data-sort='density']")
    assert _rows(page)[0] == str(by_density[0]["index"])
    page.click("th button[data-sort='density']")
    assert _rows(page)[0] in {"62", "63"}  # the dead ones
    # sort by score: described units first, best first
    page.click("th button[data-sort='score']")
    assert _rows(page)[:2] == ["0", "1"]
    # class filter and density range
    page.select_option("#klass", "dead")
    assert sorted(_rows(page)) == ["62", "63"]
    page.select_option("#klass", "all")
    page.fill("#dmin", "0")  # log10 density >= 0: nothing
    assert _rows(page) == [] and "no unit matches" in page.text_content("#status")
    page.fill("#dmin", "")
    # search over descriptions and top tokens
    page.fill("#search", "token pattern 7")
    assert _rows(page) == ["7"]
    page.fill("#search", "onerror")  # the hostile description is searchable text
    assert _rows(page) == ["3"]
    cell = page.text_content("#rows tr td.descr")
    assert cell == SHOWN_DESC + "+llm"  # the primary description, and a mark for the LLM run
    assert page.locator("img").count() == 0
    page.fill("#search", "")
    page.select_option("#pagesize", "50")
    assert len(_rows(page)) == 50
    page.click("#nextpage")
    assert len(_rows(page)) == 14
    page.screenshot(path=str(tmp_path / "index_page2.png"))
    w.clean()


def _hostile_unit(recs) -> int:
    for r in recs:
        if any("</script>" in "".join(e["strs"]) for e in r["top"]) and r["index"] + 1 < 62:
            return r["index"]
    raise AssertionError("no feature shows the planted context among its top examples")


def test_feature_page_hostile_text_is_inert(site, browser, tmp_path):
    index, recs = site
    u = _hostile_unit(recs)
    w = Watch(browser)
    page = w.page
    page.goto((index.parent / "feature" / f"{u}.html").as_uri())
    page.screenshot(path=str(tmp_path / f"feature_{u}.png"), full_page=True)
    body = page.text_content("#top")
    assert '</script><script>window.__pwned=1</script>' in body
    assert '<img src=x onerror="window.__pwned=2">' in body
    assert '"><svg onload="window.__pwned=3">' in body
    assert "<U+200B>" in body and "<U+202E>" in body  # zero-width and RTL override made visible
    assert "x" * 100 in body  # the very long line is there
    assert "↵→tab" in body  # newline and tab visible
    assert page.locator("img").count() == 0 and page.locator("#top svg").count() == 0
    assert page.locator("script").count() == 2  # the JSON data and site.js, nothing injected
    # the split multi-byte characters render whole, each on the token completing it
    toks = page.eval_on_selector_all("#top .ex:first-child .tok", "els => els.map(e => e.textContent)")
    assert {"日", "本", "語", "🎉"} <= set(toks)
    assert "日本語" in body and "�" not in "".join(toks[toks.index("日") - 1: toks.index("🎉") + 1])
    # special token marked
    assert page.locator("#top .tok.special").first.text_content() == "<|endoftext|>"
    size = (index.parent / "feature" / f"{u}.html").stat().st_size
    assert size < 200_000, size
    w.clean()


def test_feature_page_keyboard_and_description(site, browser, tmp_path):
    index, recs = site
    w = Watch(browser)
    page = w.page
    page.goto((index.parent / "feature" / "3.html").as_uri())
    page.screenshot(path=str(tmp_path / "feature_3.png"))
    assert page.text_content("#desc .description") == SHOWN_DESC
    assert "0.87" in page.text_content("#desc .scores")
    assert page.locator("img").count() == 0
    assert page.locator("svg.hist rect").count() == len(recs[3]["hist"]["counts"])
    assert page.locator("#logits-pos tr").count() == 10
    n_quant = sum(len(q["examples"]) for q in recs[3]["quantiles"])
    assert page.locator("#quantiles .ex").count() == n_quant
    assert page.locator("#top .ex").count() == len(recs[3]["top"])
    # keyboard only: Tab reaches an example; arrows then move between its tokens
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('ex')"):
            break
    else:
        raise AssertionError("Tab never reached an example")
    first = page.text_content("#detail")
    assert re.search(r"id \d+ · bytes [0-9a-f ]+|special · activation", first), first
    page.keyboard.press("ArrowRight")
    second = page.text_content("#detail")
    assert second != first and "activation" in second
    assert page.url.endswith("/3.html")  # arrows inside an example do not leave the page
    page.keyboard.press("Escape")
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(r"/4\.html$"))
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(r"/3\.html$"))
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(r"/2\.html$"))
    w.clean()
    # the failed description shows its status, a dead unit says it never fired
    page.goto((index.parent / "feature" / "12.html").as_uri())
    assert "failed" in page.text_content("#desc")
    page.goto((index.parent / "feature" / "63.html").as_uri())
    page.screenshot(path=str(tmp_path / "feature_dead.png"))
    assert "never fired" in page.text_content("#top")
    assert page.get_attribute("#next", "aria-disabled") == "true"
    page.keyboard.press("ArrowRight")  # nothing after the last unit
    assert page.url.endswith("/63.html")
    w.clean()


def test_every_description_run_with_its_explainer_and_scores(site, browser, tmp_path):
    """Unit 3 has a baseline, a negative-side and an LLM description (hostile); the index lists the runs."""
    index, _ = site
    w = Watch(browser)
    page = w.page
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto((index.parent / "feature" / "3.html").as_uri())
    page.screenshot(path=str(tmp_path / "feature_3_runs.png"), full_page=True)
    cards = page.locator("#desc .dcard")
    assert cards.count() == 3
    heads = [cards.nth(i).locator(".dhead").text_content() for i in range(3)]
    assert heads[0].startswith("positive side") and "tiny_sae" in heads[0]
    assert "explainer baseline" in heads[0]
    assert heads[1].startswith("negative side") and "tiny_sae-neg" in heads[1]
    assert "tiny_sae-llm" in heads[2] and "explainer llm (tiny-llm)" in heads[2] and "all_at_once" in heads[2]
    llm = cards.nth(2)
    assert llm.locator(".description").text_content() == HOSTILE_LLM  # shown as text
    rows = llm.locator("table.scores tr").all_text_contents()
    assert any("this description" in r and "0.42" in r and "0.61" in r and "0.77" in r for r in rows), rows
    assert any("random description (unit 7's)" in r and "0.05" in r for r in rows), rows
    assert any("shuffled tokens" in r and "0.33" in r for r in rows), rows
    assert "below zero on commas" in cards.nth(1).text_content()
    assert "ANOTHER UNIT SET" not in page.content()  # tiny_sae-L10 belongs to another unit set
    assert page.locator("img").count() == 0 and page.locator("script").count() == 2 and not dialogs
    w.clean()
    page.goto((index.parent / "feature" / "4.html").as_uri())  # the LLM failed there: its reason shows
    assert "(failed: no parsable <b>answer</b>)" in page.text_content("#desc")
    page.goto(index.as_uri())
    runs = page.locator("#runs tbody tr").all_text_contents()
    assert len(runs) == 3 and runs[0].startswith("tiny_sae") and "tiny_sae-neg" in runs[1], runs
    assert "llm (tiny-llm)" in runs[2] and "0.4 [0.3, 0.5]" in runs[2] and "0.01" in runs[2], runs
    page.select_option("#klass", "several")
    assert _rows(page) == ["3", "5"]  # only the units the LLM run described
    assert page.locator("img").count() == 0 and not dialogs
    w.clean()


def test_index_with_16k_features_stays_responsive(browser, tmp_path):
    """16,384 units: the index embeds them all but draws one page of rows at a time."""
    import time

    from tools.core.files import write_json

    n = 16384
    feat_dir = tmp_path / "run" / "features" / "big"
    feat_dir.mkdir(parents=True)
    with open(feat_dir / "features.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            d = 0.0 if i % 7 == 0 else 10 ** (-1 - (i % 50) / 10)
            rec = {"index": i, "density": d, "max_act": (i % 97) / 10, "mean_act": 0.1,
                   "hist": {"edges": [], "counts": []},
                   "logits": {"pos": [{"id": 262, "str": " the", "value": 0.5}], "neg": []},
                   "top": [], "quantiles": [], "random": []}
            fh.write(json.dumps(rec) + "\n")
    write_json(feat_dir / "meta.json", {"format": "monosemantic.features/1", "unit": "sae", "name": "big",
                                        "n_units": n, "tokens_scanned": 1000, "alive": n - n // 7 - 1,
                                        "dead": n // 7 + 1, "config": {"pages": [0]},
                                        "density_log10_histogram": {"edges": [-3, -2, -1], "counts": [5, 9]}})
    index = render_site(tmp_path / "run", "big")
    assert index.stat().st_size < 4_000_000
    w = Watch(browser)
    page = w.page
    t0 = time.perf_counter()
    page.goto(index.as_uri())
    assert len(_rows(page)) == 100
    page.click("th button[data-sort='max_act']")
    assert _rows(page)[0] == "96"  # the largest max act (9.6) with the lowest index
    page.select_option("#klass", "dead")
    assert "of 2341 matching" in page.text_content("#status")
    assert time.perf_counter() - t0 < 10
    page.screenshot(path=str(tmp_path / "index_16k.png"))
    w.clean()
