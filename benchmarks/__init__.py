"""Benchmarks: training and inference throughput (`bench_train`, `bench_inference`), attention
backend parity (`check_backends`) and data preparation (`bench_data`). They use the core
(`msa_modeling`, `data`, `train`, `eval`) and nothing imports them."""
