"""Training in stages (train/stages.py): how each stage's config resolves, the one-line errors
for bad stage lists, and on CPU a two-stage run (64 -> 128 tokens, YaRN on the attention
layers): transitions at the right steps, a resume inside the second stage that reproduces
the uninterrupted run, and the result evaluating at a longer length than it trained at."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from stripes.arch import StripedLM
from stripes.core.config import ConfigError
from stripes.train.checkpoint import DcpStates, load_checkpoint
from stripes.train.config import load_train_config
from stripes.train.loop import train
from stripes.train.stages import stage_config

from conftest import ROOT

TINY = ROOT / "configs" / "train" / "tiny.yaml"
STAGES = ("stages=[{name: short, seq_len: 64, steps: 4}, "
          "{name: long, seq_len: 128, steps: 4, lr: 1e-3, schedule: {warmup_steps: 1}, "
          "rope: {scaling: yarn, factor: 2, original_max_len: 64}}]")


def config(*overrides: str, stages: str = STAGES, data: Path | None = None):
    extra = [] if data is None else [
        f"data.sources=[{{path: {data}, source: devil}}, {{path: {data}, source: jargon}}]"]
    return load_train_config(TINY, ["steps=null", stages, *extra, *overrides])


# -- configuration ----------------------------------------------------------------------------
def test_each_stage_resolves_to_its_own_settings():
    cfg = config()
    assert cfg.steps == 8
    short, first = stage_config(cfg, 0)
    long, second = stage_config(cfg, 1)
    assert (first.start, first.end, second.start, second.end) == (0, 4, 4, 8)
    assert (short.steps, long.steps) == (4, 8)  # each stage ends at its global last step
    assert (short.data.seq_len, long.data.seq_len) == (64, 128)
    assert (short.data.seed, long.data.seed) == (cfg.data.seed, cfg.data.seed + 1)
    assert long.model.max_seq_len == 128 and long.optim.lr == 1e-3 and short.optim.lr == 3e-3
    assert long.schedule.warmup_steps == 1 and long.schedule.kind == cfg.schedule.kind
    for name in ("attn", "attn_local"):  # every attention layer, variants included
        assert long.model.mixers[name]["rope"]["scaling"] == "yarn"
        assert "scaling" not in (short.model.mixers.get(name) or {}).get("rope", {})
    assert long.model.mixers["attn"]["rope"]["theta"] == 10000  # merged, not replaced
    assert long.global_batch_tokens == cfg.global_batch_tokens  # the same tokens per step


@pytest.mark.parametrize("stages, key", [
    ("[{name: a, seq_len: 128, steps: 2}, {name: b, seq_len: 64, steps: 2}]",
     "stages[1].seq_len"),
    ("[{name: a, seq_len: 64, steps: 2}, {name: a, seq_len: 128, steps: 2}]",
     "stages[1].name"),
    ("[{name: a, seq_len: 64, steps: 0}]", "stages[0].steps"),
    ("[{name: a, seq_len: 64, steps: 2, rope: {factr: 2}}]", "stages[0].rope"),
    ("[{name: a, seq_len: 64, steps: 2}, {name: b, seq_len: 96, steps: 2}]",
     "stages[1] (b): global_batch_tokens"),  # 512 tokens are not whole sequences of 96
    ("[{name: a, seq_len: 64, steps: 2, rope: {factor: 0.5}}]",
     "stages[0] (a): model.mixers.attn.rope.factor"),
    ("[{name: a, seq_len: 64, steps: 2, schedule: {warmup_steps: 3}}]",
     "stages[0] (a): schedule.warmup_steps"),
    ("[]", "stages"),
    ("[{name: a/b, seq_len: 64, steps: 2}]", "stages[0].name"),
    ("[{name: a, seq_len: 64, steps: 3}, {name: b, seq_len: 64, steps: 1}]",
     "stages[1] (b): schedule.warmup_steps"),  # the run's warm-up of 2, inherited
    ("[{name: a, seq_len: 64, steps: 2, rope: {scaling: yarn, factor: 2}}]",
     "stages[0].rope.original_max_len"),
    ("[{name: a, seq_len: 64, steps: 2, init_from: /no/such/run}]", "stages[0].init_from"),
    ("[{name: a, seq_len: 64, steps: 2}, {name: b, seq_len: 64, steps: 2, init_from: /tmp}]",
     "stages[1].init_from"),
])
def test_bad_stages_are_one_line_naming_the_key(stages, key):
    with pytest.raises(ConfigError) as err:
        config(stages=f"stages={stages}")
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_a_stage_keeps_the_rope_scaling_it_was_extended_with():
    stages = ("stages=[{name: a, seq_len: 64, steps: 4}, {name: b, seq_len: 128, steps: 4, "
              "rope: {scaling: yarn, factor: 2, original_max_len: 64}}, "
              "{name: c, seq_len: 128, steps: 4}, "
              "{name: d, seq_len: 256, steps: 4, micro_batch: 2, rope: {factor: 4}}]")
    cfg = config(stages=stages)
    ropes = [stage_config(cfg, i)[0].model.mixers["attn"]["rope"] for i in range(4)]
    assert "scaling" not in ropes[0]
    assert ropes[1] == ropes[2] == {"theta": 10000, "scaling": "yarn", "factor": 2,
                                    "original_max_len": 64}
    assert ropes[3]["factor"] == 4 and ropes[3]["scaling"] == "yarn"


def test_steps_must_be_the_stages_sum_or_left_out():
    with pytest.raises(ConfigError, match="steps=5 .allowed: the sum of the stages' steps, 8"):
        config("steps=5")
    assert config("steps=8").steps == 8


def test_rope_scaling_without_attention_warns():
    stages = "stages=[{name: a, seq_len: 64, steps: 2, rope: {scaling: linear, factor: 2}}]"
    with pytest.warns(UserWarning, match="no attention layer"):
        config("model.stripes=[hyena_se, mamba]", "model.overrides={-1: mamba}",
               stages=stages)


# -- training ---------------------------------------------------------------------------------
def events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_data):
    run_dir = tmp_path_factory.mktemp("stages") / "run"
    cfg = config(f"output_dir={run_dir}", "checkpoint.every_steps=2", "checkpoint.keep_last=4",
                 data=demo_data)
    return run_dir, train(cfg), demo_data


def test_stages_run_in_order_with_a_checkpoint_at_each_boundary(uninterrupted):
    run_dir, result, _ = uninterrupted
    assert sorted(result.losses) == list(range(8))
    assert all(math.isfinite(loss) for loss in result.losses.values())
    stages = [(e["name"], e["step"], e["seq_len"]) for e in events(run_dir)
              if e["event"] == "stage"]
    assert stages == [("short", 0, 64), ("long", 4, 128)]
    saved = [e["step"] for e in events(run_dir) if e["event"] == "checkpoint"]
    assert saved == [2, 4, 6, 8]
    ends = [(e["stage"], e["step"], e["seq_len"], sorted(e["passkey"]))
            for e in events(run_dir) if e["event"] == "stage_eval"]
    depths = ["depth 0.1", "depth 0.5", "depth 0.9"]
    assert ends == [("short", 4, 64, depths), ("long", 8, 128, depths)]
    assert (run_dir / "eval" / "long.json").exists()
    stage_of = {step: json.loads((run_dir / "checkpoints" / f"step-{step:06d}" /
                                  "trainer.json").read_text())["trainer"]["stage"]
                for step in (6, 8)}
    assert stage_of == {6: "long", 8: "long"}


def test_resume_inside_the_second_stage_reproduces_the_run(uninterrupted, tmp_path):
    run_dir, result, data = uninterrupted
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    checkpoints = resumed_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-000008")  # as if killed after step 6's save
    (checkpoints / "latest").write_text("step-000006")
    again = train(config(f"output_dir={resumed_dir}", "checkpoint.every_steps=2",
                         "checkpoint.keep_last=4", data=data))
    assert sorted(again.losses) == [6, 7]
    assert [again.losses[s] for s in (6, 7)] == [result.losses[s] for s in (6, 7)]
    resumed = [e["step"] for e in events(resumed_dir) if e["event"] == "resumed"]
    assert resumed == [6]
    # A finished run has nothing left to do, in any stage.
    assert train(config(f"output_dir={resumed_dir}", data=data)).steps_done == 0


def resume_from(run_dir: Path, tmp_path: Path, step: int) -> Path:
    """A copy of the run as if killed right after saving `step`."""
    copy = tmp_path / f"at-{step}"
    shutil.copytree(run_dir, copy)
    for later in (copy / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(f"step-{step:06d}")
    return copy


def test_resume_at_a_stage_boundary_reproduces_the_run(uninterrupted, tmp_path):
    run_dir, result, data = uninterrupted
    copy = resume_from(run_dir, tmp_path, 4)
    again = train(config(f"output_dir={copy}", "checkpoint.every_steps=2",
                         "checkpoint.keep_last=4", data=data))
    assert sorted(again.losses) == [4, 5, 6, 7]
    assert [again.losses[s] for s in range(4, 8)] == [result.losses[s] for s in range(4, 8)]


def test_a_checkpoint_of_other_stages_is_refused(uninterrupted, tmp_path):
    run_dir, _, data = uninterrupted
    copy = resume_from(run_dir, tmp_path, 6)
    renamed = STAGES.replace("name: long", "name: longer")
    with pytest.raises(ConfigError, match="saved at step 6 by stage 'long'; the stages have "
                                          "stage 'longer' there"):
        train(config(f"output_dir={copy}", stages=renamed, data=data))
    shorter = STAGES.replace("name: short, seq_len: 64, steps: 4", "name: short, seq_len: 64, "
                             "steps: 6")
    with pytest.raises(ConfigError, match="by stage 'long'; the stages have stage 'short'"):
        train(config(f"output_dir={copy}", stages=shorter, data=data))
    with pytest.raises(ConfigError, match="saved by stage 'long' of a staged run"):
        train(load_train_config(TINY, [f"output_dir={copy}", "steps=12",
                                       f"data.sources=[{{path: {data}, source: devil}}]"]))


def test_the_result_evaluates_beyond_its_training_length(uninterrupted):
    run_dir, _, _ = uninterrupted
    cfg, _ = stage_config(config(), 1)
    model = StripedLM(cfg.model)
    model.init_weights()
    load_checkpoint(run_dir / "checkpoints" / "step-000008", DcpStates(model, None))
    ids = torch.randint(0, cfg.model.vocab_size, (1, 257),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    assert math.isfinite(loss.item()) and loss.item() < 2 * math.log(cfg.model.vocab_size)


def test_the_long_context_demo_runs_every_stage(tmp_path, demo_data):
    """configs/train/long-context-demo.yaml as written, one step a stage: 256 -> 1024 -> 4096
    tokens on CPU, YaRN on the attention layers, block checkpointing in the last stage."""
    sources = (f"data.sources=[{{path: {demo_data}, source: devil}}, "
               f"{{path: {demo_data}, source: jargon}}]")
    cfg = load_train_config(ROOT / "configs" / "train" / "long-context-demo.yaml",
                            [sources, f"output_dir={tmp_path}", "eval.every_steps=0"])
    for stage in cfg.stages:
        stage.steps, stage.schedule = 1, None
    cfg.schedule.warmup_steps = 0
    cfg.steps = None  # derived again from the stages
    cfg.validate()
    result = train(cfg)
    assert sorted(result.losses) == [0, 1, 2]
    assert all(math.isfinite(loss) for loss in result.losses.values())
    stages = [(e["name"], e["seq_len"]) for e in events(tmp_path) if e["event"] == "stage"]
    assert stages == [("ctx256", 256), ("ctx1024", 1024), ("ctx4096", 4096)]
    # Each stage ends with the held-out loss by context position and passkey retrieval at
    # its own length, logged and written to the run directory.
    results = {e["stage"]: e for e in events(tmp_path) if e["event"] == "stage_eval"}
    assert list(results) == ["ctx256", "ctx1024", "ctx4096"]
    assert list(results["ctx256"]["loss_by_position"]) == ["0-63", "64-127", "128-255"]
    # (the demo's documents are short: positions inside them stop well before 4096)
    assert set(results["ctx4096"]["loss_by_position"]) <= {
        "0-63", "64-127", "128-255", "256-511", "512-1023", "1024-2047", "2048-4095"}
    for name, result in results.items():
        assert all(math.isfinite(v) for v in result["loss_by_position"].values())
        assert set(result["passkey"]) == {"depth 0.1", "depth 0.5", "depth 0.9"}
        assert json.loads((tmp_path / "eval" / f"{name}.json").read_text()) == {
            k: v for k, v in result.items() if k not in ("event", "time")}


def test_the_first_stage_starts_from_outside_weights(uninterrupted, tmp_path):
    """`init_from` (a run directory: its latest checkpoint) starts the first stage from those
    weights: after one step at a negligible learning rate they are still the source's, and
    the first loss is below a fresh model's on the same batch."""
    from stripes.train.dcp_states import read_dcp_weights

    run_dir, _, data = uninterrupted
    stage = "{name: more, seq_len: 128, steps: 1, lr: 1e-12, schedule: {warmup_steps: 0}%s}"
    grafted = train(config(f"output_dir={tmp_path / 'grafted'}", data=data,
                           stages=f"stages=[{stage % f', init_from: {run_dir}'}]"))
    fresh = train(config(f"output_dir={tmp_path / 'fresh'}", data=data,
                         stages=f"stages=[{stage % ''}]"))
    assert grafted.losses[0] < fresh.losses[0] - 0.1, (grafted.losses, fresh.losses)
    source = read_dcp_weights(run_dir / "checkpoints" / "step-000008")
    started = read_dcp_weights(tmp_path / "grafted" / "checkpoints" / "step-000001")
    assert source.keys() == started.keys()
    for name, tensor in source.items():
        torch.testing.assert_close(started[name], tensor, rtol=1e-6, atol=1e-9, msg=name)
    starts = [e for e in events(tmp_path / "grafted") if e["event"] == "stage"]
    assert starts[0]["init_from"] == str(run_dir)
