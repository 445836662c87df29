"""Linear warmup then linear decay to zero: the LR schedule of the SPIN recipes.

The SPIN reference code trains with Hugging Face's ``get_linear_schedule_with_warmup``
(``warmup_ratio=0.1``). This reproduces it exactly, step for step, so the
numbers are comparable:

    W = ceil(warmup_fraction * total_steps)
    lr(s) = peak * s / W                                  for s < W
    lr(s) = peak * max(0, (total_steps - s) / (total_steps - W))   otherwise

``s`` counts optimizer steps already taken, so the first update uses lr(0), which is 0
when W > 0 (as in HF). Each param group gets ``lr(s) * group["lr_mult"]`` (Megatron's
groups carry ``lr_mult``, 1.0 by default).

Use: ``opt.step(); sched.step()`` once per optimizer step. A skipped step (non-finite
grads) should still call ``sched.step()`` if the data position advances, to stay on
the same curve as an uninterrupted run; the trainer decides and documents it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class LinearWarmupDecay:
    """Checkpointable schedule object; ``optimizer`` is any object with ``param_groups``."""

    optimizer: Any
    peak_lr: float
    total_steps: int
    warmup_steps: int
    num_steps: int = 0

    def get_lr(self, step: int | None = None) -> float:
        """LR for the update taken after ``step`` completed steps (default: the current one)."""
        s = self.num_steps if step is None else step
        if s < self.warmup_steps:
            return self.peak_lr * s / self.warmup_steps
        return self.peak_lr * max(0.0, (self.total_steps - s) / max(1, self.total_steps - self.warmup_steps))

    def apply(self) -> float:
        """Write the current LR into every param group; returns it."""
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` optimizer steps and set the LR for the next one."""
        self.num_steps += increment
        return self.apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "peak_lr": self.peak_lr,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the curve must match the one this object was built with."""
        for key in ("peak_lr", "total_steps", "warmup_steps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"LR schedule checkpoint has {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}: the schedule (train.lr / steps / warmup_fraction) changed")
        self.num_steps = int(state["num_steps"])
        self.apply()


def build_lr_schedule(optimizer, peak_lr: float, total_steps: int, warmup_fraction: float = 0.1) -> LinearWarmupDecay:
    """Linear warmup over ``ceil(warmup_fraction * total_steps)`` steps, then linear decay to 0.

    Sets the step-0 LR on ``optimizer.param_groups`` immediately.
    """
    if total_steps < 1:
        raise ValueError(f"build_lr_schedule: total_steps={total_steps} must be >= 1")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"build_lr_schedule: warmup_fraction={warmup_fraction} must be in [0, 1)")
    if peak_lr < 0:
        raise ValueError(f"build_lr_schedule: peak_lr={peak_lr} must be >= 0")
    sched = LinearWarmupDecay(optimizer, float(peak_lr), int(total_steps), math.ceil(warmup_fraction * total_steps))
    sched.apply()
    return sched
