"""What the host learns of each optimizer step (its loss, the ranks' votes, the gradient norm,
whether the update applied), read one step late so that the device's queue is not emptied at
every step boundary.

Reading a step's outcome waits for its update to finish. Read at once, the device's queue runs
dry and the next step's forward runs at the pace the host launches it: a profiled
transformer-1b step on an H100 had the device idle for 18.8 ms of its 67 ms forward (with
the profiler's own host overhead). Read after the next step has been queued, the host is
ahead by that step. Copies in either direction are queued without a host wait (pinned
memory), so the read is the only wait. Measured, 0.5-1.0% more tokens/s for
transformer-1b, hybrid-1b and sh2-1b at one micro-batch a step (BENCHMARKS.md). The model's
loss counts its targets on the device (arch/model.py); what still reads back inside a step:
document masking's sequence bounds, the foreach (non-fused) AdamW's verdict, DeepSpeed's
gradient norm.

    outcomes = StepOutcomes()
    for step: queue the step's work; outcomes.put(step, lr, device values)
              for done in outcomes.take(keep_latest=not boundary): book-keep done
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """A float32 tensor of `values` on `device`, copied without waiting for the device's
    queue (a copy from pageable memory would wait for everything queued before it)."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class Outcome:
    step: int
    lr: float
    values: list[float]


@dataclass
class _Queued:
    step: int
    lr: float
    host: torch.Tensor  # filled once `ready` has passed
    ready: torch.cuda.Event | None


class StepOutcomes:
    """Each step's device values, copied to the host behind its work and read in step order."""

    def __init__(self) -> None:
        self._queued: list[_Queued] = []

    def put(self, step: int, lr: float, values: torch.Tensor) -> None:
        """Queue the copy of `values` (1-D, on the step's device) to the host; no wait."""
        if values.device.type != "cuda":
            self._queued.append(_Queued(step, lr, values.detach().clone(), None))
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values.detach(), non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self._queued.append(_Queued(step, lr, host, ready))

    def take(self, keep_latest: bool) -> list[Outcome]:
        """The queued outcomes in step order, waiting for each; with `keep_latest` the last
        one put stays queued (its step's work may still be running)."""
        count = len(self._queued) - 1 if keep_latest else len(self._queued)
        taken, self._queued = self._queued[:max(count, 0)], self._queued[max(count, 0):]
        for queued in taken:
            if queued.ready is not None:
                queued.ready.synchronize()
        return [Outcome(q.step, q.lr, q.host.tolist()) for q in taken]
