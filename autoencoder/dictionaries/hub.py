"""`hf:ORG/REPO[/SUBPATH]` sources: fetched with `huggingface_hub.snapshot_download` into its cache.

Only SUBPATH's files are fetched (`allow_patterns`). Offline (`HF_HUB_OFFLINE=1`) the cache alone
answers; a miss, or a hub that cannot be reached, is one UserError line naming the files and how
to provide them.
"""

from __future__ import annotations

import re
from pathlib import Path

from tools.core.config import UserError

PREFIX = "hf:"


def parse(source: str) -> tuple[str, str]:
    """`hf:ORG/REPO[/SUBPATH]` -> (ORG/REPO, SUBPATH or "")."""
    m = re.fullmatch(r"hf:([\w.-]+/[\w.-]+)(?:/(.+?))?/?", source.strip())
    if not m:
        raise UserError(f"hub id {source!r}: expected hf:ORG/REPO[/SUBPATH]")
    return m.group(1), (m.group(2) or "").strip("/")


def fetch(source: str) -> Path:
    """The local folder (in the Hugging Face cache) holding `source`'s files."""
    repo, sub = parse(source)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise UserError(f"{source}: hub ids need huggingface_hub (pip install huggingface_hub)") from e
    patterns = [f"{sub}/*"] if sub else None
    wanted = f"{sub}/*" if sub else "all files"
    try:
        root = Path(snapshot_download(repo_id=repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any hub or network failure is reported the same way
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"{source}: {wanted} of {repo} not in the Hugging Face cache and not downloadable ({reason}); "
            f"copy those files into a local folder and pass its path, or pre-fill the cache with "
            f"`hf download {repo}" + (f" --include '{sub}/*'" if sub else "") + "` and set HF_HUB_OFFLINE=1"
        ) from e
    folder = root / sub if sub else root
    if not folder.is_dir():
        raise UserError(f"{source}: {repo} has no folder {sub!r}")
    return folder
