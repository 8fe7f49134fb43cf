"""One training stage under DeepSpeed: the step loop, logging, checkpoints, evaluation, export."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from msa_modeling.execution import apply_activation_checkpointing, apply_activation_offload, apply_compile
from msa_modeling.flops import FlopModel

from .checkpoint import CheckpointError, CheckpointManager, capture_rng_state, restore_rng_state
from .config import DivergenceConfig, LossWeights, Recipe, StageConfig, recipe_to_yaml
from .data_stream import LayoutSettings, MicroBatchStream
from .distributed import DistributedContext
from .engine import batch_geometry, deepspeed_config, initialize_engine
from .export import export_stage
from .model_setup import add_lora_adapters, load_stage_model, parameter_groups, starting_checkpoint
from .prefetch import PrefetchingStream
from .profiling import StepProfiler
from .schedule import LRMultiplier
from .throughput import memory_gb
from .tracking import MetricsLogger, resolve_wandb_mode

logger = logging.getLogger(__name__)

RECALL_KEYS = ("recall@1", "recall@5", "recall@10")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss (nan_policy: stop) after saving a checkpoint."""


class DivergenceError(RuntimeError):
    """Training stopped on a loss spike or gradient-norm excess (divergence.policy: stop)."""


class DivergenceMonitor:
    """Flags a step whose gradient norm or loss (against the mean of recent losses) is too large."""

    def __init__(self, config: DivergenceConfig) -> None:
        self.config = config
        self.recent: collections.deque[float] = collections.deque(maxlen=config.window_steps)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this (finite) step diverged, or None; records its loss for later steps."""
        config = self.config
        reason = None
        if config.max_grad_norm is not None and grad_norm > config.max_grad_norm:
            reason = f"gradient norm {grad_norm:.4g} > divergence.max_grad_norm {config.max_grad_norm}"
        elif config.loss_spike_factor is not None and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > config.loss_spike_factor * mean:
                reason = (
                    f"loss {loss:.4g} > divergence.loss_spike_factor {config.loss_spike_factor} x the mean "
                    f"{mean:.4g} of the previous {len(self.recent)} steps"
                )
        if reason is None:
            self.recent.append(loss)
        return reason


def stage_dir(run_dir: Path, stage_name: str) -> Path:
    return run_dir / "stages" / stage_name


def export_dir(run_dir: Path, stage_name: str) -> Path:
    return stage_dir(run_dir, stage_name) / "export"


def total_steps(stage: StageConfig) -> int:
    """Optimizer steps in the stage budget (a token budget rounds up to whole global batches)."""
    if stage.budget.steps is not None:
        return stage.budget.steps
    return math.ceil(stage.budget.tokens / stage.global_batch_tokens)


def weighted_loss(output: Any, weights: LossWeights) -> torch.Tensor:
    """`w_lm * lm_loss + w_aux * aux_loss`; a batch without positives has no aux term."""
    loss = weights.lm * output.lm_loss
    if output.aux_loss is not None:
        return loss + weights.aux * output.aux_loss
    if output.doc_scores is not None:
        # A zero term through the router keeps the backward graph non-empty when only the
        # router trains (frozen backbone), so every rank runs its gradient hooks as usual.
        loss = loss + 0.0 * output.doc_scores.sum()
    return loss


class StepMetrics:
    """Per-step sums kept on the device, reduced across ranks with one collective.

    Layout of the vector: loss, lm, aux, aux count, micro-batches, router memory pairs, then for
    each recall@k the per-layer sums followed by the per-layer counts (NaN recalls, i.e. no
    positives, skipped).
    """

    HEAD = 6

    def __init__(self, num_router_layers: int, device: torch.device) -> None:
        self.layers = num_router_layers
        self.values = torch.zeros(
            self.HEAD + 2 * len(RECALL_KEYS) * num_router_layers, dtype=torch.float64, device=device
        )

    def add(self, loss: torch.Tensor, output: Any, memory_pairs: torch.Tensor | float = 0.0) -> None:
        values = self.values
        values[0] += loss.detach().double()
        values[1] += output.lm_loss.detach().double()
        if output.aux_loss is not None:
            values[2] += output.aux_loss.detach().double()
            values[3] += 1
        values[4] += 1
        values[5] += memory_pairs
        if output.router_recall is not None:
            for index, key in enumerate(RECALL_KEYS):
                recall = output.router_recall[key].detach().double()
                finite = torch.isfinite(recall)
                start = self.HEAD + 2 * index * self.layers
                values[start : start + self.layers] += torch.where(finite, recall, torch.zeros_like(recall))
                values[start + self.layers : start + 2 * self.layers] += finite.double()

    def reduce(self, router_layers: list[int]) -> dict[str, float]:
        """Means over micro-batches and ranks (a host sync; once per optimizer step); `memory_pairs`
        is this step's router-layer pairs per rank."""
        dist.all_reduce(self.values)
        values = self.values.cpu().tolist()
        micro = values[4]
        result = {
            "loss": values[0] / micro,
            "lm_loss": values[1] / micro,
            "aux_loss": values[2] / values[3] if values[3] else float("nan"),
            "memory_pairs": values[5] / dist.get_world_size(),
        }
        for index, key in enumerate(RECALL_KEYS):
            start = self.HEAD + 2 * index * self.layers
            sums = values[start : start + self.layers]
            counts = values[start + self.layers : start + 2 * self.layers]
            per_layer = [s / c if c else float("nan") for s, c in zip(sums, counts)]
            for layer, value in zip(router_layers, per_layer):
                result[f"{key}/layer_{layer}"] = value
            finite = [v for v in per_layer if math.isfinite(v)]
            result[key] = sum(finite) / len(finite) if finite else float("nan")
        return result


