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
    assert labels.LabelSchema().class_name(11) == "incorrect/female/60+"
    assert labels.LabelSchema().class_name(0) == "wear/male/<30"


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
    assert labels.LabelSchema(59).to_dict()["age_threshold"] == 59
    assert labels.LabelSchema(59).to_dict() != labels.LabelSchema(60).to_dict()


# ---------------------------------------------------------------- LabelSchema: the whole schema at one threshold
def test_label_schema_groups_and_names_follow_its_threshold():
    at59 = labels.LabelSchema(59)
    assert at59.group(np.array([29, 30, 58, 59, -1])).tolist() == [0, 1, 1, 2, labels.UNKNOWN]
    assert at59.age_names == ("<30", "30-58", "59+") and labels.LabelSchema().age_names == ("<30", "30-59", "60+")
    assert at59.class_names["age"] == at59.age_names and at59.class_names["mask"] == ("wear", "incorrect", "not wear")
    assert at59.class_name(11) == "incorrect/female/59+" and at59.joint_names[0] == "wear/male/<30"
    assert len(set(at59.joint_names)) == labels.NUM_JOINT
    assert at59.encode(1, 1, 2) == 11 and at59.decode(11) == (1, 1, 2)
    assert labels.LabelSchema("59") == at59 and hash(at59) == hash(labels.LabelSchema(59))
    with pytest.raises(ConfigError, match="age-threshold must be from 31 to 99"):
        labels.LabelSchema(20)
    with pytest.raises(AttributeError):
        at59.age_threshold = 60  # frozen: one object, passed around, never changed


def test_stand_in_years_fall_back_into_their_group():
    for threshold in (40, 59, 60, 75):
        schema = labels.LabelSchema(threshold)
        groups = np.array([0, 1, 2, labels.UNKNOWN])
        years = schema.stand_in_years(groups)
        assert schema.group(years).tolist() == groups.tolist()
    assert labels.LabelSchema(60).stand_in_years(np.array([0, 1, 2])).tolist() == [25, 45, 65]


def test_schema_record_round_trips_and_reads_version_1():
    at59 = labels.LabelSchema(59)
    record = at59.to_dict()
    assert record["version"] == labels.SCHEMA_VERSION and record["tasks"]["age"] == ["<30", "30-58", "59+"]
    assert labels.LabelSchema.from_dict(record) == at59 and labels.LabelSchema(59).to_dict() == record
    # what checkpoints written before LabelSchema hold: the age groups named at 60 whatever the threshold
    version_1 = {"version": 1, "tasks": {"mask": ["wear", "incorrect", "not wear"], "gender": ["male", "female"],
                                         "age": ["<30", "30-59", "60+"]},
                 "num_joint": 18, "age_threshold": 59, "young_below": 30}
    assert labels.LabelSchema.from_dict(version_1) == at59


@pytest.mark.parametrize("change,message", [
    ({"version": 3}, "label schema version 3 is not one this mtl reads (1, 2)"),
    ({"version": None}, "label schema version None is not one this mtl reads"),
    ({"num_joint": 24}, "defines other classes"),
    ({"young_below": 25}, "defines other classes"),
    ({"tasks": {"mask": ["wear", "not wear"], "gender": ["male", "female"], "age": ["<30", "30-58", "59+"]}},
     "defines other classes"),
])
def test_a_schema_record_this_code_cannot_read_is_a_one_line_error(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        labels.LabelSchema.from_dict({**labels.LabelSchema(59).to_dict(), **change})
    assert "\n" not in str(err.value)


def test_check_same_schema_refuses_two_thresholds():
    at59, at60 = labels.LabelSchema(59), labels.LabelSchema(60)
    assert labels.check_same_schema([("a", at59), ("b", labels.LabelSchema(59))]) == at59
    with pytest.raises(ConfigError, match="b uses age threshold 60 but a uses 59: checkpoints of different schemas"):
        labels.check_same_schema([("a", at59), ("b", at60)])
