"""Per-instance scoring: teacher and reference NLL of every instance, and the
score-file format (score_file.py) that Difference Sampling reads."""

# The version of what scoring computes. It is raised with any change that alters the numbers
# for some model, and is part of every score file's settings and of the fingerprints of the
# pipeline's stages that read a model's logits (scoring, Vanilla KD, evaluation): scores made
# by other code are then refused or redone, never reused.
SCORES_VERSION = 2
