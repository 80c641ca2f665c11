"""Answers tuned for macro F1: per-class offsets on log-probabilities, fitted after training on validation people.

The competition scores 18-class macro F1 over imbalanced classes, but an argmax of the heads' probabilities
answers for accuracy: a rare class whose probabilities run low is seldom predicted. `fit` finds one additive
offset per class and decision ('mask' (3,), 'gender' (2,), 'age' (3,) for the per-task heads, or 'joint'
(18,) for a joint18 model) that maximises the 18-class macro F1 of the recalibrated answers on the data it
is given; `apply` (numpy) and `apply_torch` / `CalibrationLayer` (torch, traceable for ONNX and TorchScript
export) turn probabilities p into softmax(log p + offset) per decision, so recombination, ensembles, votes
and probability files all see calibrated probabilities. A `Calibration` is plain data (`to_dict`,
`from_dict`) stored in checkpoints and model.json.

How `fit` works, in four steps:
1. photos whose truth is unknown for any task (-1, partial-label data) are left out; the rest are `fitted_on`;
2. each decision's first class keeps offset 0 (only differences between offsets change an answer), and so
   does every class with fewer than `min_support` (5) photos in the truth, so a class absent from validation
   is not pushed away just because predicting it cannot pay there; under `min_photos` (200) nothing moves;
3. coordinate ascent: for one free offset at a time, every value on the grid (-4..4 by 0.05) is scored at
   once (where each photo's answer switches, then cumulative confusion counts: `f1_over_grid`, equal to
   `metrics.macro_f1` of the answers at each value); the offset moves to the best value, the one nearest 0
   among equals, if that beats the current value by more than `min_gain` (0.002); sweeps over the free
   offsets repeat until one moves nothing;
4. the result is scored by `metrics.predict_classes` / `metrics.macro_f1` themselves (f1_before, f1_after),
   and kept only if it raises F1 on these photos by more than `min_gain`; offsets that do not are searched
   for once more without the smoothing below, and if those do not either, every offset stays 0. So fit
   never lowers F1 on the photos it is given, and changes no answer of a model it cannot improve there;
5. given `groups` (who each photo shows), the same fit is cross-validated by person (5 folds: fitted on
   the other folds' people, each fold's photos answered with those offsets), and the offsets are kept only
   if that raises F1 by more than `min_gain` on people they were not fitted on (`cv_gain`). Validation
   sets hold few people (seven photos each in the competition), so a gain on the photos fitted can be
   that of a handful of people; training passes the person ids. `tasks` limits which heads may move.

Guarding against overfitting a small validation set: the value scored in step 3 is not F1 at that offset
but F1 averaged over every grid value within `smooth` (0.8) of it, the expected F1 when the boundary is
nudged by up to 0.8 in log-probability. A spike that one or two photos make scores low; a broad plateau,
an answer many photos back, scores high; and the offset lands inside a plateau, not at its edge next to
the last photo it flipped. On synthetic heads (`python -m bench.calibration`: 8 seeds, gains scored on
20,000 photos not fitted) smoothing raised the gain on new photos from +0.013 to +0.027 when fitting 300
photos and from +0.046 to +0.057 at 2,700 (joint18: +0.013 to +0.028, +0.047 to +0.056); fitted on 100
photos, a joint18 model lost F1 on new photos even smoothed (-0.022), and gained little at 150, hence
`min_photos`. The other guards are `min_gain`, `min_support`, the offsets' bounds and step 4.
Ties go to the smaller offset, so a model that is already optimal keeps every answer (offsets all 0, and
`apply` then returns its probabilities bit for bit). No temperature is fitted: it cannot change an argmax,
so it cannot change F1.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from mtl import labels, metrics
from mtl.errors import ConfigError

VERSION = 1
HEAD_TASKS = labels.TASKS                                    # the per-task decisions: mask, gender, age
SIZES = {**labels.NUM_CLASSES, "joint": labels.NUM_JOINT}    # offsets per decision
# NOTE: class = mask*6 + gender*3 + age: each task's answer times its place value, summed
PLACE = {"mask": 6, "gender": 3, "age": 1, "joint": 1}
LIMIT, STEP = 4.0, 0.05                                      # the offsets' grid: -4..4 by 0.05
SMOOTH = 0.8                                                  # F1 averaged over offsets within +-0.8 of each value
MIN_GAIN = 0.002
MIN_PHOTOS = 200
MIN_SUPPORT = 5
MAX_SWEEPS = 20
CV_FOLDS = 5                                                  # person-level folds of the cross-validated check
EPS = 1e-30                                                   # log(0) stand-in: such a class never wins


class CalibrationError(ConfigError, ValueError):
    """A calibration record that cannot be read, or one that does not fit the probabilities it is applied to."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-class additive offsets on log-probabilities, per decision: {'mask': (3,), 'gender': (2,), 'age': (3,)}
    for the per-task heads, or {'joint': (18,)} for a joint18 model; fitted to maximise 18-class macro F1.

    f1_before / f1_after: 18-class macro F1 on the photos it was fitted on, before and after; fitted_on: how
    many photos (those with every task's truth known); notes: what fit could not do (too few photos, a class
    without support), one line each, for the caller to log.
    """
    offsets: dict
    f1_before: float
    f1_after: float
    fitted_on: int
    notes: tuple = ()
    cv_gain: float | None = None

    def __post_init__(self):
        offsets = check_offsets(self.offsets)
        for name in ("f1_before", "f1_after"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise CalibrationError(f"calibration {name} must be a number from 0 to 1, got {value!r}")
        if isinstance(self.fitted_on, bool) or not isinstance(self.fitted_on, int | np.integer) or self.fitted_on < 0:
            raise CalibrationError(f"calibration fitted_on must be a count of photos, got {self.fitted_on!r}")
        notes = self.notes
        if isinstance(notes, str) or not isinstance(notes, list | tuple) or not all(isinstance(n, str) for n in notes):
            raise CalibrationError(f"calibration notes must be a list of strings, got {notes!r}")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "f1_before", float(self.f1_before))
        object.__setattr__(self, "f1_after", float(self.f1_after))
        object.__setattr__(self, "fitted_on", int(self.fitted_on))
        object.__setattr__(self, "notes", tuple(notes))
        if self.cv_gain is not None:
            if not (_is_number(self.cv_gain) and -1.0 <= self.cv_gain <= 1.0):
                raise CalibrationError(f"calibration cv_gain must be a number from -1 to 1, got {self.cv_gain!r}")
            object.__setattr__(self, "cv_gain", float(self.cv_gain))

    @property
    def joint(self) -> bool:
        """Whether this calibrates a joint18 model's 18-way distribution (else the three heads)."""
        return "joint" in self.offsets

    @property
    def is_identity(self) -> bool:
        """Whether every offset is 0 (apply then returns the probabilities untouched)."""
        return not any(any(v) for v in self.offsets.values())

    def to_dict(self) -> dict:
        """Plain data (JSON-able, and loadable by torch.load(weights_only=True)) for checkpoints and model.json."""
        return {"version": VERSION, "offsets": {t: list(v) for t, v in self.offsets.items()},
                "f1_before": self.f1_before, "f1_after": self.f1_after, "fitted_on": self.fitted_on,
                "notes": list(self.notes), "cv_gain": self.cv_gain}

    @classmethod
    def from_dict(cls, record) -> Calibration:
        """The Calibration a to_dict record describes, or a one-line CalibrationError (a ConfigError and ValueError)."""
        if not isinstance(record, dict):
            raise CalibrationError(f"calibration record must be a mapping, got {type(record).__name__}")
        if record.get("version") != VERSION:
            raise CalibrationError(f"calibration record version {record.get('version')!r} is not one this mtl "
                                   f"reads ({VERSION})")
        missing = [k for k in ("offsets", "f1_before", "f1_after", "fitted_on") if k not in record]
        if missing:
            raise CalibrationError(f"calibration record lacks {', '.join(missing)}")
        return cls(record["offsets"], record["f1_before"], record["f1_after"], record["fitted_on"],
                   record.get("notes", ()), record.get("cv_gain"))


