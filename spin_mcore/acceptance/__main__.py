"""``python -m spin_mcore.acceptance [--quick] [--list] [--out DIR] [--only GROUPS]``: the one-GPU acceptance run.

launch/gpu_acceptance.sh installs the carried wheels and this package first, then calls this with the
install's exit status. Exit status: 0 when no check failed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spin_mcore.acceptance", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (<= 3 min on one H200)")
    p.add_argument("--list", action="store_true", help="list the checks and what is not checked; run nothing")
    p.add_argument("--out", default=None, help="where gpu_acceptance.json goes (default $OUT, else ./gpu_acceptance)")
    p.add_argument("--work", default=None, help="scratch directory (default: a new temporary one, removed after)")
    p.add_argument("--only", default=None, help="comma list of groups or checks to run; the others are recorded as skipped")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time by which every group must have ended (default: now + the mode's budget)")
    p.add_argument("--install-rc", type=int, default=None, help="exit status of launch/gpu_acceptance.sh's pip steps")
    p.add_argument("--install-note", default=None, help="one line about the install (what failed, what was used)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.list:
        from spin_mcore.acceptance.registry import listing

        print(listing(args.quick))
        return 0
    if args.worker:
        from spin_mcore.acceptance.runner import work

        if not args.results or not args.work:
            p.error("--worker needs --results and --work")
        return work(args.worker, args.quick, Path(args.results), Path(args.work))

    from spin_mcore.acceptance import registry
    from spin_mcore.acceptance.runner import run

    out = Path(args.out or os.environ.get("OUT") or "gpu_acceptance")
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    unknown = set(only or []) - {g.name for g in registry.GROUPS} - {c.name for c in registry.CHECKS}
    if unknown:
        p.error(f"--only: unknown groups or checks {sorted(unknown)} (see --list)")
    if args.work:
        return run(out, args.quick, Path(args.work), args.deadline, only, args.install_rc, args.install_note)
    with tempfile.TemporaryDirectory(prefix="spin_acceptance_") as tmp:
        return run(out, args.quick, Path(tmp), args.deadline, only, args.install_rc, args.install_note)


if __name__ == "__main__":
    sys.exit(main())
