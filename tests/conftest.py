"""Shared test set-up: W&B never touches the network or prints, and shared settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")



@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than a thread pool on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_data_dir(tmp_path_factory) -> Path:
    """A data_dir holding the embedded SmolLM2-135M-Instruct, converted once per test session
    (~40-70 s). MONOSEMANTIC_TEST_DATA_DIR names a folder to keep the conversion across sessions."""
    from transformer.hf_load import convert_embedded

    keep = os.environ.get("MONOSEMANTIC_TEST_DATA_DIR")
    data_dir = Path(keep) if keep else tmp_path_factory.mktemp("smollm2")
    convert_embedded("smollm2-135m-instruct", data_dir)
    return data_dir


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run tools/bench/gpu_check.sh on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def browser():
    """A headless Debian chromium (playwright), skipped with the reason where either is missing."""
    from tests.helpers.browser import ARGS, CHROMIUM

    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()
