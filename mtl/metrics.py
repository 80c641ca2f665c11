"""Probabilities, the 18-class recombination, and the competition's metrics.

`head_probs` turns any architecture's logits into per-task probabilities; `recombine` is THE
18-class recombination (argmax over the product mask x gender x age of the heads' probabilities,
or the joint head's own distribution), used by validation, predict.py, ensembles and tuning.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from mtl import labels


def head_probs(outputs: dict) -> dict:
    """Logits of any architecture -> {'mask': (B,3), 'gender': (B,2), 'age': (B,3)} (+ 'joint' (B,18), 'age_reg')."""
    probs = {}
    if "joint" in outputs:
        joint = F.softmax(outputs["joint"].float(), dim=1)
        probs["joint"] = joint
        cube = joint.view(-1, 3, 2, 3)
        probs["mask"], probs["gender"], probs["age"] = cube.sum((2, 3)), cube.sum((1, 3)), cube.sum((1, 2))
    else:
        probs["mask"] = F.softmax(outputs["mask"].float(), dim=1)
        female = torch.sigmoid(outputs["gender"].float())
        probs["gender"] = torch.stack([1 - female, female], dim=1)
        probs["age"] = F.softmax(outputs["age"].float(), dim=1)
    if "age_reg" in outputs:
        probs["age_reg"] = outputs["age_reg"].float()
    return probs


def recombine(probs: dict):
    """(B, 18) class probabilities: the joint head's, else the product of the three heads' (class = m*6+g*3+a)."""
    if "joint" in probs:
        return probs["joint"]
    m, g, a = probs["mask"], probs["gender"], probs["age"]
    if isinstance(m, np.ndarray):
        return np.einsum("bi,bj,bk->bijk", m, g, a).reshape(len(m), labels.NUM_JOINT)
    return torch.einsum("bi,bj,bk->bijk", m, g, a).reshape(m.shape[0], labels.NUM_JOINT)  # NOTE: traceable


def predict_classes(probs: dict) -> np.ndarray:
    """18-class predictions (argmax of the recombination)."""
    joint = recombine(probs)
    joint = joint.detach().cpu().numpy() if isinstance(joint, torch.Tensor) else joint
    return joint.argmax(1)


def macro_f1(y_true, y_pred) -> float:
    """The competition metric: sklearn's macro F1 over the classes present in truth or prediction."""
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def truth_labels(truth: dict, schema) -> tuple:
    """(mask, gender, age_group) arrays of truth {'mask', 'gender', 'age_group' or 'age_years'/'age' in years}."""
    mask, gender = np.asarray(truth["mask"]), np.asarray(truth["gender"])
    if "age_group" in truth:
        return mask, gender, np.asarray(truth["age_group"])
    years = truth.get("age_years", truth.get("age"))
    return mask, gender, labels.as_schema(schema).group(np.asarray(years))


def score(probs: dict, truth: dict, schema, pred=None) -> dict:
    """Validation metrics from numpy probabilities and truth {'mask', 'gender', 'age_group', 'age_years'}.

    Keys: f1 (18-class macro F1, the competition metric), acc, {task}_f1, {task}_acc, and with an
    age-regression head age_reg_mae, age_reg_f1/acc (age group read off the regressed age) and
    f1_age_reg (18-class F1 with that age group). `schema` is the LabelSchema (or an age threshold);
    truth without 'age_group' gets it from 'age_years' (or 'age', in years). `pred` gives the 18-class
    answers when they do not come from recombining probs (a hard-voting ensemble).
    """
    schema = labels.as_schema(schema)
    mask, gender, age_grp = truth_labels(truth, schema)
    years = truth.get("age_years", truth.get("age"))
    pred = predict_classes(probs) if pred is None else np.asarray(pred)
    pm, pg, pa = labels.decode(pred)
    true_joint = labels.encode(mask, gender, age_grp)
    out = {"f1": macro_f1(true_joint, pred), "acc": float(accuracy_score(true_joint, pred))}
    for task, t, p in (("mask", mask, pm), ("gender", gender, pg), ("age", age_grp, pa)):
        out[f"{task}_f1"], out[f"{task}_acc"] = macro_f1(t, p), float(accuracy_score(t, p))
    if "age_reg" in probs:
        reg = np.asarray(probs["age_reg"])
        reg_grp = schema.group(np.round(reg))
        out["age_reg_mae"] = float(np.abs(reg - np.asarray(years)).mean())
        out["age_reg_f1"], out["age_reg_acc"] = macro_f1(age_grp, reg_grp), float(accuracy_score(age_grp, reg_grp))
        out["f1_age_reg"] = macro_f1(true_joint, labels.encode(pm, pg, reg_grp))
    return out


def confusion(y_true, y_pred, n_classes) -> np.ndarray:
    """Confusion matrix over all n classes (rows: truth, columns: prediction)."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def per_class_report(y_true, y_pred, names) -> list[dict]:
    """Precision, recall, F1 and support per class, one dict per class."""
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(len(names))), zero_division=0)
    return [{"class": i, "name": n, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "support": int(s[i])} for i, n in enumerate(names)]
