"""The MSA trainer (`train`): recipes, DeepSpeed ZeRO stages, checkpoints, export, tracking.

Entry points are `launch/pretrain.py`, `launch/sft.py` and `launch/run_all.py` (all call
`runner.main`), and `launch/dense_baseline.py` for the dense throughput baseline.

- `config`: the recipe dataclasses, `load_recipe(path, overrides)`, `RecipeError`.
- `runner`: stage selection, tokenizer and data preparation, `main(phase)`.
- `trainer`: `StageTrainer` (one stage: step loop, metrics, checkpoints, eval, export).
- `data_stream` / `prefetch`: micro-batches of packed rows with their `PackedLayout`, built ahead.
- `engine`, `schedule`, `model_setup`: DeepSpeed config, LR schedule, starting model and param groups.
- `checkpoint`, `export`, `tracking`, `throughput`: atomic checkpoints, Hugging Face export,
  metrics.jsonl + W&B, FLOP and memory accounting.
"""
