"""Load the configured subject: our GPT from `run_dir/transformer`, or a Hugging Face causal LM.

`subject_spec` describes it without loading weights (for hashes and checks); `load_subject` loads it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig

from tools.core.config import UserError, section
from tools.core.layout import RunLayout
from transformer.subject import GPTSubject, Subject, SubjectSpec
from transformer.subject_config import SubjectConfig


def gpt_spec(model_dir: Path) -> SubjectSpec:
    """The GPT in `run_dir/transformer` described from its config.json, weights hashed, not loaded."""
    from tools.core.files import config_hash, read_json, sha256_file

    meta = read_json(model_dir / "config.json", "transformer config")
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"transformer weights not found: {weights} (run transformer.train first)")
    m = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(m, dict) or "block_size" not in m or "n_embd" not in m:
        raise UserError(f"{model_dir / 'config.json'}: no valid `model` section")
    ident = {"kind": "gpt", "name": "gpt", "path": str(model_dir), "config_hash": config_hash(meta),
             "weights_sha256": sha256_file(weights)}
    tokens = meta.get("tokens") if isinstance(meta.get("tokens"), dict) else {}
    return SubjectSpec(ident, int(m.get("n_layer", 1)), int(m["block_size"]), int(m.get("vocab_size", 50304)),
                       (tokens.get("tokenizer_info") or {}).get("fingerprint"), {"model": m})


def subject_config(cfg: DictConfig) -> SubjectConfig:
    """The checked `subject` section."""
    return section(cfg, "subject", SubjectConfig)


def subject_spec(cfg: DictConfig) -> SubjectSpec:
    """The configured subject's spec, without loading weights."""
    sc = subject_config(cfg)
    if sc.kind == "gpt":
        model_dir = RunLayout.of(cfg).transformer
        if not (model_dir / "config.json").is_file():
            raise UserError(f"transformer config not found: {model_dir / 'config.json'} "
                            "(run transformer.train first)")
        return gpt_spec(model_dir)
    from transformer.hf_subject import hf_spec

    return hf_spec(sc, str(cfg.data_dir))


def load_subject(cfg: DictConfig, device: str, spec: SubjectSpec | None = None) -> Subject:
    """The configured subject on `device` (`subject=gpt`: run_dir/transformer; `subject=hf|smollm2`);
    `spec`: the subject's spec when the caller has it already."""
    from transformer.tokenizer import load_tokenizer

    sc = subject_config(cfg)
    spec = spec or subject_spec(cfg)
    if sc.kind == "gpt":
        from transformer.model import load_model

        subject: Subject = GPTSubject(load_model(RunLayout.of(cfg).transformer, device), spec)
    else:
        from transformer.hf_load import load_causal_lm
        from transformer.hf_subject import HFSubject

        subject = HFSubject(load_causal_lm(sc, str(cfg.data_dir), device), sc, spec)
    subject.tokenizer_loader = functools.partial(load_tokenizer, sc, str(cfg.data_dir))
    return subject
