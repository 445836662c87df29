"""SPIN training: loss, optimizer, LR schedule, and the training loop.

Import submodules directly (``spin_mcore.training.loss`` etc.); this package
imports nothing on purpose so its modules can import each other freely.
"""
