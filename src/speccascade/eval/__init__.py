"""Evaluation: metrics (sacrebleu) and translation of the Bible task with any method."""
