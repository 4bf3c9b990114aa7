"""Inputs of the checkpoint suite: a tiny model and a checkpoint `python -m tsq_vllm.quantize`
wrote.

The fixtures are the bad-input suite's (tests/reliability/conftest.py), registered here too so
both suites corrupt copies of a checkpoint written the same way.
"""

from tests.reliability.conftest import _one_thread, ckpt, tiny, written  # noqa: F401  (fixtures)
