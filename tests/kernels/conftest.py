"""Kernel tests run the Triton kernels in the interpreter on CPU tensors.

Triton reads TRITON_INTERPRET when `@triton.jit` runs, i.e. when tsq_vllm.kernels.triton_kernels
is first imported, so it is set here just for that import and then restored: the rest of the
test session (the vLLM servers of tests/serve above all) must not inherit it.
"""

import os

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import tsq_vllm.kernels.bcq_triton  # noqa: E402,F401  (the BCQ kernel, likewise)
import tsq_vllm.kernels.triton_kernels  # noqa: E402,F401  (builds the interpreted kernels)

if _saved is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _saved

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tk():
    """The Triton kernel module, checked to be interpreted."""
    from tsq_vllm.kernels import triton_kernels

    if not triton_kernels.is_interpreted():
        pytest.fail(
            "tsq_vllm.kernels.triton_kernels was imported before tests/kernels/conftest.py set "
            "TRITON_INTERPRET=1; run `pytest tests/kernels` on its own"
        )
    return triton_kernels


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Triton also consults TRITON_INTERPRET while an interpreted kernel runs: set it per test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
