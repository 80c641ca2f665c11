"""The label schema: encode/decode round trips, the age threshold, unknown labels."""
import numpy as np
import pytest

from mtl import labels
from mtl.errors import ConfigError


def test_round_trip_over_all_18_classes():
    seen = set()
    for mask in range(3):
        for gender in range(2):
            for age in range(3):
                joint = labels.encode(mask, gender, age)
                assert 0 <= joint < 18
                assert labels.decode(joint) == (mask, gender, age)
                seen.add(joint)
    assert seen == set(range(18))
    joint = np.arange(18)
    assert (labels.encode(*labels.decode(joint)) == joint).all()


def test_competition_class_numbers():
    # class = mask*6 + gender*3 + age: e.g. incorrect/female/60+ is 1*6 + 1*3 + 2
    assert labels.encode(1, 1, 2) == 11
    assert labels.class_name(11) == "incorrect/female/60+"
    assert labels.class_name(0) == "wear/male/<30"


def test_threshold_moves_ages_between_groups():
    ages = np.array([18, 29, 30, 58, 59, 60, 75])
    assert labels.age_group(ages, 60).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert labels.age_group(ages, 59).tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert labels.age_group(59, 59) == 2 and labels.age_group(59) == 1


def test_unknown_labels_stay_unknown():
    assert labels.age_group(-1) == labels.UNKNOWN
    assert labels.encode(labels.UNKNOWN, 1, 2) == labels.UNKNOWN
    assert labels.encode(np.array([0, -1]), np.array([1, 1]), np.array([2, -1])).tolist() == [5, -1]
    with pytest.raises(ValueError):
        labels.decode(18)


@pytest.mark.parametrize("bad", [30, 100, "abc", 59.5, True])
def test_threshold_outside_range_is_refused(bad):
    with pytest.raises(ConfigError, match="age-threshold"):
        labels.check_threshold(bad)


def test_schema_records_threshold():
    assert labels.schema(59)["age_threshold"] == 59
    assert labels.schema(59) != labels.schema(60)
