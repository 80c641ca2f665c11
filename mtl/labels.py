"""The label schema: the single source of truth for tasks, classes and the age threshold.

mask:   wear=0 (mask1..mask5), incorrect=1 (incorrect_mask), not wear=2 (normal)
gender: male=0, female=1
age:    0 below 30, 1 from 30 to below the threshold, 2 at or above the threshold
class = mask * 6 + gender * 3 + age, 0..17

A label of UNKNOWN (-1) means "this sample carries no label for that task"
(external data with only some labels); its loss is masked out.
"""
from __future__ import annotations

import numpy as np

from mtl.errors import ConfigError

UNKNOWN = -1
SCHEMA_VERSION = 1

YOUNG_BELOW = 30
DEFAULT_AGE_THRESHOLD = 60
MIN_THRESHOLD, MAX_THRESHOLD = 31, 99


def age_group_names(threshold: int = DEFAULT_AGE_THRESHOLD) -> tuple:
    """The age groups' names at a threshold: ('<30', '30-59', '60+') at 60, ('<30', '30-58', '59+') at 59."""
    threshold = int(threshold)
    return (f"<{YOUNG_BELOW}", f"{YOUNG_BELOW}-{threshold - 1}", f"{threshold}+")


TASKS = ("mask", "gender", "age")
TASK_CLASSES = {"mask": ("wear", "incorrect", "not wear"),
                "gender": ("male", "female"),
                "age": age_group_names(DEFAULT_AGE_THRESHOLD)}
NUM_CLASSES = {task: len(names) for task, names in TASK_CLASSES.items()}
NUM_JOINT = 18

# photo file stem -> mask label, exactly the seven photos each person has
PHOTO_MASK = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0,
              "incorrect_mask": 1, "normal": 2}
PHOTO_STEMS = tuple(PHOTO_MASK)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
GENDER_CODE = {"male": 0, "female": 1}

def check_threshold(threshold) -> int:
    """Return the age threshold as an int, or raise ConfigError unless it is a whole number in 31..99."""
    text = str(threshold).strip()
    if isinstance(threshold, bool) or not text.lstrip("-").isdigit():
        raise ConfigError(f"--age-threshold must be a whole number of years, got {threshold!r}")
    value = int(text)
    if not MIN_THRESHOLD <= value <= MAX_THRESHOLD:
        raise ConfigError(f"--age-threshold must be from {MIN_THRESHOLD} to {MAX_THRESHOLD}, got {value}")
    return value


def age_group(age, threshold: int = DEFAULT_AGE_THRESHOLD):
    """Age in years -> group 0/1/2 at the threshold; UNKNOWN (or negative) ages stay UNKNOWN. Works on arrays."""
    a = np.asarray(age)
    group = np.where(a >= threshold, 2, np.where(a >= YOUNG_BELOW, 1, 0))
    group = np.where(a < 0, UNKNOWN, group)
    return group.astype(np.int64) if group.ndim else int(group)


def joint_index(mask, gender, age_grp):
    """The class formula itself, on known labels of any array type (numpy, torch): mask*6 + gender*3 + age."""
    return mask * 6 + gender * 3 + age_grp


def split_index(joint):
    """The inverse formula on any array type: class -> (mask, gender, age group)."""
    return joint // 6, (joint // 3) % 2, joint % 3


def encode(mask, gender, age_grp):
    """(mask, gender, age group) -> 18-class label; any UNKNOWN part gives UNKNOWN. Works on arrays."""
    m, g, a = (np.asarray(x) for x in (mask, gender, age_grp))
    joint = joint_index(m, g, a)
    joint = np.where((m < 0) | (g < 0) | (a < 0), UNKNOWN, joint)
    return joint.astype(np.int64) if joint.ndim else int(joint)


def decode(joint):
    """18-class label -> (mask, gender, age group). Works on arrays."""
    j = np.asarray(joint)
    if np.any((j < 0) | (j >= NUM_JOINT)):
        raise ValueError(f"class labels must be 0..{NUM_JOINT - 1}")
    parts = split_index(j)
    return tuple(p.astype(np.int64) if p.ndim else int(p) for p in parts)


def class_name(joint: int) -> str:
    """Human-readable name of an 18-class label, e.g. 'wear/female/<30'."""
    m, g, a = decode(joint)
    return f"{TASK_CLASSES['mask'][m]}/{TASK_CLASSES['gender'][g]}/{TASK_CLASSES['age'][a]}"


def task_class_names(threshold: int = DEFAULT_AGE_THRESHOLD) -> dict:
    """Every task's class names, the age groups named at this threshold."""
    return {**TASK_CLASSES, "age": age_group_names(threshold)}


def schema(threshold: int = DEFAULT_AGE_THRESHOLD) -> dict:
    """The schema as plain data, stored in every checkpoint so inference can check it."""
    return {"version": SCHEMA_VERSION, "tasks": {t: list(n) for t, n in TASK_CLASSES.items()},
            "num_joint": NUM_JOINT, "age_threshold": int(threshold), "young_below": YOUNG_BELOW}
