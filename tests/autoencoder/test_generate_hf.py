"""Activation generation on a tiny Hugging Face model saved to a folder: several hook points per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autoencoder import generate, scatter, shard_check
from tools.core.config import UserError, compose
from tools.core.files import write_json
from tools.core.layout import RunLayout
from transformer.subject import SubjectSpec
from transformer.subject_load import load_subject

C, T, B, L, V = 24, 8, 8, 16, 96  # contexts, tokens per context, contexts per batch, context length, vocab


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("genhf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=L)
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny-llama")
    tokens = np.random.default_rng(0).integers(0, V, 4000)
    for name, dtype in (("tiny", np.uint16), ("tiny32", np.uint32)):
        data = root / "data" / f"{name}--tiny-llama"  # an HF subject's own token folder
        data.mkdir(parents=True)
        tokens.astype(dtype).tofile(data / "train.bin")
        write_json(data / "meta.json", {"format": "monosemantic.tokens/1", "tokenizer": "test",
                                        "vocab_size": V, "dtype": np.dtype(dtype).name})
    return root


def make_cfg(world: Path, run: str, *extra: str, data: str = "tiny"):
    return compose([f"run_dir={world / run}", f"data_dir={world / 'data'}", f"data.name={data}", "device=cpu",
                    "subject=hf", f"subject.model={world / 'tiny-llama'}", f"activations.contexts={C}",
                    f"activations.tokens_per_context={T}", "activations.rows_per_shard=100",
                    "activations.resample_rows=50", f"activations.batch_contexts={B}", *extra])


def rows_of(directory: Path) -> np.ndarray:
    m = shard_check.read_manifest(directory)
    return np.concatenate([np.load(directory / s["file"]) for s in m["shards"]])


def test_several_hooks_in_one_run(world):
    hooks = ["blocks.0.mlp.hook_post", "blocks.2.mlp.hook_post"]
    cfg = make_cfg(world, "multi", "activations.layers=[2,0]")
    out = generate.run(cfg)
    assert set(out["hooks"]) == set(hooks) and out["rows"] == C * T
    base = Path(cfg.run_dir) / "activations" / "train"
    for h in hooks:
        m = shard_check.read_manifest(base / h, d_in=24)
        assert m["hook_name"] == h and m["hook"] == "neurons" and m["layer"] == int(h.split(".")[1])
        assert m["model"]["kind"] == "hf" and m["model"]["architecture"] == "llama"
        assert m["model"]["name"].endswith("tiny-llama")
        assert len(m["model"]["weights"]["model.safetensors"]) == 64  # a sha256
        assert shard_check.verify_shards(base / h)["ok"]
        assert RunLayout.of(cfg).activations("train", h) == base / h
    with pytest.raises(UserError, match=r"no activations of blocks.1.mlp.hook_post .*found: blocks.0"):
        RunLayout.of(cfg).activations("train", "blocks.1.mlp.hook_post")
    assert generate.done(cfg) and generate.run(cfg)["seconds"] == 0.0

    # every row is the subject's own capture, and row i of both hooks is the same token
    subject = load_subject(cfg, "cpu")
    tokens = np.fromfile(world / "data" / "tiny--tiny-llama" / "train.bin", dtype=np.uint16)
    plan = scatter.ContextPlan(int(cfg.seed), "train", len(tokens), L, T)
    starts, pos = plan.get(0, C)
    got = subject.capture(torch.from_numpy(tokens[starts[:, None] + np.arange(L)].astype(np.int64)), hooks)
    want = {h: torch.gather(v, 1, torch.from_numpy(pos)[:, :, None].expand(-1, -1, 24)).reshape(-1, 24)
            .half().numpy() for h, v in got.items()}
    pair = {a.tobytes(): b.tobytes() for a, b in zip(*want.values(), strict=True)}
    a, b = rows_of(base / hooks[0]), rows_of(base / hooks[1])
    assert sorted(r.tobytes() for r in a) == sorted(pair)
    assert [pair[r.tobytes()] for r in a] == [r.tobytes() for r in b]


def test_one_hook_keeps_the_split_folder_and_uint32_tokens_read_the_same(world):
    a = make_cfg(world, "one16", "activations.hook=resid_post", "activations.layers=[1]")
    b = make_cfg(world, "one32", "activations.hook=resid_post", "activations.layers=[1]", data="tiny32")
    generate.run(a)
    generate.run(b)
    ma = shard_check.read_manifest(Path(a.run_dir) / "activations" / "train", d_in=16)
    mb = shard_check.read_manifest(Path(b.run_dir) / "activations" / "train")
    assert ma["hook_name"] == "blocks.1.hook_resid_post"
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def test_layers_all(world):
    cfg = make_cfg(world, "all", "activations.hook=mlp_out", "activations.layers=all",
                   "activations.contexts=8", "activations.resample_rows=0")
    out = generate.run(cfg)
    assert sorted(out["hooks"]) == [f"blocks.{i}.hook_mlp_out" for i in range(3)]


@pytest.mark.parametrize("override, match", [
    ("activations.layers=[1,7]", r"layer\(s\) \[7\] do not exist; .*tiny-llama has 3 layers \(0..2\)"),
    ("activations.hook=attn", "activations.hook`='attn': expected resid_pre | resid_mid | mlp_in | neurons "
                              r"| mlp_out | resid_post or a list of them"),
    ("activations.hook=[mlp_in,attn]", r"activations.hook`=\['mlp_in', 'attn'\]: expected"),
    ("activations.layers=[]", "activations.layers`=\\[\\]: expected a list"),
    ("activations.layers=some", "expected a list of layers"),
])
def test_bad_hooks_are_named(world, override, match):
    with pytest.raises(UserError, match=match):
        generate.run(make_cfg(world, "bad", override))


def test_transcoder_hooks_are_written_paired(world):
    from autoencoder.paired import check_paired

    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    cfg = make_cfg(world, "pair", "activations.hook=[mlp_in,mlp_out]", "activations.layers=[1]")
    out = generate.run(cfg)
    assert list(out["hooks"]) == hooks
    base = Path(cfg.run_dir) / "activations" / "train"
    ms = [shard_check.read_manifest(base / h, d_in=16) for h in hooks]
    assert [m["hook"] for m in ms] == ["mlp_in", "mlp_out"] and ms[0]["rows_key"] == ms[1]["rows_key"]
    assert check_paired(base / hooks[0], base / hooks[1]) == C * T
    # row i of both folders is the same token: the MLP maps the input row to the output row
    subject = load_subject(cfg, "cpu")
    mlp = subject.model.model.layers[1].mlp
    a, b = rows_of(base / hooks[0]), rows_of(base / hooks[1])
    with torch.no_grad():
        mapped = mlp(torch.from_numpy(a[:20]).float()).numpy()
    np.testing.assert_allclose(mapped, b[:20].astype(np.float32), rtol=2e-2, atol=2e-3)
    # and each row is the direct capture of its token
    tokens = np.fromfile(world / "data" / "tiny--tiny-llama" / "train.bin", dtype=np.uint16)
    starts, pos = scatter.ContextPlan(int(cfg.seed), "train", len(tokens), L, T).get(0, C)
    got = subject.capture(torch.from_numpy(tokens[starts[:, None] + np.arange(L)].astype(np.int64)), hooks)
    want = [torch.gather(got[h], 1, torch.from_numpy(pos)[:, :, None].expand(-1, -1, 16)).reshape(-1, 16)
            .half().numpy() for h in hooks]
    index = {r.tobytes(): i for i, r in enumerate(want[0])}
    for i in range(0, C * T, 37):
        j = index[a[i].tobytes()]
        assert want[1][j].tobytes() == b[i].tobytes()
    # a folder from another seed shares no rows
    other = make_cfg(world, "pair-seed", "activations.hook=[mlp_in,mlp_out]", "activations.layers=[1]",
                     "seed=7")
    generate.run(other)
    theirs = Path(other.run_dir) / "activations" / "train" / hooks[1]
    with pytest.raises(UserError, match=rf"{base / hooks[0]} and {theirs} do not hold the same rows "
                                        r"\(seed \d+ vs 7\)"):
        check_paired(base / hooks[0], theirs)
    # nor one written with another batch size (another scatter order)
    other = make_cfg(world, "pair-batch", "activations.hook=mlp_out", "activations.layers=[1]",
                     "activations.batch_contexts=4")
    generate.run(other)
    theirs = Path(other.run_dir) / "activations" / "train"
    with pytest.raises(UserError, match=r"do not hold the same rows \(rows_key differs"):
        check_paired(base / hooks[0], theirs)


def test_parallel_neox_has_no_resid_mid(world, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=L, use_parallel_residual=True)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    run = make_cfg(world, "neox", "activations.hook=[resid_mid]", f"subject.model={tmp_path / 'neox'}")
    with pytest.raises(UserError, match=r"activations.hook`: .*neox has no resid_mid hook point "
                                        r"\(use_parallel_residual.*\); it has: resid_pre \| mlp_in"):
        generate.run(run)


def test_out_of_memory_names_the_setting(world, monkeypatch):
    from transformer.hf_subject import HFSubject

    def oom(self, idx, hooks):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(HFSubject, "capture", oom)
    with pytest.raises(UserError, match=r"out of memory .* 8 contexts x 16 tokens.*lower "
                                        r"activations.batch_contexts \(now 8\)"):
        generate.run(make_cfg(world, "oom"))


def test_tokens_from_another_tokenizer_are_named(tmp_path):
    spec = SubjectSpec({"name": "gpt"}, 1, 64, 512, tokenizer_fingerprint="a" * 64)
    same = {"tokenizer": "gpt2", "tokenizer_info": {"fingerprint": "a" * 64}, "vocab_size": 500}
    spec.check_tokens(same, tmp_path)
    with pytest.raises(UserError, match=r"prepared with tokenizer 'smollm2' \(fingerprint bbbbbbbbbbbb\).*"
                                        "rerun transformer.prepare"):
        spec.check_tokens({"tokenizer": "smollm2", "tokenizer_info": {"fingerprint": "b" * 64}}, tmp_path)
    with pytest.raises(UserError, match="vocab_size 49152 exceeds the subject's 512"):
        spec.check_tokens({"vocab_size": 49152}, tmp_path)


def test_gpt_subject_checks_the_fingerprint_it_was_trained_on(tmp_path):
    from transformer.model import GPT, GPTConfig, save_model

    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_embd=16, n_head=2))
    trained_on = {"tokenizer": "gpt2", "tokenizer_info": {"fingerprint": "c" * 64}}
    save_model(model, tmp_path / "run" / "transformer", {"tokens": trained_on})
    data = tmp_path / "data" / "d"
    data.mkdir(parents=True)
    np.zeros(100, np.uint16).tofile(data / "train.bin")
    write_json(data / "meta.json", {"tokenizer": "other", "tokenizer_info": {"fingerprint": "d" * 64}})
    cfg = compose([f"run_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}", "data.name=d",
                   "activations.tokens_per_context=4"])
    with pytest.raises(UserError, match="meta.json: tokens were prepared with tokenizer 'other'"):
        generate.run(cfg)
