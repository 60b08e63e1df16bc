"""Evaluation: held-out LM loss (the paper's metric) and zero-shot tasks through lm-evaluation-harness."""
