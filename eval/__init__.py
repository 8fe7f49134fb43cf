"""Evaluation of MSA checkpoints (``eval``): RULER-style NIAH, QA on local data with
EM/F1/router recall, an optional LLM judge, memory-size scaling curves and benchmarks."""
