"""A run that shrinks: FSDP2 on 4 ranks to step 4, resumed on 2 ranks to step 6, then in one
process to step 8, follows the single-process curve, reads the same samples, and exports the
weights a one-process load gets (train/dcp_states.py reshards on load)."""

from __future__ import annotations

import json
import os
import sys

import pytest

# single_process_run is test_train's fixture: imported, pytest uses it (module-scoped).
from test_train import (  # noqa: F401
    FLAT,
    TINY,
    data_overrides,
    eval_losses,
    run,
    single_process_run,
    step_losses,
    train_cmd,
)


def torchrun(nproc: int, run_dir, data, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", "stripes.launch.cli", "train", TINY,
            f"output_dir={run_dir}", *data_overrides(data), "parallel.backend=fsdp", *extra]


@pytest.mark.multiprocess
def test_four_ranks_resume_on_two_then_on_one(tmp_path, demo_data,
                                              single_process_run):  # noqa: F811
    shrink = tmp_path / "shrink"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 8 sequences a step: 4 ranks x micro-batch 2, then 2 ranks x 2 x 2 accumulated, then 1.
    common = [*FLAT, "micro_batch=2", "checkpoint.every_steps=2"]
    for nproc, steps in ((4, 4), (2, 6)):
        done = run(torchrun(nproc, shrink, demo_data, *common, f"steps={steps}"), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    done = run(train_cmd(shrink, demo_data, *common, "steps=8"))
    assert done.returncode == 0, done.stderr[-3000:]

    want, got = step_losses(single_process_run), step_losses(shrink)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):  # float32 on CPU: only the order of the sums differs
        assert abs(got[step] - want[step]) < 1e-4 * abs(want[step]), (step, got, want)
    for step in (4, 8):  # held-out loss on 4 ranks at step 4, on 1 at step 8
        for name in ("devil", "jargon"):
            a = eval_losses(shrink)[step]["per_source"][name]
            b = eval_losses(single_process_run)[step]["per_source"][name]
            assert abs(a - b) < 1e-4 * b, (step, name, a, b)
    # The same samples in the same order: the loaders' positions agree at every boundary.
    ref = single_process_run / "checkpoints" / "step-000008" / "trainer.json"
    mine = shrink / "checkpoints" / "step-000008" / "trainer.json"
    assert json.loads(mine.read_text())["trainer"]["data"] == \
        json.loads(ref.read_text())["trainer"]["data"]
    events = [json.loads(line) for line in (shrink / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [4, 6]
