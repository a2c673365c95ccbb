"""Results, figures and ``report.md`` of a deraining recipe (fig4, fig6, table3) of ``rainsweep reproduce``.

Every recipe folder gets ``results.csv`` / ``results.json`` (one row per run; fig6 adds one row per evaluation along
training), ``figures/*.png`` laid out like the paper's, and ``report.md``: our numbers beside the paper's (only the
numbers in ``recipes.PAPER``; everything else is pointed to by figure or table), what was scaled and why, the wall
time, and whether the direction of the paper's effect shows. Metrics are on the 0..255 scale: E_R (rain removal,
higher is better), E_B (background error, lower is better), PSNR in dB.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.atomic import atomic_write, atomic_write_json, atomic_write_text
from engine.experiments import recipes as R
from engine.experiments import report_figures as F

#: Metric columns of the recipes' results, in order.
METRICS: tuple[str, ...] = ("E_R", "E_B", "rain_residual", "PSNR", "E_R_ceiling")


@dataclass
class Context:
    """What a report says about how its numbers were made."""

    recipe: str
    scale: R.Scale
    out: Path
    store: str
    store_count: int
    patch: int
    built_store: bool
    test_store: str
    built_test_store: bool
    models: tuple[str, ...]
    wall_s: float
    bands: dict = field(default_factory=dict)


# ---- small helpers --------------------------------------------------------------------------------------------------

def fmt(value, digits: int = 1) -> str:
    """A number for a table ("n/a" for missing or NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``12 min 05 s`` or ``42 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def read_log(run_dir: str | Path) -> list[dict]:
    """The lines of a run's log.jsonl (empty when missing)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def train_seconds(log: list[dict]) -> float:
    """Training time of a run from its log lines: each window's steps divided by its steps per second."""
    total, prev = 0.0, 0
    for rec in log:
        if rec.get("steps_per_s"):
            total += (rec["step"] - prev) / rec["steps_per_s"]
            prev = rec["step"]
    return total


def write_table(out: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    """``results.json`` (all fields) and ``results.csv`` (``columns``), atomically."""
    atomic_write_json(out / "results.json", rows, indent=2)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write(out / "results.csv", buf.getvalue().encode())


def finished(rows: list[dict]) -> list[dict]:
    """Rows with metrics."""
    return [r for r in rows if r.get("E_R") is not None]


def ceiling(done: list[dict]) -> str:
    """The E_R ceiling of the finished runs (the same held-out set for all: one value), formatted."""
    values = sorted({round(r["E_R_ceiling"], 1) for r in done if r.get("E_R_ceiling") is not None})
    return " / ".join(f"{v:.1f}" for v in values) or "n/a"


def setup_section(ctx: Context, rows: list[dict]) -> str:
    """How the numbers were made: scale, stores, models, steps, held-out set, timing."""
    sc = ctx.scale
    trained = sum(str(r.get("status", "")).startswith("trained") for r in rows)
    skipped = sum(str(r.get("status", "")).startswith("skipped") for r in rows)
    failed = sum(str(r.get("status", "")).startswith("failed") for r in rows)
    seconds = sum(train_seconds(read_log(r["run_dir"])) for r in rows if r.get("run_dir"))
    store = f"`{ctx.store}` ({ctx.store_count:,} patches of {ctx.patch} x {ctx.patch}" + (
        f", built from {', '.join(sc.sources)})" if ctx.built_store else ", the user's)")
    held = (f"the same {sc.test_count} patches of a separate store, `{ctx.test_store}`"
            + (f" (built here from {', '.join(sc.test_sources)})" if ctx.built_test_store else " (the user's)"))
    lines = [
        "## Setup",
        "",
        f"- Scale `{sc.name}`. {sc.why}",
        f"- Store: {store}.",
        f"- Models: {', '.join(ctx.models)}; {sc.iters} steps of {sc.batch} patches, L1 loss, Adam, EMA weights "
        f"evaluated (train.py defaults).",
        f"- Held-out set: {held}, with `{R.TEST_RAIN}` rain (a family no training preset has); "
        f"the paper tests on Rain100L's rain instead.",
        f"- One seed per point: differences of a few units may be run-to-run noise.",
        f"- Wall time of this invocation: {duration(ctx.wall_s)} ({trained} run(s) trained, {skipped} reused, "
        f"{failed} failed); training time summed over the runs (from their log.jsonl): {duration(seconds)}.",
    ]
    return "\n".join(lines)


def write_report(ctx: Context, title: str, body: list[str], rows: list[dict]) -> Path:
    """``report.md``: the title, the given sections, and the setup."""
    text = "\n\n".join([f"# {title}", *body, setup_section(ctx, rows)]) + "\n"
    return atomic_write_text(ctx.out / "report.md", text)


# ---- fig4 -----------------------------------------------------------------------------------------------------------

FIG4_COLUMNS = ("model", "rain", "count", *METRICS, "iters", "status", "run")


#: E_R and E_B changes smaller than this (0..255 scale) are called flat: one seed per point cannot tell them apart.
FLAT = 1.0


def trend(lo: float, hi: float) -> str:
    """How E_R (or E_B) changes from ``lo`` (fewest backgrounds) to ``hi`` (most), in words."""
    if hi - lo >= FLAT:
        return f"rises by {hi - lo:.1f}"
    if lo - hi >= FLAT:
        return f"falls by {lo - hi:.1f}"
    return f"changes by less than {FLAT:g} ({hi - lo:+.1f})"


def direction_counts(done: list[dict]) -> list[str]:
    """One sentence per (model, rain) line: its E_R and E_B at every count, and how E_R changes from the smallest to
    the largest count."""
    out = []
    for model in sorted({r["model"] for r in done}):
        for rain in sorted({r["rain"] for r in done if r["model"] == model}, key=F.rain_order):
            pts = sorted((r for r in done if r["model"] == model and r["rain"] == rain), key=lambda r: r["count"])
            if len(pts) < 2:
                continue
            lo, hi = pts[0], pts[-1]
            ers = ", ".join(f"{r['E_R']:.1f}" for r in pts)
            ebs = ", ".join(f"{r['E_B']:.1f}" for r in pts)
            counts = ", ".join(f"{r['count']:,}" for r in pts)
            out.append(f"{model}, {rain} rain: E_R {ers} and E_B {ebs} at {counts} backgrounds (E_R ceiling "
                       f"{hi['E_R_ceiling']:.1f}): E_R {trend(lo['E_R'], hi['E_R'])} from the fewest to the most.")
    return out


#: Why our absolute numbers cannot be compared with the paper's, only directions and ratios.
ABSOLUTE = ("Absolute values are not comparable: other backgrounds, training length, model size and test rain "
            "(the E_R ceiling, what a network removing exactly the rain scores, is {ceiling} here). Compare the "
            "direction and the ratio of many to few backgrounds.")


def paper_rows(done: list[dict]) -> list[list]:
    """Rows comparing ResNet on medium rain at 64 and at the largest count with the paper's 53.3 and 31.2, and the
    ratio of the two."""
    res = [r for r in done if r["model"].startswith("resnet") and r["rain"] == "medium"]
    if not res:
        return []
    rows, ours = [], {}
    for paper_count, paper_er in R.PAPER["resnet_medium_E_R"].items():
        ours[paper_count] = min(res, key=lambda r: abs(math.log(r["count"]) - math.log(paper_count)))
        o = ours[paper_count]
        rows.append([f"ResNet, medium rain, {paper_count:,} backgrounds", fmt(paper_er),
                     f"{fmt(o['E_R'])} ({o['model']}, {o['count']:,} backgrounds)"])
    (few, p_few), (many, p_many) = sorted(R.PAPER["resnet_medium_E_R"].items())
    if ours[few] is not ours[many]:
        rows.append(["ratio many / few", f"{p_many / p_few:.2f}", f"{ours[many]['E_R'] / ours[few]['E_R']:.2f}"])
    return rows


def ratio_sentence(rows: list[list]) -> str:
    """Whether the many-to-few ratio of ``paper_rows`` is stronger or weaker than the paper's ("" without one)."""
    ratio = next((r for r in rows if r[0] == "ratio many / few"), None)
    if ratio is None:
        return ""
    paper, ours = float(ratio[1]), float(ratio[2])
    if ours >= 1:
        return f" Between these counts our E_R does not fall (ratio {ours:.2f}; the paper's {paper:.2f})."
    strength = "weaker than" if ours > paper else "as strong as or stronger than"
    return f" Between these counts the fall is {strength} the paper's (ratio {ours:.2f} against {paper:.2f})."


def write_fig4(ctx: Context, rows: list[dict]) -> Path:
    """fig4: results, the E_R (Fig. 4) and E_B (Fig. 10) figures, and the report."""
    rows = sorted(rows, key=lambda r: (r["model"], F.rain_order(r["rain"]), r["count"]))
    write_table(ctx.out, rows, FIG4_COLUMNS)
    done = finished(rows)
    figs = [F.counts_figure(ctx.out / "figures" / "fig4_E_R.png", done, "E_R",
                            "Fig. 4: rain removal on held-out rain (higher is better)"),
            F.counts_figure(ctx.out / "figures" / "fig10_E_B.png", done, "E_B",
                            "Fig. 10: background error (lower is better)")]
    table = []
    for r in done:
        table.append([r["model"], r["rain"], f"{r['count']:,}", fmt(r["E_R"]), fmt(r["E_B"]), fmt(r["PSNR"], 2),
                      fmt(r["E_R_ceiling"])])
    directions = direction_counts(done)
    shows = sum("E_R falls by" in d for d in directions)
    verdict = (f"The direction of the paper's effect (with fewer backgrounds the network learns the background: it "
               f"removes more of the unseen rain, E_R higher, and reconstructs the background worse, E_B higher) "
               f"shows for {shows} of {len(directions)} training-rain line(s): E_R falls by at least {FLAT:g} from "
               f"the fewest to the most backgrounds."
               if directions else "Too few finished runs to judge the direction.")
    compared = paper_rows(done)
    body = [
        f"Held-out E_R and E_B against the number of training backgrounds, one line per training-rain range "
        f"(the paper's Figs. 4 and 10). Figures: {', '.join(f'`figures/{p.name}`' for p in figs)}.",
        "## Against the paper\n\n" + (md_table(["", "paper E_R", "ours E_R"], compared)
                                      if compared else "No ResNet run on medium rain.")
        + "\n\nAll other points: see the paper's Fig. 4 (E_R) and Fig. 10 (E_B). "
        + ABSOLUTE.format(ceiling=ceiling(done)) + ratio_sentence(compared),
        "## Our numbers\n\n" + md_table(["model", "training rain", "backgrounds", "E_R", "E_B", "PSNR (dB)",
                                         "E_R ceiling"], table),
        "## Direction\n\n" + verdict + ("\n\n" + "\n".join(f"- {d}" for d in directions) if directions else ""),
    ]
    return write_report(ctx, "Fig. 4 / Fig. 10: background count against rain removal", body, rows)


# ---- table3 ---------------------------------------------------------------------------------------------------------

def write_table3(ctx: Context, rows: list[dict]) -> Path:
    """table3: results, a bar figure, and the report with the paper's medium-rain numbers."""
    rows = sorted(rows, key=lambda r: (r["model"], F.rain_order(r["rain"]), -r["count"]))
    write_table(ctx.out, rows, FIG4_COLUMNS)
    done = finished(rows)
    fig = F.table3_figure(ctx.out / "figures" / "table3.png", done)
    paper = R.PAPER["resnet_medium_E_R"]
    top = max((r["count"] for r in done), default=0)
    table = []
    for r in done:
        p = None
        if r["model"].startswith("resnet") and r["rain"] == "medium":
            p = paper.get(r["count"]) if r["count"] in paper else (paper[30000] if r["count"] == top else None)
        table.append([r["model"], r["rain"], f"{r['count']:,}", fmt(r["E_R"]), fmt(r["E_B"]), fmt(r["PSNR"], 2),
                      fmt(p) if p is not None else "see the paper's Table III"])
    sentences = []
    for model in sorted({r["model"] for r in done}):
        for rain in sorted({r["rain"] for r in done if r["model"] == model}, key=F.rain_order):
            pts = sorted((r for r in done if r["model"] == model and r["rain"] == rain), key=lambda r: r["count"])
            if len(pts) >= 2:
                lo, hi = pts[0], pts[-1]
                sentences.append(f"{model}, {rain} rain: E_R {lo['E_R']:.1f} with {lo['count']:,} backgrounds "
                                 f"against {hi['E_R']:.1f} with {hi['count']:,} "
                                 f"({'more' if lo['E_R'] > hi['E_R'] else 'not more'} rain removed with fewer).")
    medium = [s for s in sentences if "medium rain" in s]
    verdict = ("The paper's direction (fewer backgrounds remove more unseen rain: 53.3 at 64 against 31.2 at 30,000) "
               + ("shows" if medium and all("(more" in s for s in medium) else "does not show")
               + " on medium rain here." if medium else "No pair of medium-rain runs finished.")
    body = [
        f"ResNet trained on many and on few backgrounds (the paper's Table III). Figure: `figures/{fig.name}`. "
        f"The largest count here is {top:,}, the most the store allows (the paper's is 30,000). "
        + ABSOLUTE.format(ceiling=ceiling(done)),
        "## Ours beside the paper\n\n" + md_table(["model", "training rain", "backgrounds", "E_R", "E_B", "PSNR (dB)",
                                                    "paper E_R"], table),
        "## Direction\n\n" + verdict + ("\n\n" + "\n".join(f"- {s}" for s in sentences) if sentences else ""),
    ]
    return write_report(ctx, "Table III: many against few backgrounds", body, rows)


# ---- fig6 -----------------------------------------------------------------------------------------------------------

FIG6_COLUMNS = ("band", "model", "count", "step", "event", "E_R", "E_B", "PSNR")


def band_of(row: dict) -> str:
    """The sharpness band of a fig6 row (its sweep's label is ``sharpness <band>``)."""
    return row["label"].split()[-1]


def write_fig6(ctx: Context, rows: list[dict]) -> Path:
    """fig6: E_R and E_B along training per sharpness band (from the runs' eval lines), and the report."""
    curves: list[dict] = []
    for r in rows:
        for rec in read_log(r["run_dir"]):
            if rec.get("event") in ("eval", "final"):
                curves.append({"band": band_of(r), "model": r["model"], "count": r["count"], "step": rec["step"],
                               "event": rec["event"], **{k: rec.get(k) for k in ("E_R", "E_B", "PSNR")}})
    order = {b: i for i, b in enumerate(R.BANDS)}
    curves.sort(key=lambda c: (c["model"], order.get(c["band"], 9), c["step"]))
    final = [{**r, "band": band_of(r)} for r in finished(rows)]
    atomic_write_json(ctx.out / "runs.json", rows, indent=2)
    write_table(ctx.out, curves, FIG6_COLUMNS)
    fig = F.curves_figure(ctx.out / "figures" / "fig6.png", curves)
    table = [[r["band"], r["model"], f"{r['count']:,}", f"{ctx.bands.get(r['band'], 0):,}", fmt(r["E_R"]),
              fmt(r["E_B"]), fmt(r["PSNR"], 2), fmt(r["E_R_ceiling"])]
             for r in sorted(final, key=lambda r: (r["model"], order.get(r["band"], 9)))]
    sentences = []
    for model in sorted({r["model"] for r in final}):
        er = {r["band"]: r["E_R"] for r in final if r["model"] == model}
        if "low" in er and "high" in er:
            ok = er["low"] > er["high"]
            verb = "removes more" if ok else "does not remove more"
            sentences.append(f"{model}: final E_R {er['low']:.1f} (low) / {fmt(er.get('medium'))} (medium) / "
                             f"{er['high']:.1f} (high): the blurry band {verb} unseen rain than the sharp band.")
    verdict = ("The paper's direction (models trained on blurry, low-sharpness backgrounds learn the background and "
               "remove more unseen rain; sharp backgrounds make them learn the rain) "
               + ("shows" if sentences and all("removes more" in s for s in sentences) else "does not show")
               + " here." if sentences else "Too few finished runs to judge the direction.")
    body = [
        f"Held-out E_R and E_B along training for models trained on the low (< 50), medium (500..1000) and high "
        f"(> 5000) sharpness band, the same number of backgrounds each, medium training rain (the paper's Fig. 6). "
        f"Figure: `figures/{fig.name}`; every evaluation is a row of `results.csv`.",
        "## Against the paper\n\nSee the paper's Fig. 6 for its curves; no number of it is quoted here.",
        "## Our numbers (end of training)\n\n" + md_table(
            ["band", "model", "backgrounds", "band size in store", "E_R", "E_B", "PSNR (dB)", "E_R ceiling"], table),
        "## Direction\n\n" + verdict + ("\n\n" + "\n".join(f"- {s}" for s in sentences) if sentences else ""),
    ]
    return write_report(ctx, "Fig. 6: background sharpness along training", body, rows)


def write_recipe(ctx: Context, rows: list[dict]) -> Path:
    """Write the results, figures and report of a deraining recipe into ``ctx.out``; returns the report's path."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    writers = {"fig4": write_fig4, "table3": write_table3, "fig6": write_fig6}
    return writers[ctx.recipe](ctx, rows)
