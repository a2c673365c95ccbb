"""Executors run a sweep's units of work: ``LocalExecutor`` (subprocesses of this machine, in
``engine.experiments.executors.local``) and ``RayExecutor`` (tasks on a Ray cluster, in
``engine.experiments.executors.ray_executor``; needs ``pip install "rainsweep[ray]"``). The interface and the unit
of work are in ``engine.experiments.executors.base``."""
from engine.experiments.executors.base import (CHECKPOINT, Events, Executor, ExecutorError, Outcome, Resources,
                                               Unit)

__all__ = ["CHECKPOINT", "Events", "Executor", "ExecutorError", "Outcome", "Resources", "Unit"]
