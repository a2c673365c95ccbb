"""Results, figure and ``report.md`` of the content-prior recipes fig18 / fig19 of ``rainsweep reproduce``.

Each row is one run with its held-out scores on the unseen degradation (``E_R``, ``E_B``, ``PSNR``, from train.py)
and on the degradation it trained on, on the same backgrounds (``*_seen``, ``engine.experiments.rescore``). Metrics
are on the 0..255 scale: E_R (degradation removal, higher is better), E_B (background error, lower is better).
"""
from __future__ import annotations

from pathlib import Path

from engine.experiments import recipes as R
from engine.experiments import report as rep
from engine.experiments import report_figures as F

COLUMNS = ("half", "model", "rain", "test", "count", "E_R", "E_B", "PSNR", "E_R_ceiling", "E_R_seen", "E_B_seen",
           "PSNR_seen", "E_R_ceiling_seen", "iters", "status", "run")
#: The unseen test degradation of each half.
TESTS = {"rain": R.TEST_RAIN, "noise": R.NOISE_TEST}
HALF_TITLES = {"rain": "deraining (paper's Fig. 19a)", "noise": "denoising (paper's Fig. 19b)"}


def bars_figure(path: Path, rows: list[dict], title: str) -> Path:
    """One panel per half: E_R on the seen and on the unseen degradation, one pair of bars per model."""
    from matplotlib.figure import Figure

    halves = [h for h in TESTS if any(r["half"] == h for r in rows)] or ["rain"]
    fig = Figure(figsize=(5.5 * len(halves), 4.2))
    for i, half in enumerate(halves):
        ax = fig.add_subplot(1, len(halves), i + 1)
        pts = [r for r in rows if r["half"] == half]
        xs = range(len(pts))
        ax.bar([x - 0.2 for x in xs], [r.get("E_R_seen") or 0 for r in pts], 0.4, label="seen (training) degradation")
        ax.bar([x + 0.2 for x in xs], [r["E_R"] for r in pts], 0.4, label=f"unseen: {TESTS[half]}")
        ax.set_xticks(list(xs), [r["model"] for r in pts], rotation=20)
        ax.set_ylabel(F.LABELS["E_R"])
        ax.set_title(HALF_TITLES[half])
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return F.save(fig, path)


def with_half(rows: list[dict]) -> list[dict]:
    """Rows sorted by half then model, with ``half`` (the sweep label) and ``test`` (the unseen degradation)."""
    out = [{**r, "half": r.get("label") or "rain", "test": TESTS.get(r.get("label") or "rain", "")} for r in rows]
    return sorted(out, key=lambda r: (list(TESTS).index(r["half"]) if r["half"] in TESTS else 9, r["model"]))


def score_table(done: list[dict]) -> str:
    header = ["half", "model", "training", "unseen test", "E_R unseen", "E_B unseen", "PSNR unseen (dB)",
              "E_R seen", "E_B seen", "E_R ceiling (unseen / seen)"]
    body = [[r["half"], r["model"], r["rain"], r["test"], rep.fmt(r["E_R"]), rep.fmt(r["E_B"]), rep.fmt(r["PSNR"], 2),
             rep.fmt(r.get("E_R_seen")), rep.fmt(r.get("E_B_seen")),
             f"{rep.fmt(r['E_R_ceiling'])} / {rep.fmt(r.get('E_R_ceiling_seen'))}"] for r in done]
    return rep.md_table(header, body)


def gain_sentences(done: list[dict], ft_model: str) -> list[str]:
    """Per half: the fine-tuned prior's unseen E_R against resnet's and against the best scratch model's."""
    out = []
    for half in TESTS:
        pts = [r for r in done if r["half"] == half]
        ft = next((r for r in pts if r["model"] == ft_model), None)
        scratch = [r for r in pts if r["model"] != ft_model]
        if ft is None or not scratch:
            continue
        res = next((r for r in scratch if r["model"].startswith("resnet")), None)
        best = max(scratch, key=lambda r: r["E_R"])
        parts = []
        for ref in ([res] if res else []) + ([best] if best is not res else []):
            d = ft["E_R"] - ref["E_R"]
            verb = "improves" if d >= rep.FLAT else ("lowers" if -d >= rep.FLAT else "does not change")
            parts.append(f"{verb} unseen E_R against {ref['model']} trained the same steps by {d:+.1f} "
                         f"({ft['E_R']:.1f} vs {ref['E_R']:.1f}; E_B {ft['E_B']:.1f} vs {ref['E_B']:.1f})")
        out.append(f"{HALF_TITLES[half]}: the fine-tuned prior ({ft_model}) " + "; it ".join(parts) + ".")
    return out


def gap_sentences(done: list[dict]) -> list[str]:
    """Per run: E_R on the seen degradation against the unseen one."""
    out = []
    for r in done:
        if r.get("E_R_seen") is None:
            continue
        out.append(f"{r['model']} ({r['half']}): E_R {r['E_R_seen']:.1f} on the training degradation (ceiling "
                   f"{r['E_R_ceiling_seen']:.1f}) against {r['E_R']:.1f} on unseen {r['test']} (ceiling "
                   f"{r['E_R_ceiling']:.1f}).")
    return out


