"""The distillation stage (train/distill.py): a small Llama's attention and MLPs grafted into
a hybrid, then its Hyena mixers trained to imitate the Llama's attention on real data: the
per-layer regression loss falls, and nothing but those mixers and their pre-norms moves."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from stripes.core.config import ConfigError
from stripes.graft.apply import run_graft
from stripes.graft.spec import load_graft_spec
from stripes.train.config import load_train_config
from stripes.train.dcp_states import read_dcp_weights
from stripes.train.loop import train

from conftest import ROOT

transformers = pytest.importorskip("transformers")
TINY = ROOT / "configs" / "train" / "tiny.yaml"
HYBRID = {"d_model": 64, "n_layers": 4, "vocab_size": 4096, "stripes": ["hyena_se", "attn"],
          "norm_eps": 1e-5, "max_seq_len": 64,
          "mixers": {"attn": {"n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 500.0}},
                     "hyena_se": {"filter_len": 7}},
          "mlp": {"kind": "swiglu", "hidden": 96}}


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    """A 4-layer Llama (the demo tokenizer's vocabulary) and its graft into HYBRID: its
    attention of layers 1, 3 into the hybrid's attention layers, all MLPs, embeddings, head
    and final norm; the Hyena layers 0 and 2 start fresh."""
    root = tmp_path_factory.mktemp("distill")
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama",
                                                          safe_serialization=True)
    rules = [{"source": "llama", "component": "attention", "from": "1,3", "to": "1,3"},
             {"source": "llama", "component": "mlp", "from": "0..3", "to": "0..3"},
             {"source": "llama", "component": "embeddings"},
             {"source": "llama", "component": "head"},
             {"source": "llama", "component": "final_norm"}]
    spec = {"target": {"model": HYBRID}, "rules": rules,
            "sources": {"llama": {"kind": "hf_llama", "path": str(root / "llama")}}}
    (root / "graft.yaml").write_text(yaml.safe_dump(spec))
    run_graft(load_graft_spec(root / "graft.yaml"), root / "graft")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        **config.to_dict(), "vocab_size": 100})).save_pretrained(root / "small-vocab")
    return root


def distill_stage(root, distill, steps=24):
    layers = {"source": str(root / "llama"), "source_layers": "0,2", "target_layers": "0,2",
              **distill}
    return {"name": "distill", "kind": "distill", "seq_len": 64, "steps": steps,
            "init_from": str(root / "graft"), "distill": layers}


def common(data, out):
    return [f"model={json.dumps(HYBRID)}", "arch=null", "steps=null", f"output_dir={out}",
            f"data.sources=[{{path: {data}, source: devil}}]", "schedule.kind=constant",
            "schedule.warmup_steps=0", "optim.lr=1e-2", "checkpoint.every_steps=24"]


def base_overrides(root, data, out, distill):
    return [*common(data, out), f"stages=[{json.dumps(distill_stage(root, distill))}]"]


def distill_config(root, data, out, **distill):
    return load_train_config(TINY, base_overrides(root, data, out, distill))


def test_new_mixers_learn_to_imitate_the_attention_they_replace(grafted, demo_data, tmp_path):
    result = train(distill_config(grafted, demo_data, tmp_path / "run"))
    losses = [result.losses[s] for s in range(24)]  # relative MSE to the Llama's attention
    # 7 taps explain only part of what attention does: the loss settles near 0.78 from 1.0
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4]), losses
    before = read_dcp_weights(grafted / "graft" / "checkpoints" / "step-000000")
    after = read_dcp_weights(tmp_path / "run" / "checkpoints" / "step-000024")
    for name, tensor in before.items():
        trained = name.startswith(("blocks.0.mixer", "blocks.2.mixer"))
        assert torch.equal(after[name], tensor) != trained, name


@pytest.mark.parametrize("distill, match", [
    ({"target_layers": "0,1,2"}, r"stages\[0\]\.distill\.target_layers=.*as many as"),
    ({"target_layers": "0,1"}, r"stages\[0\]\.distill\.target_layers=.*layer 1 is attention"),
    ({"source_layers": "0,4"}, r"stages\[0\]\.distill\.source_layers"),
    ({"source": "/no/such/model"}, r"stages\[0\]\.distill\.source"),
])
def test_distill_settings_are_checked_before_training(grafted, demo_data, tmp_path, distill,
                                                      match):
    with pytest.raises(ConfigError, match=f"^{match}"):
        distill_config(grafted, demo_data, tmp_path, **distill)


def test_other_vocabulary_or_backend_is_refused(grafted, demo_data, tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.source=.*vocab_size 4096"):
        distill_config(grafted, demo_data, tmp_path, source=str(grafted / "small-vocab"))
    with pytest.raises(ConfigError, match=r"parallel\.backend='fsdp'"):
        load_train_config(TINY, [*base_overrides(grafted, demo_data, tmp_path, {}),
                                 "parallel.backend=fsdp"])


def test_training_continues_after_a_distill_stage(grafted, demo_data, tmp_path):
    """The stage after a distill stage starts from its checkpoint, optimizer included."""
    stages = [distill_stage(grafted, {}, steps=3),
              {"name": "train", "seq_len": 64, "steps": 2}]
    cfg = load_train_config(TINY, [*common(demo_data, tmp_path / "run"),
                                   f"stages={json.dumps(stages)}"])
    result = train(cfg)
    assert sorted(result.losses) == [0, 1, 2, 3, 4]
    assert result.losses[3] > 3.0  # next-token loss again, not the distill regression
