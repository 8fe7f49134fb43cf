"""Experiment drivers: the GPU-scale ablations (`experiments.gpu`) and the CPU key-value run
(`experiments.kv_cpu`). They train through `train.api` and evaluate through `eval`; nothing in
the core imports them."""
