"""Figures people would rather look at: confusion matrices and grids of misclassified photos.

Each function returns a matplotlib Figure, which TensorBoard logs (`add_figure`) and reports save
as PNG (`save_png`). Uses the non-interactive Agg backend, so it runs on machines with no screen.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_figure(cm: np.ndarray, names, title="") -> plt.Figure:
    """A confusion matrix (rows truth, columns prediction) with counts, coloured by row-normalised share."""
    cm = np.asarray(cm)
    n = len(names)
    size = max(3.5, 0.45 * n + 1.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90 if n > 4 else 0, fontsize=7 if n > 4 else 9)
    ax.set_yticks(range(n), names, fontsize=7 if n > 4 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6 if n > 4 else 9,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def photo_grid(images, captions, title="", columns=8) -> plt.Figure:
    """Photos (RGB uint8 arrays) in a grid, each with its caption (e.g. 'true ... / pred ... (0.93)')."""
    n = max(len(images), 1)
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    # NOTE: constrained layout makes room for the title above the captions; tight_layout ignores a suptitle
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.6 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=6)
    if title:
        fig.suptitle(title)
    return fig


def save_png(fig, path):
    """Write a figure as PNG (atomically) and close it."""
    from mtl.io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
