"""The families by name: the ``RainFamily`` (``kernels.renderer``) of every family of ``kernels.params``: the rain
families and the noise families of ``kernels.noise``."""
from __future__ import annotations

from kernels import noise, rain_layered, rain_sparse, rain_streak
from kernels.renderer import RainFamily

#: Every family by name (the names of ``kernels.params.FAMILY_IDS``).
FAMILIES: dict[str, RainFamily] = {f.name: f for f in (rain_streak.FAMILY, rain_layered.FAMILY, rain_sparse.FAMILY,
                                                       noise.GAUSSIAN, noise.SALT_PEPPER)}


def family(name: str) -> RainFamily:
    """The renderers of family ``name``; ValueError naming the known families for any other name."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"spec.family: no renderer for rain family {name!r} (known: {', '.join(FAMILIES)})") from None
