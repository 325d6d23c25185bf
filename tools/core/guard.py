"""Output guards every stage shares: one writer per folder, no finished output replaced unseen,
no corrupt or stale input used.

- `output_lock(folder, stage)`: an exclusive lock on `<parent>/.<folder>.lock` (an `flock` held for
  the run, the file naming pid, host and stage). A second writer refuses with a line naming the
  holder; a lock left by a killed process is detected (the kernel dropped its flock) and replaced,
  and the temporaries killed writers left in the folder are removed.
- `refuse_overwrite(...)`: a finished output made under another config or from other inputs is
  replaced only with `overwrite=true` (or written under a new name).
- `seal(folder, names)` / `verify_sealed(folder, names)`: sha256 of a stage's finished files in
  `checksums.json`; consumers check them before use, so a flipped byte is a named refusal.
- `provenance(files)` / `check_provenance(recorded, now)`: the sha256 of the inputs an output was
  made from, and a refusal naming both when an input's producer changed since.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tools.core.config import UserError
from tools.core.files import sha256_file, write_json

CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "monosemantic.checksums/1"
_HELD: dict[Path, int] = {}  # lock path -> depth, so a process may re-enter its own lock


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock of an output folder sits beside it, so replacing the folder never drops the lock."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process (no holder recorded yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("time", 0))))
    return f"{info.get('stage', '?')} (pid {info.get('pid')} on {info.get('host')}, since {started})"


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, stage: str) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` for the block; UserError naming the holder if taken.

    Under torchrun only rank 0 locks (the ranks write one output together).
    """
    path = lock_path(folder)
    if int(os.environ.get("RANK", "0")) != 0:
        yield path
        return
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    fd = _acquire(path, Path(folder), stage)
    _HELD[path] = 1
    try:
        if Path(folder).is_dir():  # temporaries of killed writers (`.<name>.tmp-<pid>`, `.site.tmp-<pid>`)
            remove_stale_temps(folder, "**/.*.tmp-*")
        yield path
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            os.unlink(path)  # safe: a waiter re-checks that the path is still the inode it locked
        os.close(fd)


