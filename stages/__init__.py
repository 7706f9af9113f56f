"""Curriculum stages as DeepSpeed ZeRO jobs: engine set-up, loop, checkpoints, evaluation, MLflow."""
