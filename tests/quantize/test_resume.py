"""The per-layer journal and --resume: an interrupted run continues after its last finished layer
and gives the bytes of an uninterrupted run; a resume with other settings is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model, opts_for, single_thread
from tsq_vllm.checkpoint.atomic import JOURNAL_NAME, PARTIAL_MARKER
from tsq_vllm.quantize.__main__ import main
from tsq_vllm.quantize.layer_store import LayerStore
from tsq_vllm.quantize.run import UsageError, run_quantization

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """A tiny random Llama with 4 decoder layers, in two safetensors shards."""
    return make_tiny_model(
        tmp_path_factory.mktemp("deep") / "llama", "llama", layers=4, max_shard_size="400KB"
    )


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def _partials(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.*.partial"))


def _interrupt_after(monkeypatch, k: int) -> None:
    """In-process fault injection: Ctrl-C right after layer k was written to the journal."""
    original = LayerStore.store

    def store(self, i, *args, **kwargs):
        original(self, i, *args, **kwargs)
        if i == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(LayerStore, "store", store)


CASES = {
    "both-stages": dict(bits=3, group_size=32),
    "plain-gptq-act-order": dict(bits=4, act_order=True, stage1=False, stage2=False),
    "no-error-feedback": dict(bits=2, group_size=32, error_feedback=False),
}


@pytest.mark.parametrize("k", [0, 2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_layer_k_gives_the_uninterrupted_bytes(deep, tmp_path, monkeypatch, case, k):
    kw = CASES[case]
    reference = run_quantization(opts_for(deep, tmp_path / "whole", **kw)).output
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, k)
        with pytest.raises(KeyboardInterrupt) as info:
            run_quantization(opts_for(deep, out, **kw))
    kept = info.value.resumable  # type: ignore[attr-defined]
    assert (kept.done, kept.total) == (k + 1, 4) and not out.exists()
    assert _partials(out) == [kept.directory]
    journal = json.loads((kept.directory / JOURNAL_NAME).read_text())
    assert [e["index"] for e in journal["layers"]] == list(range(k + 1))

    job = run_quantization(opts_for(deep, out, resume=True, **kw))
    assert job.summary["resumed_layers"] == k + 1
    assert _digests(out) == _digests(reference)
    assert _partials(out) == [] and not (out / JOURNAL_NAME).exists()


LATER_STAGES = {
    "gptqt-bcq": dict(bits=3, group_size=32, method="gptqt"),
    "lm-head": dict(bits=3, group_size=32, quantize_lm_head=True),
    "refine-block": dict(bits=3, group_size=32, refine_block=2),
}


@pytest.mark.parametrize("case", sorted(LATER_STAGES))
def test_resume_of_the_later_stages_gives_the_uninterrupted_bytes(
    deep, tmp_path, monkeypatch, case
):
    """GPTQT's BCQ layers replay the weight the run continued with (not their fp16-rounded
    decode), refined scales replay as written, and the head is quantized after the resumed stack
    on the replayed streams."""
    kw = LATER_STAGES[case]
    reference = run_quantization(opts_for(deep, tmp_path / "whole", **kw))
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_quantization(opts_for(deep, out, **kw))
    job = run_quantization(opts_for(deep, out, resume=True, **kw))
    assert job.summary["resumed_layers"] == 2
    assert _digests(out) == _digests(reference.output)
    assert job.result.stats.keys() == reference.result.stats.keys()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(bits=4), "was made with bits=3, this one with 4"),
        (dict(seed=1), "was made with seed=0, this one with 1"),
        (dict(nsamples=4), "was made with nsamples=8, this one with 4"),
        (dict(dtype="bfloat16"), "was made with dtype='auto', this one with 'bfloat16'"),
        (dict(method="gptqt"), "was made with method='tsq', this one with 'gptqt'"),
        (dict(refine_block=2), "was made with refine_block=0, this one with 2"),
        (dict(quantize_lm_head=True), "was made with quantize_lm_head=False, this one with True"),
    ],
)
def test_resume_with_other_settings_is_refused_in_one_line(
    deep, tmp_path, monkeypatch, change, message
):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(KeyboardInterrupt):
            run_quantization(opts_for(deep, out, bits=3))
    before = _digests(_partials(out)[0])
    with pytest.raises(UsageError) as info:
        run_quantization(opts_for(deep, out, resume=True, **{"bits": 3, **change}))
    text = str(info.value)
    assert "\n" not in text and message in text and "or without --resume to start over" in text
    assert _digests(_partials(out)[0]) == before  # the interrupted run is left as it was


def test_resume_on_changed_calibration_text_is_refused(deep, tmp_path, monkeypatch):
    text = tmp_path / "calib.txt"
    lines = (deep / "calib.txt").read_text().splitlines()
    text.write_text("\n".join(lines))
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(KeyboardInterrupt):
            run_quantization(opts_for(deep, out, calib=f"text:{text}"))
    text.write_text("\n".join(reversed(lines)))  # same options, other windows
    with pytest.raises(UsageError, match="was calibrated on other token windows than this run"):
        run_quantization(opts_for(deep, out, calib=f"text:{text}", resume=True))


def test_resume_never_takes_the_partial_of_a_running_process(deep, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(KeyboardInterrupt) as info:
            run_quantization(opts_for(deep, out))
    partial = info.value.resumable.directory  # type: ignore[attr-defined]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (partial / PARTIAL_MARKER).write_text(f"{live.pid}\n")  # as if another run owned it
        with pytest.raises(UsageError, match="no interrupted run of --output"):
            run_quantization(opts_for(deep, out, resume=True))
        assert partial.is_dir()
    finally:
        live.kill()
        live.wait()


def test_resume_without_an_interrupted_run_is_refused(deep, tmp_path):
    with pytest.raises(UsageError, match="no interrupted run of --output .* run without --resume"):
        run_quantization(opts_for(deep, tmp_path / "out", resume=True))


def test_a_damaged_layer_file_is_redone(deep, tmp_path, monkeypatch):
    reference = run_quantization(opts_for(deep, tmp_path / "whole")).output
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt) as info:
            run_quantization(opts_for(deep, out))
    layer1 = info.value.resumable.directory / "layer-00001.safetensors"  # type: ignore[attr-defined]
    layer1.write_bytes(layer1.read_bytes()[:-8] + bytes(8))
    job = run_quantization(opts_for(deep, out, resume=True))
    assert job.summary["resumed_layers"] == 1  # layers 1 and 2 were redone
    assert _digests(out) == _digests(reference)


def _cli_args(deep: Path, out: Path) -> list[str]:
    fast = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--clip-points", "20"]
    return ["--model", str(deep), "--calib", f"text:{deep}/calib.txt", "--output", str(out), *fast]


@pytest.mark.parametrize(
    "sig,status,word",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_ctrl_c_and_sigterm_keep_the_layers_and_print_the_resume_command(
    deep, tmp_path, monkeypatch, capsys, sig, status, word
):
    reference = run_quantization(opts_for(deep, tmp_path / "whole")).output
    out = tmp_path / "out"
    original = LayerStore.store

    def store(self, i, *args, **kwargs):
        original(self, i, *args, **kwargs)
        if i == 1:
            os.kill(os.getpid(), sig)

    with monkeypatch.context() as m:
        m.setattr(LayerStore, "store", store)
        code = main(_cli_args(deep, out))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m")]
    assert code == status and len(err) == 1, err  # one line besides the progress bar
    (partial,) = _partials(out)
    assert err[0].startswith(
        f"python -m tsq_vllm.quantize: {word}; 2 of 4 decoder layers are done and kept in "
        f"{partial}; resume with: python -m tsq_vllm.quantize --model "
    )
    command = err[0].split("resume with: python -m tsq_vllm.quantize ")[1].split()
    assert command == [*_cli_args(deep, out), "--resume"]
    assert main(command) == 0
    assert _digests(out) == _digests(reference)


def test_kill_9_then_resume_gives_the_uninterrupted_bytes(deep, tmp_path, capsys, caplog):
    """A real process killed with SIGKILL after its first layers, then --resume (the CLI)."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsq_vllm.quantize", *_cli_args(deep, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            journals = [json.loads(p.read_text()) for p in tmp_path.glob(".out.*/" + JOURNAL_NAME)]
            if any(len(j["layers"]) >= 1 for j in journals):
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    (partial,) = _partials(out)
    assert (partial / PARTIAL_MARKER).read_text().strip() == str(proc.pid)

    # A new run without --resume keeps the dead run's layers and says how to resume them.
    with caplog.at_level("WARNING", logger="tsq_vllm"):
        assert main([*_cli_args(deep, tmp_path / "whole")]) == 0
        assert main([*_cli_args(deep, out), "--overwrite", "--no-stage2"]) == 0
    assert partial.exists()
    said = [r.getMessage() for r in caplog.records if "can be resumed" in r.getMessage()]
    assert said and str(partial) in said[0] and "--resume" in said[0]

    import shutil

    shutil.rmtree(out)  # the --no-stage2 checkpoint: make way for the resumed one
    assert main([*_cli_args(deep, out), "--resume"]) == 0
    assert _digests(out) == _digests(tmp_path / "whole")
    assert _partials(out) == []
