"""Typed recipe objects and their loading: YAML (OmegaConf) plus `key=value` overrides.

A recipe is validated into the dataclasses below before any work starts. A key that no
dataclass declares fails with its dotted path, the file it came from and the closest
valid name (difflib); a value of the wrong type fails with the path and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from transformers import Qwen3Config

from data.build import BuildConfig
from msa_modeling import MSAConfig


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the key and where it came from."""


@dataclass
class RunConfig:
    name: str = "msa"
    output_dir: str = "runs/msa"
    seed: int = 0
    # false: no Hugging Face Hub or `datasets` lookups and no W&B error reporting (data/offline.py);
    # every model, tokenizer and data source must then be a local path.
    allow_network: bool = False


@dataclass
class TinyTokenizerConfig:
    """A byte-level BPE tokenizer trained on the recipe's own synthetic text (no network)."""

    vocab_size: int = 512
    sample_records: int = 400
    individual_digits: bool = False  # every digit its own token, as in Qwen's tokenizers


@dataclass
class TokenizerConfig:
    path: str | None = None  # a local Hugging Face tokenizer folder or tokenizer.json
    train_tiny: TinyTokenizerConfig | None = None  # used when `path` is not given


@dataclass
class ModelConfig:
    """The backbone (a local checkpoint path, or an inline Qwen3 config for random tiny models)
    and the MSA settings (`MSAConfig` fields)."""

    backbone: str | None = None
    inline_config: dict[str, Any] | None = None
    msa: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # torch.compile each layer's token-wise blocks (norms, projections, RoPE, MLP): worth 6-7
    # MFU points on an H100 (docs/BENCHMARKS.md); costs a compile per row length at start-up.
    compile: bool = False


@dataclass
class DataConfig:
    """Named data sources. Each is a `data.build.BuildConfig` without `tokenizer`
    (the run's tokenizer is filled in): source, sample kind, template, memory filling."""

    sources: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class BudgetConfig:
    """Stage length: exactly one of `tokens` (global, counted as full rows) or `steps`."""

    tokens: float | None = None
    steps: int | None = None


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    """Linear warm-up to each group's LR, then an anneal to `final_lr_ratio` times it."""

    warmup_steps: int = 0
    anneal: Literal["cosine", "linear", "constant"] = "cosine"
    final_lr_ratio: float = 1.0


@dataclass
class LossWeights:
    lm: float = 1.0
    aux: float = 0.1


