"""Loading Hugging Face models offline: folders, the hub's failure message, the embedded GGUF."""

from __future__ import annotations

import pytest
import torch

from tools.core.config import UserError
from transformer import hf_load
from transformer.subject_config import SubjectConfig


def _tiny_llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def test_local_folder_loads_with_the_same_logits(tmp_path):
    ref = _tiny_llama(tmp_path / "tiny")
    sc = SubjectConfig(kind="hf", model=str(tmp_path / "tiny")).check()
    model = hf_load.load_causal_lm(sc, tmp_path, "cpu")
    idx = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, ref(idx).logits)
    assert not any(p.requires_grad for p in model.parameters())
    ident = hf_load.model_identity(sc, tmp_path, model)
    assert list(ident["weights"]) == ["model.safetensors"]
    assert len(ident["weights"]["model.safetensors"]) == 64  # a sha256


def test_hub_name_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    sc = SubjectConfig(kind="hf", model="meta-llama/Llama-3.1-8B-Instruct").check()
    with pytest.raises(UserError, match=r"not in the Hugging Face cache.*huggingface-cli download "
                                        r"meta-llama/Llama-3.1-8B-Instruct.*subject.model=") as e:
        hf_load.load_causal_lm(sc, tmp_path, "cpu")
    assert "\n" not in str(e.value)


def test_a_file_or_a_broken_folder_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        hf_load.load_causal_lm(SubjectConfig(kind="hf", model=str(tmp_path / "weights.bin")), tmp_path, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: not a loadable model folder"):
        hf_load.load_causal_lm(SubjectConfig(kind="hf", model=str(tmp_path / "empty")), tmp_path, "cpu")


def test_embedded_gguf_hash_is_checked(monkeypatch):
    e, path = hf_load.embedded_gguf("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setitem(hf_load.EMBEDDED, "smollm2-135m-instruct",
                        hf_load.Embedded(e.dist, e.file, "0" * 64, e.source, e.install))
    with pytest.raises(UserError, match=r"sha256 b179c952\w+, expected 0{64}"):
        hf_load.embedded_gguf("smollm2-135m-instruct")
    with pytest.raises(UserError, match="unknown model 'nope'"):
        hf_load.embedded_gguf("nope")


def test_dtype_auto_is_bf16_on_cuda_only():
    assert hf_load.torch_dtype("auto", "cpu") is torch.float32
    assert hf_load.torch_dtype("auto", "cuda:0") is torch.bfloat16
    assert hf_load.torch_dtype("float16", "cpu") is torch.float16


@pytest.mark.slow
def test_embedded_smollm2_converts_once_and_answers(smollm2_data_dir):
    sc = SubjectConfig(kind="hf", embedded="smollm2-135m-instruct").check()
    folder = hf_load.converted_dir("smollm2-135m-instruct", smollm2_data_dir)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert hf_load.resolve_model_path(sc, smollm2_data_dir) == str(folder)  # no second conversion
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "Apache License" in (folder / "LICENSE").read_text()
    tok = hf_load.load_hf_tokenizer(sc, smollm2_data_dir)
    model = hf_load.load_causal_lm(sc, smollm2_data_dir, "cpu")
    assert tok("Hello world").input_ids == [19556, 905]
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")
