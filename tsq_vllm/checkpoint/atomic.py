"""The --output directory: what may be replaced, the temporary siblings, their cleanup.

User data is never deleted: `--overwrite` replaces only an empty directory or a checkpoint this
tool wrote (its `tsq_manifest.json` lists every file, and nothing else is there), and never the
source model, the working directory or a directory around either. The writer works in a hidden
`.NAME.<pid>.<hex>.partial` sibling holding a `.tsq-partial` marker with its pid, so a later run
can tell a partial left by a killed process (marker, dead pid) from anything else. Such a partial
is removed by the next run, unless it is resumable (its `tsq_journal.json` lists finished decoder
layers, see `checkpoint.journal`): that one may hold hours of work, so it is kept and reported
until a `--resume` consumes it or the user deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "MANIFEST_NAME",
    "PARTIAL_MARKER",
    "JOURNAL_NAME",
    "partial_siblings",
    "claim_partial",
    "owner_alive",
    "resumable_layers",
    "check_output",
    "check_writable",
    "new_sibling",
    "write_manifest",
    "normal_permissions",
    "replace_dir",
    "remove_stale_partials",
]

logger = logging.getLogger("tsq_vllm.checkpoint")

MANIFEST_NAME = "tsq_manifest.json"
PARTIAL_MARKER = ".tsq-partial"
JOURNAL_NAME = "tsq_journal.json"  # the per-layer journal (checkpoint.journal) of a run
# What checkpoints written before the manifest existed hold; they are recognised by their
# quantize_config.json saying quant_method "tsq" and holding nothing outside this list.
_LEGACY_NAMES = re.compile(
    r"(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|quantize_config\.json|"
    r"generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|vocab\.json|merges\.txt|"
    r"added_tokens\.json|chat_template\.(jinja|json)|tokenizer\.model)"
)


def _tool_written(d: Path) -> bool:
    """True if every entry of directory `d` is a file this tool's writer put there."""
    entries = list(d.iterdir())
    if any(not e.is_file() or e.is_symlink() for e in entries):
        return False
    names = {e.name for e in entries}
    try:
        listed = json.loads((d / MANIFEST_NAME).read_text())["files"]
        return isinstance(listed, list) and names <= {*map(str, listed), MANIFEST_NAME}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        legacy = json.loads((d / "quantize_config.json").read_text()).get("quant_method") == "tsq"
    except (OSError, ValueError, AttributeError):
        return False
    return legacy and all(_LEGACY_NAMES.fullmatch(n) for n in names)


def check_output(output: Path, overwrite: bool, protected: Iterable[Path] = ()) -> None:
    """Refuse an --output that is, holds or lies inside a `protected` directory (the source model),
    the working directory or one of its ancestors, and an existing one unless --overwrite may
    replace it (empty, or a checkpoint this tool wrote)."""
    out = Path(output).expanduser().resolve()
    shown = str(output)
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(
            f"--output {shown!r} is the working directory or one of its parents: a checkpoint "
            f"needs a directory of its own; name a new one such as ./model-tsq"
        )
    for p in protected:
        src = Path(p).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ValueError(
                f"--output {shown!r} is, contains or lies inside the source model directory "
                f"{str(src)!r}: the source must stay untouched; write to a separate directory"
            )
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ValueError(
            f"--output {shown!r} already exists: pass --overwrite to replace it or pick another "
            "path"
        )
    if out.is_symlink() or not out.is_dir():
        raise ValueError(
            f"--output {shown!r} is a file, not a directory: remove it or pick another path"
        )
    if any(out.iterdir()) and not _tool_written(out):
        raise ValueError(
            f"--output {shown!r} holds files this tool did not write: --overwrite replaces only "
            f"an empty directory or a tsq checkpoint; move them away or pick another path"
        )


def check_writable(output: Path) -> None:
    """Fail now, not after quantizing, if the temporary sibling of `output` cannot be created."""
    parent = Path(output).expanduser().absolute().parent
    anchor = parent
    while not anchor.exists():
        anchor = anchor.parent
    probe = anchor / f".tsq-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as e:
        raise ValueError(
            f"--output {str(output)!r} cannot be written ({e.strerror or e} at {anchor}): pick a "
            f"writable location"
        ) from None
    probe.rmdir()


