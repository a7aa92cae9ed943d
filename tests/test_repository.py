"""The repository itself: what a GPU run needs of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the tracked tree's ceiling: a GPU run copies the working tree (64 MiB in all, with what it carries)
TREE_LIMIT_BYTES = 60_000_000


def test_the_tracked_tree_fits_a_gpu_run():
    """The tracked files stay under 60 MB, so that the working tree travels to a GPU machine with room
    for what a run carries; weights beyond the shipped ones and bulky records (plots no doc shows, run
    tarballs) stay out of git. The message names the largest files."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sizes = {p: (ROOT / p).stat().st_size for p in listed.decode().split("\0") if p and (ROOT / p).is_file()}
    if not sizes:
        pytest.skip("git lists no files here")
    total = sum(sizes.values())
    largest = ", ".join(f"{p} ({n / 1e6:.2f} MB)" for p, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
    assert total < TREE_LIMIT_BYTES, (f"the tracked tree is {total / 1e6:.2f} MB, over "
                                      f"{TREE_LIMIT_BYTES / 1e6:.0f} MB: take weights and bulky records out of "
                                      f"git (largest: {largest})")
