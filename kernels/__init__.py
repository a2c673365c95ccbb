"""rainsweep kernels: the math on arrays (numba CPU kernels, numba.cuda GPU kernels, numpy references).

Importing a kernels module changes no process state. A process that compiles kernels should call
``engine.runtime.configure_process()`` first (importing ``engine`` does): it keys numba's on-disk cache on these
sources and sets the OpenMP waiting policy.

Modules: ``params`` (the spec vector's layout), ``rng`` (counter-based random numbers), ``families`` (the rain
families by name: ``rain_streak`` over the ``streak`` package, ``rain_layered`` and ``rain_sparse`` over
``segments``; their interface in ``renderer``), ``composite`` and ``finish`` (compositing, channel planes),
``sharpness``, ``complexity``, ``decoupled`` (patch metrics), ``authors_generator`` (the authors' OpenCV generator,
for comparison), and the shared plumbing ``jit``, ``simd``, ``gpu_launch``.
"""
