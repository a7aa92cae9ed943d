import os
import sys

import pytest
import torch

from speccascade import runner

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


class SimulatedGraph:
    """A captured program on the CPU: a replay calls the same step function on the same state."""

    def __init__(self, step, gen, per_replay):
        self.step, self.gen, self.per_replay = step, gen, per_replay

    def replay(self):
        for _ in range(self.per_replay):
            self.step(self.gen)


@pytest.fixture
def simulated_capture(monkeypatch):
    """The CUDA capture of the decoding loops replaced by a simulation on the CPU: ``capture_graph``
    warms the step up twice on the live state and returns a :class:`SimulatedGraph`; the fixture
    is the list of ``per_replay`` of each capture made."""
    calls = []

    def capture_graph(step, device, per_replay):
        gen = torch.Generator(device=device)
        for _ in range(2):  # the warm-up runs the step on the live state, as on a GPU
            step(gen)
        calls.append(per_replay)
        return SimulatedGraph(step, gen, per_replay), gen

    monkeypatch.setattr(runner, "can_capture", lambda *bs: all(getattr(b, "capturable", False) for b in bs))
    monkeypatch.setattr(runner, "capture_graph", capture_graph)
    return calls
