"""Every stage of a recipe in order, each starting from the previous stage's export.

deepspeed launch/run_all.py recipes/qwen3_4b.yaml [--stage NAME] [key=value ...]
DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/run_all.py recipes/tiny.yaml
python launch/run_all.py recipes/tiny.yaml         # one process, same code path
"""

from train.runner import main

if __name__ == "__main__":
    raise SystemExit(main("all"))
