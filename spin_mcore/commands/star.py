"""``spin-mcore star CONFIG [key=value ...]``: STaR: keep correct rationales, rationalize failures with the answer as a hint, SFT (resumable).

Needs ``verify.kind`` (and data records with ``verify.answer_field``); run directory, results table
and plot as ``spin-mcore run``; see spin_mcore/selfimprove/star.py for the iteration.
"""

from __future__ import annotations

from spin_mcore.selfimprove.command import register_command


def register(sub) -> None:
    register_command(sub, "star", "STaR: keep correct rationales, rationalize failures with the answer as a hint, SFT (resumable)", __doc__)
