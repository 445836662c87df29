"""``spin-mcore restem CONFIG [key=value ...]``: ReST^EM: K verified samples per prompt, SFT on the correct ones (resumable).

Needs ``verify.kind`` (and data records with ``verify.answer_field``); run directory, results table
and plot as ``spin-mcore run``; see spin_mcore/selfimprove/restem.py for the iteration.
"""

from __future__ import annotations

from spin_mcore.selfimprove.command import register_command


def register(sub) -> None:
    register_command(sub, "restem", "ReST^EM: K verified samples per prompt, SFT on the correct ones (resumable)", __doc__)
