"""--report DIR: what a selection kept, for a human to check before training on it.

    selection_report.md / .json   kept instances and tokens per domain; top and bottom
                                  instances of the ranking, decoded to text
    hist_teacher.png, hist_reference.png, hist_difference.png
                                  score histograms, all instances vs kept ones

Histograms are exact over all instances (computed shard by shard, so memory stays at one
shard); their range is the 0.1-99.9 % quantile range of a fixed subsample, with values
outside it counted in the end bins.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_miniplm import _cpp
from megatron_miniplm.atomic_io import publish, temp_name, write_json_atomic, write_text_atomic
from megatron_miniplm.selection.shards import Shard, domain_table

BINS = 80
SAMPLE = 1_000_000
TEXT_CHARS = 800


@dataclass
class ReportInputs:
    shards: list[Shard]
    offsets: np.ndarray  # int64 [S + 1]
    lengths: np.ndarray  # int32 [N]
    kept: np.ndarray  # bool [N]
    summary: dict  # the blend meta (method, alpha, counts...)
    teacher: Optional[list[np.ndarray]] = None  # per-shard [n, 2] score arrays
    reference: Optional[list[np.ndarray]] = None
    ranking: Optional[np.ndarray] = None  # the scores the examples are ranked by
    ranking_name: str = "difference"
    ranking_ascending: bool = False
    examples: int = 5
    num_threads: int = 0


def domain_rows(inp: ReportInputs) -> list[dict]:
    names, maps = domain_table(inp.shards)
    ids = np.concatenate([s.mapped_domains(m) for s, m in zip(inp.shards, maps)]) if inp.shards else np.zeros(0, np.int64)
    d = len(names)
    n_all = np.bincount(ids, minlength=d)
    n_kept = np.bincount(ids[inp.kept], minlength=d)
    t_all = np.bincount(ids, weights=inp.lengths, minlength=d)
    t_kept = np.bincount(ids[inp.kept], weights=inp.lengths[inp.kept], minlength=d)
    kept_tokens = max(float(t_kept.sum()), 1.0)
    rows = []
    for i, name in enumerate(names):
        rows.append({
            "domain": name,
            "instances": int(n_all[i]), "instances_kept": int(n_kept[i]),
            "kept_fraction": float(n_kept[i] / n_all[i]) if n_all[i] else 0.0,
            "tokens": int(t_all[i]), "tokens_kept": int(t_kept[i]),
            "tokens_kept_fraction": float(t_kept[i] / t_all[i]) if t_all[i] else 0.0,
            "share_of_kept_tokens": float(t_kept[i] / kept_tokens),
        })
    return rows


def _score_kinds(inp: ReportInputs) -> list[str]:
    kinds = []
    if inp.teacher is not None:
        kinds.append("teacher")
    if inp.reference is not None:
        kinds.append("reference")
    if inp.teacher is not None and inp.reference is not None:
        kinds.append("difference")
    return kinds


def _shard_scores(inp: ReportInputs, kind: str, s: int) -> np.ndarray:
    n = int(inp.offsets[s + 1] - inp.offsets[s])
    out = np.empty(n, dtype=np.float64)
    t = inp.teacher[s] if inp.teacher is not None else None
    r = inp.reference[s] if inp.reference is not None else None
    _cpp.compute_scores(kind, t, r, out, num_threads=inp.num_threads)
    return out


def histogram(inp: ReportInputs, kind: str) -> dict:
    """Exact all / kept histograms of one score over every shard."""
    n = int(inp.offsets[-1])
    step = max(1, n // SAMPLE)
    sample = np.concatenate([_shard_scores(inp, kind, s)[(-int(inp.offsets[s])) % step::step]
                             for s in range(len(inp.shards))])
    sample = sample[np.isfinite(sample)]
    lo, hi = (np.quantile(sample, [0.001, 0.999]) if sample.size else (0.0, 1.0))
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, BINS + 1)
    all_c = np.zeros(BINS, np.int64)
    kept_c = np.zeros(BINS, np.int64)
    moments = np.zeros(4)  # sum all, count all, sum kept, count kept
    for s in range(len(inp.shards)):
        v = _shard_scores(inp, kind, s)
        k = inp.kept[int(inp.offsets[s]):int(inp.offsets[s + 1])]
        ok = np.isfinite(v)
        clipped = np.clip(v[ok], lo, hi)
        all_c += np.histogram(clipped, edges)[0]
        kept_c += np.histogram(clipped[k[ok]], edges)[0]
        moments += [v[ok].sum(), ok.sum(), v[ok & k].sum(), (ok & k).sum()]
    return {"kind": kind, "edges": edges.tolist(), "all": all_c.tolist(), "kept": kept_c.tolist(),
            "mean_all": moments[0] / max(moments[1], 1), "mean_kept": moments[2] / max(moments[3], 1)}


def _plot(h: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(h["edges"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(h["all"], edges, fill=True, alpha=0.35, label=f"all (mean {h['mean_all']:.3f})")
    ax.stairs(h["kept"], edges, linewidth=1.5, label=f"kept (mean {h['mean_kept']:.3f})")
    ax.set_xlabel({"teacher": "teacher mean NLL", "reference": "reference mean NLL",
                   "difference": "difference = reference - teacher mean NLL"}[h["kind"]])
    ax.set_ylabel("instances")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = temp_name(path) + ".png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    publish(tmp, path)


def _load_tokenizer(meta: dict):
    """(tokenizer or None, note). Decoding is best effort: a report without text is still a report."""
    tok = meta.get("tokenizer") or {}
    path = tok.get("path")
    if not path:
        return None, "the dataset meta records no tokenizer path; instances are shown as token ids"
    try:
        from megatron_miniplm.data.tokenizer import load_tokenizer
    except ImportError:
        return None, "megatron_miniplm.data.tokenizer is not available; instances are shown as token ids"
    try:
        t = load_tokenizer(path)
    except Exception as e:  # any failure to load only costs the decoded text
        return None, f"tokenizer {path} could not be loaded ({e}); instances are shown as token ids"
    note = ""
    if tok.get("sha256") and getattr(t, "sha256", tok["sha256"]) != tok["sha256"]:
        note = f"warning: {path} differs from the tokenizer recorded in the dataset meta (sha256)"
    return t, note


def examples(inp: ReportInputs) -> tuple[dict, str]:
    if inp.ranking is None or inp.examples <= 0:
        return {"top": [], "bottom": []}, "no scores to rank instances by; no examples"
    tok, note = _load_tokenizer(inp.shards[0].meta)
    names, maps = domain_table(inp.shards)
    m = min(inp.examples, int(inp.offsets[-1]))
    out = {}
    for end, asc in (("top", inp.ranking_ascending), ("bottom", not inp.ranking_ascending)):
        sel = _cpp.select(inp.ranking, m, ascending=asc, num_threads=inp.num_threads)
        idx = np.empty(sel.count, np.int64)
        sel.write_indices(idx)
        idx = idx[np.lexsort((idx, inp.ranking[idx] if asc else -inp.ranking[idx]))]
        rows = []
        for g in idx:
            s = int(np.searchsorted(inp.offsets, g, side="right") - 1)
            i = int(g - inp.offsets[s])
            shard = inp.shards[s]
            ids = shard.tokens(i)
            row = {"shard": s, "instance": i, "score": float(inp.ranking[g]), "tokens": int(ids.size),
                   "kept": bool(inp.kept[g]), "domain": names[int(maps[s][int(shard.domains()[i])])]}
            for kind, arrays in (("teacher_mean_nll", inp.teacher), ("reference_mean_nll", inp.reference)):
                if arrays is not None:
                    row[kind] = float(arrays[s][i, 0] / arrays[s][i, 1])
            row["text"] = tok.decode(ids.tolist())[:TEXT_CHARS] if tok is not None else None
            row["token_ids"] = ids[:64].tolist()
            rows.append(row)
        out[end] = rows
    return out, note


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _markdown(summary: dict, rows: list[dict], plots: list[str], ex: dict, notes: list[str], inp: ReportInputs) -> str:
    budget = (f"alpha = {summary['alpha']}" if summary.get("alpha") is not None
              else f"keep_tokens = {summary['keep_tokens']:,}")
    lines = [
        "# Selection report", "",
        f"- method: **{summary['method']}**, {budget}, order {summary['order']}, seed {summary['seed']}",
        f"- kept {summary['num_selected']:,} of {summary['num_instances_total']:,} instances "
        f"({_pct(summary['num_selected'] / max(summary['num_instances_total'], 1))}), "
        f"{summary['tokens_kept']:,} of {summary['tokens_total']:,} tokens "
        f"({_pct(summary['tokens_kept'] / max(summary['tokens_total'], 1))})",
        f"- shards: {len(summary['datasets'])}", "",
        "## Per domain", "",
        "| domain | instances | kept | kept % | tokens | tokens kept | tokens kept % | share of kept tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['domain']} | {r['instances']:,} | {r['instances_kept']:,} | {_pct(r['kept_fraction'])} | "
                     f"{r['tokens']:,} | {r['tokens_kept']:,} | {_pct(r['tokens_kept_fraction'])} | "
                     f"{_pct(r['share_of_kept_tokens'])} |")
    lines += ["", "## Score histograms", ""]
    lines += [f"![{p}]({p})" for p in plots] or ["(no score files given: no histograms)"]
    for end in ("top", "bottom"):
        if not ex.get(end):
            continue
        lines += ["", f"## {end.capitalize()} {len(ex[end])} instances by {inp.ranking_name} score", ""]
        for r in ex[end]:
            lines.append(f"### shard {r['shard']}, instance {r['instance']} — {r['domain']}, score {r['score']:.4f}, "
                         f"{r['tokens']} tokens, {'kept' if r['kept'] else 'dropped'}")
            body = r["text"] if r["text"] is not None else " ".join(map(str, r["token_ids"]))
            lines += ["", "```text", body.replace("```", "'''"), "```", ""]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes if n]
    return "\n".join(lines) + "\n"


def write_report(report_dir: str, inp: ReportInputs) -> dict:
    os.makedirs(report_dir, exist_ok=True)
    notes = []
    rows = domain_rows(inp)
    plots, hists = [], {}
    kinds = _score_kinds(inp)
    for kind in kinds:
        h = histogram(inp, kind)
        hists[kind] = h
        name = f"hist_{kind}.png"
        _plot(h, os.path.join(report_dir, name), f"{kind} scores: all vs kept ({inp.summary['method']})")
        plots.append(name)
    ex, note = examples(inp)
    notes.append(note)
    if kinds:
        notes.append("histogram ranges are the 0.1-99.9 % quantiles of a subsample; outliers fall in the end bins")
    report = {"summary": {k: v for k, v in inp.summary.items() if k != "datasets"}, "domains": rows,
              "histograms": hists, "examples": ex, "notes": [n for n in notes if n]}
    write_json_atomic(os.path.join(report_dir, "selection_report.json"), report)
    md_path = os.path.join(report_dir, "selection_report.md")
    write_text_atomic(md_path, _markdown(inp.summary, rows, plots, ex, notes, inp))
    return report
