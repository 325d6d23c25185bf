"""Which description folders the site reads for a unit set, incremental re-renders, and the describe
stage re-rendering the site after tagged runs too."""

from __future__ import annotations

import json
from pathlib import Path

from tools.html.descriptions import find_runs
from tools.html.site import render_site


def write_run(run_dir: Path, folder: str, summary: dict | None, recs: list[dict]) -> None:
    d = run_dir / "descriptions" / folder
    d.mkdir(parents=True)
    (d / "descriptions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def rec(i: int, text: str, polarity: str = "pos", **kw) -> dict:
    return {"index": i, "status": "ok", "description": text, "explainer": "baseline", "simulator": "baseline",
            "polarity": polarity, "scores": {"simulation_all": 0.5}, **kw}


def unit_sets(run_dir: Path) -> None:
    """`neurons` (base, neg, llm) beside `neurons-L10` (base, neg, llm) and two strays."""
    for name in ("neurons", "neurons-L10"):
        write_run(run_dir, name, {"name": name, "tag": None}, [rec(0, f"{name} pos")])
        write_run(run_dir, f"{name}-neg", {"name": name, "tag": None}, [rec(0, f"{name} neg", "neg")])
        write_run(run_dir, f"{name}-llm", {"name": name, "tag": "llm", "explainer": "llm", "model": "m"},
                  [rec(0, f"{name} llm", explainer="llm", model="m")])
    write_run(run_dir, "neurons-copy", {"name": "neurons", "tag": "other"}, [rec(0, "stray")])  # renamed
    write_run(run_dir, "neurons-x", None, [rec(0, "no summary, tagged")])


def test_runs_are_matched_by_their_summary_not_by_prefix(tmp_path):
    unit_sets(tmp_path)
    runs = find_runs(tmp_path, "neurons")
    assert [(r.folder, r.polarity, r.tag) for r in runs] == [
        ("neurons", "pos", None), ("neurons-neg", "neg", None), ("neurons-llm", "pos", "llm")]
    assert [r.records[0]["description"] for r in runs] == ["neurons pos", "neurons neg", "neurons llm"]
    other = find_runs(tmp_path, "neurons-L10")
    assert [r.folder for r in other] == ["neurons-L10", "neurons-L10-neg", "neurons-L10-llm"]
    # a run still in progress (no summary yet): only the untagged folders, a -neg one by its records
    for f in ("neurons", "neurons-neg", "neurons-L10"):
        (tmp_path / "descriptions" / f / "summary.json").unlink()
    assert [r.folder for r in find_runs(tmp_path, "neurons")] == ["neurons", "neurons-neg", "neurons-llm"]
    (tmp_path / "descriptions" / "neurons-neg" / "descriptions.jsonl").write_text(json.dumps(rec(0, "p")))
    assert [r.folder for r in find_runs(tmp_path, "neurons")] == ["neurons", "neurons-llm"]


def _features(run_dir: Path, name: str, n: int = 3) -> None:
    d = run_dir / "features" / name
    d.mkdir(parents=True)
    with open(d / "features.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"index": i, "density": 0.1, "max_act": 1.0, "mean_act": 0.5,
                                 "hist": {"edges": [0, 1], "counts": [3]}, "logits": {"pos": [], "neg": []},
                                 "top": [], "quantiles": [], "random": []}) + "\n")
    (d / "meta.json").write_text(json.dumps({"unit": "neuron", "name": name, "n_units": n, "layer": 0,
                                             "alive": n, "dead": 0}), encoding="utf-8")


def _data(page: Path) -> dict:
    return json.loads(page.read_text(encoding="utf-8").split('id="data">')[1].split("</script>")[0])


def test_site_shows_its_own_runs_and_rebuilds_only_changed_pages(tmp_path):
    unit_sets(tmp_path)
    _features(tmp_path, "neurons")
    index = render_site(tmp_path, "neurons")
    page = _data(index.parent / "feature" / "0.html")
    assert [d["description"] for d in page["descs"]] == ["neurons pos", "neurons neg", "neurons llm"]
    assert page["descs"][2]["explainer"] == "llm (m)" and page["descs"][1]["side"] == "neg"
    text = "".join(p.read_text(encoding="utf-8") for p in index.parent.rglob("*.html"))
    assert "L10" not in text and "stray" not in text
    data = _data(index)
    assert [r["run"] for r in data["runs"]] == ["neurons", "neurons-neg", "neurons-llm"]
    runs = data["columns"].index("other_runs")
    assert data["rows"][0][runs] == ["llm"] and data["rows"][1][runs] == []
    state = json.loads((index.parent / "render.json").read_text())
    assert state["built"] == 3
    before = (index.parent / "feature" / "1.html").stat().st_ino
    assert render_site(tmp_path, "neurons") == index  # nothing changed: nothing done
    assert json.loads((index.parent / "render.json").read_text()) == state
    llm = tmp_path / "descriptions" / "neurons-llm" / "descriptions.jsonl"
    llm.write_text(llm.read_text() + json.dumps(rec(2, "new llm", explainer="llm")) + "\n")
    render_site(tmp_path, "neurons")
    assert json.loads((index.parent / "render.json").read_text())["built"] == 1  # only unit 2's page
    assert (index.parent / "feature" / "1.html").stat().st_ino == before  # linked, not rewritten
    assert "new llm" in (index.parent / "feature" / "2.html").read_text()
    assert not list((tmp_path / "features" / "neurons").glob(".site.*-*"))  # no temp folders left


def test_tagged_runs_rerender_the_site(tmp_path, monkeypatch):
    import tools.html.site as site
    from tests.helpers.describe import cfg_for, make_run
    from tools.describe import stage

    run_dir = make_run(tmp_path)
    seen = []
    monkeypatch.setattr(site, "render_site", lambda r, name: seen.append(name) or Path(r) / "index.html")
    stage.run(cfg_for(run_dir, "describe.site=true", "describe.tag=sample", "describe.sample=2"))
    assert seen == ["l1"]  # the unit set's site, not descriptions/l1-sample's
    monkeypatch.undo()
    figures = stage.run(cfg_for(run_dir, "describe.site=true"))
    index = Path(figures["site"])
    assert [d["run"] for d in _data(index)["runs"]] == ["l1", "l1-sample"]
