"""Rain family "streak": the authors' generator, rendered fast by seeds with geometric skipping and a sparse kernel.

The generator this reproduces (``kernels.authors_generator`` is the OpenCV version; Hu, You, Gu, Zhu, Xue, Dong,
"Revisiting the Generalization Problem of Low-level Vision Models Through the Lens of Image Deraining", the journal
extension of Gu et al., "Networks are Slacking Off: Understanding Generalization Problem in Image Deraining",
NeurIPS 2023, arXiv:2305.14709): seed noise (a fraction ``amount`` of the pixels, strength
``U(256 (1 - amount), 256)``), the 3 x 3 seed filter ``[[0,.1,0],[.1,8,.1],[0,.1,0]]``, a streak kernel (the
``length x length`` diagonal rotated by ``angle - 45`` degrees about ``(length/2, length/2)`` with bilinear
``cv2.warpAffine``, then ``cv2.GaussianBlur`` with odd ``width``, OpenCV's weights, reflect-101 borders inside the
kernel), ``cv2.filter2D`` with reflect-101 borders, and a per-patch min-max normalization to 0..255 truncated to
uint8. ``angle`` is in whole degrees from vertical; a positive angle puts the lower end of a streak to the right.

How it is computed here (``reference`` does the same arithmetic the obvious way, in numpy):

- Per patch (stream 1 of ``kernels.rng``): counter 0: ``amount`` as ``aq / 2**24`` with ``aq`` a uniform integer;
  1: ``length``; 2: ``angle``; 3: width choice (a 53-bit uniform compared with the width CDF) (``patch``).
- Streak kernel in integers (``kernel``): source coordinates of the rotation in 1/32 px (as OpenCV's
  ``INTER_BITS``) from the host-made cos/sin table (``tables.TRIG``, 2**-16), bilinear weights in 1/1024, Gaussian
  rows/columns with OpenCV's weights in 2**-12 (``tables.GAUSS``), reflect-101 inside the kernel, the seed filter
  folded in (x 10, so ``[1, 80, 1]``), then scaled down by a power of two to at most ``2**TAP_BITS`` and stored as
  rows of taps (scatter offsets). Folding is exact: the reflect-101 extension of a seed image filtered by a
  symmetric 3 x 3 kernel is the same as filtering the extended seed image.
- Seeds (stream 2, one sub-stream per canvas row ``y``, draw ``j`` at counter ``2 << 32 | y << 12 | j``): one 64-bit
  hash per seed. Its top 53 bits ``u`` give the gap to the next seed, ``floor(log(1 - u) / log(1 - amount))``
  (geometric: an exact Bernoulli(amount) process per pixel); its low 11 bits ``b`` give the strength
  ``v = 4095 - (aq * b >> 23)`` in 1/16 (``256 (1 - amount u')``, ``u' = b / 2048``).
- Every seed is splatted with all its reflect-101 mirror images that reach the canvas (what ``filter2D``'s border
  does) into an integer accumulator (int64 on the GPU and in the reference, float64 holding exact integers below
  2**53 on the CPU, see ``cpu``); integer sums do not depend on the order, so atomics on the GPU give the CPU's
  result exactly.
- Min-max normalization over the canvas in integers: ``floor((acc - min) * 255 / (max - min))`` (all equal -> 0),
  then the centre crop when ``canvas_pad > 0``.

Modules: ``tables`` (host-made tables, limits), ``patch`` (per-patch draws, seeds, exact normalization) and
``kernel`` (the streak kernel's passes), each compiled for CPU and GPU from one source; ``bank`` (built kernels kept
per process), ``cpu`` (numba, parallel over patches, optionally fused with compositing), ``gpu`` (numba.cuda, one
block per patch), ``reference`` (numpy).

Residual float risk (CPU vs GPU vs reference): the gap uses ``log`` (libm on the CPU, libdevice on the GPU, both
within 1 ulp) and one IEEE division; a 1-ulp difference changes ``floor`` only when the quotient lies within ~1e-16
relative of an integer, probability ~1e-15 per seed. Everything else is integer arithmetic or exact float
operations (powers of two, compares).
"""
