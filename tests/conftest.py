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


@pytest.fixture
def simulated_capture(monkeypatch):
    """The CUDA captures replaced by simulations on the CPU (tests/helpers.py): the decoding loops'
    programs (``runner.capture_graph``: the step warmed up twice on the live state, a replay calls
    it again) and single calls (``runner.capture_call``). The fixture is the list of
    ``per_replay`` of each program captured."""
    from helpers import SimulatedCalls, simulated_capture_graph

    calls = []
    monkeypatch.setattr(runner, "can_capture", lambda *bs: all(getattr(b, "capturable", False) for b in bs))
    monkeypatch.setattr(runner, "capture_graph", simulated_capture_graph(calls))
    monkeypatch.setattr(runner, "capture_call", SimulatedCalls().capture_call)
    return calls


@pytest.fixture
def simulated_calls(simulated_capture, monkeypatch):
    """As ``simulated_capture``; the fixture is the :class:`helpers.SimulatedCalls` of single calls."""
    from helpers import SimulatedCalls

    calls = SimulatedCalls()
    monkeypatch.setattr(runner, "capture_call", calls.capture_call)
    return calls
