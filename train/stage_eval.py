"""What is measured when a stage ends (train/stages.py): the held-out loss by context
position (train/evaluate.py) and passkey retrieval at several depths (train/passkey.py),
both at the stage's sequence length. Logged as a `stage_eval` event in metrics.jsonl and
written to OUTPUT_DIR/eval/<stage>.json.

    eval: {at_stage_end: true, passkey_depths: [0.1, 0.5, 0.9], passkey_samples: 16,
           passkey_key_len: 4}

The loss by position needs held-out data (data.heldout or eval.sources); without it only the
passkey runs.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from stripes.data.format import write_atomic
from stripes.train.config import TrainConfig
from stripes.train.distributed import World
from stripes.train.evaluate import EvalSet, evaluate
from stripes.train.metrics import MetricsLogger
from stripes.train.passkey import passkey_accuracy
from stripes.train.stages import Segment


def stage_end_eval(cfg: TrainConfig, segment: Segment, model, eval_set: EvalSet | None,
                   world: World, autocast: AbstractContextManager, metrics: MetricsLogger,
                   run_dir: Path) -> dict[str, Any]:
    """Measure, log and write the stage's results; every rank calls it (collectives)."""
    micro_batch = cfg.eval.micro_batch or cfg.micro_batch
    results: dict[str, Any] = {"stage": segment.name, "step": segment.end,
                               "seq_len": cfg.data.seq_len}
    if eval_set is not None:
        results["loss_by_position"] = evaluate(
            model, eval_set, micro_batch, world.rank, world.world_size, world.device,
            autocast, cfg.document_masking, by_position=True)["by_position"]
    if cfg.eval.passkey_samples:
        results["passkey"] = passkey_accuracy(
            model, cfg.model.vocab_size, cfg.data.seq_len, cfg.eval.passkey_depths,
            cfg.eval.passkey_key_len, cfg.eval.passkey_samples, micro_batch, world.device,
            autocast, seed=cfg.seed)
    metrics.log_event("stage_eval", **results)
    if world.rank == 0:
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "eval" / f"{segment.name}.json",
                     json.dumps(results, indent=1).encode())
    return results
