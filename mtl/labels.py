"""The label schema: the single source of truth for tasks, classes and the age threshold.

mask:   wear=0 (mask1..mask5), incorrect=1 (incorrect_mask), not wear=2 (normal)
gender: male=0, female=1
age:    0 below 30, 1 from 30 to below the threshold, 2 at or above the threshold
class = mask * 6 + gender * 3 + age, 0..17

`LabelSchema` is all of it at one age threshold, one frozen object made where a run's data is loaded
(or read back from a checkpoint) and passed on: age groups, class names, the 18-class formula, and
the record stored in every checkpoint. Ages in years are `age_years`; the age task's class is
`age_group`. A label of UNKNOWN (-1) means "this sample carries no label for that task" (external
data with only some labels); its loss is masked out.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mtl.errors import ConfigError

UNKNOWN = -1
# NOTE: version 2 stores the age groups' names at the threshold; version 1 stored those of 60 whatever the threshold
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

YOUNG_BELOW = 30
DEFAULT_AGE_THRESHOLD = 60
MIN_THRESHOLD, MAX_THRESHOLD = 31, 99

TASKS = ("mask", "gender", "age")
LOSS_TASKS = (*TASKS, "joint")  # NOTE: 'joint' is the 18-class label, the one task of --arch joint18
MASK_NAMES = ("wear", "incorrect", "not wear")
GENDER_NAMES = ("male", "female")
NUM_CLASSES = {"mask": len(MASK_NAMES), "gender": len(GENDER_NAMES), "age": 3}
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


@dataclasses.dataclass(frozen=True)
class LabelSchema:
    """The tasks, their class names and the 18-class formula at one age threshold (checked: 31..99)."""
    age_threshold: int = DEFAULT_AGE_THRESHOLD

    def __post_init__(self):
        object.__setattr__(self, "age_threshold", check_threshold(self.age_threshold))

    encode = staticmethod(encode)
    decode = staticmethod(decode)

    @property
    def age_names(self) -> tuple:
        """The age groups' names: ('<30', '30-59', '60+') at 60, ('<30', '30-58', '59+') at 59."""
        return f"<{YOUNG_BELOW}", f"{YOUNG_BELOW}-{self.age_threshold - 1}", f"{self.age_threshold}+"

    @property
    def class_names(self) -> dict:
        """Every task's class names, {'mask': ('wear', ...), 'gender': (...), 'age': self.age_names}."""
        return {"mask": MASK_NAMES, "gender": GENDER_NAMES, "age": self.age_names}

    @property
    def joint_names(self) -> tuple:
        """The 18 class names in class order, e.g. 'wear/female/<30' for class 3."""
        return tuple(self.class_name(joint) for joint in range(NUM_JOINT))

    def class_name(self, joint: int) -> str:
        """Human-readable name of an 18-class label, e.g. 'incorrect/female/59+' for 11 at 59."""
        m, g, a = decode(joint)
        return f"{MASK_NAMES[m]}/{GENDER_NAMES[g]}/{self.age_names[a]}"

    def group(self, age_years):
        """Age in years -> age group at this threshold (UNKNOWN stays UNKNOWN). Works on arrays."""
        return age_group(age_years, self.age_threshold)

    def stand_in_years(self, group):
        """An age in years inside each age group (UNKNOWN stays UNKNOWN), for tables that hold years only."""
        # NOTE: 25 stays <30 and the middle of 30..threshold-1 stays in the middle group at nearby thresholds
        years = np.array([25, (YOUNG_BELOW + self.age_threshold) // 2, self.age_threshold + 5], dtype=np.int64)
        g = np.asarray(group)
        out = np.where(g >= 0, years[np.clip(g, 0, 2)], UNKNOWN).astype(np.int64)
        return out if out.ndim else int(out)

    def to_dict(self) -> dict:
        """The schema as plain data, stored in every checkpoint (`schema`) so inference can check it."""
        return {"version": SCHEMA_VERSION, "tasks": {t: list(n) for t, n in self.class_names.items()},
                "num_joint": NUM_JOINT, "age_threshold": self.age_threshold, "young_below": YOUNG_BELOW}

    @classmethod
    def from_dict(cls, record) -> LabelSchema:
        """The schema a to_dict record (any readable version) describes, or a one-line ConfigError saying why not."""
        if not isinstance(record, dict) or "age_threshold" not in record:
            raise ConfigError(f"label schema {record!r} is not a mapping with an age_threshold")
        version = record.get("version")
        if version not in READABLE_VERSIONS:
            raise ConfigError(f"label schema version {version!r} is not one this mtl reads "
                              f"({', '.join(map(str, READABLE_VERSIONS))}); use the mtl version that wrote it")
        schema = cls(record["age_threshold"])
        tasks = {t: list(n) for t, n in schema.class_names.items()}
        if version == 1:  # NOTE: version 1 named the age groups at 60 whatever its threshold
            tasks["age"] = list(LabelSchema().age_names)
        found = (record.get("tasks"), record.get("num_joint"), record.get("young_below"))
        if found != (tasks, NUM_JOINT, YOUNG_BELOW):
            raise ConfigError(f"label schema version {version} defines other classes (tasks {found[0]}, "
                              f"{found[1]} classes, young below {found[2]}) than this mtl's {tasks}")
        return schema


def as_schema(value=None) -> LabelSchema:
    """A LabelSchema from a LabelSchema, an age threshold (int) or None (the default threshold)."""
    if isinstance(value, LabelSchema):
        return value
    return LabelSchema() if value is None else LabelSchema(value)


def check_same_schema(named) -> LabelSchema:
    """The one schema of [(name, LabelSchema), ...], or a ConfigError naming two that differ (no ensembling them)."""
    first_name, first = named[0]
    for name, schema in named[1:]:
        if schema != first:
            raise ConfigError(f"{name} uses age threshold {schema.age_threshold} but {first_name} uses "
                              f"{first.age_threshold}: checkpoints of different schemas cannot be ensembled")
    return first
