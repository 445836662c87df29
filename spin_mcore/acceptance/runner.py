"""Running the acceptance checks: the parent (one subprocess per group, a deadline) and the group worker.

Parent (:func:`run`): records the install step launch/gpu_acceptance.sh reports, then runs each group
of :data:`registry.GROUPS` as ``python -m spin_mcore.acceptance --worker GROUP`` in its own process
session, relaying its output, with the group's time limit cut to what is left of the run's deadline.
A worker writes one JSON line per finished check; a check it never finished (the worker crashed, hit
a CUDA error that killed it, or was killed at its time limit) is recorded as ``fail`` with the reason and
the worker's last output line. Then the not-checked list, the closing table, and the JSON summary.

Worker (:func:`work`): runs its group's checks in order in one process. A check returns an
:class:`Outcome`; raising :class:`Skip` (``require_cuda`` does without CUDA) records ``skip``; any other
exception records ``fail`` with its one-line message (the traceback goes to stderr, hence the log). The
next check runs regardless.
"""

from __future__ import annotations

import collections
import gc
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from spin_mcore.acceptance import registry
from spin_mcore.acceptance.summary import NO_CUDA, CheckResult, build_summary, format_line, table, utc_now, write_summary

SUMMARY_NAME = "gpu_acceptance.json"
LOG_NAME = "gpu_acceptance.log"


class Skip(Exception):
    """Raised by a check that cannot run here; recorded as ``skip`` with reason ``skipped: <message>``."""


@dataclass
class Outcome:
    """What a check function returns: passed or not, one line of figures, the figures, and (on a fail) why."""

    ok: bool
    summary: str
    figures: dict = field(default_factory=dict)
    reason: Optional[str] = None


@dataclass
class Context:
    """What a check gets: the mode, a scratch directory, and state shared by the checks of one worker."""

    quick: bool
    work: Path
    state: dict = field(default_factory=dict)


def require_cuda() -> None:
    """Refuse (``skipped: no CUDA``) where torch sees no CUDA device: every GPU check calls this first."""
    try:
        import torch
    except ImportError as exc:
        raise Skip(f"no torch ({exc})") from None
    if not torch.cuda.is_available():
        raise Skip("no CUDA")


# ----------------------------------------------------------------------------- worker


def run_check(check: registry.Check, ctx: Context) -> CheckResult:
    """Run one check function; never raises (except KeyboardInterrupt / SystemExit)."""
    t0 = time.perf_counter()
    try:
        module, name = check.func.split(":")
        func = getattr(importlib.import_module(f"spin_mcore.acceptance.{module}"), name)
        out = func(ctx)
        status, reason = ("pass", None) if out.ok else ("fail", out.reason or out.summary)
        result = CheckResult(check.name, check.group, status, out.summary, out.figures, time.perf_counter() - t0, reason)
    except Skip as exc:
        reason = NO_CUDA if str(exc) == "no CUDA" else f"skipped: {exc}"
        result = CheckResult(check.name, check.group, "skip", reason, {}, time.perf_counter() - t0, reason)
    except Exception as exc:  # noqa: BLE001 - a check's failure is a result, not the end of the run
        traceback.print_exc(file=sys.stderr)
        reason = one_line(f"{type(exc).__name__}: {exc}")
        result = CheckResult(check.name, check.group, "fail", reason, {}, time.perf_counter() - t0, reason)
    finally:
        _release_memory()
    return result


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters."""
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "") or "(no message)"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a broken context is reported by the next check that uses it
            pass


def work(group: str, quick: bool, results_path: Path, work_dir: Path) -> int:
    """Worker: run ``group``'s checks, print each line, append each result to ``results_path`` (JSON lines)."""
    ctx = Context(quick=quick, work=Path(work_dir))
    ctx.work.mkdir(parents=True, exist_ok=True)
    for check in registry.checks_for(group):
        result = run_check(check, ctx)
        print(result.line(), flush=True)
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(result.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())
    _shutdown_distributed()
    return 0


def _shutdown_distributed() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            from spin_mcore.platform import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001 - the worker is exiting anyway
            pass