def summary(calibration: Calibration) -> str:
    """What a calibration did, for logs: F1 before and after on the photos fitted, the gain cross-validated by person,
    the offsets that moved; then each note on a line of its own."""
    moved = "; ".join(f"{task} {' '.join(f'{v:+.2f}' for v in offs)}"
                      for task, offs in calibration.offsets.items() if any(offs)) or "all 0"
    cv = f", {calibration.cv_gain:+.4f} cross-validated by person" if calibration.cv_gain is not None else ""
    line = (f"18-class F1 {calibration.f1_before:.4f} -> {calibration.f1_after:.4f} on the {calibration.fitted_on} "
            f"photos fitted{cv}; offsets {moved}")
    return "\n".join([line, *(f"  {note}" for note in calibration.notes)])


def _is_number(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool) \
        and math.isfinite(value)


def check_offsets(offsets) -> dict:
    """Offsets as {decision: tuple of floats} in canonical order; CalibrationError (one line) unless well formed."""
    if not isinstance(offsets, dict):
        raise CalibrationError(f"calibration offsets must be a mapping, got {type(offsets).__name__}")
    keys = set(offsets)
    if keys == {"joint"}:
        order = ("joint",)
    elif keys == set(HEAD_TASKS):
        order = HEAD_TASKS
    else:
        raise CalibrationError(f"calibration offsets must be for mask, gender and age, or for joint alone, got "
                               f"{', '.join(map(str, offsets)) or 'none'}")
    out = {}
    for task in order:
        values = offsets[task]
        if isinstance(values, np.ndarray | torch.Tensor):
            values = values.tolist()
        if not isinstance(values, list | tuple) or len(values) != SIZES[task]:
            raise CalibrationError(f"calibration offsets[{task!r}] must be {SIZES[task]} numbers, got {values!r}")
        if not all(_is_number(v) for v in values):
            raise CalibrationError(f"calibration offsets[{task!r}] must be finite numbers, got {list(values)!r}")
        out[task] = tuple(float(v) for v in values)
    return out


