"""One rank's model as a list of chunks: the one place that knows a stage may be several virtual stages.

With virtual pipeline stages (``parallel.vp > 1``) a pipeline rank holds ``vp``
``GPTModel`` chunks (each wrapped in Megatron DDP for training); Megatron's
interleaved schedule, the optimizer and ``finalize_model_grads`` take them as a
list. :class:`ModelChunks` holds them as one ``nn.Module``, so the trainer can call
``train()``, ``zero_grad_buffer()`` or ``parameters()`` on "the model" whatever
its shape; :func:`model_chunks` turns either shape into the list Megatron wants.
"""

from __future__ import annotations

import torch


class ModelChunks(torch.nn.Module):
    """This rank's virtual pipeline stages in order (chunk i was built with ``vp_stage=i``)."""

    def __init__(self, chunks: list):
        super().__init__()
        if len(chunks) < 2:
            raise ValueError(f"ModelChunks: expected at least 2 virtual stages, got {len(chunks)}")
        self.chunks = torch.nn.ModuleList(chunks)

    @property
    def config(self):
        """Chunk 0's ``TransformerConfig``: the one Megatron's schedules read (``get_model_config(model[0])``)."""
        return self.chunks[0].config

    def zero_grad_buffer(self) -> None:
        """Megatron DDP: zero every chunk's grad buffer."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def forward(self, *args, **kwargs):
        raise RuntimeError("ModelChunks is run by Megatron's interleaved schedule (spin_mcore.training.step), "
                           "one chunk at a time; it has no forward of its own")


def model_chunks(model) -> list:
    """The list of chunks of ``model``: ``model.chunks`` for :class:`ModelChunks`, else ``[model]``."""
    return list(model.chunks) if isinstance(model, ModelChunks) else [model]


def wrap_chunks(chunks: list):
    """The inverse of :func:`model_chunks`: one chunk stays itself, several become :class:`ModelChunks`."""
    return chunks[0] if len(chunks) == 1 else ModelChunks(chunks)


def sync_params(model) -> None:
    """Make every chunk's weights current before they are read (checkpoint saves).

    With ``parallel.overlap_param_gather`` the distributed optimizer's step updates only this
    rank's shard of the DDP parameter buffer; the all-gather of the rest is left to the next
    forward's pre-hooks. This runs it now, synchronously; the pre-hooks then find it done.
    A no-op for every other configuration.
    """
    for chunk in model_chunks(model):
        if getattr(chunk, "use_forward_hook", False):  # Megatron DDP with overlap_param_gather
            chunk.start_param_sync(force_sync=True)
