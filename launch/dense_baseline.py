"""Plain DeepSpeed + Hugging Face training of a recipe stage's dense backbone, on the same rows,
batch and DeepSpeed set-up as the MSA stage: the throughput baseline for docs/BENCHMARKS.md.

    deepspeed --num_gpus 2 launch/dense_baseline.py recipes/qwen3_1b_synthetic.yaml --stage cpt_synthetic --steps 50
    python launch/dense_baseline.py recipes/tiny.yaml --stage cpt_warmup --steps 3
"""

from train.runner import dense_baseline_main

if __name__ == "__main__":
    raise SystemExit(dense_baseline_main())
