"""The data foundation: reading the layout, bad input named before training, relabel, drop-ages, folds, cache."""
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mtl import checks, data, labels
from mtl.dataset import DataSpec, FaceDataset, load_fold
from mtl.errors import DataError
from mtl.images import MIN_PHOTO_SIDE, DirectImages, ImageCache, decode_image
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
        load_fold(DataSpec(data_copy), SIZE, use_cache=False, progress=False)
    assert "mask6.jpg" in str(err.value) and "--skip-bad" in str(err.value)


@pytest.mark.slow
def test_truncated_photo_is_named_and_skip_bad_goes_on(data_copy, tmp_path):
    bad = photo(data_copy, "normal", 3)
    if bad.suffix == ".png":
        bad = photo(data_copy, "normal", 4)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    for use_cache in (True, False):
        with pytest.raises(DataError, match="unreadable") as err:
            load_fold(DataSpec(data_copy), SIZE, cache_dir=tmp_path / "c", use_cache=use_cache, progress=False)
        assert str(bad) in str(err.value)
    messages = []
    fold = load_fold(DataSpec(data_copy, skip_bad=True), SIZE, cache_dir=tmp_path / "c", progress=False,
                     log=messages.append)
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
    fold = load_fold(DataSpec(synthetic_data, drop_ages=f"{low}-{high}"), SIZE, cache_dir=cache_dir, progress=False,
                     log=lambda *_: None)
    assert not fold.train_samples["age"].between(low, high).any()
    plain = load_fold(DataSpec(synthetic_data), SIZE, cache_dir=cache_dir, progress=False)
    assert plain.val_samples.equals(fold.val_samples)
    with pytest.raises(DataError, match="drop-ages"):
        checks.parse_age_range("fifty")


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
    fold = load_fold(DataSpec(synthetic_data), SIZE, cache_dir=cache_dir, progress=False)
    record = make_preprocess(SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = FaceDataset(fold.train_samples, fold.train_images, train_transform(record, "strong"), 59)
    item = ds[0]
    assert tuple(item["image"].shape) == (3, SIZE[1], SIZE[0])
    assert item["age_group"] == labels.age_group(item["age_years"], 59)
    val = FaceDataset(fold.val_samples, fold.val_images, eval_transform(record))
    # evaluation shows the photo as decoded (its load size is the input size here): uint8, HWC turned CHW, no change
    for i in (0, len(val) - 1):
        assert torch.equal(val[i]["image"], torch.from_numpy(np.array(fold.val_images[i])).permute(2, 0, 1))
        assert (val[i]["mask"], val[i]["gender"]) == tuple(fold.val_samples[["mask", "gender"]].iloc[i])


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


# ---------------------------------------------------------------- photos the loader must not misread
def write_png16(path, channels, color_type):
    """A 16-bit PNG written byte by byte (grey + alpha, which neither cv2 nor Pillow writes)."""
    h, w = channels.shape[:2]
    raw = b"".join(b"\x00" + channels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def sixteen_bit_pngs(folder):
    """{name: (16-bit PNG path, the 8-bit RGB photo it holds)}: grey (cv2 and Pillow), RGB, RGBA, grey + alpha."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (64, 48), dtype=np.uint16)
    colour = rng.integers(0, 65536, (64, 48, 4), dtype=np.uint16)
    top = lambda a: (a >> 8).astype(np.uint8)  # noqa: E731 - 16 -> 8 bits keeps the top byte
    cases = {"grey_cv2": (grey, np.stack([top(grey)] * 3, -1)), "grey_pil": (grey, np.stack([top(grey)] * 3, -1)),
             "rgb": (colour[..., :3], top(colour[..., 2::-1])), "rgba": (colour, top(colour[..., 2::-1])),
             "grey_alpha": (colour[..., :2], np.stack([top(colour[..., 0])] * 3, -1))}
    out = {}
    for name, (stored, expected) in cases.items():
        path = folder / f"{name}.png"
        if name == "grey_pil":
            Image.fromarray(stored).save(path)
        elif name == "grey_alpha":
            write_png16(path, stored, color_type=4)
        else:
            cv2.imwrite(str(path), stored)  # NOTE: cv2 writes 16-bit BGR(A) as they lie
        out[name] = (path, expected)
    return out


def test_16_bit_pngs_decode_to_their_8_bit_photo_not_white(tmp_path):
    pngs = sixteen_bit_pngs(tmp_path)
    assert Image.open(pngs["grey_cv2"][0]).mode.startswith("I;16")  # the case Pillow's convert("RGB") turns white
    cache = ImageCache(tmp_path / "cache", SIZE)
    cached, problems = cache.ensure([p for p, _ in pngs.values()], workers=1, progress=False)
    assert problems == []
    for k, (name, (path, expected)) in enumerate(pngs.items()):
        assert np.array_equal(decode_image(path), expected), name
        # at a load size too, through the cache: exactly what the 8-bit photo gives
        eight_bit = tmp_path / f"{name}_8.png"
        Image.fromarray(expected).save(eight_bit)
        assert np.array_equal(cached[k], decode_image(eight_bit, SIZE)), name
        assert cached[k].min() < 200, name


@pytest.mark.slow
def test_a_tiny_photo_is_refused_by_name_and_skip_bad_leaves_it_out(data_copy, tmp_path):
    tiny = photo(data_copy, "mask2", 6)
    Image.new("RGB", (1, 1), (90, 60, 30)).save(tiny, format="PNG" if tiny.suffix == ".png" else "JPEG")
    for use_cache in (True, False):
        with pytest.raises(DataError, match="bad photo") as err:
            load_fold(DataSpec(data_copy), SIZE, cache_dir=tmp_path / "c", use_cache=use_cache, progress=False)
        assert f"{tiny}: photo is 1x1 px, below the minimum side of {MIN_PHOTO_SIDE} px" in str(err.value)
    fold = load_fold(DataSpec(data_copy, skip_bad=True), SIZE, cache_dir=tmp_path / "c", progress=False,
                     log=lambda *_: None)
    assert str(tiny) not in set(pd.concat([fold.train_samples, fold.val_samples])["image_path"])
    assert fold.skipped == 1


def test_implausible_ages_are_named_with_their_row(data_copy, tmp_path):
    csv = data_copy / "train" / "train.csv"
    table = pd.read_csv(csv, dtype=str)
    table.loc[4, "age"] = "200"
    table.to_csv(csv, index=False)
    with pytest.raises(DataError) as err:
        load_fold(DataSpec(data_copy), SIZE, cache_dir=tmp_path / "c", progress=False)
    assert f"{csv} row 6: age 200 is outside the plausible range 0..120" in str(err.value)
    fold = load_fold(DataSpec(data_copy, skip_bad=True), SIZE, cache_dir=tmp_path / "c", progress=False,
                     log=lambda *_: None)
    kept = pd.concat([fold.train_samples, fold.val_samples])
    assert table.loc[4, "id"] not in set(kept["person_id"]) and len(kept) == 7 * 119
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"id,age\n{table.loc[4, 'id']},30\n")  # a relabel CSV can fix it
    samples, problems = data.train_samples(data_copy, relabel_csv=fixes, log=lambda *_: None)
    assert problems == [] and (samples.loc[samples["person_id"] == table.loc[4, "id"], "age"] == 30).all()
    fixes.write_text(f"id,age\n{table.loc[5, 'id']},121\n")
    with pytest.raises(DataError, match=r"fixes\.csv row 2: age 121 is outside the plausible range"):
        data.train_samples(data_copy, relabel_csv=fixes, log=lambda *_: None)
    extra = tmp_path / "extra.csv"
    pd.DataFrame({"path": [str(photo(data_copy, "normal"))], "mask": [2], "gender": [0], "age": [130]}).to_csv(
        extra, index=False)
    with pytest.raises(DataError, match=r"extra\.csv row 2: age 130 is outside the plausible range"):
        data.read_extra(extra)


# ---------------------------------------------------------------- nothing outside the data set is read
def test_eval_image_ids_must_name_files_inside_eval_images(data_copy, tmp_path):
    info_csv = data_copy / "eval" / "info.csv"
    info = pd.read_csv(info_csv, dtype=str)
    images = data_copy / "eval" / "images"
    outside = photo(data_copy, "mask1")  # a train photo: a real, readable image outside eval/images
    (images / "link_out.jpg").symlink_to(outside)
    (images / "link_in.jpg").symlink_to(images / info["ImageID"][0])
    (images / "sub").mkdir()
    shutil.copy(images / info["ImageID"][1], images / "sub" / "nested.jpg")
    bad = ["../../train/train.csv", str(outside), "link_out.jpg", "sub/../../eval_truth.csv"]
    good = ["link_in.jpg", "sub/nested.jpg"]
    extra = pd.DataFrame({"ImageID": bad + good, "ans": 0})
    pd.concat([info, extra], ignore_index=True).to_csv(info_csv, index=False)
    with pytest.raises(DataError) as err:
        data.eval_samples(data_copy)
    lines = str(err.value).splitlines()
    assert lines[0] == "4 problems with the eval photos found:"
    for k, image_id in enumerate(bad):
        row = len(info) + 2 + k
        assert f"  {info_csv} row {row}: ImageID {image_id!r} does not name a file inside {images}" in lines
    pd.concat([info, extra.iloc[len(bad):]], ignore_index=True).to_csv(info_csv, index=False)
    _, samples = data.eval_samples(data_copy)
    assert samples["person_id"].tolist()[-2:] == good


def test_train_folders_and_photos_must_lie_inside_train_images(data_copy, tmp_path):
    csv = data_copy / "train" / "train.csv"
    table = pd.read_csv(csv, dtype=str)
    images = data_copy / "train" / "images"
    elsewhere = shutil.copytree(person_dir(data_copy, 2), tmp_path / "elsewhere")
    table.loc[0, "path"] = f"../images/{table.loc[0, 'path']}"
    table.loc[1, "path"] = str(person_dir(data_copy, 1))
    shutil.rmtree(person_dir(data_copy, 2))
    (images / table.loc[2, "path"]).symlink_to(elsewhere)
    linked = person_dir(data_copy, 3) / photo(data_copy, "normal", 3).name
    linked.unlink()
    linked.symlink_to(next(p for p in elsewhere.iterdir() if p.stem == "normal"))
    inner = person_dir(data_copy, 4) / photo(data_copy, "mask5", 4).name
    inner.unlink()
    inner.symlink_to(photo(data_copy, "mask5", 5))  # a link inside train/images is fine
    table.to_csv(csv, index=False)
    _, problems = data.train_samples(data_copy)
    named = {p.path: p.reason for p in problems}
    assert set(named) == {f"{csv} row 2", f"{csv} row 3", f"{csv} row 4", str(linked)}
    for row, k in ((2, 0), (3, 1), (4, 2)):
        assert named[f"{csv} row {row}"] == f"path {table.loc[k, 'path']!r} does not name a folder inside {images}"
    assert named[str(linked)].startswith(f"links to {tmp_path / 'elsewhere'}")
    fold = load_fold(DataSpec(data_copy, skip_bad=True), SIZE, cache_dir=tmp_path / "c", progress=False,
                     log=lambda *_: None)
    read = set(pd.concat([fold.train_samples, fold.val_samples])["image_path"])
    assert fold.skipped == 4 and len(read) == 7 * 120 - 3 * 7 - 1
    assert all(Path(p).is_relative_to(images) for p in read) and str(inner) in read


# ---------------------------------------------------------------- the cache never serves a row it did not write
def test_a_truncated_cache_is_refilled_not_read_as_zeros(data_copy, tmp_path):
    samples, _ = data.train_samples(data_copy)
    paths = list(samples["image_path"][:30])
    cache = ImageCache(tmp_path / "cache", SIZE)
    cache.ensure(paths[:20], workers=1, progress=False)
    size = cache.pixels_file.stat().st_size
    os.truncate(cache.pixels_file, size // 2 - 7)  # 9 whole rows of 20 left
    notes = []
    cached, problems = ImageCache(tmp_path / "cache", SIZE).ensure(paths, workers=1, progress=False, log=notes.append)
    assert problems == [] and "holds 9 of 20 rows (truncated?); decoding 11 photo(s) again" in notes[0]
    for i, path in enumerate(paths):
        assert np.array_equal(cached[i], decode_image(path, SIZE)), i
    # a truncation while a run reads: one line, no traceback
    os.truncate(cache.pixels_file, size // 2)
    with pytest.raises(DataError, match=r"pixels\.u8: row \d+ lies past the end of the file"):
        [cached[i] for i in range(len(paths))]


def test_a_damaged_cache_is_repaired_once_even_for_rows_this_run_does_not_need(data_copy, tmp_path):
    samples, _ = data.train_samples(data_copy)
    paths = list(samples["image_path"][:20])
    cache = ImageCache(tmp_path / "cache", SIZE)
    cache.ensure(paths, workers=1, progress=False)
    os.truncate(cache.pixels_file, cache.row_bytes * 15)
    notes = []
    for _ in range(2):  # only the first ten photos are asked for: the lost rows 15..19 are not decoded now
        ImageCache(tmp_path / "cache", SIZE).ensure(paths[:10], workers=1, progress=False, log=notes.append)
    assert len(notes) == 1 and "holds 15 of 20 rows" in notes[0]
    cached, _ = ImageCache(tmp_path / "cache", SIZE).ensure(paths, workers=1, progress=False, log=notes.append)
    assert len(notes) == 1
    assert all(np.array_equal(cached[i], decode_image(p, SIZE)) for i, p in enumerate(paths))
