"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random source models by name, built once per test module."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_tiny_model(root / "llama", "llama"),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2"),
        "mistral": make_tiny_model(root / "mistral", "mistral"),
        "qwen2-bf16": make_tiny_model(root / "qwen2-bf16", "qwen2", dtype=torch.bfloat16),
    }
