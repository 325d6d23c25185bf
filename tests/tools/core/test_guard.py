"""Output guards and one-line errors: the lock, checksums, provenance, the overwrite rule,
command-line errors as one line with exit status 2, and counted jsonl records without text."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tools.core import guard
from tools.core.config import UserError, compose, error_line


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoencoder.shards", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    out = tmp_path / "sae" / "x"
    with guard.output_lock(out, "stage A"):
        assert guard.is_locked(out)
        info = json.loads(guard.lock_path(out).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with guard.output_lock(out, "stage A again"):  # the same process may re-enter
            pass
        code = ("from tools.core import guard\n"
                f"with guard.output_lock({str(out)!r}, 'stage B'):\n    pass\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert r.returncode != 0 and f"{out} is being written by stage A (pid {os.getpid()}" in r.stderr
    assert not guard.is_locked(out) and not guard.lock_path(out).exists()


def test_stale_lock_and_temporaries_of_a_dead_writer_are_replaced(tmp_path, capsys):
    out = tmp_path / "features" / "x"
    (out / ".site.tmp-999999999").mkdir(parents=True)
    (out / ".features.jsonl.tmp-999999999").write_text("partial")
    (out / f".meta.json.tmp-{os.getppid()}").write_text("a live process's")
    guard.lock_path(out).write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(),
                                                "stage": "tools.top_activations", "time": 0}))
    with guard.output_lock(out, "tools.top_activations"):
        pass
    said = capsys.readouterr().out
    assert "replaced a stale lock" in said and "pid 999999999" in said and "is gone" in said
    assert sorted(p.name for p in out.iterdir()) == [f".meta.json.tmp-{os.getppid()}"]


def test_seal_verify_and_provenance(tmp_path):
    (tmp_path / "in.bin").write_bytes(b"input")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "w.bin").write_bytes(b"weights")
    guard.seal(tmp_path / "out", ["w.bin"], inputs={"model": tmp_path / "in.bin"})
    guard.verify_sealed(tmp_path / "out", ["w.bin", "unlisted.bin"], "SAE")
    guard.check_sealed_inputs(tmp_path / "out", "rebuild it")
    (tmp_path / "out" / "w.bin").write_bytes(b"weighTs")
    with pytest.raises(UserError, match=r"SAE file .*w.bin: sha256 .* \(altered or corrupt\)"):
        guard.verify_sealed(tmp_path / "out", ["w.bin"], "SAE")
    (tmp_path / "in.bin").write_bytes(b"other input")
    with pytest.raises(UserError, match=r"out was made from model .*in.bin with sha256 .*changed since"):
        guard.check_sealed_inputs(tmp_path / "out", "rebuild it")


def test_overwrite_rule(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    assert guard.prepare_output(out, "thing", marker="meta.json", old="a", new="a", overwrite=False)
    with pytest.raises(UserError, match="holds a finished thing .*hash a, now b.*overwrite=true.*`x.name`"):
        guard.prepare_output(out, "thing", marker="meta.json", old="a", new="b", overwrite=False,
                             rename_key="x.name")
    assert not guard.prepare_output(out, "thing", marker="meta.json", old="a", new="b", overwrite=True)
    assert not (out / "meta.json").exists()  # no longer looks finished until rewritten


@pytest.mark.parametrize("args, expect", [
    (["sae.l1_coef=1"], "unknown config key `sae.l1_coef`"),
    (["run_dir=/tmp/données"], "cannot parse the override 'run_dir=/tmp/données'.*"
                               "'run_dir=\"/tmp/données\"'"),
    (["run_dir=/tmp/my", "dir"], "cannot parse the override 'dir'.*split into words by the shell"),
    (["sae=nope"], "Could not find 'sae/nope'; available: batchtopk, jumprelu, l1, matryoshka, topk"),
    (["run_dir=/proc/none/run"], "No such file or directory: /proc/none.*writable"),
])
def test_command_line_errors_are_one_line_and_exit_2(args, expect):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(expect, lines[0]), lines[0]


def test_quoted_non_ascii_path_with_spaces_is_accepted(tmp_path):
    run_dir = tmp_path / "données x"
    r = cli(f'run_dir="{run_dir}"')
    assert r.returncode == 2 and f"shard manifest not found: {run_dir}/activations" in r.stderr


def test_full_traceback_behind_an_environment_variable():
    r = cli("sae.l1_coef=1", env={"MONOSEMANTIC_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and len(r.stderr.splitlines()) > 5


def test_file_system_errors_name_the_path():
    e = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run/sae")
    assert error_line(e).startswith("Read-only file system: /mnt/ro/run/sae; check that the path")
    with pytest.raises(KeyError):  # a bug is not dressed up as a user error
        error_line(KeyError("x"))


def test_jsonl_records_without_the_text_field_are_counted(tmp_path, capsys):
    from transformer import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"text": f"document number {i} has words"} for i in range(9)] + [{"title": "no text"}] * 3
    (corpus / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": f"held out {i}"}) + "\n" for i in range(3)))
    base = [f"data_dir={tmp_path / 'data'}", "data=local", f"data.files={corpus}/*.jsonl", "data.num_proc=1",
            "data.val_files=[b.jsonl]"]
    out = prepare.run(compose(base))
    assert "3 of 12 records in" in capsys.readouterr().out
    assert out["documents"] == {"train": 9, "val": 3}
    (corpus / "b.jsonl").unlink()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": None, "id": i}) + "\n" for i in range(4)))
    with pytest.raises(UserError, match=r"none of the 4 records in .*a.jsonl has a `text` value"):
        prepare.run(compose([*base[:-1], "overwrite=true"]))
