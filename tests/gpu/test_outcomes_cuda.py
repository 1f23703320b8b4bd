"""train/outcomes.py on CUDA: queuing a step's outcome and its votes never waits for the device
(sync debug mode raises on any host wait), and what is read is what the step computed."""

from __future__ import annotations

import pytest
import torch

from stripes.train.outcomes import StepOutcomes, to_device

pytestmark = pytest.mark.gpu


def test_put_and_votes_queue_without_a_host_wait():
    a = torch.randn(4096, 4096, device="cuda")
    outcomes = StepOutcomes()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2):
            busy = a @ a @ a  # work still running when the outcome is queued behind it
            votes = to_device([1.0, float(step)], a.device)
            outcomes.put(step, 0.5, torch.cat([busy[:1, 0], votes]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = (a @ a @ a)[0, 0].item()
    done = outcomes.take(keep_latest=False)
    assert [d.step for d in done] == [0, 1]
    assert done[1].values[1:] == [1.0, 1.0]
    assert abs(done[1].values[0] - want) <= 1e-3 * abs(want)