@dataclass
class ParamGroupConfig:
    """Parameters whose name matches `pattern` (regex search; first matching group wins)."""

    name: str
    pattern: str
    lr: float | None = None  # None: the stage optimizer's lr
    frozen: bool = False
    weight_decay: float | None = None


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the linear layers whose module names match a `target_modules`
    regex (search), e.g. `'\\.(q|v)_proj$'` for the backbone, `'\\.router_'` for the router.
    Every other weight of the model is frozen; `param_groups`, if any, split the adapter weights.

    `export: merged` writes a plain MSA model with the adapters folded in; `adapter` writes the
    adapter (peft's files) over the stage's starting model (docs/EXPORTS.md)."""

    target_modules: list[str]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    export: Literal["merged", "adapter"] = "merged"


@dataclass
class EvalConfig:
    """Held-out loss and router recall on `sources` (none: no evaluation)."""

    sources: dict[str, float] = field(default_factory=dict)
    every_steps: int = 0  # 0: only at the end of the stage
    micro_batches: int = 2


@dataclass
class DivergenceConfig:
    """A finite loss or gradient norm that signals divergence (beside NaN/inf, see `nan_policy`).

    A step diverges when its gradient norm (before clipping) exceeds `max_grad_norm`, or its loss
    exceeds `loss_spike_factor` times the mean of the previous `window_steps` losses (checked once
    the window is full). Both are known only after the step's update is applied, so there is no
    skip: `policy: stop` ends the stage without saving the diverged weights (resume starts from
    the last checkpoint, which predates the divergence); `warn` logs the step, counts it in the
    metrics (`diverged_steps`) and goes on.
    """

    max_grad_norm: float | None = None
    loss_spike_factor: float | None = None
    window_steps: int = 20
    policy: Literal["stop", "warn"] = "stop"


@dataclass
class ActivationsConfig:
    """How the decoder layers keep what backward needs (applied by `msa_modeling.execution`)."""

    # Recompute decoder layers in backward instead of keeping their activations.
    checkpointing: bool = False
    # With checkpointing: recompute only the first this-many decoder layers and keep the others'
    # activations (null: recompute every layer). Speed for memory; see BENCHMARKS.md.
    checkpointed_layers: int | None = None
    # Of the recomputed layers, the first this-many keep their attention kernel's output, so
    # backward skips that kernel's second run (0.5 GiB per layer at 64K tokens, 4B shape).
    saved_attention_layers: int = 0
    # The first this-many decoder layers keep their saved activations in pinned host memory,
    # copied out and back on side streams (neither recomputed nor held on the GPU); the two
    # counts above start from the layer after them. For long rows on one GPU.
    offloaded_layers: int = 0
    # How many offloaded layers backward brings back ahead of need: more hides the copies
    # better, each costs one layer's saved activations on the GPU.
    offload_prefetch_layers: int = 2


@dataclass
class StageConfig:
    name: str
    phase: Literal["pretrain", "sft"]
    sources: dict[str, float]  # source name -> mixing weight
    row_length: int
    micro_batch_tokens: int
    global_batch_tokens: int
    budget: BudgetConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    init_from: str = "previous"  # "previous" (the preceding stage's export), "backbone", or a path
    checkpoint_every_steps: int = 100
    eval: EvalConfig = field(default_factory=EvalConfig)
    nan_policy: Literal["stop", "skip"] = "stop"
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    # The MSA chunk size P from this stage on (null: the starting model's). Pooling has no
    # parameters, so stages may change it: a curriculum from small chunks to large ones lets a
    # small model learn to read document IDs before they are averaged into big chunks.
    chunk_size: int | None = None
    lora: LoraConfig | None = None  # null: every weight (or the param_groups) trains
    # This stage's own `activations` section (null: the recipe's): how much a layer keeps depends
    # on the row length, so an 8K stage can keep what a 64K stage must recompute.
    activations: ActivationsConfig | None = None


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_clipping: float = 1.0
    torch_adam: bool | None = None  # torch's AdamW (fused on GPUs; no extension build); None: on CPU only
    # Extra keys of DeepSpeed's `zero_optimization` block, passed through as they are
    # (e.g. stage3_prefetch_bucket_size); DeepSpeed validates them.
    zero_config: dict[str, Any] = field(default_factory=dict)
    # Reduce the gradients once per optimizer step instead of after every micro-batch: with
    # gradient accumulation, 1/accumulation of the communication and of DeepSpeed's per-parameter
    # hook work. Each GPU then holds every parameter's whole bf16 gradient (2 bytes a parameter)
    # until the step ends, where ZeRO-2 and ZeRO-3 otherwise keep only their shard.
    coalesce_reduction: bool = False


# Keys that left a section, and where they live now: a recipe that still uses one fails with
# the new name instead of a bare "unknown key".
MOVED_KEYS = {
    "deepspeed.activation_checkpointing": "activations.checkpointing",
    "deepspeed.checkpointed_layers": "activations.checkpointed_layers",
    "deepspeed.saved_attention_layers": "activations.saved_attention_layers",
    "deepspeed.offloaded_layers": "activations.offloaded_layers",
}


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "msa-train"
    log_every_steps: int = 1
    peak_flops_per_device: float = 989e12  # H100 SXM dense bf16
    progress_bar: bool = True
    # torch.profiler over this many optimizer steps of every stage from profile_start_step on
    # rank 0: a trace and a time table under <stage>/profile/ (train/profiling.py). 0: off.
    profile_steps: int = 0
    profile_start_step: int = 10


@dataclass
class CheckpointConfig:
    keep_last: int = 2
    # Checkpoint at the end of a stage too, so a crash during the export resumes without
    # retraining; false skips it (short experiments, where it is several GB of optimizer state).
    save_final: bool = True


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig]
    run: RunConfig = field(default_factory=RunConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def stage(self, name: str) -> StageConfig:
        """The stage called `name`; `RecipeError` with the closest name otherwise."""
        names = [stage.name for stage in self.stages]
        if name not in names:
            raise RecipeError(f"no stage named {name!r}{_suggestion(name, names)}; stages: {names}")
        return self.stages[names.index(name)]


def _suggestion(key: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, path: str, source: str) -> Any:
    """`value` checked against (and built into) the type `annotation`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, path, source)
            except RecipeError as error:
                errors.append(error)
        raise (
            errors[0]
            if len(errors) == 1
            else RecipeError(f"{source}: {path} = {value!r} is not a {_type_name(annotation)}")
        )
    if origin is Literal:
        if value not in args:
            raise RecipeError(
                f"{source}: {path} = {value!r} must be one of {list(args)}{_suggestion(str(value), map(str, args))}"
            )
        return value
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, path, source)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {path} must be a list, got {value!r}")
        return [_convert(item, args[0], f"{path}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {path} must be a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{path}.{k}", source) for k, v in value.items()}
    if annotation is float:
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
            return float(value)  # YAML 1.1 reads `158.95e9` as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is bool and isinstance(value, bool) or annotation is str and isinstance(value, str):
        return value
    raise RecipeError(f"{source}: {path} = {value!r} is not a {_type_name(annotation)}")