# ----------------------------------------------------------------------------- parent


def run_group(group: str, checks: Sequence[registry.Check], cmd: Sequence[str], timeout: float,
              results_path: Path, env: Optional[dict] = None, out=None) -> list[CheckResult]:
    """Run one worker command with a time limit and turn what it wrote into one result per check.

    The worker's output is relayed to ``out`` (default stdout) line by line as it comes. The worker
    runs in its own process session; at its time limit that whole session is killed.
    """
    out = out or sys.stdout
    results_path = Path(results_path)
    results_path.unlink(missing_ok=True)
    tail: collections.deque = collections.deque(maxlen=30)
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, start_new_session=True, errors="replace")

    def relay():
        for line in proc.stdout:
            out.write(line)
            out.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        rc = None
    _kill_session(proc)  # the worker at its limit; after an exit, whatever it left behind (compile, save helpers)
    rc = proc.wait() if rc is None else rc
    reader.join(timeout=10)
    seconds = time.perf_counter() - t0

    done = {}
    if results_path.exists():
        for line in results_path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
                done[obj["name"]] = CheckResult.from_json(obj)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by the kill
    results = []
    last = _last_meaningful(tail)
    for check in checks:
        if check.name in done:
            results.append(done[check.name])
            continue
        if timed_out:
            why = f"not finished: group '{group}' killed at its {timeout:.0f} s limit"
        else:
            why = f"not finished: group '{group}' worker exited with status {rc}"
        if last:
            why += f" (last output: {one_line(last, 200)})"
        result = CheckResult(check.name, group, "fail", why, {}, 0.0, why)
        out.write(result.line() + "\n")
        out.flush()
        results.append(result)
    out.write(f"     group {group}: {seconds:.1f} s{' (killed at its limit)' if timed_out else ''}\n")
    out.flush()
    return results


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill the worker's process session (the worker and anything it started): only ours, by its id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.kill()


def _last_meaningful(lines) -> Optional[str]:
    for line in reversed(list(lines)):
        if line.strip() and not line.startswith(("PASS ", "FAIL ", "SKIP ")):
            return line.strip()
    return None


def check_install(install_rc: Optional[int], install_note: Optional[str]) -> CheckResult:
    """The install check: pip's exit status as launch/gpu_acceptance.sh reports it, and whether what it
    installed imports from the install (megatron.core, spin_mcore with its C++ extension, spin_kernels)."""
    import importlib.util

    t0 = time.perf_counter()
    figures: dict = {}
    problems = []

    def origin(module: str) -> Optional[str]:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        return None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))

    for module in ("megatron.core", "spin_mcore", "spin_kernels"):
        figures[f"{module}_from"] = origin(module)
        if figures[f"{module}_from"] is None:
            problems.append(f"{module} not importable")
    try:
        packing = importlib.import_module("spin_mcore._packing")
        figures["packing_extension"] = getattr(packing, "__file__", None)
        package_dir = Path(figures["spin_mcore_from"] or "").parent
        if Path(figures["packing_extension"] or "").parent != package_dir:
            problems.append(f"spin_mcore._packing comes from {figures['packing_extension']}, not from {package_dir}")
    except ImportError as exc:
        figures["packing_extension"] = None
        problems.append(f"spin_mcore._packing does not import ({one_line(exc, 150)})")
    figures.update(_versions(("megatron-core",)))
    if install_rc is None:
        reason = "skipped: nothing installed (run through launch/gpu_acceptance.sh, which reports its pip steps)"
        return CheckResult(registry.INSTALL.name, "install", "skip", reason, figures, time.perf_counter() - t0, reason)
    figures["pip_status"] = install_rc
    if install_note:
        figures["note"] = one_line(install_note, 300)
    if install_rc != 0:
        problems.insert(0, f"pip install exited with status {install_rc}{': ' + one_line(install_note, 200) if install_note else ''}")
    ok = not problems
    summary = (f"megatron-core {figures.get('megatron-core')} and spin_mcore installed; _packing and spin_kernels import "
               f"from {Path(figures['spin_mcore_from'] or '?').parent.parent}") if ok else "; ".join(problems)
    return CheckResult(registry.INSTALL.name, "install", "pass" if ok else "fail", summary, figures,
                       time.perf_counter() - t0, None if ok else summary)


