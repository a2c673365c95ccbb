"""rainsweep engine: rain synthesis, metrics, patch stores, the loader and experiments on top of ``kernels``.

Importing any ``engine`` module first configures the process for the kernels (``engine.runtime``).
"""
from engine import runtime

runtime.configure_process()
