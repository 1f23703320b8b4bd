"""Applying a graft spec (graft/spec.py): check, copy, prove, write.

    plan = plan_graft(spec)       # both architectures checked; every problem in one error
    result = run_graft(spec, out) # copy the tensors, prove each splice, write checkpoint

1. Plan, before a tensor is read: the target's layers (from its config) and each source's
   (its config and tensor shapes, read without the tensors). Each rule becomes target parameter ->
   (source, source parameter) pairs; kinds that do not match (attention into a Hyena layer,
   an MLP into a block without one), settings that differ (a RoPE base, a window, the norm
   eps), shapes that differ and two rules writing one tensor are collected, all of them,
   and raised as one line.
2. Build the target with its own init (the spec's seed) and copy the planned tensors.
3. Parity: each grafted component and its counterpart in the source, run on the same random
   activations; the largest relative error must stay under `parity_tolerance`. Shapes alone
   pass when, say, the RoPE base differs; outputs do not.
4. Write OUT/checkpoints/step-000000 (a stripes checkpoint, model and a fresh optimizer:
   `stages[0].init_from: OUT` trains from it) and OUT/graft_report.json: where every target
   parameter came from, or that it is fresh, with counts and bytes, and the parity errors.
   Nothing is written unless every check passed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from stripes.arch import ArchFile, StripedLM
from stripes.arch.config import ModelConfig
from stripes.core.config import ConfigError, load_config, to_typed
from stripes.data.format import write_atomic
from stripes.graft.hf_llama import HFLlama
from stripes.graft.spec import COMPONENTS, LAYERED, SOURCE_KINDS, GraftSpec, layer_list
from stripes.graft.stripes_source import StripesCheckpoint

_KIND_OF = {"attention": "attn"}  # the mixer kind a layered component needs


@dataclass
class Copy:
    """One grafted component: target parameters filled from a source's."""

    rule: int
    component: str
    source: str
    source_layer: int | None
    target_layer: int | None
    params: dict[str, str] = field(default_factory=dict)  # target name -> source name


class Source(Protocol):
    """What a source format gives (graft/hf_llama.py, graft/stripes_source.py): its network
    as a stripes config, tensor shapes under stripes names without reading them, and the
    whole model."""

    def model_config(self) -> ModelConfig: ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def load(self) -> StripedLM: ...


@dataclass
class Plan:
    target: ModelConfig
    sources: dict[str, Source]
    copies: list[Copy]


def target_config(spec: GraftSpec) -> ModelConfig:
    if isinstance(spec.target, str):
        return load_config(ArchFile, spec.target).model
    if isinstance(spec.target, dict) and "model" in spec.target:
        cfg = to_typed(ModelConfig, dict(spec.target["model"]), prefix="target.model")
        cfg.expand("target.model")
        return cfg
    raise ConfigError("target", spec.target, "a model YAML path or {model: {...}}")


READERS = {"hf_llama": HFLlama, "stripes": StripesCheckpoint}  # kind -> source reader


def open_source_path(path: str | Path, key: str) -> Source:
    """A source by its files: a Hugging Face directory (config.json) or a stripes checkpoint
    or run directory."""
    if (Path(path) / "config.json").is_file():
        return HFLlama(path, key=key)
    return StripesCheckpoint(path, key=key)


def open_sources(spec: GraftSpec) -> dict[str, Source]:
    sources = {}
    for name, source in spec.sources.items():
        if source.kind not in SOURCE_KINDS:
            raise ConfigError(f"sources.{name}.kind", source.kind, ", ".join(SOURCE_KINDS))
        sources[name] = READERS[source.kind](source.path, key=f"sources.{name}.path")
    return sources


def component_params(component: str, layer: int | None, model_cfg: ModelConfig,
                     names: set[str]) -> list[str]:
    """The parameter names of a component in a model with these parameter names."""
    if component == "embeddings":
        return ["embed.weight"]
    if component == "final_norm":
        return ["norm.weight"]
    if component == "head":
        return ["embed.weight" if model_cfg.tie_embeddings else "lm_head.weight"]
    part, norm = ("mlp", "mlp_norm") if component == "mlp" else ("mixer", "mixer_norm")
    prefix = f"blocks.{layer}.{part}."
    return [f"blocks.{layer}.{norm}.weight"] + sorted(n for n in names if n.startswith(prefix))


