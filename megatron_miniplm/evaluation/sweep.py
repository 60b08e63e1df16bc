"""A size sweep in the evaluation: models labelled METHOD@SIZE, their fitted curves of loss
against training FLOPs, the computation saving and the extrapolation (scaling.py), the
plot of points, fits and bands, and the lines the table and the report print.

Labels without ``@`` are one size of their method. The computation saving is measured
against one method, the baseline (EvalConfig's ``saving_baseline``): from the sweep's
fitted curve, and from the validation curves during training (``within_run``: the
baseline's curve at the same size, seeds averaged).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from megatron_miniplm.evaluation import scaling


def method_and_size(label: str) -> tuple[str, str]:
    method, _, size = label.partition("@")
    return method, size


def asked(labels: Sequence[str], baseline: Optional[str]) -> bool:
    """A sweep is analysed where labels carry sizes or a saving baseline is named."""
    return bool(baseline) or any("@" in label for label in labels)


def swept(labels: Sequence[str]) -> list[str]:
    """The labels of the sweep: those with a size where any has one (the others, such as the
    reference and the teacher, are not sizes of a method), else every label."""
    labels = list(dict.fromkeys(labels))
    sized = [label for label in labels if "@" in label]
    return sized or labels


def baseline_of(labels: Sequence[str], baseline: Optional[str]) -> Optional[str]:
    """The saving's baseline: the one named, else the second method listed (the first is the
    one the table compares with the others)."""
    methods = list(dict.fromkeys(method_and_size(label)[0] for label in swept(labels)))
    return baseline or (methods[1] if len(methods) > 1 else None)


def analyze(labels: Sequence[str], models: dict, losses: dict, documents: Optional[np.ndarray],
            metrics_files: Optional[dict], *, baseline: Optional[str], target_flops: Optional[float],
            samples: int, seed: int, level: float) -> dict:
    """``losses``: {label: [per-instance losses of each seed]}; ``models``: the results' rows
    (their ``train_flops``); ``metrics_files``: {label: [metrics files of its seeds]}."""
    baseline = baseline_of(labels, baseline)
    points = [scaling.Point(*method_and_size(label), float(models[label]["train_flops"]), losses[label])
              for label in swept(labels) if label in losses and models.get(label, {}).get("train_flops")]
    out = scaling.sweep(points, documents, baseline=baseline, target_flops=target_flops, samples=samples,
                        seed=seed, level=level) if points else {"points": [], "refused": "no model with training FLOPs"}
    out["baseline"] = baseline
    out["generation_flops"] = generation(labels, models)
    if metrics_files and baseline:
        out["within_run"] = within_run(metrics_files, baseline)
    return out


def generation(labels: Sequence[str], models: dict) -> dict:
    """{method: {size: the teacher's FLOPs that generated its corpus}} of the swept models that
    record them (SeqKD's students): their points and savings count training FLOPs alone, as the
    table's "train FLOPs" do, and the sentences say what was left out."""
    out: dict = {}
    for label in swept(labels):
        g = models.get(label, {}).get("generation_flops")
        if g:
            method, size = method_and_size(label)
            out.setdefault(method, {})[size] = g
    return out


def mean_curve(files: Sequence[str]) -> list[tuple[float, float]]:
    """(FLOPs, validation loss) over the iterations every seed validated, averaged over seeds."""
    from megatron_miniplm.evaluation.curves import validation_curve

    curves = [{p["iteration"]: p for p in validation_curve(f) if p["consumed_flops"]} for f in files]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [(float(np.mean([c[i]["consumed_flops"] for c in curves])), float(np.mean([c[i]["valid_loss"] for c in curves])))
            for i in common]


def within_run(metrics_files: dict, baseline: str) -> dict:
    """{method: {size: saving}}: each method's last validation point against the baseline's
    validation curve of the same size."""
    curves = {method_and_size(label): mean_curve(files) for label, files in metrics_files.items()}
    out: dict = {}
    for (method, size), curve in curves.items():
        base = curves.get((baseline, size))
        if method == baseline or not curve or not base:
            continue
        flops, loss = curve[-1]
        try:
            got = scaling.within_run_saving(base, flops, loss)
        except scaling.TooFewPoints as e:
            got = {"refused": str(e)}
        out.setdefault(method, {})[size] = {"flops": flops, "loss": loss, **got}
    return out


def _ratio(x: float) -> str:
    """A saving in words: inf, the baseline's curve never reaches the loss; NaN, its curve does not
    fall with compute, so no compute is needed for a loss and no saving is defined."""
    if math.isnan(x):
        return "undefined (the baseline's fitted loss does not fall with compute)"
    return "never (below the baseline's fitted floor)" if math.isinf(x) else f"{x:.3g}x"


def _bound(x: float) -> str:
    """An interval's end: inf where the draws run to it (never, or counted so)."""
    return "inf" if math.isinf(x) else f"{x:.3g}x"


def _uncounted(sweep: dict, method: str, size: str) -> str:
    g = sweep.get("generation_flops", {}).get(method, {}).get(size)
    return f"; training FLOPs only: the teacher's {g:.3g} FLOPs generating its corpus are not counted" if g else ""


def lines(sweep: dict) -> list[str]:
    """The sweep's sentences: the form, the fits, the savings, the extrapolation, or the refusal."""
    out = []
    level = f"{100 * sweep.get('level', 0.95):g}%"
    base = sweep.get("baseline")
    for method, by_size in sweep.get("within_run", {}).items():
        for size, s in by_size.items():
            at = f" at {size}" if size else ""
            if "refused" in s:
                out.append(f"computation saving of {method}{at} from the validation curves: {s['refused']}")
                continue
            how = ", the baseline's curve extrapolated by its fit" if s["extrapolated"] else ""
            how += ", at its first validation: less compute may do" if s.get("at_most") else ""
            bound = "at most " if s.get("at_most") else ""
            needs = (f"needs {s['baseline_flops']:.3g} FLOPs to reach" if math.isfinite(s["baseline_flops"])
                     else "does not reach")
            out.append(f"computation saving of {method}{at} from the validation curves: {bound}{_ratio(s['saving'])} "
                       f"({base} {needs} its {s['loss']:.4f} at {s['flops']:.3g}{how})" + _uncounted(sweep, method, size))
    if sweep.get("refused"):
        return out + [sweep["refused"]]
    if not sweep.get("fits"):
        return out
    out.append(f"fitted per method, loss against training FLOPs: {sweep['form']} ({level} bands: bootstrap over "
               f"{sweep['covers']}, {sweep['samples']} refits)")
    for method, f in sweep["fits"].items():
        e = sweep["extrapolation"][method]
        out.append(f"  {method}: {f['sizes']} sizes, l_inf {f['l_inf']:.4f}, a {f['a']:.4f}, alpha {f['alpha']:.4f}, "
                   f"c0 {f['c0']:.3g}, rmse {f['rmse']:.4f}; extrapolated to {e['flops']:.3g} FLOPs: "
                   f"{e['loss']:.4f} [{e['low']:.4f}, {e['high']:.4f}]"
                   + (f"; caution: {'; '.join(f['caveats'])}" if f.get("caveats") else ""))
    for method, by_size in sweep.get("saving", {}).items():
        for size, s in by_size.items():
            undefined = (f"; in {s['undefined']} of {sweep['samples']} refits {base}'s curve does not fall "
                         f"(counted at either end)" if s.get("undefined") else "")
            out.append(f"computation saving of {method} at {size} from the sweep's fit of {base}: "
                       f"{_ratio(s['saving'])} [{_bound(s['low'])}, {_bound(s['high'])}] at {s['flops']:.3g} FLOPs"
                       + undefined + _uncounted(sweep, method, size))
    return out


def plot(sweep: dict, png: str) -> str:
    """Points (with their intervals), fitted curves and bands, per method, on log FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_miniplm.evaluation.curves import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(p["method"] for p in sweep["points"]))
    for k, method in enumerate(methods):
        color = colors[k % len(colors)]
        pts = [p for p in sweep["points"] if p["method"] == method]
        x, y = [p["flops"] for p in pts], [p["loss"] for p in pts]
        err = [[p["loss"] - p["low"] for p in pts], [p["high"] - p["loss"] for p in pts]]
        ax.errorbar(x, y, yerr=err, fmt="o", color=color, label=method, capsize=3)
        fit = sweep.get("fits", {}).get(method)
        if fit:
            band = fit["band"]
            ax.plot(band["flops"], band["loss"], color=color)
            ax.fill_between(band["flops"], band["low"], band["high"], color=color, alpha=0.2)
    if sweep.get("target_flops"):
        ax.axvline(sweep["target_flops"], color="gray", linestyle=":", label="extrapolation")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (teacher forward included)")
    ax.set_ylabel("test loss (nats/token)")
    ax.set_title(sweep.get("form") or "", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, png)
