"""SAE architectures behind one registry, one module each (as SAELens lays out `saes/`).

    standard (l1)  `standard.L1SAE`       Anthropic 2023: ReLU + L1, neuron resampling
    topk           `topk.TopKSAE`         Gao et al. 2024: per-row TopK + AuxK
    batchtopk      `batchtopk.BatchTopKSAE`   Bussmann et al. 2024: batch top-k, inference threshold
    jumprelu       `jumprelu.JumpReLUSAE`     Rajamanoharan et al. 2024: learned thresholds + L0
    matryoshka     `matryoshka.MatryoshkaSAE` Bussmann et al. 2025: BatchTopK, nested prefix losses

`REGISTRY` maps the model-config name (SAEModelConfig.architecture) to the class and `BY_NAME` the
`sae.architecture` config name; any of them may be a transcoder (`kind="transcoder"`).
"""

from __future__ import annotations

from autoencoder.saes.base import (
    KINDS,
    PARAM_NAMES,
    SAE,
    LossTerms,
    SAEModelConfig,
    geometric_median,
    row_sq_error,
)
from autoencoder.saes.batchtopk import BatchTopKSAE
from autoencoder.saes.jumprelu import JumpReLUSAE
from autoencoder.saes.matryoshka import MatryoshkaSAE
from autoencoder.saes.standard import L1SAE
from autoencoder.saes.topk import TopKSAE

# SAEModelConfig.architecture -> class ("standard" and "topk" are SAELens' names)
REGISTRY: dict[str, type[SAE]] = {"standard": L1SAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE,
                                  "jumprelu": JumpReLUSAE, "matryoshka": MatryoshkaSAE}
# sae.architecture (our config name) -> SAEModelConfig.architecture
BY_NAME: dict[str, str] = {cls.name: key for key, cls in REGISTRY.items()}


def arch_class(config_name: str) -> type[SAE]:
    """The class of a `sae.architecture` value."""
    return REGISTRY[BY_NAME[config_name]]


def build_sae(cfg: SAEModelConfig, kernel: str = "dense") -> SAE:
    """A freshly initialised SAE of `cfg.architecture`."""
    cfg.check()
    return REGISTRY[cfg.architecture](cfg, kernel=kernel)


__all__ = ["BY_NAME", "KINDS", "PARAM_NAMES", "REGISTRY", "SAE", "BatchTopKSAE", "JumpReLUSAE", "L1SAE",
           "LossTerms", "MatryoshkaSAE", "SAEModelConfig", "TopKSAE", "arch_class", "build_sae",
           "geometric_median", "row_sq_error"]