def plan_graft(spec: GraftSpec) -> Plan:
    """Every rule checked against both architectures; raises one ConfigError with all
    problems, before any tensor is read."""
    target_cfg = target_config(spec)
    target_layers = target_cfg.expand("target.model")
    with torch.device("meta"):
        target_shapes = {k: tuple(v.shape) for k, v in StripedLM(target_cfg).state_dict().items()}
    sources = open_sources(spec)
    described = {}  # name -> (config, its layers, tensor shapes): read once per source
    for name, source in sources.items():
        cfg = source.model_config()
        described[name] = (cfg, cfg.expand(f"sources.{name}"), source.shapes())
    problems: list[str] = []
    copies: list[Copy] = []
    owner: dict[str, str] = {}  # target tensor -> the rule and pair that writes it
    for r, rule in enumerate(spec.rules):
        key = f"rules[{r}]"
        if rule.source not in sources:
            problems.append(f"{key}.source {rule.source!r} is not one of "
                            f"{sorted(sources) or 'the (empty) sources'}")
            continue
        if rule.component not in COMPONENTS:
            problems.append(f"{key}.component {rule.component!r} is not one of "
                            f"{', '.join(COMPONENTS)}")
            continue
        source_cfg, source_layers, source_shapes = described[rule.source]
        try:
            pairs = _layer_pairs(rule, key, source_cfg, target_cfg)
        except ConfigError as err:
            problems.append(str(err))
            continue
        for source_layer, target_layer in pairs:
            where = (f"{key} ({rule.component} {source_layer} -> {target_layer})"
                     if target_layer is not None else f"{key} ({rule.component})")
            needed = (source_layers[source_layer].kind if rule.component == "mixer"
                      else _KIND_OF.get(rule.component))
            if needed and source_layers[source_layer].kind != needed:
                problems.append(f"{where}: source layer {source_layer} is "
                                f"{source_layers[source_layer].kind}, not {needed}")
                continue
            if needed and target_layers[target_layer].kind != needed:
                problems.append(f"{where}: target layer {target_layer} is "
                                f"{target_layers[target_layer].kind}, not {needed}")
                continue
            differs = _settings_differ(rule.component, source_cfg, target_cfg,
                                       source_layers[source_layer] if needed else None,
                                       target_layers[target_layer] if needed else None)
            if differs:
                problems.append(f"{where}: {differs}")
                continue
            if rule.component == "mlp" and target_layers[target_layer].mlp.kind == "none":
                problems.append(f"{where}: target layer {target_layer} has no MLP")
                continue
            if rule.component == "head" and target_cfg.tie_embeddings:
                untied = "" if source_cfg.tie_embeddings else (
                    " (its head is then the source's input embeddings, not its trained head)")
                problems.append(f"{where}: the target ties its head to its embeddings; "
                                f"graft `embeddings`{untied}")
                continue
            copy = Copy(r, rule.component, rule.source, source_layer, target_layer)
            wanted = component_params(rule.component, target_layer, target_cfg,
                                      set(target_shapes))
            offered = component_params(rule.component, source_layer, source_cfg,
                                       set(source_shapes))
            if len(wanted) != len(offered):
                problems.append(f"{where}: {len(offered)} source tensors for {len(wanted)}")
                continue
            for t_name, s_name in zip(wanted, offered, strict=True):
                if t_name in owner:
                    problems.append(f"{where}: {t_name} is also written by {owner[t_name]}; "
                                    "each target tensor comes from one rule")
                    continue
                owner[t_name] = where
                if s_name not in source_shapes:
                    problems.append(f"{where}: the source has no {s_name}")
                elif target_shapes[t_name] != source_shapes[s_name]:
                    problems.append(f"{where}: {t_name} is {target_shapes[t_name]} but "
                                    f"{s_name} is {source_shapes[s_name]}")
                else:
                    copy.params[t_name] = s_name
            copies.append(copy)
    if problems:
        raise ConfigError("graft", f"{len(problems)} problem(s)", "rules that fit both "
                          "architectures", "; ".join(problems))
    return Plan(target_cfg, sources, copies)


def _settings_differ(component: str, source_cfg: ModelConfig, target_cfg: ModelConfig,
                     source_layer, target_layer) -> str:
    """Why a component would compute differently in the target, from the configs alone
    ("" if it would not): its mixer's settings (the attention backend aside) and the norm
    eps. Parity proves the same on activations; this names the setting."""
    if component in ("attention", "mixer"):
        theirs, ours = (dataclasses.asdict(layer.mixer) for layer in (source_layer,
                                                                       target_layer))
        for key in sorted(set(theirs) | set(ours)):
            if key != "backend" and theirs.get(key) != ours.get(key):
                return (f"{key} is {ours.get(key)!r} in the target's "
                        f"{target_layer.name}, {theirs.get(key)!r} in the source")
    if component in ("attention", "mixer", "mlp", "final_norm") and (
            source_cfg.norm_eps != target_cfg.norm_eps):
        return f"norm_eps is {target_cfg.norm_eps} in the target, {source_cfg.norm_eps} in " \
               "the source"
    return ""


