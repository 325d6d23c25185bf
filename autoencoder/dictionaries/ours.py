"""This project's own SAE folders (`run_dir/sae/<name>/`, written by `autoencoder.sae.save_sae`).

The export is a SAELens folder (`cfg.json` + `sae_weights.safetensors`) whose `cfg.json` also carries
`format` = `autoencoder.sae.FORMAT` and our `model` block (architecture, k, hook_name); that field tells
it apart from a SAELens folder. Encoding is SAELens' (x - b_dec, then ReLU or TopK), the same as
`autoencoder.sae.load_sae(...).encode`.
"""

from __future__ import annotations

from pathlib import Path

from autoencoder.dictionaries import saelens
from autoencoder.dictionaries.base import Dictionary, check_hook
from autoencoder.sae import CFG_FILE, FORMAT, WEIGHTS_FILE
from tools.core.files import read_json


def matches(folder: Path) -> bool:
    if not ((folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()):
        return False
    try:
        return read_json(folder / CFG_FILE, "SAE config").get("format") == FORMAT
    except Exception:  # noqa: BLE001 - an unreadable cfg.json is reported by the SAELens reader
        return False


def load(folder: Path, hook: str | None, source: str) -> Dictionary:
    """Load our export through the SAELens reader, with the hook our `model` block records."""
    d = saelens.load(folder, hook, source)
    cfg = read_json(folder / CFG_FILE, "SAE config")
    model = cfg.get("model") or {}
    recorded = model.get("hook_name") or d.hook_in
    d.hook_in = d.hook_out = check_hook(hook or recorded, str(folder / CFG_FILE))
    if model.get("hook_name_out"):  # a transcoder: it writes another hook point
        d.hook_out = check_hook(model["hook_name_out"], str(folder / CFG_FILE))
    d.source_format, d.model_name = "ours", None
    d.meta["training"] = cfg.get("training")
    return d
