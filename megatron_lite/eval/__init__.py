"""Evaluation beyond loss: EleutherAI's lm-evaluation-harness on the HF export (harness.py, with local
task YAMLs in tasks/ that read the embedded held-out data) and our own bits per byte (bits_per_byte.py)."""
