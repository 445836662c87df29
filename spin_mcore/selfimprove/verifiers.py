"""Verifiers: programs that say whether a sampled response answers a prompt correctly.

    build_verifier(verify_cfg) -> Verifier     at configuration time (ConfigError on a bad kind/field)
    run_verifier(verifier, response, ref)      -> Verdict, never raises

Plug-ins (``verify.kind``):

    exact         the whole response, whitespace-stripped, equals the reference
    numeric       the last number in the response (or ``verify.pattern``'s group 1) is within
                  ``verify.tolerance`` (absolute) of the numeric reference
    regex         ``verify.pattern``'s group 1 of its LAST match equals the reference (stripped)
    python_tests  the response (or its first ```python fenced block) followed by the reference
                  (test code with asserts) runs in a subprocess and exits 0
    arith         the demo's checker: the integer after "The answer is" (spin_mcore/demo/task.py)
    arith_equation  the demo's format checked whole: the response is "x op y = c. The answer is w."
                  with x op y == c == w == the reference; ``arith`` also accepts a wrong equation
                  before a right answer ("8 + 12 = 12. The answer is 20."), and a verified loop
                  trained on such samples learns broken rationales
    MODULE:ATTR   a user plug-in: ATTR is a Verifier subclass or a factory taking the ``verify``
                  section; it is imported when the config is built, so a bad path fails there.

Verdict status: ``correct``, ``wrong``, ``no_answer`` (no extractable answer: counted as wrong, and
separately), ``error`` (the verifier raised) or ``timeout``. A verifier that crashes or times out
fails that sample only; the run goes on.

What the python_tests sandbox enforces (and what it does not):
* wall-clock limit ``verify.timeout_s`` (the process group is killed), plus RLIMIT_CPU of the same;
* address-space limit RLIMIT_AS = ``verify.memory_mb`` MiB (allocations past it raise MemoryError);
* no network: the child runs under ``unshare -rn`` (an empty network namespace) where the kernel
  allows it; otherwise a sitecustomize audit hook refuses socket creation and connects (this is
  a guard against accidents, not a security boundary: the code can still read and write files
  the user can, and can spawn processes within the limits);
* ``python -I`` (isolated mode: no user site, no PYTHON* environment variables), cwd a fresh temp dir.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

from spin_mcore.config import ConfigError

STATUSES = ("correct", "wrong", "no_answer", "error", "timeout")
KINDS = ("exact", "numeric", "regex", "python_tests", "arith", "arith_equation")

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Verdict:
    """One sample's outcome: ``correct`` (bool), ``status`` (one of :data:`STATUSES`), the extracted
    ``answer`` (string, None when none was found) and a short ``detail`` for errors."""

    correct: bool
    status: str
    answer: Optional[str] = None
    detail: str = ""


def _ok(answer, correct: bool) -> Verdict:
    return Verdict(bool(correct), "correct" if correct else "wrong", None if answer is None else str(answer))


NO_ANSWER = Verdict(False, "no_answer")


class Verifier:
    """Base class: ``check(response, reference) -> Verdict``; may raise (``run_verifier`` catches it)."""

    name = "base"

    def check(self, response: str, reference) -> Verdict:  # pragma: no cover - interface
        raise NotImplementedError


class ExactMatch(Verifier):
    name = "exact"

    def check(self, response, reference):
        text = response.strip()
        return NO_ANSWER if not text else _ok(text, text == str(reference).strip())


class NumericAnswer(Verifier):
    """|x - reference| <= tolerance, x = the last number in the response (or ``pattern``'s group 1)."""

    name = "numeric"

    def __init__(self, tolerance: float, pattern: Optional[str] = None):
        self.tolerance = tolerance
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, response, reference):
        if self.pattern is not None:
            found = [m.group(1) for m in self.pattern.finditer(response)]
        else:
            found = _NUMBER.findall(response)
        if not found:
            return NO_ANSWER
        raw = found[-1].replace(",", "").strip()
        try:
            x = float(raw)
        except ValueError:
            return NO_ANSWER
        ref = float(reference)
        return _ok(raw, math.isfinite(x) and abs(x - ref) <= self.tolerance)


class RegexAnswer(Verifier):
    """The last match's group 1, stripped, equals ``str(reference).strip()``."""

    name = "regex"

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)

    def check(self, response, reference):
        found = [m.group(1) for m in self.pattern.finditer(response)]
        if not found or found[-1] is None:
            return NO_ANSWER
        answer = found[-1].strip()
        return _ok(answer, answer == str(reference).strip())


class ArithAnswer(Verifier):
    """The demo task's checker: the integer after "The answer is" equals the integer reference."""

    name = "arith"

    def check(self, response, reference):
        from spin_mcore.demo.task import extract_answer

        x = extract_answer(response)
        return NO_ANSWER if x is None else _ok(x, x == int(reference))


class ArithEquation(Verifier):
    """The demo task's format, checked whole: "x op y = c. The answer is w." (op + or -) with
    x op y == c == w == the integer reference; any other text is no answer."""

    name = "arith_equation"

    def check(self, response, reference):
        from spin_mcore.demo.task import parse_equation

        parsed = parse_equation(response)
        if parsed is None:
            return NO_ANSWER
        answer, holds = parsed
        return _ok(answer, holds and answer == int(reference))


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)

