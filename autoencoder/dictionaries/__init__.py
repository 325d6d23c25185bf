"""Open any sparse dictionary: `load_dictionary(source, hook=None, device="cpu") -> Dictionary`.

The format is detected from the files present, never from a flag:

| format              | files                                                  | module               |
|---------------------|--------------------------------------------------------|----------------------|
| ours                | cfg.json (with our `format`) + sae_weights.safetensors | `ours`               |
| SAELens             | cfg.json + sae_weights.safetensors                     | `saelens`            |
| sparsify            | <hookpoint>/cfg.json + sae.safetensors                 | `sparsify`           |
| Gemma Scope v1 / v2 | params.npz / params.safetensors + config.json          | `gemmascope`         |
| dictionary_learning | ae.pt + config.json                                    | `dictionary_learning`|

`source` is a folder, a file inside one, a bare name (`run_dir/sae/<name>`, given `run_dir`), or a
hub id `hf:ORG/REPO[/SUBPATH]` (`hub`). A folder holding exactly one dictionary in a subfolder
loads it; several are an error listing them, unless `hook` picks one.
"""

from __future__ import annotations

from pathlib import Path

from autoencoder.dictionaries import dictionary_learning, gemmascope, hub, ours, saelens, sparsify
from autoencoder.dictionaries.base import Dictionary, check_hook
from tools.core.config import UserError

__all__ = ["Dictionary", "load_dictionary", "detect", "FORMATS"]

FORMATS = {"ours": ours, "saelens": saelens, "sparsify": sparsify, "gemmascope": gemmascope,
           "dictionary_learning": dictionary_learning}
KNOWN = ("ours/SAELens (cfg.json + sae_weights.safetensors), "
         "sparsify (<hookpoint>/cfg.json + sae.safetensors), "
         "Gemma Scope (params.npz, or params.safetensors + config.json), "
         "dictionary_learning (ae.pt + config.json)")
WEIGHT_FILES = {"sae_weights.safetensors", "sae.safetensors", "params.npz", "params.safetensors", "ae.pt",
                "cfg.json", "config.json"}


def detect(folder: Path) -> str | None:
    """The name of the format whose files `folder` holds, or None."""
    for name, module in FORMATS.items():
        if module.matches(folder):
            return name
    return None


def _listing(folder: Path, limit: int = 20) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more or "nothing"


def _pick_child(folder: Path, hook: str | None) -> Path:
    """The one dictionary among `folder`'s subfolders, or the one whose hookpoint maps to `hook`."""
    children = sorted(p for p in folder.iterdir() if p.is_dir() and detect(p))
    if not children:
        raise UserError(f"{folder}: no dictionary format matches (files seen: {_listing(folder)}; "
                        f"formats known: {KNOWN})")
    if len(children) == 1:
        return children[0]
    if hook:
        hits = [c for c in children if detect(c) == "sparsify"
                and hook in (sparsify.hooks_for(c.name, False)[0], sparsify.hooks_for(c.name, True)[0])]
        if len(hits) == 1:
            return hits[0]
    raise UserError(f"{folder}: holds {len(children)} dictionaries ({', '.join(c.name for c in children)}); "
                    f"pass one of these subfolders as the source")


def resolve(source: str | Path, hook: str | None = None, run_dir: str | Path | None = None) -> Path:
    """The folder `source` names (a hub id is fetched into the Hugging Face cache first)."""
    text = str(source)
    if text.startswith(hub.PREFIX):
        path = hub.fetch(text)
    else:
        path = Path(text).expanduser()
        if not path.exists() and run_dir is not None and "/" not in text and "\\" not in text:
            path = Path(run_dir) / "sae" / text
        if not path.exists():
            raise UserError(f"dictionary source {text!r}: no such file or folder"
                            + (f" (nor {path})" if str(path) != text else ""))
    if path.is_file():
        if path.name not in WEIGHT_FILES:
            raise UserError(f"{path}: not a dictionary file (expected one of "
                            f"{', '.join(sorted(WEIGHT_FILES))} "
                            f"in a folder; formats known: {KNOWN})")
        path = path.parent
    return path if detect(path) else _pick_child(path, hook)


def load_dictionary(source: str | Path, hook: str | None = None, device: str = "cpu",
                    run_dir: str | Path | None = None) -> Dictionary:
    """Load the dictionary at `source` (folder, file, bare name under `run_dir/sae/`, or `hf:` id).

    `hook` (a TransformerLens-style name such as `blocks.3.hook_resid_post`) sets `hook_in` where the
    format records none, or overrides it. Every bad input is one UserError line; nothing is written.
    """
    hook = check_hook(hook, "hook=")
    folder = resolve(source, hook, run_dir)
    name = detect(folder)
    d = FORMATS[name].load(folder, hook, str(source))
    return d.to(device).eval()
