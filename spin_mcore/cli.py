"""``spin-mcore`` command line: one subcommand per stage, each in ``spin_mcore/commands/<name>.py``.

Each command module exposes ``register(subparsers)`` which adds its parser and
sets ``func`` to a callable taking the parsed args and returning an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

# Order is the order shown in --help.
COMMANDS = ("demo", "run", "generate", "train", "eval", "convert", "smoke", "ranks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spin-mcore",
        description="Self-play fine-tuning (SPIN, Chen et al. 2024) on Megatron-Core. "
        "Configs are YAML; any field can be overridden as section.field=value.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"spin_mcore.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from spin_mcore.config import ConfigError
    from spin_mcore.platform import preemption

    # Resumable commands (set_defaults(preemptible=True)) stop at a step/shard boundary on
    # SIGUSR1/SIGTERM and exit with REQUEUE_EXIT_CODE; the others keep the default handlers.
    handlers = preemption.handled() if getattr(args, "preemptible", False) else contextlib.nullcontext()
    try:
        with handlers:
            return int(args.func(args) or 0)
    except preemption.Preempted as exc:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # one line per job, not per rank
            print(f"spin-mcore {args.command}: preempted ({exc.signal_name} after {exc.where}); state saved, "
                  "re-run the same command to resume", file=sys.stderr)
        return preemption.REQUEUE_EXIT_CODE
    except ConfigError as exc:
        print(f"spin-mcore {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"spin-mcore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
