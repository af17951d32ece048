"""What the reproduction scripts write: `<out>/<result>_<scale>.md` (markdown tables, the
runs behind them) and `.png` (plots shaped like the paper's), and the Figure-3-shaped page
of a sweep (`write_sweep`). Every plot returns what it drew, read back from the axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs import short_path
from scores import fmt, human, mean_std, param_count, score_label

from prompt_jax.model_dir import BEST, CONFIG, METRICS

if TYPE_CHECKING:
    from sweep import Results, Sweep

Series = Mapping[str, Mapping[str, Sequence[float]]]  # label -> size -> one score per seed


@dataclasses.dataclass(frozen=True)
class Plot:
    """A written PNG and what it shows: panel (its y label) -> series (a line's or a bar's
    label; an unlabelled bar's x tick) -> [(x, y)] as drawn."""

    path: Path
    drawn: dict[str, dict[str, list[tuple[float, float]]]]


def output(sweep: Sweep, stem: str) -> tuple[Path, Path]:
    """(table, plot) paths for a result at the sweep's scale: <out>/<stem>_<scale>.{md,png}."""
    base = sweep.out / f"{stem}_{sweep.scale_name}"
    return base.with_suffix(".md"), base.with_suffix(".png")


# --------------------------------------------------------------------------- markdown


def write_markdown(path: Path, title: str, paragraphs: Sequence[str],
                   tables: Sequence[tuple[Sequence[str], Sequence[Sequence[Any]]]] = (),
                   after: Sequence[str] = ()) -> Path:
    """A markdown file: title, paragraphs, tables (header, rows), closing paragraphs."""
    parts = [f"# {title}", *paragraphs]
    for header, rows in tables:
        lines = ["| " + " | ".join(map(str, header)) + " |",
                 "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        parts.append("\n".join(lines))
    parts += list(after)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {short_path(path)}", flush=True)
    return path


def run_list(dirs: Mapping[str, Path]) -> str:
    """A markdown list of the runs behind a table."""
    return (f"Runs (MODEL_DIRs; each has {CONFIG}, {METRICS}, {BEST}):\n\n"
            + "\n".join(f"- {label}: `{short_path(d)}`" for label, d in dirs.items()))


def write_sweep(sweep: Sweep, results: Results, stem: str, title: str, variable: str,
                paragraphs: Sequence[str]) -> tuple[Path, Plot]:
    """The Figure-3-shaped outputs: a table (variant x size, mean ± std over seeds; per task
    when there are several) and the plot of score vs model size."""
    table, plot = output(sweep, stem)
    label = score_label(sweep.tasks, {m: 0 for t in sweep.tasks
                                      for m in results.metric_names.get(t, [])})
    params = {s: param_count(s) for s in sweep.sizes}
    header = [variable] + [f"{s} ({human(params[s])})" for s in sweep.sizes]
    rows = [[name] + [fmt(by_size.get(s)) if (name, s) not in results.missing
                      else f"not run: {results.missing[(name, s)]}" for s in sweep.sizes]
            for name, by_size in results.series.items()]
    tables = [(header, rows)]
    if len(sweep.tasks) > 1:
        rows = [[name, s, t, fmt(v)] for (name, s, t), v in results.by_task.items()]
        tables.append(([variable, "size", "task", "task score"], rows))
    if results.diagnostics:  # what moves where the official metric cannot (tiny models)
        def cell(ds, key, digits):
            values = [d[key] for d in ds if key in d]
            return fmt(values, digits) if len(values) == len(ds) else "—"

        rows = [[name, s, t, cell(ds, "rank_accuracy", 1), cell(ds, "loss", 3)]
                for (name, s, t), ds in results.diagnostics.items()]
        tables.append(([variable, "size", "task", "rank accuracy (last eval)",
                        "validation loss per token (last eval)"], rows))
    baseline = sweep.majority_baseline()
    write_markdown(table, title, [*paragraphs, *sweep.setup_lines(),
                                  f"Cells: {label} (best validation eval of each run), mean ± "
                                  f"std over seeds. Predicting the majority class scores "
                                  f"{baseline:.1f}."], tables, [run_list(results.dirs)])
    return table, plot_vs_size(plot, title, label, results.series, params, baseline,
                               loss=loss_series(results))


def loss_series(results: Results) -> dict[str, dict[str, list[float]]]:
    """label -> size -> validation loss per seed (last eval; averaged over tasks), for the
    runs whose every eval logged it."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for (label, size, _), ds in results.diagnostics.items():
        values = [d["loss"] for d in ds if "loss" in d]
        if values and len(values) == len(ds):
            out.setdefault(label, {}).setdefault(size, []).append(values)
    return {label: {size: [sum(seed) / len(seed) for seed in zip(*per_task, strict=True)]
                    for size, per_task in by_size.items()}
            for label, by_size in out.items()}


# --------------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_size(path: Path, title: str, ylabel: str, series: Series,
                 params: Mapping[str, int], baseline: float | None = None,
                 loss: Series | None = None) -> Plot:
    """The paper's Figure 1/3 shape: score vs model parameters (log x), one line per
    series (mean, std band over seeds). series: label -> {size: scores}. With one size
    only, bars (one per series) at that size instead. `baseline`: a dashed line (the
    majority-class score). `loss` (same shape as `series`): a second panel with the
    validation loss per token, which moves where tiny models' scores cannot."""
    sizes = sorted({s for by_size in series.values() for s, v in by_size.items() if v},
                   key=params.get)
    if not sizes:
        return plot_message(path, title, "no finished run to plot")
    plt = pyplot()
    panels = [(series, ylabel, baseline)]
    if loss and any(v for by_size in loss.values() for v in by_size.values()):
        panels.append((loss, "validation loss per token (lower is better)", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (values, label, line) in zip(axes[0], panels, strict=True):
        _draw_vs_size(ax, values, sizes, params, label, line, bars_from_zero=line is not None)
    fig.suptitle(title)
    return save_figure(fig, path)


def _draw_vs_size(ax, series: Series, sizes: list[str], params: Mapping[str, int],
                  ylabel: str, baseline: float | None, bars_from_zero: bool) -> None:
    if len(sizes) > 1:
        for label, by_size in series.items():
            xs = [params[s] for s in sizes if by_size.get(s)]
            stats = [mean_std(by_size[s]) for s in sizes if by_size.get(s)]
            ax.plot(xs, [m for m, _ in stats], marker="o", label=label)
            ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks([params[s] for s in sizes], [f"{s}\n{human(params[s])}" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("Model Parameters")
    else:
        labels = [label for label, by_size in series.items() if by_size.get(sizes[0])]
        stats = [mean_std(series[label][sizes[0]]) for label in labels]
        bars = ax.bar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats],
                      color=[f"C{i}" for i in range(len(labels))], capsize=3)
        ax.bar_label(bars, fmt="%.1f" if bars_from_zero else "%.3f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlabel(f"one model size: {sizes[0]} ({human(params[sizes[0]])} parameters)")
        values = [m for m, _ in stats] + ([baseline] if baseline is not None else [])
        if bars_from_zero:
            _bar_ylim(ax, values)
        elif values:
            lo, hi = min(values), max(values)
            pad = max((hi - lo) * 0.3, 0.05 * hi)
            ax.set_ylim(lo - pad, hi + pad)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1,
                   label=f"majority class ({baseline:.1f})")
    ax.set_ylabel(ylabel)
    if len(sizes) > 1 or baseline is not None:
        ax.legend(fontsize=8)


def plot_bars(path: Path, title: str, ylabel: str, groups: Mapping[str, Mapping[str, float]]
              ) -> Plot:
    """Grouped bars: groups (x positions) -> {bar label: value}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(groups) + 2), 4))
    labels = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(len(labels), 1)
    values = []
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        ys = [g.get(label, float("nan")) for g in groups.values()]
        values += [y for y in ys if y == y]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    _bar_ylim(ax, values)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_message(path: Path, title: str, message: str) -> Plot:
    """A figure that says why there is nothing to plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=9)
    return save_figure(fig, path)


def _bar_ylim(ax, values: Sequence[float]) -> None:
    if values:
        lo, hi = min(values), max(values)
        pad = max((hi - lo) * 0.5, 2.0)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)


def save_figure(fig, path: Path) -> Plot:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plot = Plot(path, drawn(fig))
    pyplot().close(fig)
    print(f"wrote {short_path(path)}", flush=True)
    return plot


def drawn(fig) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """What each panel of `fig` shows (see Plot): labelled lines' points, bars' centres and
    heights."""
    from matplotlib.container import BarContainer

    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for ax in fig.axes:
        panel = out.setdefault(ax.get_ylabel(), {})
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                panel[line.get_label()] = [(float(x), float(y)) for x, y in
                                           zip(line.get_xdata(), line.get_ydata(), strict=True)]
        ticks = {round(float(x), 6): t.get_text()
                 for x, t in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)}
        for bars in ax.containers:
            if not isinstance(bars, BarContainer):
                continue
            for bar in bars:
                x = round(bar.get_x() + bar.get_width() / 2, 6)
                name = bars.get_label() if not bars.get_label().startswith("_") else ticks[x]
                panel.setdefault(name, []).append((x, float(bar.get_height())))
    return out