def build_dataclass(cls: type, data: Any, path: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys, missing required keys and wrong
    types raise `RecipeError` naming the dotted `path` and `source`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {path or 'the recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if f"{prefix}{key}" in MOVED_KEYS:
            raise RecipeError(
                f"{source}: {prefix}{key} moved to {MOVED_KEYS[f'{prefix}{key}']}; rename the key "
                "(the value means the same)"
            )
        if key not in known:
            raise RecipeError(
                f"{source}: unknown key {prefix}{key}{_suggestion(str(key), known)}; valid keys here: {sorted(known)}"
            )
    values = {}
    for name, spec in known.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{prefix}{name}", source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: missing required key {prefix}{name}")
    return cls(**values)


def _check_open_mapping(values: dict[str, Any], valid: set[str], path: str, source: str) -> None:
    """Keys of a mapping that a Hugging Face config would silently accept must still be known."""
    for key in values:
        if key not in valid:
            raise RecipeError(f"{source}: unknown key {path}.{key}{_suggestion(key, valid)}")


def _check_model_settings(model: ModelConfig, source: str) -> None:
    msa_fields = set(inspect.signature(MSAConfig.__init__).parameters) - {"self", "backbone_kwargs"}
    _check_open_mapping(model.msa, msa_fields, "model.msa", source)
    if model.inline_config is not None:
        _check_open_mapping(model.inline_config, set(Qwen3Config().to_dict()), "model.inline_config", source)


def _check_recipe(recipe: Recipe, source: str) -> None:
    """Cross-field rules that types alone cannot express."""
    _check_model_settings(recipe.model, source)
    _check_activations(recipe.activations, "activations", source)
    for stage in recipe.stages:
        if stage.activations is not None:
            _check_activations(stage.activations, f"stages.{stage.name}.activations", source)
    _check_rest(recipe, source)


def _check_activations(activations: ActivationsConfig, path: str, source: str) -> None:
    checkpointed = activations.checkpointed_layers
    if checkpointed is not None and (checkpointed < 0 or not activations.checkpointing):
        raise RecipeError(
            f"{source}: {path}.checkpointed_layers={checkpointed} needs {path}.checkpointing: true "
            "and a count >= 0 (null recomputes every layer)"
        )
    saved = activations.saved_attention_layers
    if saved < 0 or (saved and not activations.checkpointing):
        raise RecipeError(
            f"{source}: {path}.saved_attention_layers={saved} needs {path}.checkpointing: true and a count >= 0"
        )
    if checkpointed is not None and saved > checkpointed:
        raise RecipeError(
            f"{source}: {path}.saved_attention_layers={saved} counts among the "
            f"{path}.checkpointed_layers={checkpointed} recomputed layers, so it cannot exceed it"
        )
    if activations.offloaded_layers < 0 or activations.offload_prefetch_layers < 0:
        raise RecipeError(
            f"{source}: {path}.offloaded_layers={activations.offloaded_layers} and "
            f"{path}.offload_prefetch_layers={activations.offload_prefetch_layers} must be >= 0"
        )


def _check_rest(recipe: Recipe, source: str) -> None:
    """The other cross-field rules (tracking, stages)."""
    if recipe.tracking.profile_steps < 0 or recipe.tracking.profile_start_step < 1:
        raise RecipeError(
            f"{source}: tracking.profile_steps must be >= 0 and tracking.profile_start_step >= 1 "
            f"(steps count from 1), got {recipe.tracking.profile_steps} and "
            f"{recipe.tracking.profile_start_step}"
        )
    if "stage" in recipe.deepspeed.zero_config:
        raise RecipeError(f"{source}: deepspeed.zero_config.stage: set the ZeRO stage with deepspeed.zero_stage")
    names = [stage.name for stage in recipe.stages]
    if not names:
        raise RecipeError(f"{source}: the recipe has no stages")
    if len(set(names)) != len(names):
        raise RecipeError(f"{source}: stage names must be unique, got {names}")
    if recipe.model.backbone is not None and recipe.model.inline_config is not None:
        raise RecipeError(f"{source}: model needs exactly one of model.backbone (a path) or model.inline_config")
    # A recipe whose stages all start from a checkpoint path (e.g. a converted MSA-4B) needs no backbone.
    if (
        recipe.model.backbone is None
        and recipe.model.inline_config is None
        and any(stage.init_from == "backbone" for stage in recipe.stages)
    ):
        raise RecipeError(
            f"{source}: a stage has init_from: backbone, so the model needs exactly one of "
            "model.backbone (a path) or model.inline_config"
        )
    for name, values in recipe.data.sources.items():
        build_dataclass(BuildConfig, {**values, "tokenizer": "<the run's tokenizer>"}, f"data.sources.{name}", source)
    _check_positive(
        source,
        {
            "tracking.log_every_steps": recipe.tracking.log_every_steps,
            "checkpoint.keep_last": recipe.checkpoint.keep_last,
            **(
                {
                    "tokenizer.train_tiny.vocab_size": recipe.tokenizer.train_tiny.vocab_size,
                    "tokenizer.train_tiny.sample_records": recipe.tokenizer.train_tiny.sample_records,
                }
                if recipe.tokenizer.train_tiny
                else {}
            ),
        },
    )
    for index, stage in enumerate(recipe.stages):
        where = f"{source}: stages[{index}] ({stage.name})"
        if (stage.budget.tokens is None) == (stage.budget.steps is None):
            raise RecipeError(f"{where}: budget needs exactly one of budget.tokens or budget.steps")
        _check_stage_values(stage, where)
        if stage.micro_batch_tokens % stage.row_length:
            raise RecipeError(
                f"{where}: micro_batch_tokens {stage.micro_batch_tokens} is not a multiple of row_length {stage.row_length}"
            )
        if stage.global_batch_tokens % stage.micro_batch_tokens:
            raise RecipeError(
                f"{where}: global_batch_tokens {stage.global_batch_tokens} is not a multiple of "
                f"micro_batch_tokens {stage.micro_batch_tokens}"
            )
        for source_name in [*stage.sources, *stage.eval.sources]:
            if source_name not in recipe.data.sources:
                raise RecipeError(
                    f"{where}: unknown data source {source_name!r}{_suggestion(source_name, recipe.data.sources)}; "
                    f"data.sources has {sorted(recipe.data.sources)}"
                )
        if stage.chunk_size is not None and stage.chunk_size < 1:
            raise RecipeError(f"{where}: chunk_size {stage.chunk_size} must be at least 1 (or null: the model's own)")
        if stage.init_from == "previous" and index == 0:
            raise RecipeError(
                f"{where}: the first stage cannot start from the 'previous' stage; use 'backbone' or a path"
            )


def _check_positive(where: str, values: dict[str, float | int | None]) -> None:
    for key, value in values.items():
        if value is not None and not value > 0:
            raise RecipeError(f"{where}: {key} = {value} must be greater than 0")


def _check_stage_values(stage: StageConfig, where: str) -> None:
    """Sizes, intervals, budgets and rates that would divide by zero, train nothing or go negative."""
    group_lrs = {f"param_groups[{i}].lr ({group.name})": group.lr for i, group in enumerate(stage.param_groups)}
    _check_positive(
        where,
        {
            "row_length": stage.row_length,
            "micro_batch_tokens": stage.micro_batch_tokens,
            "global_batch_tokens": stage.global_batch_tokens,
            "budget.steps": stage.budget.steps,
            "budget.tokens": stage.budget.tokens,
            "checkpoint_every_steps": stage.checkpoint_every_steps,
            "eval.micro_batches": stage.eval.micro_batches,
            "optimizer.lr": stage.optimizer.lr,
            **group_lrs,
        },
    )
    for key, value in {
        "schedule.warmup_steps": stage.schedule.warmup_steps,
        "eval.every_steps": stage.eval.every_steps,
        "optimizer.weight_decay": stage.optimizer.weight_decay,
    }.items():
        if value < 0:
            raise RecipeError(f"{where}: {key} = {value} must be 0 or more")
    if not 0.0 <= stage.schedule.final_lr_ratio <= 1.0:
        raise RecipeError(
            f"{where}: schedule.final_lr_ratio = {stage.schedule.final_lr_ratio} must be in [0, 1] "
            "(the final LR as a fraction of the peak)"
        )
    if len(stage.optimizer.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in stage.optimizer.betas):
        raise RecipeError(f"{where}: optimizer.betas = {stage.optimizer.betas} must be two numbers in [0, 1)")
    if stage.divergence.max_grad_norm is not None and not stage.divergence.max_grad_norm > 0:
        raise RecipeError(f"{where}: divergence.max_grad_norm = {stage.divergence.max_grad_norm} must be > 0")
    if stage.divergence.loss_spike_factor is not None and not stage.divergence.loss_spike_factor > 1:
        raise RecipeError(
            f"{where}: divergence.loss_spike_factor = {stage.divergence.loss_spike_factor} "
            "must be > 1 (a multiple of the recent mean loss)"
        )
    if stage.lora is not None:
        _check_lora(stage.lora, where)
    if stage.divergence.window_steps < 1:
        raise RecipeError(f"{where}: divergence.window_steps = {stage.divergence.window_steps} must be >= 1")


def _check_lora(lora: LoraConfig, where: str) -> None:
    """Sizes and patterns of a stage's `lora` block (whether the patterns match a layer is checked
    on the model, `train.model_setup.add_lora_adapters`)."""
    _check_positive(where, {"lora.rank": lora.rank, "lora.alpha": lora.alpha})
    if not 0.0 <= lora.dropout < 1.0:
        raise RecipeError(f"{where}: lora.dropout = {lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        raise RecipeError(
            f"{where}: lora.target_modules is empty; list regexes of the linear layers to adapt, "
            "e.g. ['\\.(q|k|v|o)_proj$', '\\.router_']"
        )
    for index, pattern in enumerate(lora.target_modules):
        try:
            re.compile(pattern)
        except re.error as error:
            raise RecipeError(f"{where}: lora.target_modules[{index}] = {pattern!r} is not a regex: {error}") from None


def check_world_size(recipe: Recipe, stages: list[StageConfig], world_size: int) -> None:
    """Every stage's global batch splits evenly over `world_size` ranks (checked before any work)."""
    for stage in stages:
        per_pass = stage.micro_batch_tokens * world_size
        if stage.global_batch_tokens % per_pass:
            raise RecipeError(
                f"stage {stage.name}: global_batch_tokens {stage.global_batch_tokens} is not a multiple of "
                f"micro_batch_tokens x ranks = {stage.micro_batch_tokens} x {world_size}; change the batch sizes "
                "or the number of ranks"
            )


def check_local_paths(recipe: Recipe, stages: list[StageConfig]) -> None:
    """The backbone, tokenizer and `init_from` paths the stages read exist on disk. Runs read only
    local folders; a name that is not a folder is an error here, never a Hub download."""
    paths = {"tokenizer.path": recipe.tokenizer.path}
    if any(stage.init_from == "backbone" for stage in stages):
        paths["model.backbone"] = recipe.model.backbone
    for stage in stages:
        if stage.init_from not in ("previous", "backbone"):
            paths[f"stages.{stage.name}.init_from"] = stage.init_from
    for key, value in paths.items():
        if value is not None and not Path(value).exists():
            raise RecipeError(
                f"{key}: no such folder {value!r} (resolved to {Path(value).resolve()}); runs read "
                "local checkpoints only: download it first, e.g. `hf download <repo> --local-dir "
                f"{value}`"
            )


def _stage_names_to_indices(overrides: list[str], stage_names: list[str]) -> list[str]:
    """`stages.<name>.key=v` -> `stages.<index>.key=v`, so overrides can name stages."""
    rewritten = []
    for override in overrides:
        match = re.match(r"stages\.([^.=]+)\.(.*)", override)
        if match and match.group(1) in stage_names:
            override = f"stages.{stage_names.index(match.group(1))}.{match.group(2)}"
        elif match and not (match.group(1).isdigit() and int(match.group(1)) < len(stage_names)):
            name = match.group(1)
            raise RecipeError(
                f"override {override!r}: no stage named {name!r}{_suggestion(name, stage_names)}; "
                f"stages: {stage_names} (or an index 0-{len(stage_names) - 1})"
            )
        rewritten.append(override)
    return rewritten


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe, apply `key=value` overrides and validate it.

    The file alone is validated first, so an error names the file; then the merged result,
    so an error in an override names the command line.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    file_config = OmegaConf.load(path)
    file_data = OmegaConf.to_container(file_config, resolve=True)
    recipe = build_dataclass(Recipe, file_data, "", str(path))
    _check_recipe(recipe, str(path))
    if not overrides:
        return recipe
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"command-line overrides must be key=value, got {bad}")
    merged = file_config.copy()
    for override in _stage_names_to_indices(overrides, [stage.name for stage in recipe.stages]):
        key, value = override.split("=", 1)
        OmegaConf.update(merged, key.strip(), yaml.safe_load(value), merge=False)
    source = f"{path} with command-line overrides {overrides}"
    recipe = build_dataclass(Recipe, OmegaConf.to_container(merged, resolve=True), "", source)
    _check_recipe(recipe, source)
    _check_lr_overrides(recipe, overrides, source)
    return recipe


def _check_lr_overrides(recipe: Recipe, overrides: list[str], source: str) -> None:
    """A parameter group's own `lr` wins over the stage's `optimizer.lr`, which only sets the LR of
    groups without one. Overriding `optimizer.lr` of a stage whose every group has its own LR
    would change nothing (yet be recorded), so it is an error that names the keys to set."""
    names = [stage.name for stage in recipe.stages]
    for override in _stage_names_to_indices(overrides, names):
        match = re.fullmatch(r"stages\.(\d+)\.optimizer\.lr=.*", override.strip())
        if not match:
            continue
        stage = recipe.stages[int(match.group(1))]
        if stage.param_groups and all(group.lr is not None for group in stage.param_groups):
            keys = ", ".join(
                f"stages.{stage.name}.param_groups.{i}.lr ({group.name})" for i, group in enumerate(stage.param_groups)
            )
            raise RecipeError(
                f"{source}: stages.{stage.name}.optimizer.lr has no effect: every param group of the "
                f"stage sets its own lr, which wins; override {keys} instead"
            )


def recipe_to_yaml(recipe: Recipe) -> str:
    """The validated recipe as YAML (what a run actually used)."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(recipe)))