# Installed as sitecustomize.py when unshare is not available: refuse sockets (see module docstring).
_NO_NET = """import sys
def _no_net(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"):
        raise PermissionError("network access is disabled in the verifier sandbox")
sys.addaudithook(_no_net)
"""


def _unshare_works() -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class PythonTests(Verifier):
    """Candidate code + reference tests in a sandboxed subprocess; exit status 0 means correct."""

    name = "python_tests"

    def __init__(self, timeout_s: float, memory_mb: int, python: Optional[str] = None):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.python = python or sys.executable
        self.isolation = "unshare" if _unshare_works() else "audit_hook"

    def _limits(self):
        limit = self.memory_mb * 1024 * 1024
        cpu = max(1, int(math.ceil(self.timeout_s)))

        def apply():  # runs in the child between fork and exec
            import resource

            os.setsid()  # own process group: a timeout kills everything it spawned
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

        return apply

    def check(self, response, reference):
        m = _FENCE.search(response)
        code = (m.group(1) if m else response).strip()
        if not code:
            return NO_ANSWER
        with tempfile.TemporaryDirectory(prefix="spin_verify_") as tmp:
            with open(os.path.join(tmp, "candidate.py"), "w", encoding="utf-8") as fh:
                fh.write(code + "\n\n" + str(reference) + "\n")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp}
            cmd = [self.python, "-I", "candidate.py"]
            if self.isolation == "unshare":
                cmd = ["unshare", "-rn", *cmd]
            else:  # -I drops the cwd from sys.path, so the hook goes in via PYTHONSTARTUP-free -c
                with open(os.path.join(tmp, "_no_net.py"), "w", encoding="utf-8") as fh:
                    fh.write(_NO_NET)
                cmd = [self.python, "-I", "-c",
                       "exec(open('_no_net.py').read()); import runpy; runpy.run_path('candidate.py', run_name='__main__')"]
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    preexec_fn=self._limits())
            try:
                _, err = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.communicate()
                return Verdict(False, "timeout", code, f"no exit within verify.timeout_s={self.timeout_s}")
        if proc.returncode == 0:
            return _ok(code, True)
        tail = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        if proc.returncode < 0 and -proc.returncode in (signal.SIGXCPU, signal.SIGKILL):
            return Verdict(False, "timeout", code, f"killed by signal {-proc.returncode} (CPU limit)")
        return Verdict(False, "wrong", code, tail[0][:200])


def run_verifier(verifier: Verifier, response: str, reference) -> Verdict:
    """``verifier.check`` that never raises: an exception is an ``error`` verdict (the sample fails)."""
    try:
        verdict = verifier.check(response, reference)
    except Exception as exc:  # a broken plug-in or reference fails the sample, never the run
        return Verdict(False, "error", None, f"{type(exc).__name__}: {exc}"[:200])
    if not isinstance(verdict, Verdict) or verdict.status not in STATUSES:
        return Verdict(False, "error", None, f"{verifier.name}: returned {verdict!r}, not a Verdict")
    return verdict


def _compile(pattern: Optional[str], kind: str) -> str:
    if not pattern:
        raise ConfigError(f"verify.pattern: verify.kind={kind} needs a regular expression with one group")
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"verify.pattern={pattern!r}: not a valid regular expression: {exc}") from None
    if rx.groups < 1:
        raise ConfigError(f"verify.pattern={pattern!r}: needs a capturing group around the answer, e.g. "
                          r"'answer is (\S+)'")
    return pattern


def build_verifier(v) -> Verifier:
    """The :class:`Verifier` of the ``verify`` config section ``v``; raises ConfigError naming the field."""
    if not v.kind:
        raise ConfigError(f"verify.kind is not set: one of {', '.join(KINDS)}, or MODULE:ATTR for a plug-in")
    if v.timeout_s <= 0:
        raise ConfigError(f"verify.timeout_s={v.timeout_s}: must be > 0")
    if v.memory_mb < 16:
        raise ConfigError(f"verify.memory_mb={v.memory_mb}: must be >= 16 (the interpreter itself needs ~10 MiB)")
    if v.kind == "exact":
        return ExactMatch()
    if v.kind == "numeric":
        if not v.tolerance >= 0:
            raise ConfigError(f"verify.tolerance={v.tolerance}: must be >= 0")
        return NumericAnswer(v.tolerance, _compile(v.pattern, "numeric") if v.pattern else None)
    if v.kind == "regex":
        return RegexAnswer(_compile(v.pattern, "regex"))
    if v.kind == "python_tests":
        return PythonTests(v.timeout_s, v.memory_mb)
    if v.kind == "arith":
        return ArithAnswer()
    if v.kind == "arith_equation":
        return ArithEquation()
    if ":" not in v.kind:
        raise ConfigError(f"verify.kind={v.kind!r}: must be one of {', '.join(KINDS)}, or MODULE:ATTR for a plug-in")
    module, _, attr = v.kind.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"verify.kind={v.kind!r}: cannot import the plug-in: {exc}") from None
    try:
        verifier = obj(v)
    except Exception as exc:
        raise ConfigError(f"verify.kind={v.kind!r}: the plug-in refused the verify section: {exc}") from None
    if not callable(getattr(verifier, "check", None)):
        raise ConfigError(f"verify.kind={v.kind!r}: {attr}(verify) returned {type(verifier).__name__}, which has no check()")
    return verifier