# ---------------------------------------------------------------- applying offsets (numpy and torch, one code)
def _reweighed(probs: dict, weights: dict) -> dict:
    """probs with each decision's p replaced by p * weight / sum (= softmax(log p + offset)); numpy or torch.

    A 'joint' decision replaces the 18-way distribution and recomputes the per-task marginals from it exactly
    as metrics.head_probs does; every other key (age_reg, ...) is kept as it is.
    """
    out = dict(probs)
    for task, w in weights.items():
        p = probs[task] * w
        out[task] = p / p.sum(1)[:, None]
    if "joint" in weights:
        cube = out["joint"].reshape(-1, 3, 2, 3)
        out["mask"], out["gender"], out["age"] = cube.sum((2, 3)), cube.sum((1, 3)), cube.sum((1, 2))
    return out


def _check_fits(probs: dict, calibration: Calibration):
    if calibration.joint and "joint" not in probs:
        raise CalibrationError("a calibration fitted on a joint18 model's 18-way probabilities cannot apply to "
                               "per-task heads' probabilities (no 'joint')")
    if not calibration.joint and "joint" in probs:
        raise CalibrationError("a calibration fitted on per-task heads cannot apply to a joint18 model's "
                               "probabilities: its answers come from 'joint'")


def apply(probs: dict, calibration: Calibration | None) -> dict:
    """Calibrated numpy probabilities (a new dict; softmax(log p + offset) per decision); None -> probs as given."""
    if calibration is None:
        return probs
    _check_fits(probs, calibration)
    weights = {}
    for task, offs in calibration.offsets.items():
        p = np.asarray(probs[task])
        if any(offs):  # NOTE: all-zero offsets leave a decision's probabilities bit for bit as they were
            dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
            weights[task] = np.exp(np.asarray(offs, dtype=np.float64)).astype(dtype)
    return _reweighed({k: np.asarray(v) for k, v in probs.items()}, weights)


def apply_torch(probs: dict, calibration: Calibration | None) -> dict:
    """apply for torch tensors (any device; traceable: the offsets become constants of the graph)."""
    if calibration is None:
        return probs
    _check_fits(probs, calibration)
    weights = {task: torch.tensor(offs, dtype=torch.float64).exp().to(probs[task].dtype).to(probs[task].device)
               for task, offs in calibration.offsets.items() if any(offs)}
    return _reweighed(probs, weights)


