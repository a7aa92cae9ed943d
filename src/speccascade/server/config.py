"""The ``speccascade serve`` arguments (kept out of :mod:`speccascade.cli` so its diff stays small;
imports nothing beyond argparse and the registry)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..registry import METHODS


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The server's own arguments (the pair's and the models' come from the CLI's shared helpers)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id /v1/models lists (default: speccascade-<pair> "
                                                      "or the verifier's directory name)")
    p.add_argument("--method", default="token_v3", choices=list(METHODS), help="default method of a request")
    p.add_argument("--alpha", type=float, default=None, help="default alpha of a request using --method "
                                                              "(other methods: their own default)")
    p.add_argument("--gamma", type=int, default=5, help="default draft block size")
    p.add_argument("--temperature", type=float, default=1.0, help="default temperature (OpenAI's default, 1)")
    p.add_argument("--max-tokens", type=int, default=128, help="default max_tokens of a request")
    p.add_argument("--max-batch-size", type=int, default=32, help="most prompts decoded together in one batch")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="when the loop is idle, wait this long for more requests before starting a batch")
    p.add_argument("--max-prompts", type=int, default=64, help="most prompts in one request")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration file for quality_floor / latency_budget requests: a JSON file of "
                        "python -m speccascade.server.calibration, or sweep JSONL records (docs/server.md)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests get to finish (new ones get 503)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
