"""Named recipes of the paper's experiments and the scales they run at: what to train, never how.

Source: X. Hu, Z. You, J. Gu, L. Zhu, T. Xue, C. Dong, *Revisiting the Generalization Problem of Low-level Vision
Models Through the Lens of Image Deraining* (journal extension of J. Gu et al., NeurIPS 2023, arXiv:2305.14709).

A recipe becomes a list of ``SweepSpec``: calls of ``engine.experiments.sweep.sweep`` (one per folder of runs).
``engine.experiments.reproduce`` builds the store, runs them and writes the report; this module only plans, so a
plan can be printed (``rainsweep reproduce ... --plan``) without training or a GPU.

Recipes:

- ``fig4``: held-out E_R (the paper's Fig. 4) and E_B (its Fig. 10) against the training background count, one line
  per training rain range.
- ``fig6``: E_R and E_B along training for models trained on the low / medium / high sharpness band.
- ``table3``: ResNet with the largest usable count / 64 backgrounds on medium rain, 256 / 128 on large rain.
- ``toy``: the cosine-curve denoising grid of the paper's section V (``engine.experiments.toy``).
- ``fig19``: the content prior (the paper's Sec. VI-B, Fig. 19): ResNet, UNet and SwinIR trained from scratch on
  many backgrounds against a VQGAN prior (stage 1: ``engine.experiments.prior`` on the store's clean patches) whose
  encoder alone is fine-tuned (``vqgan-ft``), all scored on unseen rain; and the same for denoising (Gaussian
  N(0, 30) -> salt-and-pepper 2 % / 2 %) when the noise degradations are available.
- ``fig18``: the ablation: the same encoder-decoder without quantization (``vqgan-noquant``) from scratch, scored on
  the training rain (seen) and on unseen rain, beside the fine-tuned prior.

Every run is scored on the same held-out backgrounds, taken from a separate test store (as the paper tests on
another data set's backgrounds). Count recipes (``fig4``, ``table3``) share one folder of runs (``sweeps/counts``),
so a run either recipe finished is reused by the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Recipe names, in the order the paper shows them.
RECIPES: tuple[str, ...] = ("fig4", "fig6", "table3", "toy", "fig18", "fig19")
#: Recipes of the content prior (they train a prior first; ``PRIOR_SCALES``).
PRIOR_RECIPES: tuple[str, ...] = ("fig18", "fig19")
#: Scales a user picks; ``tiny`` exists for tests and is not advertised.
PUBLIC_SCALES: tuple[str, ...] = ("cpu", "gpu")
#: Sharpness bands of fig6 (engine.data.select.BANDS: low < 50, medium 500..1000, high > 5000).
BANDS: tuple[str, ...] = ("low", "medium", "high")
#: Held-out rain of every deraining recipe (rain of a family no training preset has).
TEST_RAIN = "heldout-layered"
#: Training and test degradation of the denoising half of fig19 (engine.rain presets of the noise families).
NOISE_TRAIN, NOISE_TEST = "gaussian-30", "salt-pepper-2"
#: Model families a user names; a scale maps each to its concrete model (``resnet`` -> ``resnet-s`` on CPU).
FAMILIES: tuple[str, ...] = ("resnet", "unet", "swinir")

#: The paper's numbers quoted by the reports (0..255 scale for E_R; toy MSE in squared y units). Everything else the
#: reports point to by figure or table number instead of quoting.
PAPER = {
    "resnet_medium_E_R": {64: 53.3, 30000: 31.2},
    "toy_mse": {  # (train order, test order, test noise (mu, sigma)) -> mse; training noise N(0, 1)
        (1, 1, (0.0, 1.0)): 0.0009,
        (8, 8, (0.0, 1.0)): 0.0472,
        (1, 1, (10.0, 5.0)): 0.354,
        (8, 8, (10.0, 5.0)): 49.77,
    },
}


class RecipeError(ValueError):
    """An unknown recipe, scale or model name, or a store too small for a recipe."""


@dataclass(frozen=True)
class Scale:
    """Everything a recipe needs to know about how large to run.

    Attributes
    ----------
    name : str
        ``cpu``, ``gpu`` or ``tiny``.
    patch, stride : int
        Side and grid step (pixels) of the store built from ``sources`` when the user gives none.
    sources : tuple of str
        ``engine.data.precompute`` source specs of that store.
    test_sources : tuple of str
        Source specs of the held-out background store built when the user gives none (cut at the training store's
        patch size, stride = patch).
    model_suffix : str
        Appended to a model family (``"-s"``: the small variants of ``models``).
    iters, batch : int
        Training steps per run and patches per step.
    counts : tuple of int
        fig4's background counts (those the store can hold).
    add_max : bool
        fig4 also trains on the largest usable count.
    rains : tuple of str
        fig4's training rain presets.
    band_count : int
        fig6's backgrounds per sharpness band (fewer when a band of the store holds fewer).
    table3 : tuple of (str, int or None)
        table3's (rain, count) runs; None is the largest usable count.
    device : str
        train.py ``--device``.
    threads : int
        CPU threads per run (torch and numba; 0: their defaults).
    jobs : int
        Runs at once (``sweep(jobs=...)``).
    eval_every : int
        Held-out evaluation every this many steps (the curves of fig6).
    test_count : int
        Held-out patches per run.
    toy : dict
        ``engine.experiments.toy.ToyConfig`` fields that differ from its defaults.
    why : str
        What was scaled from the paper's setting and why (quoted in the reports).
    """

    name: str
    patch: int
    stride: int
    sources: tuple[str, ...]
    test_sources: tuple[str, ...]
    model_suffix: str
    iters: int
    batch: int
    counts: tuple[int, ...]
    add_max: bool
    rains: tuple[str, ...]
    band_count: int
    table3: tuple[tuple[str, int | None], ...]
    device: str
    threads: int
    jobs: int
    eval_every: int
    test_count: int
    toy: dict = field(default_factory=dict)
    why: str = ""


_TABLE3 = (("medium", None), ("medium", 64), ("large", 256), ("large", 128))

SCALES: dict[str, Scale] = {
    "gpu": Scale(
        name="gpu", patch=128, stride=128, sources=("builtin:procedural?images=2048",),
        test_sources=("builtin:skimage",), model_suffix="", iters=15_000,
        batch=16, counts=(8, 16, 32, 64, 128, 256, 512, 1024), add_max=True, rains=("small", "medium", "large"),
        band_count=512, table3=_TABLE3, device="cuda", threads=0, jobs=1, eval_every=1000, test_count=64,
        toy={"device": "cuda"},
        why="The paper's patch size (128 x 128), models and batch (16); built-in procedural textures as training "
            "backgrounds (2,048 pictures of 512 x 512: 32,768 patches, enough for the paper's 30,000) instead of its "
            "photo collections; 15,000 steps per run instead of the paper's several hundred thousand, so that a run "
            "takes minutes on one GPU (10,000 steps already showed the effect at the paper's size in a small "
            "experiment with scikit-image's pictures, 4,000 did not)."),
    "cpu": Scale(
        name="cpu", patch=32, stride=32, sources=("builtin:procedural",),
        test_sources=("builtin:skimage",), model_suffix="-s", iters=6000, batch=16,
        counts=(8, 64, 512, 4096), add_max=True, rains=("small", "medium", "large"), band_count=2048,
        table3=_TABLE3, device="cpu", threads=1, jobs=2, eval_every=500, test_count=64, toy={},
        why="Sized to finish within 30 minutes on 2 CPU cores (about 2 CPU-minutes a run): 32 x 32 patches (16 x "
            "fewer pixels than the paper's 128 x 128), the small model variants (resnet-s: 4 blocks x 16 channels, "
            "22k parameters), 6,000 steps (at 3,000 the gap between 8 and 49,151 backgrounds was 25 E_R units, at "
            "6,000 it was 33), five background counts instead of nine, two runs at once with one thread each. "
            "Training backgrounds are the built-in procedural textures (192 pictures of 512 x 512: 49,152 "
            "patches, all three sharpness bands populated); tested on scikit-image's photographs, on which the "
            "effect showed more clearly than on held-out textures in short measurements."),
    "tiny": Scale(
        name="tiny", patch=32, stride=32, sources=("builtin:procedural?images=6&size=96",),
        test_sources=("builtin:skimage/camera",), model_suffix="-s",
        iters=4, batch=4, counts=(4, 8), add_max=False, rains=("small", "medium"), band_count=4,
        table3=(("medium", None), ("medium", 4)), device="cpu", threads=1, jobs=2, eval_every=2, test_count=4,
        toy={"iters": 5, "segments": 32, "width": 8},
        why="A smoke test of the plumbing (a few steps on a few patches): its numbers mean nothing."),
}


@dataclass(frozen=True)
class PriorScale:
    """How large fig18 / fig19 run at one scale (the store, held-out set, batch and threads are the ``Scale``'s).

    Attributes
    ----------
    config : str
        VQGAN configuration of the prior (``models.vqgan.CONFIGS``).
    ft_model, noquant_model : str
        The fine-tuned prior's and the ablation's model names (``models.NAMES``).
    prior_iters, prior_batch : int
        Stage-1 steps and patches per step.
    prior_lr : float
        Stage-1 Adam learning rate.
    prior_count : int or None
        Clean patches stage 1 trains on (None: the whole store).
    iters : int
        Training steps of every fig18 / fig19 run (from scratch and fine-tuned alike).
    lr : float
        train.py ``--lr`` of those runs.
    rain : str
        Training rain of the deraining half.
    why : str
        What was scaled and why (quoted in the reports).
    """

    config: str
    ft_model: str
    noquant_model: str
    prior_iters: int
    prior_batch: int
    prior_lr: float
    prior_count: int | None
    iters: int
    lr: float
    rain: str = "medium"
    why: str = ""


PRIOR_SCALES: dict[str, PriorScale] = {
    "gpu": PriorScale(
        config="f16-1024", ft_model="vqgan-ft", noquant_model="vqgan-noquant", prior_iters=20_000, prior_batch=16,
        prior_lr=1e-4, prior_count=None, iters=15_000, lr=2e-4,
        why="taming-transformers' ImageNet VQGAN architecture (f16, 1,024 codes); with `--prior` the user's "
            "pre-trained checkpoint, otherwise a prior trained here for 20,000 steps on the training store's clean "
            "patches (far less than ImageNet pre-training, so weaker)."),
    "cpu": PriorScale(
        config="small", ft_model="vqgan-ft-s", noquant_model="vqgan-noquant-s", prior_iters=2000, prior_batch=16,
        prior_lr=5e-4, prior_count=None, iters=1500, lr=1e-3,
        why="The `small` VQGAN (f4, 256 codes of 32 channels, 772k parameters) trained for 2,000 steps on the "
            "training store's clean 32 x 32 patches instead of taming's ImageNet model; every run 1,500 steps "
            "of 16 patches at learning rate 1e-3, for the CPU budget of 30 minutes on 2 cores (on an idle core "
            "swinir-s takes about 160 ms a step, resnet-s 30 ms, vqgan-ft-s 70 ms, a prior step 90 ms)."),
    "tiny": PriorScale(
        config="small", ft_model="vqgan-ft-s", noquant_model="vqgan-noquant-s", prior_iters=4, prior_batch=4,
        prior_lr=5e-4, prior_count=None, iters=4, lr=1e-3, why="A smoke test of the plumbing: numbers mean nothing."),
}


def get_prior_scale(name: str) -> PriorScale:
    """The prior scale called ``name``; RecipeError listing the valid ones otherwise."""
    if name not in PRIOR_SCALES:
        raise RecipeError(f"--scale {name!r}: expected one of {', '.join(PUBLIC_SCALES)}")
    return PRIOR_SCALES[name]


def noise_available() -> bool:
    """Whether the engine knows the noise degradations of fig19's denoising half (``NOISE_TRAIN``, ``NOISE_TEST``)."""
    from engine.rain import RainSpec

    try:
        RainSpec.parse(NOISE_TRAIN), RainSpec.parse(NOISE_TEST)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SweepSpec:
    """One ``sweep()`` call of a recipe.

    Attributes
    ----------
    key : str
        Folder of its runs under ``OUT/sweeps/``.
    counts, rains, models : tuple
        The grid (every combination is one run).
    extra : tuple of str
        train.py arguments beyond the grid's (batch, device, held-out set, sharpness band, ...).
    label : str
        What distinguishes this call within its recipe (e.g. ``sharpness low``), for tables and legends.
    test_rain : str
        Held-out degradation of its runs.
    """

    key: str
    counts: tuple[int, ...]
    rains: tuple[str, ...]
    models: tuple[str, ...]
    extra: tuple[str, ...]
    label: str = ""
    test_rain: str = TEST_RAIN


def get_scale(name: str) -> Scale:
    """The scale called ``name``; RecipeError listing the valid ones otherwise."""
    if name not in SCALES:
        raise RecipeError(f"--scale {name!r}: expected one of {', '.join(PUBLIC_SCALES)}")
    return SCALES[name]


def check_recipe(name: str) -> str:
    """``name`` if it is a recipe; RecipeError listing the recipes otherwise."""
    if name not in RECIPES:
        raise RecipeError(f"recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return name


def resolve_models(names: list[str] | tuple[str, ...] | None, scale: Scale) -> tuple[str, ...]:
    """Concrete model names: a family (``resnet``, ``unet``, ``swinir``) gets the scale's suffix, a full model name
    (e.g. ``resnet-s`` or ``unet``) on a scale without a suffix is kept. None: ResNet."""
    import models

    out = []
    for n in names or ("resnet",):
        n = n.strip()
        full = n + scale.model_suffix if n in FAMILIES else n
        if full not in models.NAMES:
            raise RecipeError(f"--model {n!r}: expected a family ({', '.join(FAMILIES)}) or one of "
                              f"{', '.join(models.NAMES)}")
        out.append(full)
    return tuple(dict.fromkeys(out))


def largest_count(store_count: int) -> int:
    """The largest training count a store of ``store_count`` patches allows: all but one (a sweep keeps at least one
    patch out of training; the held-out backgrounds come from the separate test store)."""
    return store_count - 1


def base_extra(scale: Scale, device: str | None, test_store: str, test_rain: str = TEST_RAIN) -> tuple[str, ...]:
    """train.py arguments every run of a recipe shares. Every run is scored on the same held-out backgrounds: the
    first ``scale.test_count`` of a fixed permutation of ``test_store``."""
    args = ["--batch", str(scale.batch), "--device", device or scale.device, "--test-rain", test_rain,
            "--test-store", test_store, "--test-count", str(scale.test_count), "--eval-every", str(scale.eval_every)]
    if scale.threads:
        args += ["--threads", str(scale.threads)]
    return tuple(args)


def _top(store_count: int) -> int:
    top = largest_count(store_count)
    if top < 1:
        raise RecipeError(f"the store holds {store_count} patch(es): too few to train on")
    return top


def fig4_sweeps(scale: Scale, model_names: tuple[str, ...], store_count: int, test_store: str,
                device: str | None = None) -> list[SweepSpec]:
    """fig4: every count of the scale the store holds (and the largest usable one) x the scale's rains."""
    top = _top(store_count)
    counts = [c for c in scale.counts if c <= top]
    if scale.add_max or not counts:
        counts.append(top)
    counts = sorted(set(counts))
    return [SweepSpec("counts", tuple(counts), scale.rains, model_names, base_extra(scale, device, test_store),
                      "background count")]


def table3_sweeps(scale: Scale, model_names: tuple[str, ...], store_count: int, test_store: str,
                  device: str | None = None) -> list[SweepSpec]:
    """table3: the scale's (rain, count) pairs, counts capped at the largest usable one; one sweep per rain, all in
    fig4's folder (a run fig4 finished is reused)."""
    top = _top(store_count)
    extra = base_extra(scale, device, test_store)
    by_rain: dict[str, list[int]] = {}
    for rain, count in scale.table3:
        by_rain.setdefault(rain, []).append(top if count is None else min(count, top))
    return [SweepSpec("counts", tuple(sorted(set(c))), (rain,), model_names, extra, f"{rain} rain")
            for rain, c in by_rain.items()]


def band_count(scale: Scale, band_sizes: dict[str, int]) -> int:
    """Backgrounds per band for fig6: the scale's, or fewer when a band holds fewer (all bands train on as many)."""
    smallest = min(band_sizes[b] for b in BANDS)
    if smallest < 1:
        empty = [b for b in BANDS if band_sizes[b] < 1]
        raise RecipeError(f"the store has no patch in the sharpness band(s) {', '.join(empty)}; fig6 needs all three "
                          f"(low < 50, medium 500..1000, high > 5000)")
    return min(scale.band_count, smallest)


def fig6_sweeps(scale: Scale, model_names: tuple[str, ...], band_sizes: dict[str, int], test_store: str,
                device: str | None = None) -> list[SweepSpec]:
    """fig6: one sweep per sharpness band, the same count each, medium rain, evaluated every ``scale.eval_every``
    steps. The separate test store matters here: held-out patches taken from the training store would depend on
    each band's training patches and differ in sharpness themselves."""
    n = band_count(scale, band_sizes)
    extra = base_extra(scale, device, test_store)
    return [SweepSpec(f"sharpness-{b}", (n,), ("medium",), model_names, (*extra, "--sharpness", b), f"sharpness {b}")
            for b in BANDS]


def toy_grid() -> dict:
    """The toy grid of the paper's Figs. 11-14: networks trained on orders 1, 4 and 8 with N(0, 1) noise, each
    tested on orders 1, 4, 8 with N(0, 1), N(0, 2) and N(10, 5)."""
    return {"train_orders": (1, 4, 8), "train_noises": ((0.0, 1.0),), "test_orders": (1, 4, 8),
            "test_noises": ((0.0, 1.0), (0.0, 2.0), (10.0, 5.0))}


def prior_sweeps(recipe: str, scale: Scale, prior_scale: PriorScale, scratch_models: tuple[str, ...],
                 store_count: int, test_store: str, prior: str, device: str | None = None,
                 noise: bool = False) -> list[SweepSpec]:
    """fig18 / fig19: the scratch models and the fine-tuned prior, each trained on the largest usable count.

    fig19 has a deraining half (``prior_scale.rain`` -> ``TEST_RAIN``) and, with ``noise``, a denoising half
    (``NOISE_TRAIN`` -> ``NOISE_TEST``); fig18 the deraining half with ``scratch_models`` = the ablation. Scratch and
    fine-tuned runs go to separate folders (only the latter get ``--prior``); fig18 reuses fig19's fine-tuned run.
    """
    top = _top(store_count)
    halves = [("rain", prior_scale.rain, TEST_RAIN)]
    if noise and recipe == "fig19":
        halves.append(("noise", NOISE_TRAIN, NOISE_TEST))
    specs = []
    for label, train, test in halves:
        extra = (*base_extra(scale, device, test_store, test), "--lr", str(prior_scale.lr))
        specs.append(SweepSpec(f"prior-scratch-{label}", (top,), (train,), scratch_models, extra, label, test))
        specs.append(SweepSpec(f"prior-ft-{label}", (top,), (train,), (prior_scale.ft_model,),
                               (*extra, "--prior", prior), label, test))
    return specs
