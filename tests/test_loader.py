"""The batch loader: every batch holds its own items' photos and labels, whichever path carried them."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from mtl.dataset import DataSpec, FaceDataset, load_fold
from mtl.loader import PREFETCH, PhotoRing, ReusedBuffers, make_loader
from mtl.transforms import eval_transform, make_preprocess

SIZE = (40, 52)


@pytest.fixture
def val_set(synthetic_data, cache_dir):
    fold = load_fold(DataSpec(synthetic_data), SIZE, cache_dir=cache_dir, progress=False)
    return FaceDataset(fold.val_samples, fold.val_images, eval_transform(make_preprocess(SIZE)))


def assert_batch_is(batch, dataset, indices):
    assert batch["index"].tolist() == [dataset[i]["index"] for i in indices]
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch["image"], torch.stack([dataset[i]["image"] for i in indices]))
    assert batch["mask"].tolist() == [dataset[i]["mask"] for i in indices]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_batch_of_a_pass_holds_its_items_after_the_ring_wraps(val_set, workers):
    subset = Subset(val_set, np.arange(3, 28))  # NOTE: as train.py's validation loader: a Subset, 25 items
    loader = make_loader(subset, batch_size=3, workers=workers)
    batches = list(loader)  # NOTE: all kept: a batch must not change when later batches reuse its slot
    assert len(batches) == len(loader) == math.ceil(25 / 3) > 2 * PREFETCH + 1
    for k, batch in enumerate(batches):
        assert_batch_is(batch, subset, range(3 * k, min(3 * k + 3, 25)))
        assert "ring" not in batch
        assert not batch["image"].is_shared()  # NOTE: torch's worker path hands over shared memory; the ring copies


def test_shuffled_passes_cover_every_item_once_and_replay_from_a_seed(val_set):
    def order(seed):
        loader = make_loader(val_set, batch_size=8, workers=2, shuffle=True,
                             generator=torch.Generator().manual_seed(seed))
        batches = list(loader)
        for batch in batches[:3]:
            assert_batch_is(batch, val_set, batch["index"].tolist())
        return torch.cat([batch["index"] for batch in batches]).tolist()

    first = order(0)
    assert sorted(first) == list(range(len(val_set))) and first != sorted(first)
    assert order(0) == first and order(1) != first


class TwoSizes(Dataset):
    """Photos 4x6 for the first six items and 5x6 after: the ring is sized from item 0."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        height = 6 if i < 6 else 5
        pixels = np.random.default_rng(i).integers(0, 256, (height, 4, 3), dtype=np.uint8)
        return {"image": torch.from_numpy(pixels).permute(2, 0, 1), "index": i, "mask": i % 3}


def test_photos_of_another_size_than_the_first_still_arrive_whole():
    dataset = TwoSizes()
    for k, batch in enumerate(make_loader(dataset, batch_size=3, workers=2)):
        assert_batch_is(batch, dataset, range(3 * k, 3 * k + 3))


def test_reading_a_slot_another_batch_overwrote_is_an_error():
    ring = PhotoRing(slots=2, batch_size=3, photo_shape=(6, 4, 3))
    dataset = TwoSizes()
    batch = ring.collate((0, [dataset[i] for i in range(3)]))
    ring.collate((2, [dataset[i] for i in range(3, 6)]))  # NOTE: batch 2 goes to slot 0 too, before batch 0 is read
    with pytest.raises(RuntimeError, match="batch 0's photo buffer was overwritten by batch 2"):
        ring.take(batch, ReusedBuffers((3, 6, 4, 3)))


def test_a_batch_let_go_lends_its_buffer_to_a_later_one(val_set):
    pointers = [batch["image"].data_ptr() for batch in make_loader(val_set, batch_size=3, workers=2)]
    assert len(set(pointers)) <= ReusedBuffers.KEEP < len(pointers)
