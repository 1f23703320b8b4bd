"""The `stripes prepare` config: schema, validation, and the input files it names.

    data:
      output: runs/data/demo
      sources:
        - {name: devil, paths: [data/corpus/devil.jsonl.zst]}
        - {name: jargon, paths: ["data/corpus/jargon*.jsonl.zst"], text_field: auto}
      tokenizer: {model: null, vocab_size: 4096, type: bpe, byte_fallback: true,
                  sample_bytes: 10000000}
      shard_tokens: 50000000
      workers: 2
      strict: false
      overwrite: false

Paths are relative to the working directory. `PrepareConfig.resolve()` is the single place
the config is checked: every problem is a one-line `ConfigError` naming its key.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from stripes.core.config import ConfigError, require_positive
from stripes.data.sources import READERS, SUFFIXES, format_of

# config `tokenizer.type` -> sentencepiece `model_type`
TOKENIZER_TYPES = {"bpe": "bpe", "unigram": "unigram"}
SPECIAL_PIECES = 3  # unk, bos, eos: sentencepiece's defaults, ids 0, 1, 2
BYTE_PIECES = 256  # byte fallback adds one piece per byte value
# A source name becomes a directory name, so it is kept to portable file-name characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ResolvedSource:
    name: str
    files: list[Path]
    formats: dict[Path, str]  # file -> key of sources.READERS
    text_field: str


@dataclass
class SourceConfig:
    name: str = MISSING
    paths: list[str] = MISSING  # files or globs, relative to the working directory
    format: str = "auto"  # auto (by file name) or one of sources.READERS
    text_field: str = "auto"  # auto: `text` (RedPajama v1) else `raw_content` (v2), per line

    def resolve(self, key: str) -> ResolvedSource:
        if not _NAME.fullmatch(self.name or ""):
            raise ConfigError(f"{key}.name", self.name,
                              "letters, digits, '_', '-' and '.', not starting with '_', '-', '.'")
        if self.format != "auto" and self.format not in READERS:
            raise ConfigError(f"{key}.format", self.format, ", ".join(["auto", *READERS]),
                              "unknown source format")
        if not self.text_field:
            raise ConfigError(f"{key}.text_field", self.text_field, "auto or a field name")
        if not self.paths:
            raise ConfigError(f"{key}.paths", self.paths, "a list of one or more files or globs")
        files: list[Path] = []
        for j, pattern in enumerate(self.paths):
            for path in _expand(f"{key}.paths[{j}]", pattern):
                if path not in files:
                    files.append(path)
        formats = {}
        for path in files:
            formats[path] = self.format if self.format != "auto" else format_of(path)
            if formats[path] is None:
                raise ConfigError(f"{key}.format", self.format, ", ".join(READERS),
                                  f"cannot tell the format of {path} from its name (known "
                                  f"endings: {', '.join(SUFFIXES)}); name the format")
        return ResolvedSource(self.name, files, formats, self.text_field)


@dataclass
class TokenizerConfig:
    model: str | None = None  # an existing sentencepiece .model; null trains one
    vocab_size: int = 4096
    type: str = "bpe"  # one of TOKENIZER_TYPES
    byte_fallback: bool = True  # unknown characters become bytes, so decoding is lossless
    sample_bytes: int = 10_000_000  # at most this much text is drawn to train on
    # sentencepiece's result depends on its thread count, so it is fixed by the config
    # rather than by the machine: the same config trains the same tokenizer everywhere.
    train_threads: int = 4

    def validate(self, key: str) -> None:
        if self.model is not None:
            if not Path(self.model).is_file():
                raise ConfigError(f"{key}.model", self.model,
                                  "a sentencepiece .model file, or null to train one",
                                  "no such file")
            return
        if self.type not in TOKENIZER_TYPES:
            raise ConfigError(f"{key}.type", self.type, ", ".join(TOKENIZER_TYPES),
                              "unknown tokenizer type")
        smallest = SPECIAL_PIECES + 1 + (BYTE_PIECES if self.byte_fallback else 0)
        if self.vocab_size < smallest:
            because = " with byte_fallback (256 byte pieces + 3 special)" if self.byte_fallback \
                else " (3 special pieces + 1)"
            raise ConfigError(f"{key}.vocab_size", self.vocab_size, f">= {smallest}{because}",
                              "vocabulary too small")
        require_positive(f"{key}.sample_bytes", self.sample_bytes, integer=True)
        require_positive(f"{key}.train_threads", self.train_threads, integer=True)


@dataclass
class PrepareConfig:
    output: str = MISSING
    sources: list[SourceConfig] = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard_tokens: int = 50_000_000  # at most this many tokens per shard (a longer document
    #                                 gets a shard of its own: documents never span shards)
    workers: int = 2  # tokenizer processes
    strict: bool = False  # stop at the first bad input instead of skipping and counting it
    overwrite: bool = False  # replace a dataset that was made with another tokenizer

    def resolve(self, key: str = "data") -> list[ResolvedSource]:
        """Check every value; return each source with the files its paths match."""
        if not self.output:
            raise ConfigError(f"{key}.output", self.output, "a directory path")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise ConfigError(f"{key}.output", self.output, "a directory, new or existing",
                              "exists and is not a directory")
        require_positive(f"{key}.shard_tokens", self.shard_tokens, integer=True)
        require_positive(f"{key}.workers", self.workers, integer=True)
        self.tokenizer.validate(f"{key}.tokenizer")
        if not self.sources:
            raise ConfigError(f"{key}.sources", self.sources, "a list of one or more sources")
        seen: set[str] = set()
        resolved = []
        for i, source in enumerate(self.sources):
            where = f"{key}.sources[{i}]"
            if source.name in seen:
                raise ConfigError(f"{where}.name", source.name, "names used once",
                                  "duplicate source name")
            seen.add(source.name)
            resolved.append(source.resolve(where))
        return resolved


def _expand(key: str, pattern: str) -> list[Path]:
    """The files `pattern` names, sorted; a pattern that names none is an error."""
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not found:
            raise ConfigError(key, pattern, "a glob matching at least one file",
                              "matches no file")
    else:
        found = [Path(pattern)]
        if not found[0].exists():
            raise ConfigError(key, pattern, "an existing file or a glob", "no such file")
    for path in found:
        if not path.is_file():
            raise ConfigError(key, str(path), "files, or a glob such as dir/*.jsonl.zst",
                              "not a regular file")
    return found


@dataclass
class PrepareFile:
    """The top level of a data YAML: everything sits under `data:`."""

    data: PrepareConfig = MISSING