@dataclass
class StageState:
    """What a checkpoint stores besides DeepSpeed's model/optimizer/scheduler state."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    diverged_steps: int = 0
    wandb_run_id: str | None = None
    last_eval_step: int = -1  # so that a resume after the final evaluation does not log it twice


def configure_layer_execution(model: Any, recipe: Recipe, stage: StageConfig | None = None) -> None:
    """The `activations` section (the stage's own, else the recipe's) and `model.compile`, applied by
    wrapping the decoder layers:
    checkpointing of the layers after the first `offloaded_layers` (all, or the first
    `checkpointed_layers`, of which the first `saved_attention_layers` keep their attention
    output), activation offload of the first `offloaded_layers`, and `torch.compile`."""
    activations = stage.activations if stage is not None and stage.activations is not None else recipe.activations
    layers = model.config.num_hidden_layers
    offloaded = activations.offloaded_layers
    checkpointed = activations.checkpointed_layers
    if offloaded > layers:
        raise ValueError(f"activations.offloaded_layers={offloaded} but the model has {layers} layers")
    if checkpointed is not None and offloaded + checkpointed > layers:
        raise ValueError(
            f"activations.checkpointed_layers={checkpointed} (after {offloaded} offloaded) "
            f"but the model has {layers} layers"
        )
    if activations.checkpointing:
        recomputed = layers - offloaded if checkpointed is None else checkpointed
        if activations.saved_attention_layers > recomputed:
            raise ValueError(
                f"activations.saved_attention_layers={activations.saved_attention_layers} but only "
                f"{recomputed} layers are recomputed ({layers} layers, {offloaded} offloaded)"
            )
        apply_activation_checkpointing(
            model, layers=recomputed, start=offloaded, keep_attention_layers=activations.saved_attention_layers
        )
    # After checkpointing, so that the offload's prefetch hooks sit outside the recomputation.
    if offloaded:
        apply_activation_offload(model, layers=offloaded, prefetch_layers=activations.offload_prefetch_layers)
    if recipe.model.compile:
        apply_compile(model)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StageTrainer:
    """Trains one stage from its starting model (or its latest checkpoint) to its budget, then exports."""

    def __init__(
        self,
        recipe: Recipe,
        stage: StageConfig,
        run_dir: Path,
        tokenizer_dir: Path,
        vocab_size: int,
        previous_export: Path | None,
        context: DistributedContext,
    ) -> None:
        self.recipe = recipe
        self.stage = stage
        self.run_dir = run_dir
        self.dir = stage_dir(run_dir, stage.name)
        self.tokenizer_dir = tokenizer_dir
        self.context = context
        self.total_steps = total_steps(stage)

        model = load_stage_model(
            stage.init_from, recipe.model, previous_export, vocab_size, recipe.run.seed, context.device
        )
        # The trainer weighs the losses itself; the config copy makes the export record the weights.
        model.config.lm_loss_weight = stage.loss_weights.lm
        model.config.aux_loss_weight = stage.loss_weights.aux
        if stage.chunk_size is not None and stage.chunk_size != model.config.chunk_size:
            # Layouts (the data stream's and the model's own) and the export all read the config.
            logger.info("stage %s: chunk size %d -> %d", stage.name, model.config.chunk_size, stage.chunk_size)
            model.config.chunk_size = stage.chunk_size
        configure_layer_execution(model, recipe, stage)
        model.train()
        self.model_config = model.config
        self.flops = FlopModel.from_model(model)
        # What a LoRA stage's adapter export names as its base (None: written beside the adapter).
        self.base_checkpoint = starting_checkpoint(stage.init_from, previous_export)
        if stage.lora is not None:
            model = add_lora_adapters(model, stage.lora, stage.name)
        groups = parameter_groups(model, stage)
        self.group_names = [group["name"] for group in groups]
        self.rows_per_micro, self.accumulation = batch_geometry(stage, context.world_size)
        ds_config = deepspeed_config(
            recipe, stage, self.rows_per_micro, self.accumulation, context.world_size, context.on_cpu
        )
        self.engine, self.scheduler = initialize_engine(
            model, groups, ds_config, LRMultiplier.from_config(stage.schedule, self.total_steps)
        )
        logger.info(
            "stage %s: %d steps, %d rows/micro-batch x %d accumulation x %d ranks, ZeRO-%d",
            stage.name,
            self.total_steps,
            self.rows_per_micro,
            self.accumulation,
            context.world_size,
            recipe.deepspeed.zero_stage,
        )
        # Per-rank streams of random numbers, after the (identical) model initialisation.
        seed_everything(recipe.run.seed * 1000 + context.rank)
        self.stream = PrefetchingStream(self._stream(stage.sources, seed=recipe.run.seed), context.device)
        self.checkpoints = CheckpointManager(self.dir / "checkpoints", recipe.checkpoint.keep_last, context)
        self.state = StageState()
        self.divergence = DivergenceMonitor(stage.divergence)
        self.metrics: MetricsLogger | None = None

    def _stream(self, sources: dict[str, float], seed: int) -> MicroBatchStream:
        return MicroBatchStream(
            sources,
            self.stage.row_length,
            self.rows_per_micro,
            self.run_dir,
            LayoutSettings.from_model_config(self.model_config),
            seed,
            self.context.rank,
            self.context.world_size,
        )

    def resume(self) -> None:
        """Continue from the stage's newest complete checkpoint, if any."""
        saved = self.checkpoints.load(self.engine)
        if saved is None:
            return
        try:
            self.state = StageState(**saved["stage_state"])
            self.stream.load_state_dict(saved["data"])
            restore_rng_state(saved["rng"])
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(
                f"checkpoint {saved['path']}: its trainer state does not fit this stage "
                f"({error!r}); move that folder away to resume from the next older one"
            ) from error

    def save_checkpoint(self) -> None:
        self.checkpoints.save(
            self.engine,
            self.state.step,
            {
                "step": self.state.step,
                "stage_state": dataclasses.asdict(self.state),
                "data": self.stream.state_dict(),
                "rng": capture_rng_state(),
            },
        )

    def run(self) -> Path:
        """Train to the budget, then export; returns the export folder."""
        self.train()
        return export_stage(
            self.engine,
            self.recipe.deepspeed.zero_stage,
            export_dir(self.run_dir, self.stage.name),
            self.tokenizer_dir,
            recipe_to_yaml(self.recipe),
            self.context,
            self.stage.lora.export if self.stage.lora is not None else None,
            self.base_checkpoint,
        )

    def train(self) -> None:
        """Resume from the newest checkpoint, if any, and train to the budget (no export)."""
        self.resume()
        if self.context.is_main:
            tracking = self.recipe.tracking
            # The W&B run id is also kept beside the checkpoints, for a kill before the first one.
            run_id_file = self.dir / "wandb_run_id"
            if self.state.wandb_run_id is None and run_id_file.is_file():
                self.state.wandb_run_id = run_id_file.read_text().strip() or None
            self.metrics = MetricsLogger(
                self.dir,
                resolve_wandb_mode(tracking.wandb),
                tracking.project,
                f"{self.recipe.run.name}/{self.stage.name}",
                dataclasses.asdict(self.stage),
                self.state.wandb_run_id,
            )
            self.metrics.resume_at(self.state.step)
            self.state.wandb_run_id = self.metrics.wandb_run_id
            if self.state.wandb_run_id is not None:
                run_id_file.write_text(self.state.wandb_run_id)
        try:
            self._train_loop()
        finally:
            self.stream.close()
            if self.metrics is not None:
                self.metrics.finish()

    def _train_loop(self) -> None:
        stage = self.stage
        budget_tokens = self.total_steps * stage.global_batch_tokens
        progress = tqdm(
            total=budget_tokens,
            initial=self.state.tokens_seen,
            unit="tok",
            unit_scale=True,
            desc=stage.name,
            disable=not (self.context.is_main and self.recipe.tracking.progress_bar),
        )
        tracking = self.recipe.tracking
        profiler = StepProfiler(
            self.dir / "profile",
            tracking.profile_start_step,
            tracking.profile_steps,
            self.context.device,
            self.context.is_main,
        )
        with progress, profiler:
            while self.state.step < self.total_steps:
                profiler.step_starting(self.state.step + 1)
                record = self._train_step()
                self.state.step += 1
                profiler.step_finished(self.state.step)
                self.state.tokens_seen += stage.global_batch_tokens
                progress.update(stage.global_batch_tokens)
                progress.set_postfix(loss=f"{record['loss']:.4f}", r1=f"{record['recall@1']:.2f}")
                finite = math.isfinite(record["loss"])
                if not finite:
                    self.state.skipped_steps += 1
                divergence = self.divergence.check(record["loss"], record["grad_norm"]) if finite else None
                if divergence:
                    self.state.diverged_steps += 1
                record.update(
                    step=self.state.step,
                    tokens_seen=self.state.tokens_seen,
                    tokens_budget=budget_tokens,
                    skipped_steps=self.state.skipped_steps,
                    diverged_steps=self.state.diverged_steps,
                )
                if self.metrics is not None and (
                    self.state.step % self.recipe.tracking.log_every_steps == 0 or not finite or divergence
                ):
                    self.metrics.log(record)
                if not finite:
                    self._handle_non_finite(record)
                if divergence:
                    self._handle_divergence(divergence)
                if stage.eval.sources and stage.eval.every_steps and self.state.step % stage.eval.every_steps == 0:
                    self._evaluate()
                if self.state.step % stage.checkpoint_every_steps == 0:
                    self.save_checkpoint()
        if stage.eval.sources and self.state.last_eval_step != self.state.step:
            self._evaluate()
        if self.recipe.checkpoint.save_final:
            self.save_checkpoint()

    def _handle_non_finite(self, record: dict[str, Any]) -> None:
        """DeepSpeed has already discarded the update (its overflow check); stop or go on per policy."""
        message = (
            f"stage {self.stage.name}: non-finite loss {record['loss']} at step {self.state.step} "
            f"(lm {record['lm_loss']}, aux {record['aux_loss']}, grad norm {record['grad_norm']})"
        )
        if self.stage.nan_policy == "skip":
            logger.warning("%s; the update was skipped (nan_policy: skip)", message)
            return
        self.save_checkpoint()
        raise NonFiniteLossError(
            f"{message}; checkpoint saved under {self.checkpoints.root}; "
            "set nan_policy: skip in the stage to step over such batches"
        )

    def _handle_divergence(self, reason: str) -> None:
        """The update is already applied: stop without checkpointing it, or warn and go on, per policy."""
        message = f"stage {self.stage.name}: step {self.state.step} diverged: {reason}"
        if self.stage.divergence.policy == "warn":
            logger.warning("%s (divergence.policy: warn)", message)
            return
        saved = self.checkpoints.checkpoint_tags()
        raise DivergenceError(
            f"{message}. Its weights are not saved; a resume starts from "
            f"{saved[0] if saved else 'the start of the stage'} under {self.checkpoints.root}. "
            "Lower the LR, or set divergence.policy: warn to go on"
        )

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step of `accumulation` micro-batches; returns its metrics (rank-averaged)."""
        engine, device = self.engine, self.context.device
        sums = StepMetrics(len(self.model_config.router_layers), device)
        tokens = flops = 0.0
        started = time.perf_counter()
        # The LRs this step's update uses: engine.step() advances the scheduler at the boundary.
        step_lrs = self.scheduler.get_last_lr()
        coalesce = self.recipe.deepspeed.coalesce_reduction
        with engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
            for _ in range(self.accumulation):
                batch = self.stream.next()
                tokens += batch.input_ids.numel()
                flops += self.flops.training_flops(batch.work)
                batch = batch.to(device)
                output = engine(batch.input_ids, layout=batch.layout)
                loss = weighted_loss(output, self.stage.loss_weights)
                engine.backward(loss)
                if not coalesce:
                    engine.step()
                sums.add(loss, output, batch.work.memory_pairs(output.selected_docs))
        if coalesce:
            # DeepSpeed finds the accumulation boundary by counting step() calls; here one call ends
            # the optimizer step, so every call is a boundary.
            engine.set_gradient_accumulation_boundary(True)
            engine.step()
        record = sums.reduce(self.model_config.router_layers)
        elapsed = time.perf_counter() - started
        flops += self.flops.memory_pair_training_flops(record.pop("memory_pairs"))
        grad_norm = engine.get_global_grad_norm()
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        for name, lr in zip(self.group_names, step_lrs):
            record[f"lr/{name}"] = lr
        record["tokens_per_s_per_device"] = tokens / elapsed
        record["mfu"] = flops / elapsed / self.recipe.tracking.peak_flops_per_device
        record["memory_gb"] = memory_gb(device)
        record["step_seconds"] = elapsed
        return record

    def _evaluate(self) -> None:
        """Loss and router recall on the stage's eval sources, always from their start."""
        stream = self._stream(self.stage.eval.sources, seed=self.recipe.run.seed + 1)
        sums = StepMetrics(len(self.model_config.router_layers), self.context.device)
        self.engine.eval()
        with torch.no_grad():
            for _ in range(self.stage.eval.micro_batches):
                batch = stream.next().to(self.context.device)
                output = self.engine(batch.input_ids, layout=batch.layout)
                sums.add(weighted_loss(output, self.stage.loss_weights), output)
        self.engine.train()
        reduced = sums.reduce(self.model_config.router_layers)
        del reduced["memory_pairs"]
        record = {f"eval/{key}": value for key, value in reduced.items()}
        layers = self.model_config.router_layers
        per_layer = (
            " (" + ", ".join(f"layer {i}: {record[f'eval/recall@1/layer_{i}']:.3f}" for i in layers) + ")"
            if len(layers) > 1
            else ""
        )
        logger.info(
            "stage %s step %d eval: loss %.4f, recall@1 %.3f%s",
            self.stage.name,
            self.state.step,
            record["eval/loss"],
            record["eval/recall@1"],
            per_layer,
        )
        if self.metrics is not None:
            self.metrics.log({"step": self.state.step, **record})
        self.state.last_eval_step = self.state.step
