"""The GPU-scale MSA experiment, from one command, inside a wall-clock budget.

    python -m experiments.gpu --gpus 0 1 2 3 --results-dir runs/experiments
    python -m experiments.gpu --gpus 0 1 --time-budget 7    # from the repository root: no install needed
    python -m experiments.gpu --gpus 0 0 0 --variants main no_aux global_positions   # three on GPU 0
    python -m experiments.gpu --smoke --results-dir /tmp/gpu_smoke   # CPU, toy scale

What it does:
1. Trains one tokenizer for every variant (the recipe's `train_tiny`, on the recipe's sources).
2. Runs four variants of `recipes/qwen3_350m_synthetic.yaml` through its four stages (CPT
   warm-up, CPT main, SFT short at 8K rows, SFT long at 16K rows), one process per GPU
   (`CUDA_VISIBLE_DEVICES`; DeepSpeed ZeRO-2 in a world of one). `--gpus` names one worker slot
   per entry, so a GPU named twice runs two variants at once. With fewer slots than variants,
   the variants queue, each slot running its share one after the other:
   - `main`: the recipe;
   - `no_aux`: `loss_weights.aux: 0` in every stage (the router is never trained);
   - `global_positions`: `model.msa.document_positions: false`: positions count from the start
     of each example instead of restarting in each document; inference then encodes each
     document at its offset in the memory and the question after the whole memory;
   - `no_interleave`: every interleave (multi-hop, one example per retrieval step) source is
     replaced by its one-round counterpart, which retrieves both hops' IDs at once;
   Data builds run in separate CPU processes, one per source, while the workers start.
3. Fits the steps to the budget: the first stage uses the recipe's steps, or fewer when the
   assumed throughput says they would not fit; each later stage is scaled (up to
   `--max-step-scale`) to the time left, from the throughput and per-stage overhead measured so far.
   `--steps-from JSON` instead trains every stage for the steps `main` trained in that earlier
   run, so ablations run in later calls (or on other cards) match it step for step.
4. Evaluates each variant's last export, in order of importance, until its deadline:
   RULER-style NIAH (`eval/niah.py`; at L and 64L in rounds that ask both sizes alike) and
   held-out needle QA in one shared memory (router recall@1/5/10, exact match, whether the
   generated ID was the needle) at memories of L, 64L, 8L, 2L, 4L, 16L and 32L tokens (L: the
   longest training row), multi-hop QA through the interleave loop and key-value QA at about L
   tokens. (Cheap sizes come before 32L.)
5. Writes to `--results-dir` (at most 6 files): `<name>.json` (every number, the per-step
   curves, timings), `<name>_loss.png`, `<name>_recall.png` (training curves of all variants),
   `<name>_niah.png` (NIAH accuracy against memory size), `<name>_memory_recall.png` (held-out
   router recall@k against memory size) and `<name>_log.txt` (the summary table and the tail of
   every process's log). It prints the summary, with the acceptance check: NIAH accuracy at
   64L within 10% of the accuracy at L.

Work folders (runs, data builds, logs) go under `--work-dir`. `key=value` arguments are recipe
overrides applied to every variant.

The package, in the order a run takes: `plan` (variants, smoke scale, steps per stage, worker
slots), `training` (tokenizer, data builds, stages through `train.api.run_stage`), `evaluation`
(the jobs and their cost model), `stats` (the acceptance check and its bootstrap interval),
`report` (table, plots, JSON, merging), `worker` (one variant's process) and `driver` (processes,
deadlines, command line).
"""
