"""``GPTModel`` that can hand back its vocab-parallel logits sequence-major, without a copy.

Megatron-Core's ``GPTModel._postprocess`` ends, when called without labels, with
``logits.transpose(0, 1).contiguous()``: a full copy of the step's largest tensor
([s, b, V/tp] -> [b, s, V/tp]) in forward, and another of its gradient in backward.
With labels it instead hands the untouched [s, b, V/tp] output-layer logits to
``compute_language_model_loss``. :class:`SpinGPTModel` uses that hook: called with
``sequence_major_logits=True`` it returns those logits as they are, and the caller
(``training/step.py``) computes its own loss from the transposed *view*.

With ``final_hidden_states=True`` it stops one step earlier: the last stage returns the
final-layernormed hidden states [s, b, h] and applies no output layer;
:meth:`SpinGPTModel.output_weight` hands the vocab-parallel weight [V/tp, h] to the caller's
fused linear log-prob op (``train.fused_linear_logprobs``), which owns the projection.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel


class _SequenceMajor:
    """Marker passed as Megatron's ``labels``: 'return the logits, compute no loss'."""


_SEQUENCE_MAJOR = _SequenceMajor()
_FINAL_HIDDEN = _SequenceMajor()  # 'stop before the output layer'


class SpinGPTModel(GPTModel):
    """Megatron's ``GPTModel`` plus two keywords.

    ``forward(..., sequence_major_logits=True)`` returns, on the last stage, the output layer's
    vocab-parallel logits [s, b, V/tp] (contiguous; ``.transpose(0, 1)`` is the [b, s, V/tp] view
    without a copy); ``forward(..., final_hidden_states=True)`` returns the final-layernormed hidden states
    [s, b, h] instead, for a caller that applies :meth:`output_weight` itself (the fused linear log-prob op).
    Every other call behaves exactly as ``GPTModel``'s (without labels: a
    contiguous [b, s, V/tp] copy; with labels: Megatron's cross-entropy [b, s]).
    """

    def forward(self, *args, sequence_major_logits: bool = False, final_hidden_states: bool = False, **kwargs):
        if not (sequence_major_logits or final_hidden_states):
            return super().forward(*args, **kwargs)
        what = "final_hidden_states" if final_hidden_states else "sequence_major_logits"
        if sequence_major_logits and final_hidden_states:
            raise ValueError("SpinGPTModel: pass sequence_major_logits=True or final_hidden_states=True, not both")
        if kwargs.get("labels") is not None:
            raise ValueError(f"SpinGPTModel: {what}=True computes no loss; pass labels=None")
        if self.config.mtp_num_layers:
            raise ValueError(f"SpinGPTModel: {what}=True does not support multi-token prediction "
                             f"(mtp_num_layers={self.config.mtp_num_layers})")
        if final_hidden_states and self.config.sequence_parallel:
            raise ValueError("SpinGPTModel: final_hidden_states=True does not support sequence parallelism "
                             "(the hidden states would be this rank's [s/tp, b, h] slice)")
        kwargs["labels"] = _FINAL_HIDDEN if final_hidden_states else _SEQUENCE_MAJOR
        return super().forward(*args, **kwargs)

    def _postprocess(self, *args, **kwargs):
        # GPTModel.forward passes every argument by keyword; hidden_states are final-layernormed here.
        if kwargs.get("labels") is _FINAL_HIDDEN and self.post_process:
            return kwargs["hidden_states"]  # [s, b, h]
        return super()._postprocess(*args, **kwargs)

    def output_weight(self):
        """The output layer's vocab-parallel weight [V/tp, h] (the embedding's when they are tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def compute_language_model_loss(self, labels, logits):
        if labels is _SEQUENCE_MAJOR:
            return logits  # [s, b, V/tp], the output layer's own buffer
        return super().compute_language_model_loss(labels, logits)
