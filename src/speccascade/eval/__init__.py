"""Evaluation: metrics (sacrebleu), tasks (the Bible translation task and JSONL files), the sweep and its report."""
