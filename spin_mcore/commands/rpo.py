"""``spin-mcore rpo CONFIG [key=value ...]``: Iterative RPO: DPO on correct-vs-incorrect samples plus NLL on the chosen (resumable).

Needs ``verify.kind`` (and data records with ``verify.answer_field``); run directory, results table
and plot as ``spin-mcore run``; see spin_mcore/selfimprove/rpo.py for the iteration.
"""

from __future__ import annotations

from spin_mcore.selfimprove.command import register_command


def register(sub) -> None:
    register_command(sub, "rpo", "Iterative RPO: DPO on correct-vs-incorrect samples plus NLL on the chosen (resumable)", __doc__)
