"""Continual pretraining (CPT) stages of a recipe: the stages with phase: pretrain.

deepspeed launch/pretrain.py recipes/qwen3_4b.yaml [--stage NAME] [key=value ...]
DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/pretrain.py recipes/tiny.yaml
python launch/pretrain.py recipes/tiny.yaml         # one process, same code path
"""

from train.runner import main

if __name__ == "__main__":
    raise SystemExit(main("pretrain"))