def _layer_pairs(rule, key: str, source_cfg: ModelConfig, target_cfg: ModelConfig
                 ) -> list[tuple[int | None, int | None]]:
    if rule.component not in LAYERED:
        for name, value in (("from", rule.from_layers), ("to", rule.to_layers)):
            if value is not None:
                raise ConfigError(f"{key}.{name}", value, f"no layers for {rule.component}")
        return [(None, None)]
    sources = layer_list(rule.from_layers, source_cfg.n_layers, f"{key}.from")
    targets = layer_list(rule.to_layers, target_cfg.n_layers, f"{key}.to")
    if len(sources) != len(targets):
        raise ConfigError(f"{key}.to", rule.to_layers, f"{len(sources)} layers, as many as "
                          f"`from` names", f"it names {len(targets)}")
    return list(zip(sources, targets, strict=True))


def run_graft(spec: GraftSpec, out: str | Path) -> dict[str, Any]:
    """Plan, copy, prove and write (see the module docstring); returns the report."""
    out = Path(out)
    if (out / "checkpoints" / "latest").exists():
        raise ConfigError("out", str(out), "a directory without a checkpoint",
                          "a graft never overwrites one")
    plan = plan_graft(spec)
    torch.manual_seed(spec.seed)
    target = StripedLM(plan.target)
    target.init_weights()
    source_models = {name: source.load() for name, source in plan.sources.items()
                     if any(c.source == name for c in plan.copies)}
    state = target.state_dict()
    with torch.no_grad():
        for copy in plan.copies:
            weights = source_models[copy.source].state_dict()
            for t_name, s_name in copy.params.items():
                state[t_name].copy_(weights[s_name])
    target.eval()
    for model in source_models.values():
        model.eval()
    parity = [{"rule": c.rule, "component": c.component, "source": c.source,
               "source_layer": c.source_layer, "target_layer": c.target_layer,
               "max_rel_err": component_error(c, target, source_models[c.source])}
              for c in plan.copies]
    failed = [p for p in parity if not p["max_rel_err"] <= spec.parity_tolerance]
    if failed:
        worst = max(failed, key=lambda p: p["max_rel_err"])
        raise ConfigError("parity_tolerance", spec.parity_tolerance, "a bound every grafted "
                          "component meets", f"{len(failed)} component(s) differ from their "
                          f"source, worst rules[{worst['rule']}] {worst['component']} "
                          f"{worst['source_layer']} -> {worst['target_layer']}: relative "
                          f"error {worst['max_rel_err']:.3g}")
    report = _report(plan, target, parity)
    _write(out, target, plan, spec, report)
    return report


@torch.no_grad()
def component_error(copy: Copy, target: StripedLM, source: StripedLM) -> float:
    """max relative error of the target's component against the source's on the same random
    activations (float64 comparison of float32 runs)."""
    generator = torch.Generator().manual_seed(copy.rule)
    d = target.cfg.d_model
    x = torch.randn(2, 16, d, generator=generator)
    if copy.component == "embeddings":
        ids = torch.randint(0, target.cfg.vocab_size, (2, 16), generator=generator)
        return _rel(target.embed(ids), source.embed(ids))
    if copy.component == "final_norm":
        return _rel(target.norm(x), source.norm(x))
    if copy.component == "head":
        return _rel(F.linear(x, target._head_weight()), F.linear(x, source._head_weight()))
    t, s = target.blocks[copy.target_layer], source.blocks[copy.source_layer]
    if copy.component in ("attention", "mixer"):
        return _rel(t.mixer(t.mixer_norm(x)), s.mixer(s.mixer_norm(x)))
    return _rel(t.mlp(t.mlp_norm(x)), s.mlp(s.mlp_norm(x)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _report(plan: Plan, target: StripedLM, parity: list[dict[str, Any]]) -> dict[str, Any]:
    origin = {t: f"{c.source}:{s}" for c in plan.copies for t, s in c.params.items()}
    params = {name: {"from": origin.get(name, "fresh"), "numel": p.numel(),
                     "bytes": p.numel() * p.element_size()}
              for name, p in target.state_dict().items()}
    totals = {kind: {"tensors": len(rows), "params": sum(r["numel"] for r in rows),
                     "bytes": sum(r["bytes"] for r in rows)}
              for kind, rows in (("grafted", [r for r in params.values() if r["from"] != "fresh"]),
                                 ("fresh", [r for r in params.values() if r["from"] == "fresh"]))}
    return {"totals": totals, "parity": parity, "params": params}


def _write(out: Path, target: StripedLM, plan: Plan, spec: GraftSpec, report: dict) -> None:
    from omegaconf import OmegaConf

    from stripes.train.checkpoint import DcpStates, save_checkpoint

    optimizer = torch.optim.AdamW(target.parameters())  # fresh: the trainer's own replaces it
    config = {"model": OmegaConf.to_container(OmegaConf.structured(plan.target)),
              "seed": spec.seed}
    out.mkdir(parents=True, exist_ok=True)
    # The report first: a checkpoint is never published without it (freeze: grafted reads it)
    write_atomic(out / "graft_report.json", json.dumps(report, indent=1).encode())
    save_checkpoint(out, 0, DcpStates(target, optimizer),
                    {"tokens_seen": 0, "skipped_steps": 0, "graft": report["totals"]},
                    config, keep_last=1)
