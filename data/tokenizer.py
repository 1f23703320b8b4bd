"""The sentencepiece tokenizer of a prepared dataset: load one, or train one on a sample.

Trained tokenizers are set up so that decoding gives back the exact text (identity
normalisation, whitespace kept, no dummy prefix, byte fallback by default): the shards are
then a lossless encoding of the corpus, which the round-trip tests check. Training is
deterministic: the sample is drawn in file order and the thread count is part of the config.
A training is described by a recipe key (sample digest + options); a directory that already
holds a tokenizer trained from the same recipe reuses it instead of training again.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from stripes.core.config import ConfigError
from stripes.data.prepare_config import TOKENIZER_TYPES, ResolvedSource, TokenizerConfig
from stripes.data.sources import read_source, strict_error

# Fixed options of every trained tokenizer (the config's knobs are added to these).
TRAINER_OPTIONS = {
    "normalization_rule_name": "identity",  # no NFKC: tokens decode to the exact text
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,  # code indentation becomes pieces, not bytes
    "split_digits": True,
    "character_coverage": 0.9995,
    "max_sentence_length": 1 << 15,  # bytes; sample lines are cut well below this
    "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
    "minloglevel": 2,  # sentencepiece logs every step to stderr otherwise
}
SAMPLE_LINE_CHARS = 4096  # longer lines are cut: sentencepiece drops over-long sentences


class Tokenizer:
    """A sentencepiece model (its serialized bytes) and what the manifest records of it."""

    def __init__(self, model: bytes, origin: str, recipe: str | None = None) -> None:
        self.recipe = recipe  # recipe key of a trained tokenizer, None for a loaded one
        try:
            self.processor = spm.SentencePieceProcessor(model_proto=model)
        except (RuntimeError, OSError) as err:
            raise ConfigError("data.tokenizer.model", origin, "a sentencepiece .model file",
                              f"cannot load: {_first_line(err)}") from None
        self.model = model
        self.sha256 = hashlib.sha256(model).hexdigest()
        if self.eos_id < 0:
            raise ConfigError("data.tokenizer.model", origin,
                              "a sentencepiece model with an EOS piece", "it has no EOS id")

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()


def obtain(cfg: TokenizerConfig, sources: list[ResolvedSource], output: Path,
           strict: bool) -> Tokenizer:
    """The configured tokenizer: `cfg.model` loaded, or one trained on the sources (or reused
    from `output` when it was trained there from the same recipe). Writes nothing."""
    if cfg.model is not None:
        return Tokenizer(Path(cfg.model).read_bytes(), cfg.model)
    lines = draw_sample(sources, cfg.sample_bytes, strict)
    key = recipe_key(cfg, lines)
    previous = read_recipe(output)
    model_path = output / "tokenizer.model"
    if previous.get("key") == key and model_path.is_file():
        model = model_path.read_bytes()
        if hashlib.sha256(model).hexdigest() == previous.get("sha256"):
            return Tokenizer(model, str(model_path), key)
    return Tokenizer(train(cfg, lines), "a newly trained tokenizer", key)


def draw_sample(sources: list[ResolvedSource], budget: int, strict: bool) -> list[str]:
    """At most `budget` bytes of non-blank lines: an equal share per source, and within a
    source an equal share per file, each taken from the file's start. Reading only heads
    keeps this cheap on large corpora while every file contributes."""
    lines: list[str] = []
    for source in sources:
        share = max(1, budget // len(sources) // len(source.files))
        for number in range(len(source.files)):
            lines.extend(_file_sample(source, number, share, strict))
    if not lines:
        raise ConfigError("data.sources", [s.name for s in sources],
                          "sources with at least one non-empty document",
                          "no text to train a tokenizer on")
    return lines


def _file_sample(source: ResolvedSource, number: int, share: int, strict: bool
                 ) -> Iterator[str]:
    taken = 0
    records = read_source(source.files[number:number + 1], source.formats, source.text_field)
    for record in records:
        if record.skip is not None:
            if strict:
                raise strict_error(record)
            continue
        for line in record.text.split("\n"):
            line = line[:SAMPLE_LINE_CHARS]
            size = len(line.encode("utf-8"))
            if not line.strip():
                continue
            if taken + size > share:
                return
            taken += size
            yield line


def recipe_key(cfg: TokenizerConfig, lines: list[str]) -> str:
    sample = hashlib.sha256()
    for line in lines:
        sample.update(line.encode("utf-8") + b"\n")
    recipe = {"sample": sample.hexdigest(), "options": TRAINER_OPTIONS,
              "sentencepiece": spm.__version__, **_config_options(cfg)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _config_options(cfg: TokenizerConfig) -> dict:
    return {"model_type": TOKENIZER_TYPES[cfg.type], "vocab_size": cfg.vocab_size,
            "byte_fallback": cfg.byte_fallback, "num_threads": cfg.train_threads}


def train(cfg: TokenizerConfig, lines: list[str]) -> bytes:
    """Train a sentencepiece model on `lines`; sentencepiece's refusals (a vocabulary too
    small for the characters seen, or too large for the sample) become ConfigErrors."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                       **TRAINER_OPTIONS, **_config_options(cfg))
    except RuntimeError as err:
        raise ConfigError("data.tokenizer.vocab_size", cfg.vocab_size,
                          "a size sentencepiece can train on this sample",
                          _first_line(err)) from None
    return model.getvalue()


RECIPE = "tokenizer.recipe.json"


def recipe_record(tokenizer: Tokenizer) -> bytes:
    """What is stored beside a trained tokenizer so that the next run can reuse it."""
    return json.dumps({"key": tokenizer.recipe, "sha256": tokenizer.sha256}).encode()


def read_recipe(output: Path) -> dict:
    """The recipe record of the tokenizer in `output` (empty when absent or unreadable)."""
    try:
        return json.loads((output / RECIPE).read_text())
    except (OSError, ValueError):
        return {}


def _first_line(err: Exception) -> str:
    """sentencepiece messages start with 'Internal: src/file.cc(123) [check] '; keep the rest."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\w+: \S+\(\d+\) \[[^\]]*\] ", "", text)
