"""Building the model a stage starts from, and its trainable parameter groups."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

import msa_modeling  # noqa: F401  (registers model_type "msa" with the Auto classes)
from msa_modeling import MSAForCausalLM

from .config import LoraConfig, ModelConfig, StageConfig
from .export_files import ADAPTER_CONFIG_FILE

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_backbone(
    inline_config: dict[str, Any], vocab_size: int, seed: int, dtype: torch.dtype, device: torch.device | None = None
) -> Qwen3ForCausalLM:
    """A seeded random Qwen3 from an inline config (without `vocab_size`, the tokenizer's).

    On an accelerator the weights are drawn there: a billion-parameter CPU initialisation takes
    most of a minute in a launcher-started rank, which gets one thread. The draws then come
    from that device's generator, so the same seed gives other weights than on the CPU.
    """
    fields = {"vocab_size": vocab_size, **inline_config}
    torch.manual_seed(seed)  # the random backbone is part of the recipe, so seed it
    with torch.device(device or "cpu"):
        return Qwen3ForCausalLM(Qwen3Config(**fields)).to(dtype)


def build_from_backbone(
    model_config: ModelConfig, vocab_size: int, seed: int, device: torch.device | None = None
) -> MSAForCausalLM:
    """The MSA model converted from the recipe's backbone (a checkpoint path or an inline Qwen3 config).

    An inline config without `vocab_size` takes the tokenizer's. A backbone whose embedding
    matrix is smaller than the tokenizer (special tokens were added) is resized first. A random
    backbone, and the MSA model built from it, are initialised on `device` (default: the CPU).
    """
    dtype = DTYPES[model_config.dtype]
    if model_config.inline_config is not None:
        backbone = random_backbone(model_config.inline_config, vocab_size, seed, dtype, device)
    else:
        backbone = AutoModelForCausalLM.from_pretrained(model_config.backbone, dtype=dtype)
    if backbone.config.vocab_size < vocab_size:
        logger.warning(
            "resizing the backbone's embeddings from %d to the tokenizer's %d ids",
            backbone.config.vocab_size,
            vocab_size,
        )
        backbone.resize_token_embeddings(vocab_size)
    with torch.device(backbone.device):  # the new router projections are drawn beside the backbone
        return MSAForCausalLM.from_backbone(backbone, **model_config.msa)


def is_msa_checkpoint(path: str | Path) -> bool:
    config_path = Path(path) / "config.json"
    return config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == "msa"


def load_stage_model(
    init_from: str,
    model_config: ModelConfig,
    previous_export: Path | None,
    vocab_size: int,
    seed: int,
    device: torch.device | None = None,
) -> MSAForCausalLM:
    """The model a stage starts from: the previous stage's export, the recipe backbone, or a path
    (an MSA checkpoint, or a plain backbone that is converted with the recipe's MSA settings).
    A random backbone is initialised on `device`."""
    if init_from == "backbone":
        return build_from_backbone(model_config, vocab_size, seed, device)
    if init_from == "previous":
        if previous_export is None:
            raise ValueError("stage starts from the previous stage, but there is none")
        path = previous_export
    else:
        path = Path(init_from)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        logger.info("starting from LoRA adapter %s, merged into its base model", path)
        return AutoPeftModelForCausalLM.from_pretrained(path, dtype=DTYPES[model_config.dtype]).merge_and_unload()
    if is_msa_checkpoint(path):
        logger.info("starting from MSA checkpoint %s", path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model_config.dtype])
    logger.info("converting backbone checkpoint %s", path)
    return build_from_backbone(
        ModelConfig(backbone=str(path), msa=model_config.msa, dtype=model_config.dtype), vocab_size, seed
    )


def starting_checkpoint(init_from: str, previous_export: Path | None) -> Path | None:
    """The MSA checkpoint folder a stage loads as it is, or None when its starting model exists
    only in memory (converted from a backbone, or merged from a LoRA adapter)."""
    if init_from == "backbone":
        return None
    path = previous_export if init_from == "previous" else Path(init_from)
    return path.resolve() if path is not None and is_msa_checkpoint(path) else None


def add_lora_adapters(model: MSAForCausalLM, lora: LoraConfig, stage_name: str) -> PeftModel:
    """`model` wrapped by peft with LoRA adapters on the linear layers that `lora.target_modules`
    match (every other weight frozen). A pattern that matches no linear layer is an error."""
    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    targets: list[str] = []
    for index, pattern in enumerate(lora.target_modules):
        matched = [name for name in linear_names if re.search(pattern, name)]
        if not matched:
            examples = sorted({re.sub(r"\.\d+\.", ".N.", name) for name in linear_names})
            raise ValueError(
                f"stage {stage_name}: lora.target_modules[{index}] = {pattern!r} matches no linear layer "
                f"of the model; its linear layers are named like {examples} (N: the layer index)"
            )
        targets += matched
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" in targets:
        # An adapter on a head that shares its weight with the embedding cannot be merged into one.
        raise ValueError(
            f"stage {stage_name}: lora.target_modules match lm_head, whose weight is tied to the "
            "input embedding; adapt the head only in a model with tie_word_embeddings: false"
        )
    # Full module names, so that peft adapts exactly the layers matched here (it would treat a
    # bare name such as "q_proj" as a suffix, and a single string as a full-match regex).
    config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(set(targets)),
    )
    wrapped = get_peft_model(model, config)
    # The adapted layers' inputs then carry gradients even where the frozen embedding starts a
    # recomputed (activation-checkpointed) segment.
    wrapped.enable_input_require_grads()
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info(
        "stage %s: LoRA rank %d on %d linear layers, %d trainable parameters",
        stage_name,
        lora.rank,
        len(set(targets)),
        trainable,
    )
    return wrapped


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def parameter_groups(model: torch.nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """Optimizer parameter groups of a stage; frozen groups get `requires_grad=False` and no group.

    Each parameter joins the first group whose regex `pattern` it matches. Without groups in
    the recipe every parameter trains at the stage optimizer's LR. With `stage.lora` only the
    adapter weights are candidates (the groups split them); every other weight is frozen.
    """
    optimizer = stage.optimizer
    candidates = []
    for name, param in model.named_parameters():
        if stage.lora is not None and not is_lora_parameter(name):
            param.requires_grad_(False)
        else:
            candidates.append((name, param))
    if not stage.param_groups:
        params = [param for _, param in candidates]
        for param in params:
            param.requires_grad_(True)
        return [{"name": "all", "params": params, "lr": optimizer.lr, "weight_decay": optimizer.weight_decay}]
    patterns = [re.compile(group.pattern) for group in stage.param_groups]
    members: list[list[torch.nn.Parameter]] = [[] for _ in stage.param_groups]
    unmatched = []
    for name, param in candidates:
        index = next((i for i, pattern in enumerate(patterns) if pattern.search(name)), None)
        if index is None:
            unmatched.append(name)
            continue
        members[index].append(param)
        param.requires_grad_(not stage.param_groups[index].frozen)
    if unmatched:
        raise ValueError(
            f"stage {stage.name}: parameters match no param_groups pattern: {unmatched[:5]}"
            f"{' ...' if len(unmatched) > 5 else ''}; add a catch-all group such as pattern '.*'"
        )
    # A group that catches nothing is almost always a mis-escaped regex or one shadowed by an
    # earlier group; training would silently run without it.
    empty = [group for group, params in zip(stage.param_groups, members) if not params]
    if empty:
        raise ValueError(
            f"stage {stage.name}: param group {empty[0].name!r} (pattern {empty[0].pattern!r}) matches no "
            f"{'LoRA adapter ' if stage.lora is not None else ''}parameter; check the regex (YAML: write "
            "'\\.router_' in single quotes) and that no earlier group takes its parameters"
        )
    groups = []
    for group, params in zip(stage.param_groups, members):
        count = sum(p.numel() for p in params)
        logger.info(
            "param group %s: %d tensors, %d parameters, %s",
            group.name,
            len(params),
            count,
            "frozen" if group.frozen else f"lr {group.lr if group.lr is not None else optimizer.lr:g}",
        )
        if group.frozen:
            continue
        groups.append(
            {
                "name": group.name,
                "params": params,
                "lr": group.lr if group.lr is not None else optimizer.lr,
                "weight_decay": group.weight_decay if group.weight_decay is not None else optimizer.weight_decay,
            }
        )
    if not groups:
        raise ValueError(f"stage {stage.name}: every parameter group is frozen or empty; nothing would train")
    return groups
