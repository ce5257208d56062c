"""Matplotlib figures: learning curves, image grids, confusion matrix, dropout comparison."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fmnist_lightning.data import CLASS_NAMES  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _curve_axes(rows_by_label: dict[str, list[dict[str, float]]], path: Path) -> None:
    """The tutorial's two plots side by side: loss and accuracy, training vs validation, per epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in (
        (axes[0], "loss", "Training and validation loss"),
        (axes[1], "acc", "Training and validation accuracy"),
    ):
        for label, rows in rows_by_label.items():
            prefix = f"{label} " if label else ""
            for split, style in (("train", "o-"), ("val", "s--")):
                points = [(r["epoch"], r[f"{split}/{metric}"]) for r in rows if f"{split}/{metric}" in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(
                        xs, ys, style, markersize=3, label=f"{prefix}{'training' if split == 'train' else 'validation'}"
                    )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    _curve_axes({"": rows}, path)


def plot_compare(rows_by_model: dict[str, list[dict[str, float]]], path: Path) -> None:
    _curve_axes(rows_by_model, path)


def image_grid_figure(images: torch.Tensor, titles: Sequence[str], columns: int = 5) -> plt.Figure:
    """A grid of 28x28 grayscale images (uint8 or float in [0, 1]), each with its title (which may
    have two lines: each row leaves room for them)."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(np.asarray(image.squeeze().cpu()), cmap="gray", interpolation="none")
        ax.set_title(title, fontsize=8)
    return fig


def plot_image_grid(images: torch.Tensor, titles: Sequence[str], path: Path, columns: int = 5) -> None:
    _save(image_grid_figure(images, titles, columns), path)


def plot_confusion_matrix(confusion: list[list[int]], path: Path) -> None:
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Confusion matrix (test set)")
    _save(fig, path)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None, path: Path) -> None:
    """The learning-rate range test: smoothed training loss against the learning rate (log scale),
    the suggested rate marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, "-", label="training loss (smoothed)")
    if suggestion is not None:
        i = min(range(len(lrs)), key=lambda k: abs(lrs[k] - suggestion))
        ax.plot(lrs[i], losses[i], "o", color="red", markersize=9, label=f"suggestion: {suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("Learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)


@dataclass(frozen=True)
class SliceParam:
    """One tuned parameter of a study, for `plot_slices`."""

    name: str
    points: list[tuple[Any, float, int]]  # (value drawn, objective, trial number), one per trial
    log: bool = False  # a range on a log scale
    choices: tuple[Any, ...] = ()  # a list of choices, in the space file's order (empty: a range)


def plot_slices(params: Sequence[SliceParam], ylabel: str, path: Path) -> None:
    """Each trial's objective against the value of each parameter (Optuna's slice plot), coloured by
    trial number. Numbers stay numbers on the x axis, choices of numbers too (`batch_size: [64, 128]`,
    ticks at the choices); other choices (true/false, names) are evenly spaced ticks in their order.

    Optuna's own slice plot passes every choice to matplotlib as its repr (the string '64'), which
    matplotlib then places as a category, logging that it did ("Using categorical units...")."""
    fig, axes = plt.subplots(1, len(params), figsize=(max(4.5, 3.2 * len(params)), 4), sharey=True, squeeze=False)
    numbers = [n for p in params for _, _, n in p.points]
    norm = plt.Normalize(min(numbers, default=0), max(numbers, default=1))
    scatter = None
    for ax, p in zip(axes.flat, params):
        values = [v for v, _, _ in p.points]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (*p.choices, *values))
        if numeric:
            xs = [float(v) for v in values]
            if p.log:
                ax.set_xscale("log")
            if p.choices:
                ticks = sorted({float(c) for c in p.choices})
                ax.set_xticks(ticks, [f"{c:g}" for c in ticks])
                ax.minorticks_off()
                pad = (ticks[-1] - ticks[0]) * 0.1 or 1.0
                ax.set_xlim(ticks[0] - pad, ticks[-1] + pad)
        else:
            order = list(p.choices) or list(dict.fromkeys(values))
            xs = [float(order.index(v)) for v in values]
            ax.set_xticks(range(len(order)), [str(c) for c in order])
            ax.set_xlim(-0.5, len(order) - 0.5)
        ys = [y for _, y, _ in p.points]
        scatter = ax.scatter(xs, ys, c=[n for _, _, n in p.points], cmap="Blues", norm=norm, edgecolors="grey")
        ax.set_xlabel(p.name)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel(ylabel)
    if scatter is not None:
        fig.colorbar(scatter, ax=list(axes.flat), label="trial")
    fig.suptitle("Slice plot: each trial's value of each parameter")
    _save(fig, path)