def prior_section(ps: R.PriorScale, prior_path: str, metrics: dict | None) -> str:
    made = (f"trained here by stage 1 (`rainsweep prior`, config `{ps.config}`, {ps.prior_iters:,} steps of "
            f"{ps.prior_batch} clean patches; L1 + codebook/commitment losses, straight-through estimator, dead-code "
            f"restarts; no patch discriminator, no LPIPS perceptual loss: its VGG weights are not shipped)"
            if metrics is not None else "given by the user (`--prior`)")
    lines = [f"## The prior\n\n`{prior_path}`, {made}."]
    if metrics:
        lines.append(f"Reconstruction of {metrics['patches']} training patches: PSNR {metrics['psnr']:.2f} dB; "
                     f"code perplexity {metrics['perplexity']:.1f} of {metrics['n_embed']} codes, "
                     f"{metrics['dead_codes']} unused; {rep.duration(metrics.get('train_seconds', 0))} of training.")
    lines.append(f"Fine-tuning trains only the encoder side (`encoder.*`, `quant_conv`); codebook, `post_quant_conv` "
                 f"and decoder stay bit-identical to the prior.")
    return "\n\n".join(lines)


def write_prior_recipe(ctx: rep.Context, ps: R.PriorScale, rows: list[dict], prior_path: str,
                       prior_metrics: dict | None, noise: bool, available: bool = True) -> Path:
    """fig18 / fig19: results.csv / results.json, ``figures/<recipe>.png`` and report.md into ``ctx.out``."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    rows = with_half(rows)
    rep.write_table(ctx.out, rows, COLUMNS)
    done = rep.finished(rows)
    if ctx.recipe == "fig19":
        title = "Fig. 19: a content prior against networks trained from scratch, on unseen degradations"
        fig = bars_figure(ctx.out / "figures" / "fig19.png", done, "Fig. 19: E_R, seen and unseen degradation")
        gains = gain_sentences(done, ps.ft_model)
        why = "it was not requested" if available else "this engine has no noise degradations"
        missing = "" if noise else (f" The denoising half (Fig. 19b: {R.NOISE_TRAIN} -> {R.NOISE_TEST}) is left "
                                    f"out: {why}.")
        body = [
            f"Models trained from scratch on {rep.fmt(done[0]['count']) if done else 'n/a'} backgrounds against the "
            f"VQGAN prior fine-tuned on the same pairs, the same number of steps, scored on a degradation none saw "
            f"(the paper's Fig. 19). Figure: `figures/{fig.name}`.{missing}",
            "## Our numbers\n\n" + score_table(done),
            "## Does the prior help on unseen degradation?\n\n"
            + ("\n".join(f"- {g}" for g in gains) if gains else "Too few finished runs to compare.")
            + "\n\nThe paper's direction: the fine-tuned prior removes unseen rain and noise that the networks "
              "trained from scratch leave in place (see its Fig. 19; no number of it is quoted here).",
            "## Seen against unseen\n\n" + "\n".join(f"- {s}" for s in gap_sentences(done)),
            prior_section(ps, prior_path, prior_metrics),
        ]
    else:
        title = "Fig. 18: the encoder-decoder without quantization, from scratch"
        fig = bars_figure(ctx.out / "figures" / "fig18.png", done, "Fig. 18: E_R, seen and unseen rain")
        nq = next((r for r in done if r["model"] == ps.noquant_model), None)
        ft = next((r for r in done if r["model"] == ps.ft_model), None)
        if nq and nq.get("E_R_seen") is not None:
            fits = nq["E_R_seen"] / nq["E_R_ceiling_seen"] if nq["E_R_ceiling_seen"] else float("nan")
            unseen = nq["E_R"] / nq["E_R_ceiling"] if nq["E_R_ceiling"] else float("nan")
            verdict = (f"{ps.noquant_model} reaches {100 * fits:.0f} % of the E_R ceiling on its training rain and "
                       f"{100 * unseen:.0f} % on unseen {R.TEST_RAIN} rain.")
            if ft and ft.get("E_R_seen") is not None:
                verdict += (f" The fine-tuned prior ({ps.ft_model}): {100 * ft['E_R_seen'] / ft['E_R_ceiling_seen']:.0f}"
                            f" % and {100 * ft['E_R'] / ft['E_R_ceiling']:.0f} %; unseen E_R {ft['E_R']:.1f} against "
                            f"{nq['E_R']:.1f} without quantization.")
        else:
            verdict = "The ablation's run did not finish."
        body = [
            f"The same encoder-decoder as the prior without vector quantization, trained from scratch on the same "
            f"pairs (the paper's Fig. 18), scored on its training rain and on unseen rain, beside the fine-tuned "
            f"prior. The paper's direction: without the codebook the network fits the training rain and fails on "
            f"unseen rain, so the gain comes from the codebook. Figure: `figures/{fig.name}`.",
            "## Our numbers\n\n" + score_table(done),
            "## Direction\n\n" + verdict + "\n\n" + "\n".join(f"- {s}" for s in gap_sentences(done)),
            prior_section(ps, prior_path, prior_metrics),
        ]
    return rep.write_report(ctx, title, body, rows)
