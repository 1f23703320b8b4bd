"""train/outcomes.py: each step's outcome read in step order, the latest kept back on request."""

from __future__ import annotations

import torch

from stripes.train.outcomes import StepOutcomes, to_device


def test_outcomes_are_read_in_step_order_and_the_latest_can_wait():
    outcomes = StepOutcomes()
    outcomes.put(0, 0.1, torch.tensor([1.0, 0.0]))
    assert outcomes.take(keep_latest=True) == []  # step 0's work may still be running
    values = torch.tensor([2.0, 1.0])
    outcomes.put(1, 0.2, values)
    values += 5  # the step's tensor is reused or changed later: what was put stays
    [first] = outcomes.take(keep_latest=True)
    assert (first.step, first.lr, first.values) == (0, 0.1, [1.0, 0.0])
    [second] = outcomes.take(keep_latest=False)
    assert (second.step, second.lr, second.values) == (1, 0.2, [2.0, 1.0])
    assert outcomes.take(keep_latest=False) == []


def test_votes_reach_the_device_as_float32():
    votes = to_device([1.0, 0.0], torch.device("cpu"))
    assert votes.dtype == torch.float32 and votes.tolist() == [1.0, 0.0]
