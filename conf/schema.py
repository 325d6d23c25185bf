"""Every config group's dataclass, stored in Hydra's ConfigStore as `<group>/schema`.

Each YAML option of a group starts with `defaults: [schema, _self_]`, so the dataclass supplies
every key and default (with its comment), the option holds only what it changes, and an unknown
key or a wrongly typed value is refused when the config is composed.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from autoencoder.config import ActivationsConfig, SAETrainConfig
from tools.core.tracking import WandbConfig
from tools.describe.config import DescribeConfig
from tools.features.config import FeaturesConfig
from tools.pipeline_config import PipelineConfig
from transformer.config import DataConfig, TrainConfig
from transformer.subject_config import SubjectConfig

GROUPS: dict[str, type] = {
    "subject": SubjectConfig, "data": DataConfig, "transformer": TrainConfig,
    "activations": ActivationsConfig, "sae": SAETrainConfig, "features": FeaturesConfig,
    "describe": DescribeConfig, "pipeline": PipelineConfig, "wandb": WandbConfig,
}


def register() -> None:
    """Store the schemas (idempotent)."""
    cs = ConfigStore.instance()
    for group, schema in GROUPS.items():
        cs.store(group=group, name="schema", node=schema, provider="monosemantic")