class CalibrationLayer(nn.Module):
    """apply_torch as a module, offsets held as (non-persistent) buffers: {probs} -> {calibrated probs}.

    For exported models (DeployModel): traced by torch.jit.trace and torch.onnx.export (dynamo); the buffers
    follow .to(device) and stay out of the model's state_dict (the checkpoint stores Calibration.to_dict).
    """

    def __init__(self, calibration: Calibration | None):
        super().__init__()
        self.joint = calibration is not None and calibration.joint
        self.tasks = [t for t, offs in calibration.offsets.items() if any(offs)] if calibration is not None else []
        for task in self.tasks:
            weight = torch.tensor(calibration.offsets[task], dtype=torch.float64).exp().float()
            self.register_buffer(f"weight_{task}", weight, persistent=False)

    def forward(self, probs: dict) -> dict:
        if not self.tasks:
            return probs
        if self.joint != ("joint" in probs):
            raise CalibrationError("this calibration was fitted for another architecture (joint18 vs per-task heads)")
        return _reweighed(probs, {t: getattr(self, f"weight_{t}").to(probs[t].dtype) for t in self.tasks})


# ---------------------------------------------------------------- fitting
def fast_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = labels.NUM_JOINT) -> np.ndarray:
    """metrics.macro_f1 for many candidate answers at once: y_pred (..., N) of ints -> macro F1 (...,).

    The same definition (sklearn's: mean F1 over the classes present in truth or prediction), from bincount
    confusion counts instead of sklearn.
    """
    y_pred = np.asarray(y_pred)
    pred = y_pred.reshape(-1, y_pred.shape[-1])
    cells = np.arange(len(pred))[:, None] * n_classes + pred
    size = len(pred) * n_classes
    predicted = np.bincount(cells.ravel(), minlength=size).reshape(-1, n_classes)
    tp = np.bincount(cells[pred == y_true[None, :]], minlength=size).reshape(-1, n_classes)
    return _macro_f1_of_counts(tp, predicted, np.bincount(y_true, minlength=n_classes)).reshape(y_pred.shape[:-1])


def _macro_f1_of_counts(tp, predicted, actual) -> np.ndarray:
    """Macro F1 (..., ) from per-class true positives and predicted counts (..., K) and the truth's counts (K,)."""
    denom = predicted + actual
    present = denom > 0
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(denom.shape), where=present)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def _class_truth(truth: dict, schema) -> np.ndarray:
    """The 18-class truth, UNKNOWN (-1) where any task's truth is unknown."""
    return np.asarray(labels.encode(*metrics.truth_labels(truth, schema)), dtype=np.int64).reshape(-1)


def _take(probs: dict, rows) -> dict:
    """The rows of the probabilities the answers come from (mask, gender, age, joint)."""
    return {k: np.asarray(v)[rows] for k, v in probs.items() if k in SIZES}


