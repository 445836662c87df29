"""Evaluation: built-in metrics (held-out NLL, pair accuracy/margin, verifiable accuracy) and lm-evaluation-harness."""
