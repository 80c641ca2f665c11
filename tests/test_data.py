"""The data foundation: reading the layout, bad input named before training, relabel, drop-ages, folds, cache."""
import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from mtl import data, labels
from mtl.dataset import FaceDataset, load_fold
from mtl.errors import DataError
from mtl.images import DirectImages, ImageCache, decode_image
from mtl.loader import make_loader
from mtl.splits import person_folds
from mtl.transforms import eval_transform, make_preprocess, train_transform

SIZE = (40, 52)


@pytest.fixture
def data_copy(synthetic_data, tmp_path):
    """A writable copy of the session's synthetic data set, to plant problems in."""
    return shutil.copytree(synthetic_data, tmp_path / "data")


def person_dir(root, k=0):
    return root / "train" / "images" / pd.read_csv(root / "train" / "train.csv", dtype=str)["path"][k]


def photo(root, stem, k=0):
    return next(p for p in person_dir(root, k).iterdir() if p.stem == stem)


def test_reads_every_photo_with_its_labels(synthetic_data):
    people = pd.read_csv(synthetic_data / "train" / "train.csv", dtype=str)
    samples, problems = data.train_samples(synthetic_data)
    assert problems == []
    assert len(samples) == 7 * len(people)
    assert samples.groupby("person_id").size().eq(7).all()
    for stem, mask in labels.PHOTO_MASK.items():
        assert (samples.loc[samples["photo"] == stem, "mask"] == mask).all()
    first = people.iloc[0]
    rows = samples[samples["person_id"] == first["id"]]
    assert (rows["gender"] == labels.GENDER_CODE[first["gender"]]).all()
    assert (rows["age"] == int(first["age"])).all()


def test_missing_column_is_named(data_copy):
    csv = data_copy / "train" / "train.csv"
    pd.read_csv(csv, dtype=str).drop(columns=["age"]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) age"):
        data.train_samples(data_copy)


def test_missing_and_extra_photos_are_named_and_junk_ignored(data_copy):
    missing = photo(data_copy, "mask3")
    missing.unlink()
    extra = person_dir(data_copy, 1) / "mask6.jpg"
    shutil.copy(photo(data_copy, "mask1", 1), extra)
    (person_dir(data_copy, 2) / "._mask1.jpg").write_bytes(b"resource fork")
    (person_dir(data_copy, 2) / ".ipynb_checkpoints").mkdir()
    _, problems = data.train_samples(data_copy)
    named = {p.path: p.reason for p in problems}
    assert named == {str(person_dir(data_copy) / "mask3"): "photo missing",
                     str(extra): named[str(extra)]}
    assert "extra file" in named[str(extra)]
    with pytest.raises(DataError, match="mask3") as err:
        load_fold(data_copy, SIZE, use_cache=False, progress=False)
    assert "mask6.jpg" in str(err.value) and "--skip-bad" in str(err.value)


def test_truncated_photo_is_named_and_skip_bad_goes_on(data_copy, tmp_path):
    bad = photo(data_copy, "normal", 3)
    if bad.suffix == ".png":
        bad = photo(data_copy, "normal", 4)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    for use_cache in (True, False):
        with pytest.raises(DataError, match="unreadable") as err:
            load_fold(data_copy, SIZE, cache_dir=tmp_path / "c", use_cache=use_cache, progress=False)
        assert str(bad) in str(err.value)
    messages = []
    fold = load_fold(data_copy, SIZE, cache_dir=tmp_path / "c", skip_bad=True, progress=False, log=messages.append)
    assert fold.skipped == 1
    assert any("skipping 1" in m for m in messages)
    everything = pd.concat([fold.train_samples, fold.val_samples])
    assert str(bad) not in set(everything["image_path"]) and len(everything) == 7 * 120 - 1


def test_relabel_is_applied_and_reported(data_copy, tmp_path):
    people = data.read_people(data_copy)
    pid, gender, age = people.iloc[5][["id", "gender", "age"]]
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,gender,age\n{pid},{'male' if gender else 'female'},\n")
    messages = []
    samples, _ = data.train_samples(data_copy, relabel_csv=fixes, log=messages.append)
    rows = samples[samples["person_id"] == pid]
    assert (rows["gender"] == 1 - gender).all() and (rows["age"] == age).all()
    assert "1 change" in messages[0] and pid in messages[0]
    fixes.write_text("id,age\nnobody,40\n")
    with pytest.raises(DataError, match="nobody"):
        data.train_samples(data_copy, relabel_csv=fixes)


def test_drop_ages_only_from_training(synthetic_data, cache_dir):
    all_ages = data.read_people(synthetic_data)["age"]
    low, high = 50, 59
    assert all_ages.between(low, high).sum() >= 5
    fold = load_fold(synthetic_data, SIZE, drop_ages=f"{low}-{high}", cache_dir=cache_dir, progress=False,
                     log=lambda *_: None)
    assert not fold.train_samples["age"].between(low, high).any()
    plain = load_fold(synthetic_data, SIZE, cache_dir=cache_dir, progress=False)
    assert plain.val_samples.equals(fold.val_samples)
    with pytest.raises(DataError, match="drop-ages"):
        data.parse_age_range("fifty")


