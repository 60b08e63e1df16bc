"""Per-instance scoring: teacher and reference NLL of every instance, and the
score-file format (score_file.py) that Difference Sampling reads."""