def _versions(dists: Sequence[str]) -> dict:
    from importlib import metadata

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment() -> dict:
    """Versions, GPU and host, without importing torch (``nvidia-smi`` answers for the GPU)."""
    env = {"python": platform.python_version(), "executable": sys.executable, "host": platform.node(),
           "machine": platform.machine(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    env.update(_versions(("torch", "triton", "megatron-core", "transformers", "numpy", "spin_mcore")))
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        first = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
        if first:
            name, driver, memory, clock = [x.strip() for x in (first.split(",") + ["", "", ""])[:4]]
            env.update(gpu=name, driver=driver, gpu_memory=memory, sm_clock_max=clock)
            env["gpus"] = len(proc.stdout.strip().splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    env.setdefault("gpu", None)
    return env


def not_checked_results() -> list[CheckResult]:
    return [CheckResult(f"not_checked.{n.name}", "not_checked", "not_checked", f"{n.what}: {n.why}", {}, 0.0,
                        n.why) for n in registry.NOT_CHECKED]


def run(out_dir: Path, quick: bool, work_dir: Path, deadline: Optional[float] = None,
        only: Optional[Sequence[str]] = None, install_rc: Optional[int] = None,
        install_note: Optional[str] = None, python: Optional[str] = None) -> int:
    """The whole run; returns 0 when no check failed, 1 otherwise. Writes ``out_dir/gpu_acceptance.json``."""
    mode = "quick" if quick else "full"
    started, t0 = utc_now(), time.perf_counter()
    deadline = deadline or (time.time() + registry.BUDGET_S[mode])
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    env_facts = environment()
    env_facts["mode"] = mode
    print(f"GPU acceptance ({mode}) on {env_facts.get('gpu') or 'no GPU'}; torch {env_facts.get('torch')}, "
          f"triton {env_facts.get('triton')}, megatron-core {env_facts.get('megatron-core')}; "
          f"{max(0, deadline - time.time()):.0f} s left of the budget", flush=True)

    results = [check_install(install_rc, install_note)]
    print(results[0].line(), flush=True)
    selected = set(only or [])
    for group in registry.GROUPS:
        checks = registry.checks_for(group.name)
        if selected and group.name not in selected and not any(c.name in selected for c in checks):
            for c in checks:
                why = f"skipped: not selected (--only {','.join(sorted(selected))})"
                results.append(CheckResult(c.name, group.name, "skip", why, {}, 0.0, why))
                print(results[-1].line(), flush=True)
            continue
        left = deadline - time.time()
        if left < 5:
            for c in checks:
                why = f"not run: the {registry.BUDGET_S[mode]} s budget of the {mode} run was spent before group '{group.name}'"
                results.append(CheckResult(c.name, group.name, "fail", why, {}, 0.0, why))
                print(results[-1].line(), flush=True)
            continue
        cmd = [python or sys.executable, "-m", "spin_mcore.acceptance", "--worker", group.name,
               "--results", str(work_dir / f"{group.name}.jsonl"), "--work", str(work_dir / group.name)]
        if quick:
            cmd.append("--quick")
        results += run_group(group.name, checks, cmd, min(group.timeout(quick), left),
                             work_dir / f"{group.name}.jsonl")
    results += not_checked_results()
    for r in results[-len(registry.NOT_CHECKED):]:
        print(r.line(), flush=True)

    summary = build_summary(results, mode, started, time.perf_counter() - t0, env_facts)
    path = write_summary(summary, out_dir / SUMMARY_NAME, registry.all_names())
    print("\n" + table(results), flush=True)
    print(format_line("pass" if summary["ok"] else "fail", "acceptance",
                      f"{'no check failed' if summary['ok'] else 'some checks failed'}; summary {path}",
                      summary["wall_s"]), flush=True)
    return 0 if summary["ok"] else 1
