"""stripes export --format hf: a Llama network trained by stripes loads in `transformers`
without custom code and gives stripes' logits; its tokenizer encodes like stripes'. What a
Llama cannot express is refused in one line, before anything is written."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch

from stripes.arch.config import ModelConfig
from stripes.core.config import to_typed
from stripes.launch.cli import main

from conftest import save_trained_checkpoint
from numerics import rel_error

transformers = pytest.importorskip("transformers")


def llama_like(vocab: int = 4096, rope: dict | None = None, tie: bool = False, **attn):
    raw = {"d_model": 64, "n_layers": 3, "vocab_size": vocab, "max_seq_len": 256,
           "stripes": ["attn"], "tie_embeddings": tie, "norm_eps": 1e-5,
           "mixers": {"attn": {"n_heads": 4, "n_kv_heads": 2, "rope": rope or {"theta": 500},
                               **attn}},
           "mlp": {"kind": "swiglu", "hidden": 96}}
    return to_typed(ModelConfig, raw, prefix="model")


def export_and_load(tmp_path, cfg, data=None):
    model, path, _ = save_trained_checkpoint(tmp_path / "run", cfg, data)
    assert main(["export", str(path), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return model.eval(), hf


@pytest.mark.parametrize("rope, tie", [
    ({"theta": 500.0}, False),
    ({"theta": 500.0, "scaling": "linear", "factor": 4.0}, True),
    ({"theta": 500.0, "scaling": "ntk", "factor": 8.0}, False),  # exported as its new base
])
def test_transformers_reproduces_the_logits(tmp_path, rope, tie):
    model, hf = export_and_load(tmp_path, llama_like(rope=rope, tie=tie))
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(hf(ids).logits, model(ids)) < 1e-5


def test_the_tokenizer_loads_and_encodes_like_stripes(tmp_path, demo_data):
    export_and_load(tmp_path, llama_like(), data=demo_data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(demo_data / "tokenizer.model"))
    text = "HACKER, n. One who hacks; also a 'wizard' (see Jargon)."
    assert tokenizer.encode(text) == sp.encode(text)
    assert tokenizer.eos_token_id == sp.eos_id()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == \
        sp.eos_id()


@pytest.mark.parametrize("cfg, reason", [
    (None, "layer 0 is hyena_se"),  # tiny.yaml: a hybrid
    (llama_like(window=16), "attention window 16"),
    (llama_like(rope={"scaling": "yarn", "factor": 4.0}), "RoPE scaling yarn"),
])
def test_what_llama_cannot_express_is_one_line(tmp_path, capsys, cfg, reason):
    save_trained_checkpoint(tmp_path / "run", cfg)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "--format hf" in err
    assert not (tmp_path / "hf").exists()


def test_formats_do_not_share_a_directory(tmp_path, capsys):
    save_trained_checkpoint(tmp_path / "run", llama_like())
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    for fmt, other in (("hf", "model.yaml"), ("stripes", "config.json")):
        if fmt == "stripes":  # now an hf export sits there alone
            (tmp_path / "out" / "model.yaml").unlink()
            assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"),
                         "--format", "hf"]) == 0
        capsys.readouterr()
        assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"),
                     "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"it holds {other}" in err
