"""`python -m tsq_vllm.quantize`: quantize a causal LM and write a GPTQ-compatible checkpoint.

    python -m tsq_vllm.quantize --model smollm2 --bits 3 --group-size 64 --output ./smollm2-tsq-int3

Exit status: 0 only when the complete checkpoint is in place; 2 for bad input (one line on
stderr, checked before any model weights are read); 1 when quantizing or writing fails. On any
failure nothing is left at --output, and an existing checkpoint there is kept. Ctrl-C exits 130,
SIGTERM 143, both keeping the finished decoder layers for --resume and printing the command that
resumes; --debug adds the traceback to a failure's one line.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from .heap import return_freed_memory
from .options import QuantizeOptions, flag_of
from .run import Resumable, UsageError, run_quantization

__all__ = ["build_parser", "main", "parse_options"]

PROG = "python -m tsq_vllm.quantize"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI, generated from `QuantizeOptions` so every flag is a field and shares its help."""
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, default, meta in QuantizeOptions.field_specs():
        flag = flag_of(name, default)
        if isinstance(default, bool):
            # SUPPRESS: an absent switch leaves the field's own default, and --help does not print
            # "(default: True)" next to --no-stage1, which would read as "stage 1 is off".
            p.add_argument(
                flag,
                dest=name,
                action="store_false" if default else "store_true",
                default=argparse.SUPPRESS,
                help=meta["help"],
            )
            continue
        kind = float if isinstance(default, float) else int if isinstance(default, int) else str
        choices = meta.get("choices")
        # Choices are checked by QuantizeOptions, whose message names the fix; argparse's would not.
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else None
        p.add_argument(
            flag, dest=name, type=kind, default=default, metavar=metavar, help=meta["help"]
        )
    p.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="on failure, print the full traceback before the one-line error",
    )
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so the writer cleans up; exits 128 + the signal number."""


def _interrupt(signum: int, _frame: Any) -> NoReturn:
    raise _Terminated(signum)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _failure(e: BaseException, output: str) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (
            f"No space left on device while writing --output {output!r}: free some space or pick "
            "another path"
        )
    return _one_line(e)


def parse_options(argv: Sequence[str] | None = None) -> tuple[QuantizeOptions, bool]:
    """The command line as options, and whether --debug was given (it is not an option of the
    quantization itself). Benchmarks build their runs through this, so they parse as the CLI does.
    """
    args = vars(build_parser().parse_args(argv))
    debug = args.pop("debug")
    return QuantizeOptions(**args), debug


def _kept(e: BaseException, argv: Sequence[str] | None) -> str:
    """What an interrupted run left: nothing, or finished layers and the command that resumes."""
    kept: Resumable | None = getattr(e, "resumable", None)
    if kept is None:
        return "nothing was written"
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    return (
        f"{kept.done} of {kept.total} decoder layers are done and kept in {kept.directory}; "
        f"resume with: {PROG} {shlex.join(args)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        opts, debug = parse_options(argv)
    except ValueError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keeps a bad-input run to the one error line
    return_freed_memory()  # else peak RSS grows with every decoder layer (glibc's heap)
    # A plain `kill` should clean up like Ctrl-C does: the writer removes its partial directory.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # SIGINT raises KeyboardInterrupt (keep the finished layers, print the resume command) even
    # when the parent started us with SIGINT ignored, as a non-interactive shell's `cmd &` does.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with logging_redirect_tqdm():
            s = run_quantization(opts, progress=True).summary
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        word = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"{PROG}: {word}; {_kept(e, argv)}", file=sys.stderr)
        if isinstance(e, _Terminated):
            return 128 + int(e.args[0] if e.args else signal.SIGTERM)
        return 130
    except Exception as e:  # anything else is still one line; --debug shows where it came from
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_failure(e, opts.output)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    print(
        f"wrote {s['output']}: {s['linears']} linears, {s['bytes'] / 2**20:.1f} MiB, "
        f"{s['tokens']} calibration tokens; load {s['load_seconds']:.0f}s, quantize "
        f"{s['quantize_seconds']:.0f}s, write {s['write_seconds']:.0f}s, total "
        f"{s['total_seconds']:.0f}s; peak RSS {s['peak_rss_mib']:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
