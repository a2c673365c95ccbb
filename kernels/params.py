"""Layout of the float64 parameter vector that carries a rain spec into the kernels.

Kernels never see ``engine.rain.RainSpec`` (imports point engine -> kernels); ``RainSpec.to_vector()`` packs the spec
into this layout. Ranges are closed intervals; integer fields (length, angle, widths) hold whole numbers.
"""
from __future__ import annotations

FAMILY = 0          # family id, see FAMILY_IDS
AMOUNT_LO = 1       # seed fraction (streak) / density (other families), uniform range
AMOUNT_HI = 2
LENGTH_LO = 3       # streak length in pixels, uniform integer range
LENGTH_HI = 4
ANGLE_LO = 5        # degrees from vertical, uniform integer range (0 = vertical streaks)
ANGLE_HI = 6
BETA_LO = 7         # compositing weight, uniform range, drawn in 1/1024 steps
BETA_HI = 8
RAIN_PROB = 9       # probability that a patch gets rain at all
THRESHOLD = 10      # mask threshold t on the 0..255 rain layer (mask = rain > t)
CANVAS_PAD = 11     # 0: render on the patch; p > 0: render on a (H+2p) x (W+2p) canvas, keep the centre crop
N_WIDTHS = 12       # number of width choices (1..MAX_WIDTHS)
WIDTHS = 13         # WIDTHS .. WIDTHS+MAX_WIDTHS-1: odd blur widths in pixels
WIDTH_CDF = WIDTHS + 8  # cumulative probabilities of the width choices (last one is 1.0)
MAX_WIDTHS = 8
SIGMA = WIDTH_CDF + MAX_WIDTHS  # gaussian-noise: standard deviation on the 0..255 scale
MU = SIGMA + 1                  # gaussian-noise: mean on the 0..255 scale
SALT = MU + 1                   # salt-pepper: probability that a channel value becomes 255
PEPPER = SALT + 1               # salt-pepper: probability that a channel value becomes 0
SIZE = PEPPER + 1

#: Renderer families. "streak" is the authors' generator; "layered" and "sparse" are held-out rain families;
#: "gaussian-noise" and "salt-pepper" are degradations beyond rain (``kernels.noise``).
FAMILY_IDS = {"streak": 0, "layered": 1, "sparse": 2, "gaussian-noise": 3, "salt-pepper": 4}

#: How a family's degradation meets the background ``B`` (uint8, 0..255), per compositing mode:
#: "add-layer": ``I = min(255, B + beta * R)`` with one non-negative rain layer ``R`` for all three channels;
#: "add-signed-rgb": ``I = clip(B + n, 0, 255)`` with a signed offset ``n`` drawn per channel;
#: "replace": each channel value is kept or replaced by a drawn value.
MODES = {"add-layer": 0, "add-signed-rgb": 1, "replace": 2}

#: The compositing mode of every family of ``FAMILY_IDS``.
FAMILY_MODES = {"streak": "add-layer", "layered": "add-layer", "sparse": "add-layer",
                "gaussian-noise": "add-signed-rgb", "salt-pepper": "replace"}
