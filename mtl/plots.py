"""Figures people would rather look at: confusion matrices and grids of misclassified photos.

Each function returns a matplotlib Figure, which TensorBoard logs (`add_figure`; `epoch_figures` are a
training epoch's) and reports save as PNG (`save_png`). Uses the non-interactive Agg backend, so it runs on
machines with no screen.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtl import labels  # noqa: E402


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


def epoch_figures(val_set, probs, epoch, log_images) -> dict:
    """{TensorBoard tag: figure} of a validation pass: confusion matrices per task and for the 18 classes, and
    the `log_images` most confident mistakes (val_set: a dataset.FaceDataset; probs: its per-task probabilities)."""
    from mtl.metrics import confusion, predict_classes, recombine
    schema = val_set.schema
    pred = predict_classes(probs)
    truth_joint = schema.encode(val_set.mask, val_set.gender, val_set.age_group)
    parts = dict(zip(labels.TASKS, schema.decode(pred)))
    truths = {"mask": val_set.mask, "gender": val_set.gender, "age": val_set.age_group}
    figures = {f"confusion/{task}": confusion_figure(confusion(truths[task], parts[task], len(names)), names,
                                                     f"{task} (epoch {epoch})")
               for task, names in schema.class_names.items()}
    names18 = schema.joint_names
    figures["confusion/18_classes"] = confusion_figure(confusion(truth_joint, pred, labels.NUM_JOINT), names18,
                                                       f"18 classes (epoch {epoch})")
    wrong = np.flatnonzero(pred != truth_joint)
    if len(wrong) and log_images:
        joint = recombine(probs)
        worst = wrong[np.argsort(-joint[wrong, pred[wrong]])][:log_images]
        captions = [f"true {names18[truth_joint[i]]}\npred {names18[pred[i]]} ({joint[i, pred[i]]:.2f})" for i in worst]
        title = f"most confident mistakes, epoch {epoch} (age threshold {schema.age_threshold})"
        figures["misclassified"] = photo_grid([val_set.pixels(i) for i in worst], captions, title)
    return figures


def save_png(fig, path):
    """Write a figure as PNG (atomically) and close it."""
    from mtl.io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
