"""Validation loss against consumed tokens and training FLOPs, every student in one PNG.

Read from the metrics files the trainer writes (JSON lines): a validation line carries
the iteration and ``valid_loss``; the training line of the same iteration carries the
consumed tokens and FLOPs (the Vanilla KD teacher's forward passes included), so the
FLOPs panel compares methods at equal compute as the paper does (the file's format:
``megatron_miniplm.training.metrics``).
"""

from __future__ import annotations

import os
from typing import Sequence

from megatron_miniplm.training import metrics


def validation_curve(metrics_file: str) -> list[dict]:
    """[{"iteration", "valid_loss", "consumed_tokens", "consumed_flops"}] in iteration order."""
    m = metrics.read(metrics_file)
    points = []
    for it in sorted(m.valid):
        t = m.train.get(it, {})
        points.append({"iteration": it, "valid_loss": m.valid[it]["valid_loss"],
                       "consumed_tokens": t.get("consumed_tokens"), "consumed_flops": t.get("consumed_flops")})
    return points


def plot_curves(runs: dict, png: str) -> str:
    """``runs``: {model: [metrics files, one per seed]}. Writes ``png`` (atomically) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, files) in enumerate(runs.items()):
        for s, path in enumerate(_as_list(files)):
            points = validation_curve(path)
            label = name if s == 0 else None
            for ax, key in zip(axes, ("consumed_tokens", "consumed_flops")):
                xy = [(p[key], p["valid_loss"]) for p in points if p[key] is not None]
                if xy:
                    ax.plot(*zip(*xy), marker="o", markersize=3, color=colors[k % len(colors)], label=label,
                            alpha=1.0 if s == 0 else 0.6)
    axes[0].set_xlabel("consumed tokens")
    axes[1].set_xlabel("training FLOPs (teacher forward included)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, png)


def save_figure(fig, png: str) -> str:
    """A matplotlib figure written to ``png`` under a temporary name, then published; closed."""
    import matplotlib.pyplot as plt

    from megatron_miniplm.atomic_io import publish, temp_name

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    tmp = temp_name(png)
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    publish(tmp, png)
    return png


def _as_list(files) -> Sequence[str]:
    return [files] if isinstance(files, str) else list(files)
