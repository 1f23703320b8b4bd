"""`stripes graft` (graft/apply.py): a small Llama built and saved by `transformers`, its
attention and MLPs grafted into a hybrid; the grafted layers compute what the Llama's do; a
target identical to the source reproduces its logits; bad specs fail before writing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from test_graft_hf_llama import save_llama

from stripes.arch import StripedLM
from stripes.core.config import ConfigError
from stripes.graft.apply import run_graft, target_config
from stripes.graft.spec import layer_list, load_graft_spec
from stripes.train.checkpoint import load_weights

from conftest import ROOT
from numerics import rel_error

transformers = pytest.importorskip("transformers")

HYBRID = {"d_model": 64, "n_layers": 6, "vocab_size": 97, "stripes": ["hyena_se", "attn"],
          "norm_eps": 1e-5,
          "mixers": {"attn": {"n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 500.0}},
                     "hyena_se": {"filter_len": 7}},
          "mlp": {"kind": "swiglu", "hidden": 96}}
RULES = [{"source": "llama", "component": "attention", "from": "0..2", "to": "1..5:2"},
         {"source": "llama", "component": "mlp", "from": [0, 1, 2], "to": "0,2,4"},
         {"source": "llama", "component": "embeddings"},
         {"source": "llama", "component": "head"},
         {"source": "llama", "component": "final_norm"}]


def write_spec(path, source_dir, model=None, rules=None, **extra):
    spec = {"target": {"model": model or HYBRID},
            "sources": {"llama": {"kind": "hf_llama", "path": str(source_dir)}},
            "rules": RULES if rules is None else rules, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return directory, save_llama(directory)


def test_layer_lists():
    assert layer_list("0..3", 8, "k") == [0, 1, 2, 3]
    assert layer_list("1..7:2", 8, "k") == [1, 3, 5, 7]
    assert layer_list("0,2,-1", 8, "k") == [0, 2, 7]
    assert layer_list([4], 8, "k") == [4]
    for bad in ("0..8", "a..b", [], None):
        with pytest.raises(ConfigError, match="^k="):
            layer_list(bad, 8, "k")


def test_grafted_layers_compute_what_the_llama_layers_do(llama, tmp_path):
    source_dir, hf = llama
    spec = load_graft_spec(write_spec(tmp_path / "graft.yaml", source_dir))
    report = run_graft(spec, tmp_path / "out")
    assert len(report["parity"]) == 3 + 3 + 3
    assert all(p["max_rel_err"] < 1e-6 for p in report["parity"])
    params = report["params"]
    assert params["blocks.3.mixer.q_proj.weight"]["from"] == \
        "llama:blocks.1.mixer.q_proj.weight"
    assert params["blocks.4.mlp.down_proj.weight"]["from"] == "llama:blocks.2.mlp.down_proj.weight"
    assert params["blocks.0.mixer.filter_taps"]["from"] == "fresh"  # Hyena: the target's init
    assert params["blocks.1.mlp.up_proj.weight"]["from"] == "fresh"  # no rule reached it
    totals = report["totals"]
    assert totals["grafted"]["params"] + totals["fresh"]["params"] == sum(
        p["numel"] for p in params.values())
    # The checkpoint holds the grafted tensors: layer 3's attention is HF layer 1's.
    model = StripedLM(target_config(spec))
    load_weights(tmp_path / "out", model)
    hf_layer = hf.model.layers[1].self_attn
    torch.testing.assert_close(model.blocks[3].mixer.k_proj.weight, hf_layer.k_proj.weight)
    # Same activations through HF's decoder layer 1 attention and the grafted layer 3.
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.blocks[3].mixer(model.blocks[3].mixer_norm(x))
        normed = hf.model.layers[1].input_layernorm(x)
        position = torch.arange(12)[None]
        cos_sin = hf.model.rotary_emb(normed, position)
        mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
        theirs = hf_layer(normed, position_embeddings=cos_sin, attention_mask=mask)[0]
    assert rel_error(ours, theirs) < 1e-5


def test_a_target_identical_to_the_source_reproduces_its_logits(llama, tmp_path):
    source_dir, hf = llama
    identical = {"d_model": 64, "n_layers": 3, "vocab_size": 97, "stripes": ["attn"],
                 "norm_eps": 1e-5, "mixers": {"attn": HYBRID["mixers"]["attn"]},
                 "mlp": HYBRID["mlp"]}
    rules = [*RULES[2:], {"source": "llama", "component": "attention", "from": "0..2",
                          "to": "0..2"},
             {"source": "llama", "component": "mlp", "from": "0..2", "to": "0..2"}]
    spec_path = write_spec(tmp_path / "same.yaml", source_dir, identical, rules)
    done = subprocess.run([sys.executable, "-m", "stripes.launch.cli", "graft", str(spec_path),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "0 fresh" in done.stdout
    model = StripedLM(target_config(load_graft_spec(spec_path)))
    load_weights(tmp_path / "out", model)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_error(model.eval()(ids), hf(ids).logits) < 1e-5


def test_bad_rules_fail_before_anything_is_written(llama, tmp_path):
    source_dir, _ = llama
    bad = [{"source": "llama", "component": "attention", "from": "0..1", "to": "0..1"},  # hyena
           {"source": "llama", "component": "mlp", "from": "0..2", "to": "0..1"},  # 3 vs 2
           {"source": "nope", "component": "mlp", "from": 0, "to": 0},
           {"source": "llama", "component": "heads"}]
    spec = load_graft_spec(write_spec(tmp_path / "bad.yaml", source_dir, rules=bad))
    with pytest.raises(ConfigError) as err:
        run_graft(spec, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and message.startswith("graft='4 problem(s)'")
    assert "target layer 0 is hyena_se, not attn" in message
    assert "3 layers, as many as `from` names" in message
    assert "'nope' is not one of ['llama']" in message and "'heads' is not one of" in message
    assert not (tmp_path / "out").exists()
    wider = dict(HYBRID, mlp={"kind": "swiglu", "hidden": 128})
    spec = load_graft_spec(write_spec(tmp_path / "wide.yaml", source_dir, wider))
    with pytest.raises(ConfigError, match=r"blocks.0.mlp.down_proj.weight is \(64, 128\) but"):
        run_graft(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_settings_and_parity_catch_what_shapes_cannot(llama, tmp_path, monkeypatch):
    """A target whose attention uses another RoPE base takes the same tensors, shape for
    shape, and computes something else: the plan names the setting; and were the configs
    silent about it, parity on activations refuses it all the same."""
    import stripes.graft.apply as apply

    source_dir, _ = llama
    other_base = json.loads(json.dumps(HYBRID))
    other_base["mixers"]["attn"]["rope"]["theta"] = 10000.0
    spec = load_graft_spec(write_spec(tmp_path / "rope.yaml", source_dir, other_base))
    with pytest.raises(ConfigError, match="rope is .*10000.0.* in the target's attn"):
        run_graft(spec, tmp_path / "out")
    monkeypatch.setattr(apply, "_settings_differ", lambda *args: "")
    with pytest.raises(ConfigError, match="parity_tolerance=1e-05: 3 component.* attention"):
        run_graft(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_rules_may_not_write_one_tensor(llama, tmp_path):
    source_dir, _ = llama
    rules = [*RULES, {"source": "llama", "component": "mlp", "from": 0, "to": 4}]
    spec = load_graft_spec(write_spec(tmp_path / "twice.yaml", source_dir, rules=rules))
    with pytest.raises(ConfigError, match=r"blocks.4.mlp_norm.weight is also written by "
                                          r"rules\[1\] \(mlp 2 -> 4\)"):
        run_graft(spec, tmp_path / "out")


def test_the_example_spec_reads():
    spec = load_graft_spec(ROOT / "configs" / "graft" / "transformer-1b-into-sh2-1b.yaml")
    cfg = target_config(spec)
    assert [spec.rules[i].component for i in range(2)] == ["attention", "mlp"]
    attention = layer_list(spec.rules[0].to_layers, cfg.n_layers, "to")
    assert [spec_layer.kind for spec_layer in cfg.expand() if spec_layer.index in attention] \
        == ["attn"] * len(attention)


def test_a_stripes_checkpoint_is_a_source_too(llama, tmp_path):
    """The first graft's output (a stripes checkpoint) grafted whole into the same hybrid:
    every mixer kind by `mixer`, nothing fresh, every splice exact; a mixer into a layer of
    another kind is refused."""
    source_dir, _ = llama
    run_graft(load_graft_spec(write_spec(tmp_path / "first.yaml", source_dir)),
              tmp_path / "first")
    rules = [{"source": "mine", "component": "mixer", "from": "0..5", "to": "0..5"},
             {"source": "mine", "component": "mlp", "from": "0..5", "to": "0..5"},
             *[{"source": "mine", "component": c} for c in ("embeddings", "head",
                                                           "final_norm")]]
    spec = {"target": {"model": HYBRID}, "rules": rules,
            "sources": {"mine": {"kind": "stripes", "path": str(tmp_path / "first")}}}
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(spec))
    report = run_graft(load_graft_spec(tmp_path / "second.yaml"), tmp_path / "second")
    assert report["totals"]["fresh"]["params"] == 0
    assert max(p["max_rel_err"] for p in report["parity"]) == 0.0
    spec["rules"] = [{"source": "mine", "component": "mixer", "from": 0, "to": 1}]
    (tmp_path / "third.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="target layer 1 is attn, not hyena_se"):
        run_graft(load_graft_spec(tmp_path / "third.yaml"), tmp_path / "third")
