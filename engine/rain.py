"""Rain specifications: the authors' ranges, the journal's Table I, held-out test families, degradations beyond
rain (Gaussian and salt-and-pepper noise), and a CLI syntax.

A ``RainSpec`` says from which ranges a patch's rain parameters are drawn; ``engine.synth.synthesize`` draws one
parameter set per patch from ``(seed, key)`` and renders it. All intensities are on the 0..255 scale. The noise
families ("gaussian-noise", "salt-pepper", ``kernels.noise``) are specs of the same record, so every place that takes
rain (loader, trainer, held-out set, sweeps) takes them too; they use their own fields and ``prob``, and ignore the
rain fields.

The paper's denoising counterpart (its Fig. 19b) trains on Gaussian noise N(0, 30) (preset ``gaussian-30``) and
tests on salt-and-pepper noise, 2 % salt and 2 % pepper per RGB channel (preset ``salt-pepper-2``).

References: Hu, You, Gu, Zhu, Xue, Dong, "Revisiting the Generalization Problem of Low-level Vision Models Through the
Lens of Image Deraining" (journal extension of Gu et al., "Networks are Slacking Off: Understanding Generalization
Problem in Image Deraining", NeurIPS 2023, arXiv:2305.14709); the held-out "layered" family follows the depth layers
of Garg & Nayar, "Vision and Rain", IJCV 75(1):3-27, 2007, doi:10.1007/s11263-006-0028-6.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kernels import params as P

#: Journal Table I gives "quantity" without a unit. We read it as the ``value`` argument of the widely used
#: ``get_noise(img, value)`` rain code that the authors' generator follows: noise U(0, 256) is kept where it is at
#: least ``256 - value * 0.01``, so the seed fraction is ``amount = quantity * 0.01 / 256`` (quantity 200..300 ->
#: amount 0.0078..0.0117, i.e. about the density of the authors' "large" range).
TABLE1_QUANTITY_TO_AMOUNT = 0.01 / 256.0


@dataclass(frozen=True)
class RainSpec:
    """Ranges from which one patch's rain is drawn.

    Attributes:
        family: renderer, one of ``"streak"`` (the authors' generator), ``"layered"`` and ``"sparse"`` (held-out
            rain), ``"gaussian-noise"`` and ``"salt-pepper"`` (noise; see ``kernels.noise`` and the fields below).
            The rain fields (amount .. threshold, canvas_pad) apply to the rain families only.
        amount: (lo, hi) fraction of pixels that seed a streak (streak); streaks per canvas pixel per depth layer
            (layered; far layers get up to twice as many); streaks per canvas pixel, at least one (sparse).
        width: odd blur widths in pixels to choose from (streak); near-layer streak widths, the far layer being
            1 px wide (layered); streak widths (sparse).
        width_prob: probability of each width (sums to 1).
        length: (lo, hi) streak length in pixels, integers, inclusive (streak, sparse); far-layer length, nearer
            layers being shorter down to 2/5 of it (layered).
        angle: (lo, hi) streak angle in whole degrees from vertical, inclusive (a positive angle puts the lower end
            to the right); for layered and sparse one direction per patch, with per-streak jitter of a few degrees.
        beta: (lo, hi) compositing weight in ``I = clip(B + beta * R, 0, 255)`` (noise families: not used; their
            patches report beta 1).
        rain_prob: probability that a patch gets rain, or noise (the authors train with 0.9).
        threshold: mask threshold ``t``: ``mask = rain > t`` on the 0..255 rain layer (rain families; a noise
            family's mask is the set of pixels it corrupted).
        canvas_pad: 0 renders on the patch itself (default, the authors' ``add_rain`` on a crop); ``p > 0`` renders
            on a canvas padded by ``p`` on each side and keeps the centre crop, so streaks enter from outside and
            normalization spans the larger canvas (closer to rain made on the whole image).
        sigma: "gaussian-noise" only: standard deviation of the noise on the 0..255 scale (> 0); 0 elsewhere.
        mu: "gaussian-noise" only: mean of the noise on the 0..255 scale; 0 elsewhere.
        salt: "salt-pepper" only: probability that a channel value becomes 255, per channel; 0 elsewhere.
        pepper: "salt-pepper" only: probability that a channel value becomes 0, per channel; 0 elsewhere.
        name: preset name, or ``"custom"``.
    """

    family: str = "streak"
    amount: tuple[float, float] = (0.005, 0.007)
    width: tuple[int, ...] = (3, 5, 7)
    width_prob: tuple[float, ...] = (0.25, 0.5, 0.25)
    length: tuple[int, int] = (35, 45)
    angle: tuple[int, int] = (-30, 30)
    beta: tuple[float, float] = (0.7, 1.0)
    rain_prob: float = 1.0
    threshold: int = 50
    canvas_pad: int = 0
    sigma: float = 0.0
    mu: float = 0.0
    salt: float = 0.0
    pepper: float = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_spec(self)

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "RainSpec":
        """The preset called ``name`` (see ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown rain preset {name!r}; valid presets: {', '.join(PRESETS)}")
        spec = PRESETS[name]
        return dataclasses.replace(spec, **overrides) if overrides else spec

    @classmethod
    def parse(cls, text: str) -> "RainSpec":
        """Parse a preset name or ``field=value`` list, e.g.
        ``"amount=0.005:0.007,width=3|5|7,length=35:45,angle=-30:30,beta=0.7:1"`` or ``"medium,prob=0.9"``.

        Fields: ``family`` (name), ``amount``/``beta`` (``lo:hi`` floats, or one value), ``length``/``angle``
        (``lo:hi`` integers, or one value), ``width`` (``a|b|c`` odd integers), ``wprob`` (``p|q|r``, default uniform),
        ``prob`` (rain probability 0..1), ``t`` (mask threshold 0..254), ``pad`` (canvas padding, pixels >= 0);
        for the noise families ``sigma`` / ``mu`` (gaussian-noise, floats on the 0..255 scale) and ``salt`` /
        ``pepper`` (salt-pepper, fractions per channel), e.g. ``"gaussian-noise,sigma=30"`` or
        ``"salt-pepper,salt=0.02,pepper=0.02"``. A field that the spec's family does not use is an error naming it.
        A leading bare word is a preset, or a noise family's name (its default preset, ``FAMILY_PRESETS``), that the
        fields then override; without it the fields start from ``medium``, or from the default preset of the noise
        family that ``family=`` names.
        """
        text = text.strip()
        if not text:
            raise ValueError(f"empty rain spec; expected a preset ({', '.join(PRESETS)}) or {FIELD_FORMS_HELP}")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        base = None
        if "=" not in parts[0]:
            base = FAMILY_PRESETS.get(parts[0], parts[0])
            parts.pop(0)
            if base not in PRESETS:
                raise ValueError(f"unknown rain preset {base!r}; valid presets: {', '.join(PRESETS)} (or a noise "
                                 f"family: {', '.join(FAMILY_PRESETS)})")
        changes: dict = {}
        keys: list[str] = []
        for part in parts:
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in _FIELD_PARSERS:
                raise ValueError(f"rain spec field {part!r} is not understood; expected {FIELD_FORMS_HELP}")
            attr, parser, form = _FIELD_PARSERS[key]
            try:
                changes[attr] = parser(value)
            except ValueError as err:
                raise ValueError(f"rain spec field {key!r}: {value!r} is not of the form {form} ({err})") from None
            keys.append(key)
        if base is None:
            base = FAMILY_PRESETS.get(changes.get("family", ""), "medium")
        spec = PRESETS[base]
        _check_keys_apply(keys, changes.get("family", spec.family))
        if "width" in changes and "width_prob" not in changes:
            changes["width_prob"] = tuple([1.0 / len(changes["width"])] * len(changes["width"]))
        try:
            return dataclasses.replace(spec, name=base if not changes else "custom", **changes)
        except ValueError as err:
            raise ValueError(f"rain spec {text!r}: {err}") from None

    # ---- kernel interface --------------------------------------------------------------------------------------

    def to_vector(self) -> np.ndarray:
        """Pack into the float64 layout of ``kernels.params`` for the kernels."""
        v = np.zeros(P.SIZE, dtype=np.float64)
        v[P.FAMILY] = P.FAMILY_IDS[self.family]
        v[P.AMOUNT_LO], v[P.AMOUNT_HI] = self.amount
        v[P.LENGTH_LO], v[P.LENGTH_HI] = self.length
        v[P.ANGLE_LO], v[P.ANGLE_HI] = self.angle
        v[P.BETA_LO], v[P.BETA_HI] = self.beta
        v[P.RAIN_PROB] = self.rain_prob
        v[P.THRESHOLD] = self.threshold
        v[P.CANVAS_PAD] = self.canvas_pad
        n = len(self.width)
        v[P.N_WIDTHS] = n
        v[P.WIDTHS:P.WIDTHS + n] = self.width
        cdf = np.cumsum(np.asarray(self.width_prob, dtype=np.float64))
        cdf[-1] = 1.0
        v[P.WIDTH_CDF:P.WIDTH_CDF + n] = cdf
        v[P.SIGMA], v[P.MU], v[P.SALT], v[P.PEPPER] = self.sigma, self.mu, self.salt, self.pepper
        return v

    @property
    def mode(self) -> str:
        """The family's compositing mode (``kernels.params.FAMILY_MODES``): "add-layer" for rain,
        "add-signed-rgb" for gaussian-noise, "replace" for salt-pepper."""
        return P.FAMILY_MODES[self.family]

    def describe(self) -> str:
        """One line for logs and figure titles."""
        if self.family == "gaussian-noise":
            return f"{self.name} (gaussian-noise; sigma {self.sigma:g}, mu {self.mu:g}, prob {self.rain_prob:g})"
        if self.family == "salt-pepper":
            return (f"{self.name} (salt-pepper; salt {self.salt:g}, pepper {self.pepper:g} per channel, "
                    f"prob {self.rain_prob:g})")
        w = "|".join(str(x) for x in self.width)
        return (f"{self.name} ({self.family}; amount {self.amount[0]:g}:{self.amount[1]:g}, width {w}, "
                f"length {self.length[0]}:{self.length[1]}, angle {self.angle[0]}:{self.angle[1]}, "
                f"beta {self.beta[0]:g}:{self.beta[1]:g}, prob {self.rain_prob:g}, t {self.threshold}, "
                f"canvas {'patch' if self.canvas_pad == 0 else f'+{self.canvas_pad}px'})")


# ---- validation and parsing helpers ------------------------------------------------------------------------------

FIELD_FORMS_HELP = (f"comma-separated fields: family={'|'.join(P.FAMILY_IDS)}, amount=LO:HI, width=W1|W2|..., "
                    "wprob=P1|P2|..., length=LO:HI, angle=LO:HI, beta=LO:HI, prob=P, t=T, pad=PIXELS; "
                    "gaussian-noise: sigma=S, mu=M; salt-pepper: salt=P, pepper=P")


def _float_range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    lo_f = float(lo)
    return (lo_f, float(hi) if sep else lo_f)


def _int_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    lo_i = int(lo)
    return (lo_i, int(hi) if sep else lo_i)


def _int_choices(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("|"))


def _float_choices(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split("|"))


def _family(text: str) -> str:
    if text not in P.FAMILY_IDS:
        raise ValueError(f"unknown family; valid: {', '.join(P.FAMILY_IDS)}")
    return text


_FIELD_PARSERS = {
    "family": ("family", _family, "|".join(P.FAMILY_IDS)),
    "amount": ("amount", _float_range, "LO:HI (floats)"),
    "width": ("width", _int_choices, "W1|W2|... (odd integers)"),
    "wprob": ("width_prob", _float_choices, "P1|P2|... (one per width, sum 1)"),
    "length": ("length", _int_range, "LO:HI (integers)"),
    "angle": ("angle", _int_range, "LO:HI (integer degrees)"),
    "beta": ("beta", _float_range, "LO:HI (floats)"),
    "prob": ("rain_prob", float, "P (0..1)"),
    "t": ("threshold", int, "T (integer 0..254)"),
    "pad": ("canvas_pad", int, "PIXELS (integer >= 0)"),
    "sigma": ("sigma", float, "S (float > 0, 0..255 scale)"),
    "mu": ("mu", float, "M (float, 0..255 scale)"),
    "salt": ("salt", float, "P (fraction 0..1 per channel)"),
    "pepper": ("pepper", float, "P (fraction 0..1 per channel)"),
}

_COMMON_KEYS = ("family", "prob")
#: The spec-string fields each family uses (besides ``family`` and ``prob``).
FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    **{f: ("amount", "width", "wprob", "length", "angle", "beta", "t", "pad")
       for f, mode in P.FAMILY_MODES.items() if mode == "add-layer"},
    "gaussian-noise": ("sigma", "mu"),
    "salt-pepper": ("salt", "pepper"),
}


def _check_keys_apply(keys: list[str], family: str) -> None:
    for key in keys:
        if key not in _COMMON_KEYS and key not in FAMILY_KEYS[family]:
            raise ValueError(f"rain spec field {key!r} does not apply to family {family!r} (its fields: "
                             f"{', '.join(_COMMON_KEYS + FAMILY_KEYS[family])})")


def _check_spec(s: RainSpec) -> None:
    def fail(field: str, msg: str) -> None:
        raise ValueError(f"RainSpec.{field}: {msg}")

    if s.family not in P.FAMILY_IDS:
        fail("family", f"{s.family!r} is not one of {', '.join(P.FAMILY_IDS)}")
    for field in ("amount", "length", "angle", "beta"):
        rng = getattr(s, field)
        if len(rng) != 2 or rng[0] > rng[1]:
            fail(field, f"{rng!r} must be a (lo, hi) pair with lo <= hi")
    if not 0.0 < s.amount[0] <= s.amount[1] <= 0.5:
        fail("amount", f"{s.amount!r} must lie in (0, 0.5]")
    if not 1 <= s.length[0] <= s.length[1] <= 128:
        fail("length", f"{s.length!r} must be whole pixels in 1..128")
    if not -90 <= s.angle[0] <= s.angle[1] <= 90:
        fail("angle", f"{s.angle!r} must be whole degrees in -90..90")
    if not 0.0 <= s.beta[0] <= s.beta[1] <= 4.0:
        fail("beta", f"{s.beta!r} must lie in 0..4")
    if not 1 <= len(s.width) <= P.MAX_WIDTHS or any(w < 1 or w > 31 or w % 2 == 0 for w in s.width):
        fail("width", f"{s.width!r} must be 1..{P.MAX_WIDTHS} odd integers in 1..31")
    if len(s.width_prob) != len(s.width) or any(p < 0 for p in s.width_prob) or abs(sum(s.width_prob) - 1) > 1e-6:
        fail("width_prob", f"{s.width_prob!r} must hold one non-negative probability per width, summing to 1")
    if not 0.0 <= s.rain_prob <= 1.0:
        fail("rain_prob", f"{s.rain_prob!r} must lie in 0..1")
    if not 0 <= s.threshold <= 254:
        fail("threshold", f"{s.threshold!r} must be an integer in 0..254")
    if not 0 <= s.canvas_pad <= 256:
        fail("canvas_pad", f"{s.canvas_pad!r} must be 0..256 pixels")
    _check_noise(s, fail)


def _check_noise(s: RainSpec, fail) -> None:
    """The noise fields: in range for their family, 0 for every other family (so equal specs compare equal)."""
    for field, owner in (("sigma", "gaussian-noise"), ("mu", "gaussian-noise"), ("salt", "salt-pepper"),
                         ("pepper", "salt-pepper")):
        if s.family != owner and getattr(s, field) != 0:
            fail(field, f"{getattr(s, field)!r} is set, but only the {owner} family uses {field} (family is "
                        f"{s.family!r})")
    if s.family == "gaussian-noise":
        if not 0.0 < s.sigma <= 255.0:
            fail("sigma", f"{s.sigma!r} must lie in (0, 255] (0..255 scale)")
        if not -255.0 <= s.mu <= 255.0:
            fail("mu", f"{s.mu!r} must lie in -255..255 (0..255 scale)")
    if s.family == "salt-pepper":
        if not (0.0 <= s.salt <= 1.0 and 0.0 <= s.pepper <= 1.0 and 0.0 < s.salt + s.pepper <= 1.0):
            fail("salt", f"salt {s.salt!r} and pepper {s.pepper!r} must be fractions in 0..1 with a sum in (0, 1]")


def _table1(name: str, width: tuple[int, ...], length: tuple[int, int], angle: tuple[int, int]) -> RainSpec:
    amount = (200 * TABLE1_QUANTITY_TO_AMOUNT, 300 * TABLE1_QUANTITY_TO_AMOUNT)
    return RainSpec(family="streak", amount=amount, width=width, width_prob=tuple([1 / len(width)] * len(width)),
                    length=length, angle=angle, name=name)


#: Training presets (the authors' ranges), the journal's Table I, and the held-out test families.
PRESETS: dict[str, RainSpec] = {
    "small": RainSpec(amount=(0.002, 0.004), width=(1, 3), width_prob=(0.5, 0.5), length=(25, 35),
                      angle=(-10, 10), name="small"),
    "medium": RainSpec(amount=(0.005, 0.007), width=(3, 5, 7), width_prob=(0.25, 0.5, 0.25), length=(35, 45),
                       angle=(-30, 30), name="medium"),
    "large": RainSpec(amount=(0.008, 0.010), width=(7, 9), width_prob=(0.5, 0.5), length=(45, 55),
                      angle=(-60, 60), name="large"),
    "random": RainSpec(amount=(0.002, 0.010), width=(1, 3, 5, 7, 9), width_prob=(0.2,) * 5, length=(25, 55),
                       angle=(-60, 60), name="random"),
    "table1-small": _table1("table1-small", (5,), (30, 31), (-5, 5)),
    "table1-medium": _table1("table1-medium", (5, 7, 9), (20, 40), (-30, 30)),
    "table1-large": _table1("table1-large", (1, 3, 5, 7, 9), (5, 60), (-70, 70)),
    # Held-out test families (generator form and statistics differ from every training preset; see kernels).
    # layered: 2-4 depth layers of 25-50 streaks each on 128 x 128 (twice that in the far layer), near layers
    # 3-5 px wide, far layer 1 px wide and 20-60 px long; coverage of rain > 50 ~0.25, and ~5 % of its rain pixels
    # above 200 (~0.4 % in the authors' min-max normalized rain) (kernels/rain_layered.py, tests/test_rain_heldout.py).
    "heldout-layered": RainSpec(family="layered", amount=(0.0015, 0.003), width=(3, 5), width_prob=(0.5, 0.5),
                                length=(20, 60), angle=(-20, 20), beta=(0.8, 1.0), name="heldout-layered"),
    # sparse: 4-9 thin (1 px) bright streaks 60-100 px long with tapered ends; the patch's direction lies within 15
    # degrees of vertical, each streak within 3 of it; coverage of rain > 50 ~0.03 (kernels/rain_sparse.py).
    "heldout-sparse": RainSpec(family="sparse", amount=(0.0003, 0.0006), width=(1,), width_prob=(1.0,),
                               length=(60, 100), angle=(-15, 15), beta=(0.8, 1.0), name="heldout-sparse"),
    # Degradations beyond rain, the paper's Fig. 19b: train on N(0, 30), test on 2 % salt + 2 % pepper per channel.
    "gaussian-30": RainSpec(family="gaussian-noise", sigma=30.0, mu=0.0, beta=(1.0, 1.0), name="gaussian-30"),
    "salt-pepper-2": RainSpec(family="salt-pepper", salt=0.02, pepper=0.02, beta=(1.0, 1.0), name="salt-pepper-2"),
}

#: The default preset of each noise family: ``RainSpec.parse`` reads the family's name as this preset.
FAMILY_PRESETS = {"gaussian-noise": "gaussian-30", "salt-pepper": "salt-pepper-2"}

#: Presets the trainer may use for training rain; everything else is meant for held-out testing.
TRAINING_PRESETS = ("small", "medium", "large", "random", "table1-small", "table1-medium", "table1-large")
