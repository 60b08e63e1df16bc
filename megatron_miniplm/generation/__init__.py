"""SeqKD's corpus: continuations sampled from a teacher for prompts cut from a dataset's
instances, written as a new indexed dataset (tools/generate_corpus.py)."""

# The version of what generation computes: raised with any change that alters the samples
# for some model and seed; part of the run's identity and of the pipeline stage's fingerprint.
GENERATION_VERSION = 1
