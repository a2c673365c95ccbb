"""Training batches from a patch store: shuffled per epoch, sharded, with rain synthesized on the fly.

``batches(store, subset, ...)`` yields the ``Batch`` objects of one epoch; ``Loader`` is the same as an object that
keeps its state (resident data, DALI pipeline) between epochs. Both give exactly the same batches in every mode
(``MODES``) and on every device for the same arguments. A ``Batch`` holds NCHW images and an N1HW rain layer of one
of ``DTYPES`` (float32 / bfloat16 / float16 in 0..1, or uint8 in 0..255 that ``to_unit`` converts on any device).

The package's modules, one job each:

- ``order``: epoch order, shard batches and rain keys, pure functions of ``(seed, epoch)``.
- ``args``: argument checks and ``LoaderError``.
- ``planes``: output dtypes, the uint8 -> 0..1 conversion (``to_unit``), host buffers.
- ``batch``: the ``Batch`` type and ``finish_batch`` (rain and conversion on the batch's device).
- ``reading``, ``resident``, ``dali``: getting uint8 NHWC patches from the store onto the device.
- ``api``: ``Loader``, ``batches`` and its cache.
- ``steps``: training steps on top of ``batches``: the global batch split over data-parallel ranks, small subsets
  glued over loader epochs, resume at an ``(epoch, offset)`` position.
- ``multi``, ``multi_render``: K streams (``Stream``: subset, rain, seed) in one ``MultiBatch`` with a leading stream axis
  ([K, B, 3, P, P]) for a fused model: ``multi_batches``, ``MultiLoader``.
- ``multi_steps``: training steps of K streams, each on its own epochs (``MultiTrainingStream``).
"""
from __future__ import annotations

from engine.loader.api import DEFAULT_MEMORY_BUDGET, Loader, batches, cached_loaders, clear_cache
from engine.loader.args import DTYPES, MODES, LoaderError
from engine.loader.batch import Batch, finish_batch
from engine.loader.multi import MultiLoader, Stream, multi_batches
from engine.loader.multi_render import MultiBatch
from engine.loader.order import MAX_EPOCH, MAX_SHUFFLE_INDEX, epoch_order, rain_keys, shard_batches
from engine.loader.planes import to_unit

__all__ = ["DEFAULT_MEMORY_BUDGET", "DTYPES", "MAX_EPOCH", "MAX_SHUFFLE_INDEX", "MODES", "Batch", "Loader", "LoaderError",
           "MultiBatch", "MultiLoader", "Stream", "batches", "cached_loaders", "clear_cache", "epoch_order",
           "finish_batch", "multi_batches", "rain_keys", "shard_batches", "to_unit"]