def fit(probs: dict, truth: dict, schema, *, groups=None, tasks=None, folds: int = CV_FOLDS, limit: float = LIMIT,
        step: float = STEP, smooth: float = SMOOTH, min_gain: float = MIN_GAIN, min_photos: int = MIN_PHOTOS,
        min_support: int = MIN_SUPPORT, max_sweeps: int = MAX_SWEEPS) -> Calibration:
    """Offsets maximising the 18-class macro F1 of apply(probs) against truth (see the module's docstring).

    probs: numpy per-task probabilities ('mask' (N,3), 'gender' (N,2), 'age' (N,3), optionally 'joint' (N,18):
    then the 18 joint offsets are fitted, as recombine answers from 'joint'); truth: what metrics.score takes;
    schema: the LabelSchema (or age threshold) that reads truth's ages. Uses only the photos given. Offsets
    lie on a grid from -limit to limit by step; smooth is the half-width of the neighbourhood F1 is averaged over.
    groups: who each photo shows (person ids): the offsets are then kept only if, cross-validated by person
    (`folds` folds: fitted on the others, scored on each fold's people), they raise F1 by more than min_gain on
    people they were not fitted on (cv_gain records that estimate). tasks: the heads whose offsets may move
    (default all three; ignored for joint18, whose 18 offsets all may).
    """
    schema = labels.as_schema(schema)
    decisions = ("joint",) if "joint" in probs else HEAD_TASKS
    movable = set(decisions) if tasks is None or decisions == ("joint",) else set(tasks)
    if not movable <= set(decisions):
        raise ValueError(f"tasks must be among {', '.join(decisions)}, got {', '.join(sorted(movable))}")
    y_all = _class_truth(truth, schema)
    for task in decisions:
        shape = np.shape(probs[task]) if task in probs else "missing"
        if shape != (len(y_all), SIZES[task]):
            raise ValueError(f"probs[{task!r}] has shape {shape}, expected ({len(y_all)}, {SIZES[task]}) "
                             f"for {len(y_all)} photos of truth")
    known = y_all >= 0
    y, kept = y_all[known], _take(probs, known)
    n, notes = len(y), []
    zeros = {t: (0.0,) * SIZES[t] for t in decisions}
    if n == 0:
        return Calibration(zeros, 0.0, 0.0, 0, ("no photo has every task's truth known: offsets left at 0",))
    f1_before = metrics.macro_f1(y, metrics.predict_classes(kept))
    if n < min_photos:
        notes.append(f"only {n} photos with every task's truth known (< {min_photos}): offsets left at 0")
        return Calibration(zeros, f1_before, f1_before, n, tuple(notes))

    # 1. which offsets may move: not a decision's first class, nor a class with too little support
    truths = dict(zip(HEAD_TASKS, labels.split_index(y))) if decisions == HEAD_TASKS else {"joint": y}
    free = []
    for task in decisions:
        support = np.bincount(truths[task], minlength=SIZES[task])
        names = schema.joint_names if task == "joint" else schema.class_names[task]
        rare = [c for c in range(1, SIZES[task]) if support[c] < min_support]
        if rare:
            notes.append(f"{task}: fewer than {min_support} photos of " + ", ".join(names[c] for c in rare)
                         + ": offset left at 0")
        if task in movable:
            free += [(task, c) for c in range(1, SIZES[task]) if support[c] >= min_support]

    # 2. coordinate ascent on the smoothed F1, then (should that not raise F1 on these photos) on F1 itself
    logp = {t: np.log(np.maximum(np.asarray(kept[t], dtype=np.float64), EPS)) for t in decisions}
    steps = int(round(limit / step))
    grid = np.arange(-steps, steps + 1) * step
    windows = dict.fromkeys((int(round(smooth / step)), 0))
    for window in windows:
        found = _ascend(logp, y, free, grid, window, min_gain, max_sweeps)
        fitted = Calibration({t: tuple(round(float(v), 6) for v in found[t]) for t in decisions}, f1_before,
                             f1_before, n, tuple(notes))
        if fitted.is_identity:
            break
        # 3. scored by the metric itself on the calibrated probabilities; kept only for a gain above min_gain
        f1_after = metrics.macro_f1(y, metrics.predict_classes(apply(kept, fitted)))
        if f1_after > f1_before + min_gain:
            fitted = dataclasses.replace(fitted, f1_after=f1_after)
            break
        notes.append(f"the offsets found {'with' if window else 'without'} smoothing score {f1_after:.4f} on these "
                     f"photos, not above {f1_before:.4f} + {min_gain:g}: not kept")
    else:
        return Calibration(zeros, f1_before, f1_before, n, tuple(notes))
    if fitted.is_identity:
        return Calibration(zeros, f1_before, f1_before, n, tuple(notes))
    if groups is None:
        return fitted
    # 4. the same fit, cross-validated by person: does it raise F1 on people it was not fitted on?
    options = dict(tasks=tasks, limit=limit, step=step, smooth=smooth, min_gain=min_gain, min_photos=min_photos,
                   min_support=min_support, max_sweeps=max_sweeps)
    gain = cross_validated_gain(kept, y, np.asarray(groups)[known], schema, folds, options)
    if gain is None:
        notes.append(f"too few people to cross-validate the offsets by person (< {folds * 2}): not kept")
        return Calibration(zeros, f1_before, f1_before, n, tuple(notes))
    if gain <= min_gain:
        notes.append(f"cross-validated by person, the offsets change F1 on people they were not fitted on by "
                     f"{gain:+.4f} (not above {min_gain:g}): not kept")
        return Calibration(zeros, f1_before, f1_before, n, tuple(notes), cv_gain=gain)
    return dataclasses.replace(fitted, cv_gain=gain)


def cross_validated_gain(probs: dict, y: np.ndarray, groups: np.ndarray, schema, folds: int, options: dict):
    """F1 of the answers when each person's photos are calibrated by offsets fitted on the other folds' people,
    minus F1 of the raw answers (None with fewer than 2 * folds people). Folds are drawn by a fixed seed."""
    people = np.unique(groups)
    if len(people) < 2 * folds:
        return None
    fold_of_person = np.random.default_rng(0).permutation(len(people)) % folds
    fold = fold_of_person[np.searchsorted(people, groups)]
    truth = dict(zip(("mask", "gender", "age_group"), labels.split_index(y)))
    answers = metrics.predict_classes(probs).copy()
    raw = answers.copy()
    for k in range(folds):
        train, held = fold != k, fold == k
        offsets = fit(_take(probs, train), {t: v[train] for t, v in truth.items()}, schema, **options)
        answers[held] = metrics.predict_classes(apply(_take(probs, held), offsets))
    return metrics.macro_f1(y, answers) - metrics.macro_f1(y, raw)


