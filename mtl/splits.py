"""Person-level folds: the seven photos of one person never sit in two folds.

Folds are drawn over people, stratified on gender x age group at the competition's own 60-year
boundary (not the training threshold, so moving --age-threshold never changes the folds), and
are deterministic under a seed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mtl import labels
from mtl.checks import check_fold
from mtl.errors import ConfigError

STRATIFY_THRESHOLD = labels.DEFAULT_AGE_THRESHOLD


def person_folds(samples: pd.DataFrame, folds: int = 5, seed: int = 42) -> np.ndarray:
    """Fold number (0..folds-1) of every sample; a person's photos all share one fold."""
    check_fold(folds, 0)
    people = samples["person_id"].to_numpy()
    n_people = len(np.unique(people))
    if n_people < folds:
        raise ConfigError(f"--folds {folds} needs at least {folds} people, the data has {n_people}")
    strata = labels.encode(0, samples["gender"].clip(lower=0).to_numpy(),
                           labels.age_group(samples["age"].to_numpy(), STRATIFY_THRESHOLD).clip(min=0))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.full(len(samples), -1, dtype=np.int64)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(samples)), strata, groups=people)):
        fold_of[val_idx] = k
    return fold_of
