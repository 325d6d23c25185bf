"""Checking activation shards against their manifest: header, size and sha256 (docs/formats.md).

`verify_once` hashes a file once per process and file version; `ShardReader` calls it (from its
verifier thread) for every shard before using its rows, `load_resample_set` for `resample.npy`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tools.core.config import UserError
from tools.core.files import read_json, sha256_file

FORMAT = "monosemantic.activations/1"
DTYPE = "float16"
MANIFEST = "manifest.json"
RESAMPLE = "resample.npy"


def read_manifest(directory: str | os.PathLike, *, d_in: int | None = None,
                  dtype: str | None = None) -> dict[str, Any]:
    """The manifest of a complete shard directory; UserError if missing, incomplete or mismatched."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"shard manifest not found: {path} (run autoencoder.generate first)")
    m = read_json(path, "shard manifest")
    if not isinstance(m, dict):
        raise UserError(f"{path}: not a JSON object")
    if not str(m.get("format", "")).startswith("monosemantic.activations/"):
        raise UserError(f"{path}: not an activation manifest "
                        f"(format {m.get('format')!r}, expected {FORMAT!r})")
    for key in ("d_in", "dtype", "shards", "total_rows"):
        if key not in m:
            raise UserError(f"{path}: missing key `{key}`")
    if m.get("complete") is not True:
        done = len(m.get("shards") or [])
        raise UserError(f"{path}: incomplete (complete={m.get('complete')!r}, {done} shards listed); "
                        "rerun autoencoder.generate to finish it")
    if m["dtype"] != DTYPE:
        raise UserError(f"{path}: dtype {m['dtype']!r}, expected {DTYPE!r}")
    if dtype is not None and m["dtype"] != dtype:
        raise UserError(f"{path}: dtype {m['dtype']!r} but {dtype!r} was expected")
    if d_in is not None and int(m["d_in"]) != int(d_in):
        raise UserError(f"{path}: d_in={m['d_in']} but d_in={d_in} was expected (config or model)")
    if not m["shards"]:
        raise UserError(f"{path}: lists no shards")
    listed = sum(int(s["rows"]) for s in m["shards"])
    if listed != int(m["total_rows"]):
        raise UserError(f"{path}: total_rows={m['total_rows']} but the shards list {listed} rows")
    return m


def _open_npy(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of an `.npy` file, from its header alone."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except FileNotFoundError:
        raise UserError(f"shard missing: {path}") from None
    except (ValueError, OSError) as e:
        raise UserError(f"shard {path}: not a readable .npy file ({e})") from e
    if fortran:
        raise UserError(f"shard {path}: Fortran-ordered, expected C order")
    return shape, dt, offset


def check_shard(directory: Path, entry: dict[str, Any], d_in: int, *, sha256: bool = False) -> int:
    """Header, size (and optionally sha256) of one shard against its manifest entry; returns offset."""
    path = directory / entry["file"]
    shape, dt, offset = _open_npy(path)
    want = (int(entry["rows"]), int(d_in))
    if tuple(shape) != want or dt != np.dtype(DTYPE):
        raise UserError(f"shard {path}: header says {dt} {list(shape)}, "
                        f"manifest expects {DTYPE} {list(want)}")
    size, expect = path.stat().st_size, offset + want[0] * want[1] * 2
    if size != expect:
        raise UserError(f"shard {path}: {size} bytes, expected {expect} (truncated or altered)")
    if sha256:
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise UserError(f"shard {path}: sha256 {got[:16]}..., manifest expects {entry['sha256'][:16]}... "
                            "(altered or corrupt; regenerate it)")
    return offset


_VERIFIED: set[tuple[str, int, int, int, str]] = set()  # files whose sha256 matched, this process
_VERIFIED_LOCK = threading.Lock()


def _file_key(path: Path, sha256: str) -> tuple[str, int, int, int, str]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, sha256)


def verify_once(path: str | os.PathLike, sha256: str, what: str = "shard",
                stop: threading.Event | None = None) -> bool:
    """Check `path`'s sha256 against the manifest's, once per process and file version.

    UserError naming the file on a mismatch; False when `stop` was set before the hash finished.
    """
    path = Path(path)
    try:
        key = _file_key(path, sha256)
    except FileNotFoundError:
        raise UserError(f"{what} missing: {path}") from None
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return True
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):  # hashlib releases the GIL: training steps run meanwhile
            h.update(block)
            if stop is not None and stop.is_set():
                return False
    got = h.hexdigest()
    if got != sha256:
        raise UserError(f"{what} {path}: sha256 {got[:16]}..., manifest expects {sha256[:16]}... "
                        "(altered or corrupt; regenerate it with autoencoder.generate overwrite=true); "
                        "nothing was trained on it")
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)
    return True


def verify_resample(directory: str | os.PathLike) -> None:
    """Check `resample.npy` against the manifest's `resample_sha256` (not checked when not recorded)."""
    directory = Path(directory)
    m = read_json(directory / MANIFEST, "shard manifest") if (directory / MANIFEST).is_file() else {}
    if m.get("resample_sha256"):
        verify_once(directory / RESAMPLE, m["resample_sha256"], "resampling set")


def verify_shards(directory: str | os.PathLike, *, progress: bool = False) -> dict[str, Any]:
    """Check every shard's sha256, header and size against the manifest (and `resample.npy`'s shape)."""
    directory = Path(directory)
    m = read_manifest(directory)
    entries = m["shards"]
    it = entries
    if progress:
        from tqdm import tqdm

        it = tqdm(entries, desc="verify", unit="shard")
    nbytes = 0
    for e in it:
        check_shard(directory, e, int(m["d_in"]), sha256=True)
        nbytes += (directory / e["file"]).stat().st_size
    resample = directory / RESAMPLE
    res_rows = None
    if resample.is_file():
        shape, dt, _ = _open_npy(resample)
        if len(shape) != 2 or shape[1] != int(m["d_in"]) or dt != np.dtype(DTYPE):
            raise UserError(f"{resample}: {dt} {list(shape)}, expected {DTYPE} [n, {m['d_in']}]")
        if m.get("resample_rows") is not None and shape[0] != int(m["resample_rows"]):
            raise UserError(f"{resample}: {shape[0]} rows, manifest says {m['resample_rows']}")
        res_rows = int(shape[0])
        verify_resample(directory)
    return {"directory": str(directory), "shards": len(entries), "rows": int(m["total_rows"]),
            "d_in": int(m["d_in"]), "bytes": nbytes, "resample_rows": res_rows, "ok": True}