def new_sibling(path: Path, tag: str) -> Path:
    """A new, hidden, uniquely named directory beside `path` (same filesystem, so renames are
    atomic).

    A "partial" one gets the marker that lets `remove_stale_partials` recognise it after a crash.
    """
    # mkdir (unlike mkdtemp) honours the umask, so the finished checkpoint gets ordinary
    # permissions.
    d = _sibling_path(path, tag)
    d.mkdir()
    if tag == "partial":
        (d / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
    return d


def _sibling_path(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}"


def _partial_pattern(output: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(output.name)}\.(\d+)\.[0-9a-f]{{8}}\.partial")


def partial_siblings(output: Path) -> list[Path]:
    """The partial directories of `output` (named like ours and holding the marker), any pid."""
    out = Path(output).expanduser().absolute()
    if not out.parent.is_dir():
        return []
    pattern = _partial_pattern(out)
    return [
        d
        for d in sorted(out.parent.iterdir())
        if pattern.fullmatch(d.name)
        and not d.is_symlink()
        and d.is_dir()
        and (d / PARTIAL_MARKER).is_file()
    ]


def owner_alive(directory: Path) -> bool:
    """True if another running process owns a partial directory (its marker names a live pid
    other than ours: an earlier run interrupted in this same process may be taken over)."""
    try:
        pid = int((directory / PARTIAL_MARKER).read_text().strip())
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and _alive(pid)


def claim_partial(directory: Path) -> Path:
    """Rename a partial directory of a dead run to this process's name and pid, marker too."""
    m = re.fullmatch(r"\.(.+)\.\d+\.[0-9a-f]{8}\.partial", directory.name)
    assert m, directory
    output = directory.parent / m.group(1)
    fresh = _sibling_path(output, "partial")
    os.replace(directory, fresh)
    (fresh / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
    return fresh


def write_manifest(directory: Path) -> None:
    """List the files written so far, and drop the partial marker: the directory is finished."""
    (directory / PARTIAL_MARKER).unlink(missing_ok=True)
    names = sorted(f.name for f in directory.iterdir())
    (directory / MANIFEST_NAME).write_text(json.dumps({"files": names}, indent=2) + "\n")


def normal_permissions(directory: Path) -> None:
    """Give every written file the umask's mode: safetensors creates its files owner-only (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory into place; an old `dst` is removed only after the move."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = new_sibling(dst, "old")
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def resumable_layers(directory: Path) -> int:
    """How many finished layers the journal in partial `directory` lists (0: none, no journal)."""
    try:
        layers = json.loads((directory / JOURNAL_NAME).read_text()).get("layers")
    except (OSError, ValueError, AttributeError):
        return 0
    return len(layers) if isinstance(layers, list) else 0


def remove_stale_partials(output: Path) -> list[Path]:
    """Remove the partial siblings of `output` left by killed runs (marker present, pid dead),
    except resumable ones (a journal listing finished layers): those are kept and reported with
    how to resume or remove them, since they may hold hours of work the user wants."""
    out = Path(output).expanduser().absolute()
    pattern = _partial_pattern(out)
    removed, kept = [], []
    for d in partial_siblings(out):
        m = pattern.fullmatch(d.name)
        assert m is not None
        try:
            pid = int((d / PARTIAL_MARKER).read_text().strip())
        except (OSError, ValueError):
            continue  # an unreadable marker: not provably ours, so kept
        if pid != int(m.group(1)) or _alive(pid):
            continue
        done = resumable_layers(d)
        if done:
            kept.append(f"{d} ({done} decoder layer(s) done)")
            continue
        shutil.rmtree(d)
        removed.append(d)
    if removed:
        logger.warning(
            "removed %d partial checkpoint(s) left by killed runs: %s",
            len(removed),
            ", ".join(str(d) for d in removed),
        )
    if kept:
        logger.warning(
            "kept %d interrupted run(s) of this --output that can be resumed: %s; rerun the same "
            "command with --resume to continue, or delete the directory",
            len(kept),
            ", ".join(kept),
        )
    return removed
