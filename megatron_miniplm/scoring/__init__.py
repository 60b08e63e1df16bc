"""Per-instance scoring: teacher and reference NLL of every instance (issue 7), and the
score-file format (score_file.py) that Difference Sampling reads."""
