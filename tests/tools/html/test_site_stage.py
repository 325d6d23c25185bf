"""The site stage: `python -m tools.site` renders a unit set's browser under its own lock, and shows
every description run registered for the unit set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tools import site
from tools.core import guard
from tools.core.config import UserError, compose
from tools.core.layout import RunLayout
from tools.describe.synthetic import fires_after, fires_on, write_features

RULES = [fires_on(" thou"), fires_after(" the"), fires_on(" king")]



def _run_dir(tmp_path: Path) -> Path:
    write_features(tmp_path, "l1", RULES)
    lay = RunLayout(tmp_path)
    lay.sae("l1").mkdir(parents=True)
    (lay.sae("l1") / "cfg.json").write_text("{}")
    return tmp_path


def _index_data(index: Path) -> dict:
    return json.loads(index.read_text(encoding="utf-8").split('id="data">')[1].split("</script>")[0])


def test_cli_writes_the_site(tmp_path):
    run_dir = _run_dir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tools.site", f"run_dir={run_dir}", "features.sae=l1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    index = RunLayout(run_dir).site("l1") / "index.html"
    assert index.is_file() and (index.parent / "feature" / "2.html").is_file()
    assert str(index) in proc.stdout
    cfg = compose([f"run_dir={run_dir}", "features.sae=l1"])
    assert site.done(cfg)
    assert not guard.lock_path(index.parent).exists()  # released
    missing = subprocess.run([sys.executable, "-m", "tools.site", f"run_dir={run_dir}", "features.sae=nope"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "features.sae='nope'" in missing.stderr


def test_second_writer_is_refused(tmp_path):
    run_dir = _run_dir(tmp_path)
    cfg = compose([f"run_dir={run_dir}"])
    site_dir = RunLayout(run_dir).site("l1")
    code = ("import sys, time; from tools.core import guard; l = guard.output_lock(sys.argv[1], 'test'); "
            "l.__enter__(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(site_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="is being written by test"):
            site.run(cfg)
        assert not (site_dir / "index.html").exists()
    finally:
        holder.kill()
        holder.wait()
    assert site.run(cfg)["site"] == str(site_dir / "index.html")


def test_describe_then_site_shows_the_run(tmp_path):
    from tools.describe import stage

    run_dir = _run_dir(tmp_path)
    cfg = compose([f"run_dir={run_dir}"])
    site.run(cfg)
    assert site.done(cfg) and _index_data(RunLayout(run_dir).site("l1") / "index.html")["runs"] == []
    stage.run(compose([f"run_dir={run_dir}", "describe.site=false", "describe.tag=t"]))
    assert not site.done(cfg)  # a new description run: the site is behind
    index = Path(site.run(cfg)["site"])
    assert [r["run"] for r in _index_data(index)["runs"]] == ["l1-t"]
    assert site.done(cfg)
    figures = stage.run(compose([f"run_dir={run_dir}", "describe.site=true"]))  # describe runs the stage
    assert figures["site"] == str(index) and site.done(cfg)
    assert [r["run"] for r in _index_data(index)["runs"]] == ["l1", "l1-t"]