def test_no_person_crosses_folds_and_folds_are_deterministic(synthetic_data):
    samples, _ = data.train_samples(synthetic_data)
    folds = person_folds(samples, folds=5, seed=1)
    assert set(folds) == set(range(5))
    assert samples.assign(fold=folds).groupby("person_id")["fold"].nunique().eq(1).all()
    assert (person_folds(samples, folds=5, seed=1) == folds).all()
    assert not (person_folds(samples, folds=5, seed=2) == folds).all()
    # stratified: every fold holds both genders
    for k in range(5):
        assert samples.loc[folds == k, "gender"].nunique() == 2
    train_people = set(samples.loc[folds != 0, "person_id"])
    assert train_people.isdisjoint(samples.loc[folds == 0, "person_id"])


def test_cache_equals_direct_decode_and_rebuilds_stale(data_copy, tmp_path):
    samples, _ = data.train_samples(data_copy)
    paths = list(samples["image_path"][:20])
    cache = ImageCache(tmp_path / "cache", SIZE)
    cached, problems = cache.ensure(paths, workers=1, progress=False)
    assert problems == []
    direct = DirectImages(paths, SIZE)
    for i in range(len(paths)):
        assert cached[i].shape == (SIZE[1], SIZE[0], 3) and cached[i].dtype == np.uint8
        assert np.array_equal(cached[i], direct[i])
    # the cache is a file, not a list of arrays: pickling the source (to DataLoader workers) carries no pixels
    assert len(pickle.dumps(cached)) < 2000
    # a photo replaced on disk is decoded again
    target = paths[0]
    before = np.array(cached[0])
    replacement = paths[10] if os.path.splitext(paths[10])[1] == os.path.splitext(target)[1] else paths[11]
    shutil.copy(replacement, target)
    os.utime(target, ns=(1, 1))
    again, _ = ImageCache(tmp_path / "cache", SIZE).ensure(paths, workers=1, progress=False)
    assert np.array_equal(again[0], decode_image(target, SIZE))
    assert not np.array_equal(again[0], before)
    assert np.array_equal(again[5], cached[5])


def test_dataset_items_and_transforms(synthetic_data, cache_dir):
    fold = load_fold(synthetic_data, SIZE, cache_dir=cache_dir, progress=False)
    record = make_preprocess(SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = FaceDataset(fold.train_samples, fold.train_images, train_transform(record, "strong"), 59)
    item = ds[0]
    assert tuple(item["image"].shape) == (3, SIZE[1], SIZE[0])
    assert item["age_group"] == labels.age_group(item["age"], 59)
    val = FaceDataset(fold.val_samples, fold.val_images, eval_transform(record))
    assert np.allclose(val[0]["image"].numpy(), val[0]["image"].numpy())
    assert set(fold.train_samples["person_id"]).isdisjoint(fold.val_samples["person_id"])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_items_in_channels_last(synthetic_data, cache_dir, workers):
    fold = load_fold(synthetic_data, SIZE, cache_dir=cache_dir, progress=False)
    val = FaceDataset(fold.val_samples, fold.val_images, eval_transform(make_preprocess(SIZE)))
    batch = next(iter(make_loader(val, batch_size=5, workers=workers)))
    assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape) == (5, 3, SIZE[1], SIZE[0])
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch["image"], torch.stack([val[i]["image"] for i in range(5)]))
    assert batch["mask"].tolist() == [val[i]["mask"] for i in range(5)]
    assert batch["index"].tolist() == list(range(5))


def test_extra_table_with_unknown_labels(synthetic_data, tmp_path):
    photos = sorted((synthetic_data / "eval" / "images").iterdir())[:3]
    csv = tmp_path / "extra.csv"
    pd.DataFrame({"path": [str(p) for p in photos], "mask": [2, -1, ""], "gender": ["", "female", 0],
                  "age": [-1, 70, 33]}).to_csv(csv, index=False)
    extra = data.read_extra(csv)
    assert extra["mask"].tolist() == [2, -1, -1]
    assert extra["gender"].tolist() == [-1, 1, 0]
    assert extra["age"].tolist() == [-1, 70, 33]
    data.write_extra(extra, tmp_path / "again.csv")
    assert data.read_extra(tmp_path / "again.csv")[["mask", "gender", "age"]].equals(extra[["mask", "gender", "age"]])
    pd.DataFrame({"path": ["nowhere.jpg"], "mask": [0], "gender": [0], "age": [3]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="nowhere.jpg"):
        data.read_extra(csv)


def test_eval_images_listed_but_absent_are_all_named(data_copy):
    info, samples = data.eval_samples(data_copy)
    assert list(samples["person_id"]) == list(info["ImageID"])
    gone = [data_copy / "eval" / "images" / info["ImageID"][k] for k in (0, 3)]
    for path in gone:
        path.unlink()
    with pytest.raises(DataError) as err:
        data.eval_samples(data_copy)
    assert all(str(p) in str(err.value) for p in gone)
