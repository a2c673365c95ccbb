"""Pairing the rainy and clean images of a paired deraining test set by file name.

Paired sets ship as a folder of rainy images and a folder of clean ones (or one folder holding both), matched by
file name. ``pair_folders`` finds the pairs under one of these naming schemes (``SCHEMES``):

=============  ===============================  ===============================  ===========================
scheme         rainy file                       clean file                       sets
=============  ===============================  ===============================  ===========================
``rain100``    ``rain-001.png``                 ``norain-001.png``               Rain100L, Rain100H
``suffix``     ``001_rain.png``                 ``001_clean.png``                own photographs
``same-name``  ``rain/1.png``                   ``norain/1.png`` (same name)     Rain12, Rain800 splits, ...
``variants``   ``901_1.jpg`` ... ``901_14.jpg``  ``901.jpg`` (one clean, many     Rain1400 (Rain14000)
                                                rainy)
=============  ===============================  ===============================  ===========================

A file's *key* is its name without extension and without the scheme's marker (markers match case-insensitively);
a rainy and a clean file pair when their keys are equal, whatever their extensions. ``rain100`` and ``suffix`` also
work with both kinds in one folder (pass it twice); ``same-name`` and ``variants`` need two folders. With
``scheme="auto"`` every scheme is tried and the one pairing the most files wins (ties: the order above).

Only the files directly in each folder are read (sub-folders are ignored; hidden files too). Every other file is an
error: a non-image file (by extension, ``engine.data.sources.IMAGE_EXTENSIONS``), a file the scheme does not
recognize, or an image without a partner; the error lists the first few of each and their count. ``check_sizes``
then reads each image's size from its header (EXIF orientation applied, as decoding does) and names every pair whose
two images differ in size.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.data.sources import IMAGE_EXTENSIONS

#: How many names an error message lists before "and N more".
SHOWN = 5


class PairingError(ValueError):
    """The folders cannot be paired: missing folders, non-image or unmatched files, duplicate keys, size
    mismatches."""


@dataclass(frozen=True)
class Scheme:
    """A naming scheme: how a file name marks a rainy or a clean image.

    Attributes
    ----------
    name : str
        The scheme's name (``--scheme``).
    rainy_prefix, rainy_suffix, clean_prefix, clean_suffix : str
        Markers at the start or end of the file name without extension ("" when the scheme has none).
    variants : bool
        Rainy names are ``<key>_<number>``, several per clean image ``<key>`` (Rain1400).
    """

    name: str
    rainy_prefix: str = ""
    rainy_suffix: str = ""
    clean_prefix: str = ""
    clean_suffix: str = ""
    variants: bool = False

    @property
    def marked(self) -> bool:
        """Whether rainy and clean names carry markers (so one folder can hold both)."""
        return bool(self.rainy_prefix or self.rainy_suffix or self.clean_prefix or self.clean_suffix)

    def rainy_key(self, stem: str) -> str | None:
        """The key of a rainy file name without extension, or None when the scheme does not read it as rainy."""
        if self.variants:
            head, sep, tail = stem.rpartition("_")
            return head if sep and head and tail.isdigit() else None
        return _strip(stem, self.rainy_prefix, self.rainy_suffix)

    def clean_key(self, stem: str) -> str | None:
        """The key of a clean file name without extension, or None when the scheme does not read it as clean."""
        return _strip(stem, self.clean_prefix, self.clean_suffix)

    def describe(self) -> str:
        """The scheme in words, for messages: e.g. ``"rain-KEY / norain-KEY"``."""
        if self.variants:
            return "KEY_N (several rainy) / KEY"
        return (f"{self.rainy_prefix}KEY{self.rainy_suffix} / {self.clean_prefix}KEY{self.clean_suffix}")


def _strip(stem: str, prefix: str, suffix: str) -> str | None:
    low = stem.lower()
    if prefix:
        if not low.startswith(prefix):
            return None
        stem, low = stem[len(prefix):], low[len(prefix):]
    if suffix:
        if not low.endswith(suffix):
            return None
        stem = stem[:len(stem) - len(suffix)]
    return stem or None


#: The naming schemes, in the order ``auto`` prefers on a tie.
SCHEMES: tuple[Scheme, ...] = (
    Scheme("rain100", rainy_prefix="rain-", clean_prefix="norain-"),
    Scheme("suffix", rainy_suffix="_rain", clean_suffix="_clean"),
    Scheme("same-name"),
    Scheme("variants", variants=True),
)
SCHEME_NAMES: tuple[str, ...] = ("auto", *(s.name for s in SCHEMES))


@dataclass(frozen=True)
class Pair:
    """One rainy image and its clean counterpart.

    Attributes
    ----------
    key : str
        The shared key (file name without extension and markers; for ``variants``, the rainy name's stem).
    rainy, clean : str
        The two file paths, as found under the folders given.
    """

    key: str
    rainy: str
    clean: str


@dataclass(frozen=True)
class Pairing:
    """The pairs of two folders and the scheme that matched them.

    Attributes
    ----------
    pairs : list of Pair
        In natural order of their keys (``2`` before ``10``).
    scheme : Scheme
        The scheme used.
    """

    pairs: list[Pair]
    scheme: Scheme


def natural_key(text: str) -> tuple:
    """Sort key that orders the digit runs of ``text`` by value: ``rain-2`` before ``rain-10``."""
    return tuple((0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


def _listing(files: list[str], what: str, folder: str) -> str:
    shown = ", ".join(os.path.basename(f) for f in files[:SHOWN])
    more = f" and {len(files) - SHOWN} more" if len(files) > SHOWN else ""
    return f"{len(files)} {what} in {folder}: {shown}{more}"


def list_images(folder: str | os.PathLike, role: str) -> list[str]:
    """The image files directly in ``folder``, sorted by name.

    Parameters
    ----------
    folder : str or os.PathLike
        A folder of images.
    role : str
        ``"rainy"`` or ``"clean"``, for error messages.

    Returns
    -------
    list of str
        Paths of the files with an image extension (``IMAGE_EXTENSIONS``); hidden files are ignored.

    Raises
    ------
    PairingError
        ``folder`` is not a folder, holds a file that is not an image, or holds no image (the message names its
        sub-folders, which are not searched).
    """
    p = Path(folder)
    if not p.is_dir():
        raise PairingError(f"{role} folder {str(p)!r}: {'not a folder' if p.exists() else 'no such folder'}")
    entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
    files = [str(e) for e in entries if e.is_file()]
    others = [f for f in files if Path(f).suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        raise PairingError(_listing(others, "files that are not images", f"the {role} folder {str(p)!r}")
                           + f" (expected only images: {', '.join(sorted(IMAGE_EXTENSIONS))}); move them out")
    if not files:
        subs = [e.name for e in entries if e.is_dir()]
        hint = f" (sub-folders are not searched; pass one of them: {', '.join(subs[:SHOWN])})" if subs else ""
        raise PairingError(f"{role} folder {str(p)!r}: holds no image files{hint}")
    return files


def _keyed(files: list[str], key_of, role: str, folder: str, many: bool) -> tuple[dict[str, list[str]], list[str]]:
    """Group ``files`` by key; returns (key -> files, files the scheme does not recognize). Several files with one
    key are an error unless ``many``."""
    keyed: dict[str, list[str]] = {}
    unknown = []
    for f in files:
        k = key_of(Path(f).stem)
        if k is None:
            unknown.append(f)
        else:
            keyed.setdefault(k, []).append(f)
    if not many:
        dup = [fs for fs in keyed.values() if len(fs) > 1]
        if dup:
            names = "; ".join(" and ".join(os.path.basename(f) for f in fs) for fs in dup[:SHOWN])
            raise PairingError(f"{role} folder {folder!r}: {len(dup)} names are taken by more than one image "
                               f"(same name, different extensions): {names}")
    return keyed, unknown


def _match(scheme: Scheme, rainy_files: list[str], clean_files: list[str], rainy_dir: str, clean_dir: str,
           same: bool) -> tuple[list[Pair], list[str]]:
    """The pairs of one scheme and the error lines for what stays unpaired (empty when everything pairs)."""
    rainy, rainy_unknown = _keyed(rainy_files, scheme.rainy_key, "rainy", rainy_dir, scheme.variants)
    clean, clean_unknown = _keyed(clean_files, scheme.clean_key, "clean", clean_dir, False)
    if same:  # one folder holds both: a file is unrecognized only when it is neither rainy nor clean
        rainy_unknown = [f for f in rainy_unknown if f in clean_unknown]
        clean_unknown = []
    pairs = [Pair(Path(r).stem if scheme.variants else k, r, clean[k][0])
             for k in rainy if k in clean for r in rainy[k]]
    pairs.sort(key=lambda p: natural_key(p.key))
    problems = []
    by_name = lambda f: natural_key(os.path.basename(f))  # noqa: E731
    lone_rainy = sorted((f for k in rainy if k not in clean for f in rainy[k]), key=by_name)
    lone_clean = sorted((fs[0] for k, fs in clean.items() if k not in rainy), key=by_name)
    rainy_unknown, clean_unknown = sorted(rainy_unknown, key=by_name), sorted(clean_unknown, key=by_name)
    where = f"folder {rainy_dir!r}" if same else f"rainy folder {rainy_dir!r}"
    if rainy_unknown:
        problems.append(_listing(rainy_unknown, f"files whose names the scheme does not read as "
                                                f"{'rainy or clean' if same else 'rainy'}", f"the {where}"))
    if clean_unknown:
        problems.append(_listing(clean_unknown, "files whose names the scheme does not read as clean",
                                 f"the clean folder {clean_dir!r}"))
    if lone_rainy:
        problems.append(_listing(lone_rainy, "rainy images without a clean partner", f"the {where}"))
    if lone_clean:
        problems.append(_listing(lone_clean, "clean images without a rainy partner",
                                 f"the {'folder' if same else 'clean folder'} {clean_dir!r}"))
    return pairs, problems


def pair_folders(rainy_dir: str | os.PathLike, clean_dir: str | os.PathLike, scheme: str = "auto") -> Pairing:
    """Pair the images of ``rainy_dir`` with those of ``clean_dir`` by file name.

    Parameters
    ----------
    rainy_dir, clean_dir : str or os.PathLike
        The folders (the same folder for sets that keep both kinds in one, e.g. Rain100L's ``rain-001.png`` and
        ``norain-001.png``).
    scheme : str
        A name in ``SCHEME_NAMES``: ``"auto"`` or one of ``SCHEMES`` (see the module docstring).

    Returns
    -------
    Pairing
        Every pair, and the scheme used.

    Raises
    ------
    PairingError
        A folder is missing or holds non-image files or no images; an unknown scheme; a scheme that needs two
        folders given one; or files that do not pair (listed with their count, per kind).
    """
    if scheme not in SCHEME_NAMES:
        raise PairingError(f"scheme {scheme!r}: expected one of {', '.join(SCHEME_NAMES)}")
    rainy_dir, clean_dir = str(rainy_dir), str(clean_dir)
    same = os.path.realpath(rainy_dir) == os.path.realpath(clean_dir)
    rainy_files = list_images(rainy_dir, "rainy")
    clean_files = rainy_files if same else list_images(clean_dir, "clean")
    candidates = [s for s in SCHEMES if scheme in ("auto", s.name)]
    if same:
        candidates = [s for s in candidates if s.marked]
        if not candidates:
            raise PairingError(f"scheme {scheme!r} needs two folders (rainy and clean images with the same names); "
                               f"{rainy_dir!r} was given as both")
    results = []
    for s in candidates:
        try:
            results.append((s, *_match(s, rainy_files, clean_files, rainy_dir, clean_dir, same)))
        except PairingError:
            if scheme != "auto":
                raise
    if not results:  # every scheme failed on duplicate names: report the first one's error
        _match(candidates[0], rainy_files, clean_files, rainy_dir, clean_dir, same)
    best = max(results, key=lambda r: len(r[1]))  # max keeps the first of equals: the preferred scheme
    chosen, pairs, problems = best
    if problems or not pairs:
        tried = (f"scheme {chosen.name} ({chosen.describe()}), which paired the most files"
                 if scheme == "auto" else f"scheme {chosen.name} ({chosen.describe()})")
        found = f"{len(pairs)} pairs found" if pairs else "no pairs found"
        raise PairingError(f"cannot pair {rainy_dir!r} with {clean_dir!r} under {tried}: {found}; "
                           + "; ".join(problems or ["nothing matched"])
                           + ". Accepted schemes: " + "; ".join(f"{s.name} ({s.describe()})" for s in SCHEMES))
    return Pairing(pairs, chosen)


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of an image file read from its header, as decoding will see it (EXIF orientations that
    turn the image by 90 degrees swap the two).

    Raises
    ------
    PairingError
        The file cannot be opened as an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise PairingError(f"{path!r}: not a readable image ({type(e).__name__}: {e})") from e
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def check_sizes(pairs: list[Pair]) -> list[tuple[int, int]]:
    """The ``(height, width)`` of each pair, after checking that its two images have the same size.

    Raises
    ------
    PairingError
        Listing the pairs whose rainy and clean images differ in size (first few, with sizes, and the count), or
        naming a file that is not a readable image.
    """
    sizes, bad = [], []
    for p in pairs:
        r, c = image_size(p.rainy), image_size(p.clean)
        if r != c:
            bad.append(f"{os.path.basename(p.rainy)} {r[0]}x{r[1]} vs {os.path.basename(p.clean)} {c[0]}x{c[1]}")
        sizes.append(r)
    if bad:
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise PairingError(f"{len(bad)} of {len(pairs)} pairs have rainy and clean images of different sizes "
                           f"(height x width): {'; '.join(bad[:SHOWN])}{more}")
    return sizes


__all__ = ["Pair", "Pairing", "PairingError", "SCHEMES", "SCHEME_NAMES", "Scheme", "check_sizes", "image_size",
           "list_images", "natural_key", "pair_folders"]
