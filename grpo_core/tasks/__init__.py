"""Synthetic verifiable tasks (integer arithmetic, linear equations, fractions) in the plain row format."""
from grpo_core.data.io import write_dataset
from grpo_core.tasks.synthetic import TASKS, TaskKind, make_synthetic, make_train_test

__all__ = ["TASKS", "TaskKind", "make_synthetic", "make_train_test", "write_dataset"]
