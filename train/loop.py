"""The training loop: the same for every backend.

    world = init_world()                          # torchrun, a Slurm step, or one
    model = StripedLM on meta -> to_empty -> init_weights (same seed on every rank)
    engine = build_engine(...)                    # wrap + optimizer (train/engine.py)
    resume from checkpoints/latest if any         # model, optimizer, loader, RNG, step
    for step: lr(step) -> micro-batches (fwd, loss / accum, bwd) -> clip -> guard -> step
              -> read the step before's loss and verdict, and log it (train/outcomes.py)
              -> evaluate (held out) -> checkpoint (this step's outcome read first)

On SIGUSR1 or SIGTERM (a scheduler's warning, train/preemption.py) the run finishes its step
and the next (the vote is read a step late), checkpoints and returns `stopped_by`; `stripes
train` then exits with REQUEUE_EXIT.

A step whose loss or gradient norm is not finite is skipped (no update) and counted; after
`max_bad_steps` in a row the run halts with a clear message. Everything a step depends on
is restored on resume (the schedule is a function of the step), so on CPU a resumed run
reproduces the uninterrupted run's losses exactly.

With `stages` (train/stages.py) the loop above runs once per stage, each built for its
stage's settings and started from the checkpoint that ended the stage before.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from stripes.arch.model import StripedLM
from stripes.core.config import ConfigError
from stripes.core.log import log
from stripes.data.loader import DataLoader, TokenDataset
from stripes.train.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from stripes.train.config import TrainConfig
from stripes.train.distill import Distiller
from stripes.train.distributed import World, all_reduce_mean, close_world, init_world
from stripes.train.engine import build_engine
from stripes.train.evaluate import build_eval_set, evaluate
from stripes.train.freeze import Freezer
from stripes.train.metrics import MetricsLogger, Throughput, mfu, peak_flops
from stripes.train.outcomes import Outcome, StepOutcomes, to_device
from stripes.train.parallel import resolve_backend
from stripes.train.preemption import StopRequest
from stripes.train.schedule import lr_at
from stripes.train.stage_eval import stage_end_eval
from stripes.train.stages import Segment, resume_step, stage_config


class TrainingHalted(RuntimeError):
    """Too many non-finite steps in a row: the run stops rather than train on garbage."""


@dataclass
class TrainResult:
    steps_done: int
    losses: dict[int, float]  # step -> mean loss over the global batch (this run's steps)
    skipped_steps: int
    last_checkpoint: Path | None
    stopped_by: str | None = None  # the signal that ended the run early (preemption.py)


def train(cfg: TrainConfig) -> TrainResult:
    world = init_world(cfg.device)
    finished = False
    try:
        with StopRequest() as stop:
            result = _train_stages(cfg, world, stop)
        finished = True
        return result
    finally:
        close_world(finished=finished)


def _train_stages(cfg: TrainConfig, world: World, stop: StopRequest) -> TrainResult:
    # Read once per process: `latest` is rewritten as the run goes.
    checkpoint = find_checkpoint(Path(cfg.output_dir), cfg.checkpoint.resume)
    if not cfg.stages:
        return _train(cfg, world, Segment("", 0, 0, cfg.steps), cfg.steps, checkpoint, stop)
    plan = [stage_config(cfg, i) for i in range(len(cfg.stages))]
    for stage_cfg, segment in plan:  # every stage fits this world before any trains
        try:
            stage_cfg.batch_plan(world.world_size)
            if segment.kind == "distill" and world.world_size > 1:
                raise ConfigError("parallel.backend", f"a world of {world.world_size}",
                                  "one process for a distill stage",
                                  "its mixers run outside the wrapped model")
        except ConfigError as err:
            raise ConfigError(f"stages[{segment.index}] ({segment.name}): {err.key}",
                              err.value, err.allowed, err.reason) from None
    done = resume_step(checkpoint, [segment for _, segment in plan])
    result = TrainResult(0, {}, 0, None)
    for stage_cfg, segment in plan:
        if done >= segment.end:
            continue  # trained before this process started
        part = _train(stage_cfg, world, segment, cfg.steps, checkpoint, stop)
        checkpoint, done = part.last_checkpoint, segment.end  # the next starts there
        result = TrainResult(result.steps_done + part.steps_done,
                             {**result.losses, **part.losses}, part.skipped_steps,
                             part.last_checkpoint, part.stopped_by)
        if part.stopped_by:
            break
        release_memory()
    return result


def release_memory() -> None:
    """Between stages: the finished stage's model, optimizer and compiled graphs go before
    the next (longer) stage allocates."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train(cfg: TrainConfig, world: World, segment: Segment, total_steps: int,
           checkpoint: Path | None, stop: StopRequest) -> TrainResult:
    """Steps [segment.start, segment.end) = [.., cfg.steps) of the run, from `checkpoint`
    (inside the segment, or at its start: the previous stage's last) or from scratch."""
    run_dir = Path(cfg.output_dir)
    sequences, accum = cfg.batch_plan(world.world_size)
    backend = resolve_backend(cfg.parallel.backend, world)
    # CPUs without bf16 matrix units run bf16 autocast slower than float32.
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and world.device.type == "cuda")

    _check_writable(run_dir)  # first: bad paths fail before any heavy work
    dataset = TokenDataset(cfg.data)
    if dataset.tokenizer.vocab_size > cfg.model.vocab_size:  # the loss does not check ids
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"at least the data's {dataset.tokenizer.vocab_size} token ids",
                          f"{cfg.data.sources[0].path} was tokenized with "
                          f"{dataset.tokenizer.file}")
    torch.manual_seed(cfg.seed)  # every rank initialises the same weights
    with torch.device("meta"):
        model = StripedLM(cfg.model)
    model.to_empty(device=world.device)
    model.init_weights()
    if checkpoint is None and segment.init_from:
        source = load_weights(segment.init_from, model, f"stages[{segment.index}].init_from")
        log.info(f"stage {segment.name!r} starts from the weights of {source}")
    engine = build_engine(model, cfg, backend, world, accum, bf16)
    freezer = Freezer(engine.model, cfg.freeze)
    objective = engine.module
    if segment.kind == "distill":  # one process: checked before any stage trained
        objective = Distiller(engine.model, segment.distill, world.device,
                              f"stages[{segment.index}].distill")
    loader = DataLoader(dataset, sequences, world.rank, world.world_size, world.device)
    stage_eval = bool(segment.name) and cfg.eval.at_stage_end
    held_out = cfg.eval.sources is not None or cfg.data.heldout > 0
    eval_set = (build_eval_set(dataset, cfg.eval.sources, cfg.eval.samples)
                if cfg.eval.every_steps or (stage_eval and held_out) else None)

    start, tokens_seen, skipped = segment.start, 0, 0
    checkpoint_stage = None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine.states, seed=cfg.seed)
        start, tokens_seen, skipped = state["step"], state["tokens_seen"], state["skipped_steps"]
        checkpoint_stage = state.get("stage", "")
        if not segment.name and checkpoint_stage:
            raise ConfigError("checkpoint.resume", str(checkpoint), "a checkpoint of a run "
                              "without stages, or checkpoint.resume=never",
                              f"it was saved by stage {checkpoint_stage!r} of a staged run")
        if checkpoint_stage == segment.name:  # else the stage's own data starts afresh
            loader.load_state_dict(state["data"])
            log.info(f"resumed from {checkpoint} at step {start}")
        else:
            log.info(f"stage {segment.name!r} starts from {checkpoint} (step {start})")
    if checkpoint is None and segment.start:
        raise ConfigError("checkpoint.resume", cfg.checkpoint.resume, "a checkpoint from step "
                          f"{segment.start} on in {run_dir / 'checkpoints'}",
                          f"stage {segment.name!r} starts there and none was found")
    if start < segment.start:
        raise ConfigError("checkpoint.resume", str(checkpoint), f"a checkpoint at step >= "
                          f"{segment.start}, where stage {segment.name!r} starts",
                          f"it was saved at step {start}, inside an earlier stage")

    metrics = MetricsLogger(run_dir, total_steps, world.rank, device=world.device)
    if checkpoint is not None and checkpoint_stage == segment.name:
        metrics.log_event("resumed", step=start, path=str(checkpoint))
    elif segment.name:
        metrics.log_event("stage", step=start, name=segment.name, index=segment.index,
                          seq_len=cfg.data.seq_len, steps=segment.end - segment.start,
                          init_from=segment.init_from if checkpoint is None else None)
    throughput = Throughput()
    flops_fwd, peak = model.flops_per_token(cfg.data.seq_len), peak_flops(world.device)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16) if bf16
                else nullcontext())
    losses: dict[int, float] = {}
    bad_in_a_row, last_save, saved = 0, time.monotonic(), None
    outcomes, stop_voted, save_voted = StepOutcomes(), False, False

    def record(done: Outcome, step: int) -> None:
        """Book-keep step `done.step`, read while `step` is the latest queued."""
        nonlocal bad_in_a_row, skipped, stop_voted, save_voted
        loss_mean, stop_votes, clock_votes, grad_norm, applied = done.values
        behind = step - done.step  # steps queued since: the loader and tokens moved on
        if applied:
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
            skipped += 1
            end = loader.samples_consumed - behind * sequences
            metrics.log_event("bad_step", step=done.step + 1, loss=loss_mean,
                              grad_norm=grad_norm, samples=[end - sequences, end])
            if bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingHalted(f"{bad_in_a_row} steps in a row had a non-finite loss or "
                                     f"gradient norm (last at step {done.step + 1}); see "
                                     f"{run_dir / 'metrics.jsonl'} for the batches")
        losses[done.step] = loss_mean
        throughput.update(cfg.global_batch_tokens)
        stop_voted |= stop_votes > 0
        save_voted |= clock_votes > 0
        if (done.step + 1) % cfg.log_every == 0 or done.step + 1 == cfg.steps:
            rate = throughput.tokens_per_s()
            metrics.log(done.step + 1, loss=loss_mean, lr=done.lr, grad_norm=grad_norm,
                        tokens_per_s=rate, skipped_steps=skipped,
                        tokens_seen=tokens_seen - behind * cfg.global_batch_tokens,
                        step_time_s=throughput.step_time(),
                        mfu=mfu(rate / world.world_size, flops_fwd, peak)
                        if rate and peak else None)

    if freezer.groups:
        metrics.log_event("frozen", step=start, params=freezer.count(start))
    for step in range(start, cfg.steps):
        if step > start and freezer.changes_at(step):
            metrics.log_event("frozen", step=step, params=freezer.count(step))
        lr = lr_at(step - segment.start, cfg.schedule, cfg.optim.lr,
                   segment.end - segment.start)
        batch = next(loader)
        loss_sum = torch.zeros((), device=world.device)
        for micro in range(accum):
            rows = slice(micro * cfg.micro_batch, (micro + 1) * cfg.micro_batch)
            with engine.accumulating(last=micro == accum - 1):
                with autocast:
                    doc_ids = batch["doc_ids"][rows] if cfg.document_masking else None
                    loss = objective(batch["input_ids"][rows], doc_ids,
                                     batch["targets"][rows]) / accum
                engine.backward(loss)
            loss_sum += loss.detach()
        # One reduction for the loss and two votes that must be unanimous: a signal may reach
        # one rank first, and each rank reads its own clock. The update is queued on the
        # reduced loss's device-side verdict; the host reads it all one step late
        # (train/outcomes.py), and at once only where the step ends in a save, an evaluation
        # or the run's end, or a vote read at the step before asked for a save or a stop.
        minutes = cfg.checkpoint.every_minutes
        votes = to_device([float(stop.requested), float(
            minutes is not None and time.monotonic() - last_save > 60 * minutes)], world.device)
        reduced = all_reduce_mean(torch.cat([loss_sum.reshape(1), votes]))
        grad_norm, applied = engine.step(lr, torch.isfinite(reduced[0]), freezer.frozen(step))
        outcomes.put(step, lr, torch.cat([
            reduced, torch.stack([grad_norm.float(), applied.float()]).to(reduced)]))
        tokens_seen += cfg.global_batch_tokens

        evaluating = cfg.eval.every_steps and ((step + 1) % cfg.eval.every_steps == 0
                                               or step + 1 == cfg.steps)
        saving = (step + 1) % cfg.checkpoint.every_steps == 0 or step + 1 == cfg.steps
        boundary = evaluating or saving or (stage_eval and step + 1 == segment.end)
        for done in outcomes.take(keep_latest=True):
            record(done, step)
        if boundary or stop_voted or save_voted:  # act on this step's own outcome too
            for done in outcomes.take(keep_latest=False):
                record(done, step)

        if evaluating:
            losses_eval = evaluate(engine.module, eval_set, cfg.eval.micro_batch or cfg.micro_batch,
                                   world.rank, world.world_size, world.device, autocast,
                                   cfg.document_masking)
            metrics.log_eval(step + 1, losses_eval)
            throughput.mark()  # evaluation is not training time
        stopping = stop_voted and step + 1 < total_steps  # the last step ends it anyway
        if saving or save_voted or stopping:
            trainer_state = {"tokens_seen": tokens_seen, "skipped_steps": skipped,
                             "data": loader.state_dict(), "stage": segment.name}
            saved = save_checkpoint(run_dir, step + 1, engine.states, trainer_state,
                                    config_yaml, cfg.checkpoint.keep_last)
            metrics.log_event("checkpoint", step=step + 1, path=str(saved))
            last_save, save_voted = time.monotonic(), False
            throughput.mark()  # the save is not training time
        if stage_eval and step + 1 == segment.end:  # after the save: a failure loses no step
            stage_end_eval(cfg, segment, engine.module, eval_set, world, autocast, metrics,
                           run_dir)
        if stopping:
            by = stop.signal_name or "another rank's signal"
            metrics.log_event("stopped", step=step + 1, signal=by)
            metrics.close()
            return TrainResult(step + 1 - start, losses, skipped, saved, by)
    metrics.close()
    return TrainResult(cfg.steps - start, losses, skipped, saved)


def _check_writable(run_dir: Path) -> None:
    """Create `run_dir` and prove a file can be written there, or fail in one line."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError("output_dir", str(run_dir), "a directory this process can write",
                          err.strerror or type(err).__name__) from None
