"""Neuronpedia's bulk-import folder, `<model_id>/<source_id>/`, from SAEDashboard feature records.

Rows follow the webapp's importer (`apps/webapp/app/api/admin/import/route.ts`, which reads
`release.jsonl`, `model.jsonl`, `sourceset.jsonl`, `source.jsonl`, then every
`features/*.jsonl.gz` into the `Neuron` table, `activations/*.jsonl.gz` into `Activation` and
`explanations/*.jsonl.gz` into `Explanation`) and the columns of its Prisma schema, as SAEDashboard's
`neuronpedia_export.py` writes them. Ids are derived from their content (sha256), so an export of the
same inputs gives the same rows; gzip headers carry no time stamp.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Neuronpedia's seeded default user (`DEFAULT_CREATOR_USER_ID` of apps/webapp/lib/env.ts)
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"


@dataclass(frozen=True)
class Source:
    """Who and what one imported source is."""

    model_id: str
    source_set: str
    source_id: str  # `<layer>-<source_set>[__<suffix>]`, Neuronpedia's `layer` column
    layer: int
    creator_id: str
    creator_name: str
    description: str
    dataset: str
    n_prompts: int
    n_tokens: int
    created_at: str  # ISO 8601


def source_id(layer: int, source_set: str, suffix: str | None = None) -> str:
    """Neuronpedia's source id: `<layer>-<set>`, `__<suffix>` appended (SAEDashboard's `sae_id_suffix`)."""
    return f"{layer}-{source_set}" + (f"__{suffix}" if suffix else "")


def row_id(*parts: Any) -> str:
    """A 25-character cuid-shaped id determined by `parts`."""
    return "c" + hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()[:24]


def dumps(row: dict[str, Any]) -> str:
    """One JSON line: UTF-8, escapes only where JSON needs them, no NaN."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def write_jsonl(path: Path, rows: list[dict[str, Any]], *, gz: bool = False) -> None:
    """Write rows as JSON lines (gzipped without a time stamp when `gz`) to a fresh path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(dumps(r) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data, compresslevel=6, mtime=0) if gz else data)


def header_rows(src: Source) -> dict[str, list[dict[str, Any]]]:
    """release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl of one source."""
    t = src.created_at
    release = {"name": f"{src.model_id}-{src.source_set}", "description": src.description,
               "descriptionShort": src.description, "creatorName": src.creator_name,
               "creatorNameShort": src.creator_name, "creatorId": src.creator_id, "visibility": "PUBLIC",
               "isNewUi": False, "featured": False, "urls": [], "defaultUmapSourceIds": [], "createdAt": t}
    model = {"id": src.model_id, "instruct": src.model_id.endswith("-it"), "creatorId": src.creator_id,
             "displayNameShort": src.model_id, "displayName": src.model_id, "visibility": "PUBLIC",
             "inferenceEnabled": False, "layers": 0, "neuronsPerLayer": 0, "owner": "", "createdAt": t,
             "updatedAt": t}
    sourceset = {"modelId": src.model_id, "name": src.source_set, "creatorId": src.creator_id,
                 "hasDashboards": True, "visibility": "PUBLIC", "description": src.description, "type": "",
                 "creatorName": src.creator_name, "urls": [], "releaseName": release["name"],
                 "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                 "showHeadAttribution": False, "showUmap": False, "createdAt": t}
    source = {"id": src.source_id, "modelId": src.model_id, "setName": src.source_set,
              "creatorId": src.creator_id, "hasDashboards": True, "inferenceEnabled": False,
              "inferenceHosts": [], "visibility": "PUBLIC", "hasUmap": False, "hasUmapLogSparsity": False,
              "hasUmapClusters": False, "num_prompts": src.n_prompts, "num_tokens_in_prompt": src.n_tokens,
              "dataset": src.dataset, "createdAt": t}
    return {"release": [release], "model": [model], "sourceset": [sourceset], "source": [source]}


FEATURE_KEYS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
                "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
                "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
                "logits_hist_data_bar_values", "decoder_weights_dist")


def feature_rows(src: Source, feat: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `Neuron` row and `Activation` rows of one SAEDashboard feature record."""
    index = str(feat["feature_index"])
    acts = []
    for k, a in enumerate(feat["activations"]):
        values = a["values"]
        top = max(values) if values else 0.0
        acts.append({"id": row_id(src.model_id, src.source_id, index, k), "tokens": a["tokens"],
                     "index": index, "layer": src.source_id, "modelId": src.model_id, "maxValue": top,
                     "maxValueTokenIndex": values.index(top) if values else 0,
                     "minValue": min(values) if values else 0.0, "values": values,
                     "creatorId": src.creator_id, "dataSource": None, "dataIndex": None, "dfaValues": [],
                     "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": src.created_at,
                     "lossValues": [], "logitContributions": None, "binMin": a["bin_min"],
                     "binMax": a["bin_max"], "binContains": a["bin_contains"],
                     "qualifyingTokenIndex": a["qualifying_token_index"]})
    neuron = {"modelId": src.model_id, "layer": src.source_id, "index": index, "creatorId": src.creator_id,
              "createdAt": src.created_at, "maxActApprox": max([a["maxValue"] for a in acts], default=0.0),
              "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10,
              "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [],
              **{k: feat[k] for k in FEATURE_KEYS}, "sourceSetName": src.source_set}
    return neuron, acts


def explanation_row(src: Source, index: int, description: str, model: str, notes: str,
                    run: str) -> dict[str, Any]:
    """One `Explanation` row: the description, its explainer model, and how it was made and scored."""
    return {"id": row_id(src.model_id, src.source_id, str(index), run), "modelId": src.model_id,
            "layer": src.source_id, "index": str(index), "description": description,
            "authorId": src.creator_id, "triggeredByUserId": None, "notes": notes, "typeName": None,
            "explanationModelName": model, "createdAt": src.created_at}


def model_type_row(model: str, creator_name: str) -> dict[str, Any]:
    """An `ExplanationModelType` row for an explainer model Neuronpedia may not know yet."""
    return {"name": model, "displayName": model, "description": f"explainer model {model}",
            "featured": False, "url": None, "creatorName": creator_name}
