"""Benchmark a recipe's stage through the trainer, beside the standalone step and the dense baseline.

python launch/bench_trainer.py recipes/qwen3_1b_synthetic.yaml --stage cpt_synthetic
deepspeed --num_gpus 2 launch/bench_trainer.py recipes/qwen3_4b.yaml --stage cpt_main --shape qwen3-4b --synthetic
"""

from train.benchmark import benchmark_main

if __name__ == "__main__":
    raise SystemExit(benchmark_main())
