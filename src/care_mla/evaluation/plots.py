"""PNG plots of sweeps: pure functions from plain data (lists, dicts) to a file.

Matplotlib's object API with the Agg canvas is used directly (no pyplot): no display, no
global figure state, safe in threads and tests. Every function takes the data and the path
and writes one PNG; none reads a model or a report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_vs_saving", "plot_layer_ranks", "plot_spectra", "plot_layer_errors"]

_DPI = 110


def _figure(width: float, height: float, panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def plot_vs_saving(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: Path | str,
    *,
    ylabel: str,
    title: str,
    log_y: bool = False,
    reference: tuple[str, float] | None = None,
    styles: Mapping[str, Mapping] | None = None,
) -> Path:
    """One line per series of ``(kv_saving, value)`` points; x in percent of the GQA cache saved.

    `reference` = (label, y) draws a dashed horizontal line (e.g. the original model).
    `styles` = {label: matplotlib line keywords} (color, linestyle, marker) per series.
    Points with a non-positive value are left out of a log-scale plot.
    """
    from matplotlib.ticker import FormatStrFormatter

    fig, (ax,) = _figure(9, 5)
    markers = "osD^v<>ph*"
    for i, (label, points) in enumerate(series.items()):
        pts = sorted((100 * x, y) for x, y in points if y is not None and (y > 0 or not log_y))
        style = {"marker": markers[i % len(markers)], **((styles or {}).get(label) or {})}
        if pts:
            ax.plot(*zip(*pts), label=label, **style)
    if reference is not None:
        ax.axhline(reference[1], linestyle="--", color="grey", label=reference[0])
    ax.set(xlabel="KV-cache saving (% of the GQA cache)", ylabel=ylabel, title=title)
    if log_y:
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))  # plain numbers (1.5, 2, 3), not 10^x
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: many series
    return _save(fig, path)


def plot_layer_ranks(
    panels: Mapping[str, Mapping[str, Sequence[int]]], path: Path | str, *, title: str
) -> Path:
    """Per-layer ranks: one panel per branch (e.g. "K", "V"), one line per budget in each."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(5.5 * len(panels), 4.2, len(panels))
    for ax, (panel, curves) in zip(axes, panels.items()):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for label, ranks in curves.items():
            ax.plot(range(len(ranks)), ranks, marker="o", markersize=3, label=label)
        ax.set(xlabel="layer", ylabel="rank", title=panel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def plot_spectra(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    path: Path | str,
    *,
    title: str,
    marks: Mapping[str, float] | None = None,
) -> Path:
    """Singular values σ_i / σ_1 (log scale) against i: one panel per branch, a line per layer.

    `marks` = {label: rank} draws vertical lines, e.g. the uniform rank of each budget.
    """
    fig, axes = _figure(5.5 * len(panels), 4.2, len(panels))
    for ax, (panel, curves) in zip(axes, panels.items()):
        for label, sigma in curves.items():
            top = max(sigma) if len(sigma) else 0.0
            if top > 0:
                ax.plot(range(1, len(sigma) + 1), [max(s / top, 1e-12) for s in sigma], label=label)
        for label, rank in (marks or {}).items():
            ax.axvline(rank, linestyle=":", color="grey")
            ax.annotate(label, (rank, 1.0), rotation=90, fontsize="x-small", va="top", ha="right", color="grey")
        ax.set(xlabel="index i", ylabel="σ_i / σ_1", title=panel, yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def plot_layer_errors(panels: Mapping[str, Mapping[str, Sequence[float]]], path: Path | str, *, title: str) -> Path:
    """Per-layer errors (log scale): one panel per quantity (e.g. "K relative error"), one line per run."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(5.0 * len(panels), 4.0, len(panels))
    for ax, (panel, curves) in zip(axes, panels.items()):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for label, values in curves.items():
            ax.plot(range(len(values)), [max(v, 1e-12) for v in values], marker="o", markersize=3, label=label)
        ax.set(xlabel="layer", title=panel, yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return _save(fig, path)
