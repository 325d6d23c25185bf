#!/usr/bin/env bash
# GPU check: one script, under 8 minutes on one GPU. Runs the tests marked `cuda`, then prints
# key=value figures: the SAE step at 4096 and 16384 features (dense and trained sparsity, rows/s and
# FLOP utilisation against the device's fp32/bf16 peak), the LM step (tokens/s, MFU), generation
# rows/s against a bare forward, top-activation tokens/s, and the shards-vs-memory ratio.
#
#   bash tools/bench/gpu_check.sh            # everything (needs a CUDA device)
#   GPU_CHECK_DRY=1 bash tools/bench/gpu_check.sh   # print the steps, run nothing (any machine)
#
# Each step has its own time limit; a step that fails or times out prints `<step>=failed` and the
# script goes on, exiting 1 at the end if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled WANDB_SILENT=true

failed=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "# $name (limit ${limit}s): $*"
    [[ -n "${GPU_CHECK_DRY:-}" ]] && return 0
    local t0=$SECONDS
    if timeout "$limit" "$@"; then
        echo "${name}_s=$((SECONDS - t0))"
    else
        echo "${name}=failed"
        failed=1
    fi
}

if [[ -z "${GPU_CHECK_DRY:-}" ]]; then
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device visible to torch" >&2
        exit 2
    fi
    python - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu={p.name.replace(' ', '_')} gpu_mem_gib={p.total_memory / 2**30:.0f} torch={torch.__version__} "
      f"cuda={torch.version.cuda}")
EOF
fi

# 1. the CUDA tests (autocast, pinned memory, bf16 feature pass) and the rest of the shard tests
step cuda_tests 240 python -m pytest -q -p no:cacheprovider -m cuda tests

# 2. SAE step: 4096 and 16384 features, dense and trained sparsity, against the bf16/fp32 peak
step sae_step 120 python -m tools.bench.sae_step --device cuda --features 4096,16384 \
    --sparsity dense,trained --batch 4096 --steps 10 --warmup 3 --no-shards

# 3. LM step: a short transformer.train on random tokens, bf16 autocast; tokens/s and MFU
step lm_step 120 python - <<'EOF'
import json, tempfile
from pathlib import Path

import numpy as np

from transformer import train
from tools.core.config import compose

root = Path(tempfile.mkdtemp(prefix="gpu-check-lm-"))
folder = root / "data" / "random"
folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for split, n in (("train", 4_000_000), ("val", 200_000)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(folder / f"{split}.bin")
(folder / "meta.json").write_text(json.dumps({
    "format": "monosemantic.tokens/1", "tokenizer": "random", "vocab_size": 50257, "eot_id": 50256,
    "dtype": "uint16", "tokens": {"train": 4_000_000, "val": 200_000}, "unigram_entropy_nats": 10.8,
    "config_hash": "random"}))
out = train.run(compose([f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", "data.name=random",
                         "device=cuda", "wandb.mode=disabled", "transformer.n_layer=4",
                         "transformer.n_embd=512", "transformer.n_head=8", "transformer.block_size=1024",
                         "transformer.batch_size=16", "transformer.max_steps=40", "transformer.eval_interval=40",
                         "transformer.eval_batches=2", "transformer.checkpoint_interval=1000",
                         "transformer.warmup_steps=5"]))
print(f"lm_tokens_per_s={out['tokens_per_s']:.0f} lm_mfu={out['mfu']:.3f} lm_params={out['params']} "
      f"lm_peak_tflops={out['peak_flops'] / 1e12:.0f} lm_peak_source={out['peak_flops_source']}")
EOF

# 4. activation generation against a bare forward over the same batches
step generate 90 python -m tools.bench.generate --device cuda --contexts 4096 --batch-contexts 256

# 5. the top-activation pass (bf16 forward as the feature stage runs it on CUDA)
step top_activations 90 python -m tools.bench.top_activations --device cuda --features 16384 \
    --tokens 2097152 --batch-tokens 65536

# 6. the trainer fed from verified shards vs from memory (goal >= 0.95)
step loader 90 python -m tools.bench.loader --device cuda --rows 2000000 --rows-per-shard 500000 \
    --steps 100 --batch-size 4096

# 7. exemplars for every MLP neuron: one pass over all layers vs one layer per run, Transluce's loop and a
#    bare forward (SmolLM2, converted into a scratch data_dir), then all 32 layers of a random model with
#    Llama-3.1-8B's shapes in bf16, with the projected hours for 1M x 95 tokens on 1 and 8 GPUs
EXDATA="${TMPDIR:-/tmp}/gpu_check_smollm2"
step exemplars_smollm2 150 bash -c "python -c \"from transformer.hf_load import convert_embedded; \
convert_embedded('smollm2-135m-instruct', '$EXDATA')\" && python -m tools.bench.exemplars --device cuda \
--data-dir '$EXDATA' --contexts 2048 --context-len 95 --batch-tokens 48640"
step exemplars_llama8b 150 python -m tools.bench.exemplars --device cuda --random-llama-8b --skip b,c \
    --contexts 1024 --context-len 95 --batch-tokens 24320

echo "gpu_check_failed=$failed"
exit "$failed"
