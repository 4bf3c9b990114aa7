"""`python -m tsq_vllm.eval`: perplexity, FP and quantized checkpoints through one command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import make_tiny_model, single_thread
from tsq_vllm.eval import main, perplexity

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2")


def test_perplexity_is_the_mean_next_token_nll(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ids = torch.randint(0, 384, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = [float(model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss) for i in range(3)]
    res = perplexity(model, ids, batch_size=2)
    assert res["tokens"] == 3 * 39
    assert res["nll"] == pytest.approx(sum(hf) / 3, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]))


def test_fp_and_quantized_checkpoints_go_through_the_same_command(tiny, tmp_path, capsys):
    from tsq_vllm.quantize.options import QuantizeOptions
    from tsq_vllm.quantize.run import run_quantization

    calib = f"text:{tiny}/calib.txt"
    q8 = run_quantization(
        QuantizeOptions(
            model=str(tiny),
            output=str(tmp_path / "q8"),
            calib=calib,
            bits=8,
            group_size=32,
            nsamples=4,
            seqlen=64,
            clip_points=10,
        )
    ).output
    q2 = run_quantization(
        QuantizeOptions(
            model=str(tiny),
            output=str(tmp_path / "q2"),
            calib=calib,
            bits=2,
            group_size=32,
            nsamples=4,
            seqlen=64,
            clip_points=10,
        )
    ).output
    results = {}
    for name, path in (("fp", tiny), ("q8", q8), ("q2", q2)):
        out = tmp_path / f"{name}.json"
        assert (
            main(
                [
                    "--model",
                    str(path),
                    "--data",
                    calib,
                    "--seqlen",
                    "64",
                    "--max-tokens",
                    "1024",
                    "--output-json",
                    str(out),
                ]
            )
            == 0
        )
        results[name] = json.loads(out.read_text())
        line = capsys.readouterr().out
        assert line.count("\n") == 1 and f"ppl {results[name]['ppl']:.4f}" in line
    assert [results[n]["kind"] for n in ("fp", "q8", "q2")] == ["fp", "tsq", "tsq"]
    assert results["q2"]["quantization_config"]["bits"] == 2
    assert all(r["tokens"] == 16 * 63 and r["windows"] == 16 for r in results.values())
    # 8-bit is nearly lossless; 2-bit on a random model is not: the quantized weights really are
    # used.
    assert abs(results["q8"]["nll"] - results["fp"]["nll"]) < 0.01
    assert abs(results["q2"]["nll"] - results["fp"]["nll"]) > 0.01


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--data", "wiki"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["--model", str(tmp_path), "--seqlen", "1"]) == 2
    assert "--seqlen 1 must be at least 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,expected", [(None, "float32"), ("auto", "float16"), ("bfloat16", "bfloat16")]
)
def test_eval_computes_in_float32_unless_told_whatever_the_config_declares(
    tiny, tmp_path, flag, expected
):
    """A checkpoint whose config says float16 (AutoRound writes that) is measured in float32 by
    default, like every other row of a comparison; --dtype auto keeps the declared dtype."""
    from transformers import AutoModelForCausalLM

    fp16 = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(tiny).to(torch.float16).save_pretrained(fp16)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (fp16 / f).write_bytes((tiny / f).read_bytes())
    out = tmp_path / "r.json"
    args = ["--model", str(fp16), "--data", f"text:{tiny}/calib.txt", "--seqlen", "32"]
    args += ["--max-tokens", "64", "--output-json", str(out)]
    assert main(args + (["--dtype", flag] if flag else [])) == 0
    assert json.loads(out.read_text())["dtype"] == expected
