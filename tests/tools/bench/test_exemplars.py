"""The exemplar benchmark's re-implementation of Transluce's loop finds what the one-pass scan finds:
every layer's neurons, the same top-k and bottom-k contexts (tools/bench/exemplars.py's (a) and (c))."""

import numpy as np
import torch

from tests.helpers.subjects import M, N, V, hf_subject, tiny_hf
from tools.bench.exemplars import _same_topk, transluce_layer
from tools.features.config import FeaturesConfig
from tools.features.one_pass import scan_sets
from tools.features.source import Inputs


def test_transluce_loop_finds_the_scans_top_and_bottom_contexts():
    model = hf_subject(tiny_hf("llama"))
    n_ctx, T, k = 40, 16, 6
    tokens = np.random.default_rng(0).integers(0, V, n_ctx * T).astype(np.int64)
    fc = FeaturesConfig(unit="neuron", batch_tokens=8 * T, top_k=k, dtype="float32")
    inps = [Inputs(model, None, layer, tokens, T, n_ctx, M, {}) for layer in range(N)]
    with torch.no_grad():
        sides, _ = scan_sets(inps, fc, 0, "cpu", True)
        batches = [torch.from_numpy(tokens[c * T:(c + 8) * T]).view(-1, T) for c in range(0, n_ctx, 8)]
        for layer, (pos, neg) in enumerate(sides):
            top_v, top_i, bot_v, bot_i = transluce_layer(model, batches, layer, k)
            assert torch.allclose(pos.top_v, top_v.t()) and torch.allclose(neg.top_v, -bot_v.t())
            assert _same_topk(pos.top_v, pos.top_c, top_i.t())
            assert _same_topk(neg.top_v, neg.top_c, bot_i.t())
            # a context list in another order is told apart
            assert not _same_topk(pos.top_v, pos.top_c.flip(1), top_i.t())
