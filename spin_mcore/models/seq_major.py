"""``GPTModel`` that can hand back its vocab-parallel logits sequence-major, without a copy.

Megatron-Core's ``GPTModel._postprocess`` ends, when called without labels, with
``logits.transpose(0, 1).contiguous()``: a full copy of the step's largest tensor
([s, b, V/tp] -> [b, s, V/tp]) in forward, and another of its gradient in backward.
With labels it instead hands the untouched [s, b, V/tp] output-layer logits to
``compute_language_model_loss``. :class:`SpinGPTModel` uses that hook: called with
``sequence_major_logits=True`` it returns those logits as they are, and the caller
(``training/step.py``) computes its own loss from the transposed *view*.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel


class _SequenceMajor:
    """Marker passed as Megatron's ``labels``: 'return the logits, compute no loss'."""


_SEQUENCE_MAJOR = _SequenceMajor()


class SpinGPTModel(GPTModel):
    """Megatron's ``GPTModel`` plus one keyword.

    ``forward(..., sequence_major_logits=True)`` returns, on the last stage, the output layer's
    vocab-parallel logits [s, b, V/tp] (contiguous; ``.transpose(0, 1)`` is the [b, s, V/tp] view
    without a copy). Every other call behaves exactly as ``GPTModel``'s (without labels: a
    contiguous [b, s, V/tp] copy; with labels: Megatron's cross-entropy [b, s]).
    """

    def forward(self, *args, sequence_major_logits: bool = False, **kwargs):
        if not sequence_major_logits:
            return super().forward(*args, **kwargs)
        if kwargs.get("labels") is not None:
            raise ValueError("SpinGPTModel: sequence_major_logits=True computes no loss; pass labels=None")
        if self.config.mtp_num_layers:
            raise ValueError("SpinGPTModel: sequence_major_logits=True does not support multi-token prediction "
                             f"(mtp_num_layers={self.config.mtp_num_layers})")
        kwargs["labels"] = _SEQUENCE_MAJOR
        return super().forward(*args, **kwargs)

    def compute_language_model_loss(self, labels, logits):
        if labels is _SEQUENCE_MAJOR:
            return logits  # [s, b, V/tp], the output layer's own buffer
        return super().compute_language_model_loss(labels, logits)
