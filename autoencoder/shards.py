"""Activation shard directories: `python -m autoencoder.shards run_dir=... [activations.split=val]`.

A shard directory (docs/formats.md) holds `shard_00000.npy`, ... (`float16 [rows, d_in]`, rows
already shuffled across contexts by `autoencoder.generate`), `manifest.json` and `resample.npy`.
Writing is `autoencoder.shard_write`, reading `autoencoder.shard_reader`, checking
`autoencoder.shard_check`. This stage prints a directory's manifest summary and verifies every
shard (sha256, header, size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from autoencoder.config import ActivationsConfig
from autoencoder.shard_check import read_manifest, verify_shards
from tools.core.config import stage_main
from tools.core.layout import RunLayout
from tools.core.stage import Stage


def summary(m: dict[str, Any]) -> str:
    """A manifest in three lines."""
    gb = int(m["total_rows"]) * int(m["d_in"]) * 2 / 1e9
    model = m.get("model") or {}
    return "\n".join([
        f"split {m.get('split')}: {m['total_rows']:,} rows x d_in {m['d_in']} ({m['dtype']}, {gb:.3g} GB) "
        f"in {len(m['shards'])} shards (~{m.get('rows_per_shard')} rows each)",
        f"hook {m.get('hook_name')}; {m.get('contexts')} contexts x {m.get('tokens_per_context')} tokens "
        f"(block_size {m.get('block_size')}); seed {m.get('seed')}",
        f"model {model.get('path')} (config hash {model.get('config_hash')}); "
        f"resample.npy {m.get('resample_rows')} rows; complete {m.get('complete')}",
    ])


class ShardsStage(Stage):
    """A check of `run_dir/activations/<activations.split>/`: writes nothing, so it is never done."""

    name, what, key, schema = "autoencoder.shards", "activation directory", "activations", ActivationsConfig
    writes = False

    def output_dir(self) -> Path:
        return RunLayout.of(self.cfg).activations_split(self.c.split)

    def work(self) -> dict[str, Any]:
        """Manifest summary, then every shard verified (sha256, header, size)."""
        directory = self.output_dir()
        m = read_manifest(directory)
        print(summary(m), flush=True)
        result = verify_shards(directory, progress=True)
        print(f"verified {result['shards']} shards ({result['bytes'] / 1e6:.1f} MB) in {directory}: "
              "sha256, header and size all match the manifest", flush=True)
        return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Inspect `run_dir/activations/<split>/`: manifest summary, then every shard verified."""
    return ShardsStage(cfg).run()


def done(cfg: DictConfig) -> bool:
    """Inspection writes nothing, so it is never 'done' for the pipeline."""
    return ShardsStage(cfg).done()


main = stage_main(run)

if __name__ == "__main__":
    main()
