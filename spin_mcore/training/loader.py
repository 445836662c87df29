"""The trainer's step readers: this DP rank's records of each optimizer step, from DALI or torch.

    open_steps(data, plan, ...)     -> DaliSteps | TorchSteps       (data: training/batches.open_training_data)
    reader.step_examples(step)      -> [Example] * (global_batch / dp), micro-batch order
    reader.state()                  -> what resumes it (DALI: its reader checkpoint; torch: None)

Both yield, for step ``k``, exactly the records ``StepPlan.rank_microbatches(k, dp_rank)`` names, in
that order; packing and micro-batching consume them unchanged, so the two loaders give bitwise the
same training. ``DaliSteps`` hands DALI every rank's records of every step as one rank-major file
list (``shard_id`` = DP rank, ``num_shards`` = DP size; why not DALI's own shuffle:
``spin_mcore.data.dali_loader``), one DALI batch per step, so a rank opens only its own records.

Exact resume: :meth:`DaliSteps.state` is the DALI reader checkpoint plus the step its file list
starts at; it goes into the training checkpoint, one object per rank
(``training/train_checkpoint.py``), and the resumed reader is rebuilt from it. Every batch's
``source_info`` (the file each sample came from) is checked against the plan, so a wrong position
is an error, never silently different data. Without a saved state (a torch loader's checkpoint,
a changed DP size) the file list starts at the resumed step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from spin_mcore.training.batches import Example, StepPlan, TrainingData


def open_steps(data: TrainingData, plan: StepPlan, total_steps: int, pstate, start_step: int = 0,
               state: Optional[dict] = None):
    """This rank's step reader of ``data`` (``.step_examples(step)``, ``.state()``, ``.close()``), at ``start_step``."""
    if data.loader == "torch":
        return TorchSteps(data.examples, plan, pstate.dp_rank)
    device_id = None
    if pstate.device.type == "cuda":
        device_id = pstate.device.index if pstate.device.index is not None else torch.cuda.current_device()
    return DaliSteps(data.files, plan, total_steps, pstate.dp_rank, pstate.dp, start_step, state, device_id,
                     need_generated=data.objective == "spin", need_refs=data.objective == "spin")


def rank_items(plan, step: int, dp_rank: int) -> list[int]:
    """Item indices of ``dp_rank`` at ``step``, in micro-batch order (``global_batch / dp`` ints)."""
    return torch.cat(plan.rank_microbatches(step, dp_rank)).tolist()


class TorchSteps:
    """Today's path: every record parsed from JSON on every rank; a step's records picked by index."""

    name = "torch"

    def __init__(self, examples: list, plan, dp_rank: int):
        self.examples, self.plan, self.dp_rank = examples, plan, dp_rank

    def step_examples(self, step: int) -> list:
        """This rank's Examples of ``step`` (``global_batch / dp`` of them, micro-batch order)."""
        return [self.examples[i] for i in rank_items(self.plan, step, self.dp_rank)]

    def state(self):
        return None

    def close(self) -> None:
        pass


class DaliSteps:
    """DALI's numpy reader over the token store: this DP rank's records only (see module docstring).

    Args:
        files: the token-store file of every item (index = item, as ``plan.order`` counts them).
        plan, total_steps: the trainer's :class:`~spin_mcore.training.batches.StepPlan` and step count.
        dp_rank, dp: this rank's DALI shard and the shard count.
        start_step: the first step this run trains (the resumed step).
        state: :meth:`state` saved with the checkpoint at ``start_step``, or None (the file list then
            starts at ``start_step``).
        device_id: the rank's CUDA device, or None (CPU pipeline).
        need_generated, need_refs: the objective's fields (SPIN: both); a record without them is a ValueError.
    """

    name = "dali"

    def __init__(self, files: Sequence[str], plan, total_steps: int, dp_rank: int, dp: int, start_step: int = 0,
                 state: Optional[dict] = None, device_id: Optional[int] = None, need_generated: bool = True,
                 need_refs: bool = True):
        from spin_mcore.data.dali_loader import DaliRecordReader

        self.files, self.plan, self.dp_rank = list(files), plan, dp_rank
        self.need_generated, self.need_refs = need_generated, need_refs
        self.base = int(state["base_step"]) if state else start_step
        self.next_step = int(state["next_step"]) if state else start_step
        if not 0 <= self.base <= start_step <= total_steps or self.next_step != start_step:
            raise ValueError(f"DALI reader state (list from step {self.base}, at step {self.next_step}) does not "
                             f"match the training checkpoint's step {start_step} of {total_steps}")
        self.reader = None
        if self.base < total_steps:
            order = [self.files[i] for r in range(dp) for s in range(self.base, total_steps)
                     for i in rank_items(plan, s, r)]
            self.reader = DaliRecordReader(order, plan.global_batch // dp, dp_rank, dp,
                                           checkpoint=state["checkpoint"] if state else None, device_id=device_id)

    def step_examples(self, step: int) -> list:
        """This rank's Examples of ``step`` (``global_batch / dp``, micro-batch order); steps are read in order."""
        from spin_mcore.data.token_store import decode_record

        if step != self.next_step or self.reader is None:
            raise RuntimeError(f"DALI reader: step {step + 1} asked, the reader is at step {self.next_step + 1}")
        arrays, paths = self.reader.next()
        expected = [self.files[i] for i in rank_items(self.plan, step, self.dp_rank)]
        if paths != expected:
            raise RuntimeError(f"DALI reader (DP rank {self.dp_rank}) returned other records than the plan's for "
                               f"step {step + 1}: {paths[:2]}... != {expected[:2]}...")
        self.next_step += 1
        out = []
        for arr, path in zip(arrays, paths):
            prompt, real, gen, ref_real, ref_gen = decode_record(arr, path)
            if self.need_generated and gen is None:
                raise ValueError(f"{path}: record lacks field generated_ids")
            if self.need_refs and (ref_real is None or ref_gen is None):
                raise ValueError(f"{path}: record lacks field ref_logp_real / ref_logp_generated")
            if not self.need_generated:  # as the torch path reads an SFT record
                gen = ref_real = ref_gen = None
            out.append(Example(prompt, real, gen, ref_real, ref_gen))
        return out

    def state(self) -> Optional[dict]:
        """What resumes this reader at its current step: {base_step, next_step, checkpoint: bytes}."""
        if self.reader is None:
            return None
        return {"base_step": self.base, "next_step": self.next_step, "checkpoint": self.reader.checkpoint()}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
