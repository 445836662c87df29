"""theta_t loaded once per iteration: one resident model serves every stage that reads it.

    ResidentPolicy(cfg, pstate, checkpoint)
        .get()        the model in eval mode (built and loaded on first use; back on the device if parked)
        .park()       its weights to host memory while an external engine uses the GPUs (CUDA only)
        .take()       the model handed to the trainer, which owns (and changes) it from then on
        .release()    forget it (nothing was taken)

An iteration reads theta_t for the engine's HF export (or the in-process engine), the reference
pass of the training pairs, the reference pass of the held-out pairs, and as the trainer's start.
Loading it for each was 3-4 reads of a 140 GB checkpoint per iteration at 70B. The model is built in
the training layout (:func:`~spin_mcore.training.trainer.build_policy`: virtual stages included) so
the trainer wraps the same tensors in DDP instead of loading again; the inference stages accept that
layout (the reference pass runs the interleaved schedule; the export walks every chunk).

Loading is lazy: a resumed iteration whose stages are complete loads nothing it does not use.
"""

from __future__ import annotations

import gc
from typing import Optional

import torch


def _plain_params(model) -> list:
    """Parameters whose storage is a plain tensor; Transformer Engine's FP8 (quantised) params are
    left where they are: moving them would dequantise them."""
    return [p for p in model.parameters() if type(p.data) is torch.Tensor]


def move_params(model, device: torch.device) -> int:
    """Move ``model``'s plain parameters to ``device`` in place (the ``Parameter`` objects, and so the
    attributes Megatron sets on them, stay). Returns the bytes moved."""
    moved = 0
    for p in _plain_params(model):
        if p.data.device != device:
            p.data = p.data.to(device)
            moved += p.data.numel() * p.data.element_size()
    return moved


class ResidentPolicy:
    """theta_t (``checkpoint``) for one iteration, loaded at most once; see the module docstring."""

    def __init__(self, cfg, pstate, checkpoint: Optional[str]):
        self.cfg, self.pstate, self.checkpoint = cfg, pstate, checkpoint
        self._model = None
        self._parked = False
        self.loads = 0

    def get(self):
        """This rank's stage of theta_t (``GPTModel`` or ``ModelChunks``), eval mode, on the device."""
        if self._model is None:
            from spin_mcore.training.trainer import build_policy

            self._model = build_policy(self.cfg, self.pstate, self.checkpoint)
            self.loads += 1
        if self._parked:
            move_params(self._model, self.pstate.device)
            self._parked = False
        self._model.eval()
        return self._model

    def park(self) -> None:
        """Free the device for an external engine: on CUDA the weights go to host memory until the
        next :meth:`get`. On CPU there is nothing to free (the engine shares the host's memory anyway)."""
        if self._model is None or self.pstate.device.type != "cuda":
            return
        move_params(self._model, torch.device("cpu"))
        self._parked = True
        torch.cuda.empty_cache()

    def take(self):
        """The model for the trainer (:func:`~spin_mcore.training.trainer.train`'s ``load_model``); the
        trainer changes its weights, so this object forgets it."""
        model = self.get()
        self._model = None
        return model

    def release(self) -> None:
        """Drop the model if nobody took it (its memory goes back before the next stage)."""
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