def switch_points(logp: np.ndarray, offsets: np.ndarray, c: int, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where one decision's answer argmax(logp + offsets) changes as offset c runs over the (rising) grid.

    Returns (rival, first), both (N,): a photo is answered rival (its best class other than c) at grid values
    before index first and c from first on (first = len(grid): never). Exactly numpy's argmax, ties included.
    """
    others = logp + offsets
    others[:, c] = -np.inf
    rival = others.argmax(1)
    rival_score = np.take_along_axis(others, rival[:, None], 1)[:, 0]
    mine = logp[:, c]

    def wins(g):  # NOTE: argmax takes the first of equal scores: a tie goes to c only when c comes before its rival
        score = mine + grid[np.minimum(g, len(grid) - 1)]
        return (score > rival_score) | ((score == rival_score) & (c < rival))

    # an estimate by subtraction, then moved to the exact first win (the sum's rounding can differ by a step)
    first = np.searchsorted(grid, rival_score - mine)
    while np.any(back := (first > 0) & wins(first - 1)):
        first = first - back
    while np.any(ahead := (first < len(grid)) & ~wins(first)):
        first = first + ahead
    return rival, first


def f1_over_grid(y: np.ndarray, before: np.ndarray, after: np.ndarray, first: np.ndarray, steps: int,
                 n_classes: int = labels.NUM_JOINT) -> np.ndarray:
    """(steps,) macro F1 of the answers at each grid index g: before where g < first, else after (all (N,) ints).

    The confusion counts at g are those of all-before plus the photos switched by g (a cumulative sum), so
    the whole grid costs O(N + steps * classes), not O(N * steps).
    """
    def switched(answers, rows=slice(None)):  # (steps, K): photos switched by index g whose answer there is k
        cells = first[rows] * n_classes + answers[rows]
        return np.bincount(cells, minlength=(steps + 1) * n_classes).reshape(-1, n_classes).cumsum(0)[:steps]

    hit_before, hit_after = before == y, after == y
    predicted = np.bincount(before, minlength=n_classes) - switched(before) + switched(after)
    tp = (np.bincount(before[hit_before], minlength=n_classes) - switched(before, hit_before)
          + switched(after, hit_after))
    return _macro_f1_of_counts(tp, predicted, np.bincount(y, minlength=n_classes))


def _ascend(logp: dict, y, free, grid, window: int, min_gain: float, max_sweeps: int) -> dict:
    """Coordinate ascent of the free offsets on the grid; {decision: offsets array}.

    One offset at a time: the answers at every grid value (switch_points) scored at once (f1_over_grid),
    averaged over window grid values each side; the offset moves to the best value (the smallest |offset| of
    equals) when that beats the current one by more than min_gain. Sweeps repeat until one moves nothing.
    """
    offsets = {t: np.zeros(p.shape[1]) for t, p in logp.items()}
    answers = {t: p.argmax(1) for t, p in logp.items()}
    order = np.argsort(np.abs(grid), kind="stable")
    box = np.ones(2 * window + 1) / (2 * window + 1)
    for _ in range(max_sweeps):
        moved = False
        for task, c in free:
            rival, first = switch_points(logp[task], offsets[task], c, grid)
            rest = sum((PLACE[t] * a for t, a in answers.items() if t != task), np.zeros(len(y), np.int64))
            f1 = f1_over_grid(y, rest + PLACE[task] * rival, rest + PLACE[task] * c, first, len(grid))
            f1 = np.convolve(np.pad(f1, window, mode="edge"), box, mode="valid")  # NOTE: edges extend outward
            here = int(np.argmin(np.abs(grid - offsets[task][c])))
            best = order[np.argmax(f1[order] >= f1.max() - 1e-12)]
            if f1[best] > f1[here] + min_gain:
                offsets[task][c], moved = grid[best], True
                answers[task] = np.where(first <= best, c, rival)
        if not moved:
            break
    return offsets