def _acquire(path: Path, folder: Path, stage: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path.parent} for {folder} ({e.strerror}); "
                        "choose a writable run_dir / data_dir") from None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock {path} ({e.strerror}); "
                            "choose a writable run_dir / data_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{folder} is being written by {_holder_text(holder)} (lock {path}); wait for "
                            "it to finish, or write elsewhere (another run_dir or name)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and flock: retry
            os.close(fd)
            continue
        old = _read_holder(fd)
        if old and old.get("pid") != os.getpid():
            alive = old.get("host") == socket.gethostname() and _pid_alive(int(old.get("pid", -1)))
            state = "was still running but held no lock" if alive else "is gone"
            print(f"note: replaced a stale lock {path} left by {_holder_text(old)}, which {state}",
                  flush=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "time": time.time(),
                "folder": str(folder)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        return fd
    raise UserError(f"could not take the lock {path}: it keeps being replaced by other writers")


def is_locked(folder: str | os.PathLike) -> bool:
    """Whether some process holds `folder`'s lock (for tests and status tools)."""
    path = lock_path(folder)
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_temps(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Remove `folder/<pattern>` temporaries (named `...tmp-<pid>`) whose writer is no longer running."""
    import re
    import shutil

    removed = []
    for p in Path(folder).glob(pattern):
        m = re.search(r"tmp-(\d+)$", p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by killed runs in {folder}", flush=True)
    return removed


# ---------------------------------------------------------------------------------------- overwrite


def refuse_overwrite(folder: str | os.PathLike, what: str, old: Any, new: Any, *, overwrite: bool,
                     rename_key: str | None = None) -> None:
    """A finished `what` in `folder` made under `old` (hash) may become `new` only with overwrite=true."""
    if overwrite or old == new:
        return
    alt = f" or choose a new `{rename_key}`" if rename_key else ""
    raise UserError(f"{folder} holds a finished {what} made from another config or inputs (hash {old}, "
                    f"now {new}); pass overwrite=true to replace it{alt}")


# ---------------------------------------------------------------------------------------- checksums


def _read_checksums(folder: Path) -> dict[str, Any]:
    path = folder / CHECKSUMS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild this output with overwrite=true") from None
    return data if isinstance(data, dict) else {}


def seal(folder: str | os.PathLike, names: Iterable[str],
         inputs: dict[str, str | os.PathLike] | None = None) -> dict[str, Any]:
    """Record the sha256 and size of each finished file of `folder` in `checksums.json` (merged),
    and, given `inputs` ({role: path}), the sha256 of the files it was made from."""
    folder = Path(folder)
    try:
        old = _read_checksums(folder)
    except UserError:
        old = {}
    files = dict(old.get("files") or {})
    for name in names:
        p = folder / name
        files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    out = {"format": CHECKSUMS_FORMAT, "files": dict(sorted(files.items())),
           "inputs": provenance(inputs) if inputs is not None else old.get("inputs") or {}}
    write_json(folder / CHECKSUMS, out)
    return out


def verify_file(path: str | os.PathLike, sha256: str | None, what: str, fix: str) -> None:
    """Refuse `path` naming it when its sha256 is not the recorded one (None: nothing recorded)."""
    if sha256 is None:
        return
    got = sha256_file(path)
    if got != sha256:
        raise UserError(f"{what} file {path}: sha256 {got[:16]}..., expected {sha256[:16]}... "
                        f"(altered or corrupt); {fix}")


def verify_sealed(folder: str | os.PathLike, names: Iterable[str], what: str,
                  fix: str = "rebuild it with overwrite=true") -> None:
    """Refuse, naming the file, when a file listed in `checksums.json` no longer matches it.

    Files that `checksums.json` does not list (or folders from before checksums) are not checked.
    """
    folder = Path(folder)
    path = folder / CHECKSUMS
    files = _read_checksums(folder).get("files") or {}
    for name in names:
        want = files.get(name)
        if want is None:
            continue
        p = folder / name
        if not p.is_file():
            raise UserError(f"{what} file {p} is missing (listed in {path}); rebuild the {what}")
        got = sha256_file(p)
        if got != want["sha256"]:
            raise UserError(f"{what} file {p}: sha256 {got[:16]}..., {CHECKSUMS} expects "
                            f"{want['sha256'][:16]}... (altered or corrupt); {fix}")


# ---------------------------------------------------------------------------------------- provenance


def provenance(files: dict[str, str | os.PathLike]) -> dict[str, dict[str, str]]:
    """{role: {"path", "sha256"}} of the inputs an output is made from."""
    return {k: {"path": str(v), "sha256": sha256_file(v)} for k, v in sorted(files.items())}


def check_provenance(output: str | os.PathLike, recorded: dict[str, dict[str, str]] | None,
                     rebuild: str) -> None:
    """Refuse an input `output` whose recorded producers changed since, naming both.

    `recorded` is what `provenance` returned when `output` was made; `rebuild` says how to remake it.
    """
    for role, rec in (recorded or {}).items():
        p = Path(rec["path"])
        if not p.is_file():
            raise UserError(f"{output} was made from {role} {p}, which is gone; {rebuild}")
        now = sha256_file(p)
        if now != rec["sha256"]:
            raise UserError(f"{output} was made from {role} {p} with sha256 {rec['sha256'][:16]}..., "
                            f"which is now {now[:16]}... (changed since); {rebuild}")


def check_sealed_inputs(folder: str | os.PathLike, rebuild: str) -> None:
    """`check_provenance` on the inputs `seal` recorded for `folder` (nothing recorded: not checked)."""
    check_provenance(folder, _read_checksums(Path(folder)).get("inputs"), rebuild)


def prepare_output(folder: str | os.PathLike, what: str, *, marker: str, sealed: Iterable[str] = (),
                   old: Any, new: Any, overwrite: bool, rename_key: str | None = None) -> bool:
    """The overwrite rule for a stage about to write `folder` (whose `marker` file marks it finished).

    Returns True when the finished output is current (made under `new`, its sealed files intact).
    A finished output made under another hash, or with altered sealed files, is refused unless
    `overwrite`; then `marker` is removed, so the output stops looking finished until rewritten.
    """
    folder = Path(folder)
    if not (folder / marker).is_file():
        return False
    try:
        verify_sealed(folder, sealed, what)
        refuse_overwrite(folder, what, old, new, overwrite=overwrite, rename_key=rename_key)
        if old == new:
            return True
    except UserError:
        if not overwrite:
            raise
    print(f"overwrite=true: replacing the finished {what} in {folder}", flush=True)
    (folder / marker).unlink(missing_ok=True)  # under torchrun every rank may get here
    return False
