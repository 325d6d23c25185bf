"""Sparse autoencoders: training, checkpoints, and `load_dictionary` for dictionaries of any format."""

from typing import Any

__all__ = ["load_dictionary"]


def __getattr__(name: str) -> Any:
    if name == "load_dictionary":
        from autoencoder.dictionaries import load_dictionary

        return load_dictionary
    raise AttributeError(f"module 'autoencoder' has no attribute {name!r}")
