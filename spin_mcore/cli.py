"""``spin-mcore`` command line: one subcommand per stage, each in ``spin_mcore/commands/<name>.py``.

Each command module exposes ``register(subparsers)`` which adds its parser and
sets ``func`` to a callable taking the parsed args and returning an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from pathlib import Path

# Exit statuses: bad input (config, data, paths: the message names what to fix), a failure of the
# program (a rank raised something else, or died), and preemption (state saved, run again).
EXIT_BAD_INPUT = 1
EXIT_FAILURE = 3

# Order is the order shown in --help.
COMMANDS = ("demo", "run", "restem", "rpo", "star", "generate", "train", "eval", "convert", "smoke", "ranks", "plan",
            "report", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spin-mcore",
        description="Self-play fine-tuning (SPIN, Chen et al. 2024) on Megatron-Core. "
        "Configs are YAML; any field can be overridden as section.field=value, anywhere on the line.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback (it is also written to the run directory's error.log)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"spin_mcore.commands.{name}").register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, accepting ``key=value`` overrides and ``--debug`` anywhere on the line.

    argparse stops collecting a positional list at the first option, so ``generate c.yaml --out X
    parallel.tp=2`` would leave ``parallel.tp=2`` unrecognised; such leftovers join the overrides.
    Everything after a literal ``--`` (the command of ``spin-mcore ranks``) is left alone.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    rest = [a for a in extra if a not in overrides]
    if overrides and not hasattr(args, "overrides"):
        rest += overrides
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    args.debug = debug or getattr(args, "debug", False)
    return args


def _report(args, summary: str, trace: str, failure: bool, in_rank: bool) -> None:
    """One line on stderr for an error, and its traceback to stderr with --debug.

    ``in_rank``: a launched rank raised it; its traceback then also goes to
    ``<args.log_dir>/error.log`` (a command sets ``log_dir`` to its run or output directory).
    Input refused before any process started leaves no file behind. ``failure``: the program
    failed (not the input), so the line says where the traceback is.
    """
    path = None
    log_dir = getattr(args, "log_dir", None)
    if trace and log_dir and in_rank:
        from spin_mcore.utils.io import atomic_write_text

        try:
            path = Path(log_dir) / "error.log"
            atomic_write_text(path, f"spin-mcore {args.command}: {summary}\n{trace}")
        except OSError:
            path = None
    where = ""
    if failure and not args.debug:
        where = f" (traceback: {path})" if path else " (--debug shows the traceback)"
    from spin_mcore.launcher import launch_rank

    rank = launch_rank()
    prefix = f"spin-mcore {args.command}: " + (f"rank {rank}: " if rank else "")
    print(f"{prefix}{summary}{where}", file=sys.stderr)
    if args.debug and trace:
        print(trace, file=sys.stderr, end="" if trace.endswith("\n") else "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from spin_mcore.config import USER_ERRORS, ConfigError
    from spin_mcore.launcher import WorkerError, launch_rank, launched, quiet_repeated_warnings
    from spin_mcore.platform import preemption

    if launched():  # srun/torchrun started every rank: each warning once per job, from rank 0
        quiet_repeated_warnings(launch_rank())

    # Resumable commands (set_defaults(preemptible=True)) stop at a step/shard boundary on
    # SIGUSR1/SIGTERM and exit with REQUEUE_EXIT_CODE; the others keep the default handlers.
    handlers = preemption.handled() if getattr(args, "preemptible", False) else contextlib.nullcontext()
    try:
        with handlers:
            return int(args.func(args) or 0)
    except preemption.Preempted as exc:
        if launch_rank() == 0:  # one line per job, not per rank
            print(f"spin-mcore {args.command}: preempted ({exc.signal_name} after {exc.where}); state saved, "
                  "re-run the same command to resume", file=sys.stderr, flush=True)
        # Exit 75 is a "bad exit" to srun --kill-on-bad-exit=1: wait until rank 0 has published.
        preemption.leave_together()
        return preemption.REQUEUE_EXIT_CODE
    except WorkerError as exc:  # a local rank failed (run_local): its message, not two nested tracebacks
        _report(args, f"error: {exc.summary}" if exc.user_error else exc.summary, exc.traceback,
                failure=not exc.user_error, in_rank=True)
        return EXIT_BAD_INPUT if exc.user_error else EXIT_FAILURE
    except ConfigError as exc:
        # Every rank validates the same config: under srun, rank 0 speaks for all.
        if launch_rank() == 0:
            _report(args, f"config error: {exc}", traceback.format_exc(), failure=False, in_rank=False)
        return EXIT_BAD_INPUT
    except USER_ERRORS as exc:
        _report(args, f"error: {exc}", traceback.format_exc(), failure=False, in_rank=False)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
