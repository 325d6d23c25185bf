"""The in-process LLM backend (describe=local) on a tiny random Llama saved to a folder: every code
path fast (chat explainer, all-at-once simulator with its cached prompt head, label checks, bad
input). The embedded SmolLM2 runs in one slow test on planted units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from tools.core.config import UserError, compose, section
from tools.describe import stage
from tools.describe.allatonce import AllAtOnceSimulator
from tools.describe.config import DescribeConfig
from tools.describe.local import LocalLM, LocalModelConfig, label_ids
from tools.describe.synthetic import WORDS, fires_after, fires_on, write_features

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tiny_llama(folder: Path, chat_template: str | None = CHAT) -> Path:
    """A 2-layer random Llama and a byte-level BPE whose digits are single tokens (as in Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["".join(WORDS) * 3,
              "Explanation: the unit fires on the token unknown 0 1 2 3 4 5 6 7 8 9 10\t\n",
              "We study units of a language model. Activations: <start> <end>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def read_records(folder: Path) -> list[dict]:
    return [json.loads(ln) for ln in (folder / "descriptions.jsonl").read_text().splitlines()]


def local_cfg(run_dir: Path, model: Path, *overrides: str):
    return compose([f"run_dir={run_dir}", "describe=local", "describe.embedded=null",
                    f"describe.model={model}", "describe.site=false", "describe.explain_max_tokens=12",
                    "describe.threads=1", *overrides])


def test_all_at_once_equals_a_plain_forward_and_counts_forwards(tiny):
    lm = LocalLM(LocalModelConfig(model=str(tiny), batch_tokens=64))
    sim = AllAtOnceSimulator(lm)
    assert sim.labels == [str(i) for i in range(10)]  # "10" is two tokens here, so 0-9
    contexts = [[" the", " king", " is", " good"], [" thy", " love"], [" a", " lord", ",", " sweet", "."]]
    out = sim('the token " king"', contexts)
    assert out.mode == "all_at_once" and [len(p) for p in out.preds] == [4, 2, 5]
    head = sim._head('the token " king"')
    for strs, pred in zip(contexts, out.preds, strict=True):  # no cache, no padding, no batching
        body, slots = sim.body(strs)
        with torch.inference_mode():
            logits = lm.model(torch.tensor([head + body])).logits[0]
        probs = torch.softmax(logits[[len(head) + s for s in slots]][:, sim.ids], -1)
        assert torch.allclose(probs @ sim.values, torch.tensor(pred), atol=1e-3)
        assert all(body[s + 1:s + 1 + len(sim.slot_ids)] == sim.slot_ids for s in slots)
    # one forward for the shared head, then batches of at most 64 padded body tokens
    assert lm.usage.forwards >= 2 and lm.usage.completion_tokens == 0


def test_labels_must_be_single_tokens(tiny):
    lm = LocalLM(LocalModelConfig(model=str(tiny)))
    with pytest.raises(UserError, match="single token.*'10'"):
        AllAtOnceSimulator(lm, [str(i) for i in range(11)])
    with pytest.raises(UserError, match="at least two"):
        label_ids(lm.tokenizer, ["0"], "\t")
    assert AllAtOnceSimulator(lm, ["0", "5", "9"]).values.tolist() == [0.0, 5.0, 10.0]


def test_local_stage_end_to_end(tmp_path, tiny):
    write_features(tmp_path, "l1", [fires_on(" thou"), fires_after(" the")], extra={" thou": 0.04})
    (tmp_path / "sae/l1").mkdir(parents=True)
    (tmp_path / "sae/l1/cfg.json").write_text("{}")
    figures = stage.run(local_cfg(tmp_path, tiny))
    recs = read_records(tmp_path / "descriptions/l1")
    assert len(recs) == 2
    for r in recs:
        assert r["explainer"] == "llm" and r["model"] == str(tiny)
        if r["status"] == "ok":  # a random model's sentence, scored by the all-at-once simulator
            assert r["simulator_mode"] == "all_at_once" and r["failed_contexts"] == 0
            assert r["scores"]["simulation_all"] is not None
            assert set(r["controls"]) == {"random_description", "shuffled_tokens"}
            assert r["usage"]["forwards"] >= 3 * 2 and r["usage"]["completion_tokens"] >= 1
        else:
            assert r["status"] == "failed" and r["reason"]
    assert figures["simulator_forwards"] >= 2
    assert stage.done(local_cfg(tmp_path, tiny))


def test_local_bad_input(tmp_path, tiny):
    write_features(tmp_path, "l1", [fires_on(" thou")])
    (tmp_path / "sae/l1").mkdir(parents=True)
    (tmp_path / "sae/l1/cfg.json").write_text("{}")
    with pytest.raises(UserError, match="not a loadable model folder|not a local folder"):
        stage.run(local_cfg(tmp_path, tmp_path / "nowhere"))
    no_chat = build_tiny_llama(tmp_path / "nochat", chat_template=None)
    with pytest.raises(UserError, match="no chat template"):
        stage.run(local_cfg(tmp_path, no_chat))
    with pytest.raises(UserError, match="single token"):
        stage.run(local_cfg(tmp_path, tiny, "describe.labels=[0,10]"))
    with pytest.raises(UserError, match="describe.model. or .describe.embedded"):
        section(compose([f"run_dir={tmp_path}", "describe=local", "describe.embedded=null"]), "describe",
                DescribeConfig)


@pytest.mark.slow
def test_smollm2_describes_and_simulates_planted_units(tmp_path, smollm2_data_dir):
    """The embedded SmolLM2-135M-Instruct explains two planted units and its all-at-once simulator
    scores them; the figures are whatever this small model manages, recorded, not tuned for."""
    write_features(tmp_path, "l1", [fires_on(" king"), fires_on(" night")], n_ctx=120)
    (tmp_path / "sae/l1").mkdir(parents=True)
    (tmp_path / "sae/l1/cfg.json").write_text("{}")
    cfg = compose([f"run_dir={tmp_path}", f"data_dir={smollm2_data_dir}", "describe=local",
                   "describe.site=false", "describe.explain_top=6", "describe.explain_per_bin=0",
                   "describe.threads=1", "describe.score_random=4", "describe.score_per_bin=0"])
    stage.run(cfg)
    recs = read_records(tmp_path / "descriptions/l1")
    assert [r["status"] for r in recs] == ["ok", "ok"], [r.get("reason") for r in recs]
    for r in recs:
        assert r["model"] == "smollm2-135m-instruct" and r["simulator_mode"] == "all_at_once"
        assert isinstance(r["description"], str) and r["description"]
        assert r["scores"]["simulation_all"] is not None
    lm = LocalLM(LocalModelConfig(embedded="smollm2-135m-instruct", data_dir=str(smollm2_data_dir)))
    sim = AllAtOnceSimulator(lm)
    assert sim.labels == [str(i) for i in range(10)]  # SmolLM2 splits "10" into "1", "0"
    # A description naming the token: the simulator rates that token above the others
    preds = sim('the word " king"', [[" the", " king", " said", " to", " the", " queen"]]).preds[0]
    assert preds[1] == max(preds)


def test_python_api_one_unit(tiny):
    from tools.describe.api import describe_unit, load_local
    from tools.describe.synthetic import contexts, unit_record

    unit = unit_record(3, contexts(120, 20, seed=1), fires_on(" king"), seed=1, bins=3)
    rec = describe_unit(unit)
    assert rec["status"] == "ok" and '" king"' in rec["description"] and rec["scores"]["simulation_all"] > 0.9
    rec = describe_unit(unit, lm=load_local(model=str(tiny)), explain_max_tokens=8, other="the word x")
    assert rec["index"] == 3 and rec["explainer"] == "llm" and rec["model"] == str(tiny)
    if rec["status"] == "ok":
        assert rec["simulator_mode"] == "all_at_once" and rec["controls"]["random_description"]["from"] == -1


def test_docs_example_runs():
    import subprocess
    import sys

    script = ROOT / "docs" / "describe_one_unit.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('baseline: Fires on " king"')
