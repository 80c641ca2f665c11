"""Batches for training and inference: the DataLoader with the project's seeding, collation and photo ring.

`make_loader` is the one way a dataset becomes batches (dicts of tensors; "image" is uint8 (B, 3, H, W)
in channels_last layout; the model normalizes it). With worker processes, torch's own path puts every
batch in a new shared-memory segment: the worker creates it, faults in and fills it (19 MB for 32
photos at 384x512), the main process maps and frees it, and measured on a cached data set that cost
more than reading and flipping the photos. Here each pass over the data instead allocates a ring of
shared batch buffers once: batch k is written into slot k mod S by a worker and copied out by the
main process as it arrives: into one of a few buffers it reuses, or on CUDA into pinned memory
(where torch's pin step would copy anyway; asked for where there is no CUDA, pinning is left out).
S = workers x prefetch + 1 is enough because DataLoader never has more than workers x prefetch batches
sent and not yet returned, and batch k is copied out before batch k + workers x prefetch + 1 is sent;
every copy checks that its slot still holds the batch it was written for. `balanced_sampler` is the
--sampler balanced draw of an epoch's photos.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
    default_collate,
    get_worker_info,
)

from mtl import labels

PREFETCH = 2  # batches each worker prepares ahead (DataLoader's prefetch_factor)


def seed_worker(worker_id):
    """DataLoader worker init: seed numpy, random and the albumentations pipeline from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "set_random_seed"):
        info.dataset.set_random_seed(seed)


def collate(items: list[dict]) -> dict:
    """default_collate, but photos are stacked as they lie in memory (HWC) and come out channels_last.

    ToTensorV2 gives (3, H, W) views of (H, W, 3) photos; stacking those views into a contiguous NCHW batch
    is a strided copy that cost more than reading a cached photo. Stacking the HWC photos is a plain copy,
    and the (B, H, W, 3) batch viewed as (B, 3, H, W) is already in channels_last layout, which the convs
    (CPU and CUDA) take as is.
    """
    batch = _collate_labels(items)
    photos = [item["image"].permute(1, 2, 0) for item in items]
    if not all(photo.is_contiguous() for photo in photos):
        batch["image"] = default_collate([item["image"] for item in items])
        return batch
    out = None
    if get_worker_info() is not None:  # NOTE: as default_collate does: build the batch in shared memory
        numel = sum(photo.numel() for photo in photos)
        storage = photos[0]._typed_storage()._new_shared(numel, device=photos[0].device)
        out = photos[0].new(storage).resize_(len(photos), *photos[0].shape)
    batch["image"] = torch.stack(photos, out=out).permute(0, 3, 1, 2)
    return batch


def _collate_labels(items: list[dict]) -> dict:
    return default_collate([{k: v for k, v in item.items() if k != "image"} for item in items])


class PhotoRing:
    """Shared uint8 buffers for `slots` batches of (H, W, 3) photos, and which batch number each slot holds."""

    def __init__(self, slots: int, batch_size: int, photo_shape):
        self.photos = torch.empty((slots, batch_size, *photo_shape), dtype=torch.uint8).share_memory_()
        self.holds = torch.full((slots,), -1, dtype=torch.int64).share_memory_()

    def collate(self, numbered) -> dict:
        """In a worker: write batch `number`'s photos into its slot; the batch carries [slot, number, size]."""
        number, items = numbered
        photos = [item["image"].permute(1, 2, 0) for item in items]
        if len(photos) > self.photos.shape[1] or any(p.shape != self.photos.shape[2:] for p in photos):
            return collate(items)  # NOTE: a photo of another size: this batch takes torch's own path
        slot = number % len(self.photos)
        torch.stack(photos, out=self.photos[slot, :len(photos)])
        self.holds[slot] = number
        batch = _collate_labels(items)
        batch["ring"] = torch.tensor([slot, number, len(photos)])
        return batch

    def take(self, batch: dict, buffers: ReusedBuffers) -> dict:
        """In the main process: copy a batch's photos out of its slot (the slot is free for reuse after this)."""
        if "ring" not in batch:
            return batch
        slot, number, size = batch.pop("ring").tolist()
        photos = buffers.get()[:size]
        photos.copy_(self.photos[slot, :size])
        if int(self.holds[slot]) != number:
            raise RuntimeError(f"batch {number}'s photo buffer was overwritten by batch {int(self.holds[slot])} "
                               "before it was read (more batches in flight than the ring has slots)")
        batch["image"] = photos.permute(0, 3, 1, 2)
        return batch


class ReusedBuffers:
    """Main-process batch buffers, each reused once nothing outside holds it any more.

    A new 19 MB tensor per batch made glibc keep ~0.5 GB of freed batches in the heap; reusing a few
    buffers keeps memory flat. A buffer still held (a kept batch, a tensor autograd saved) is never
    reused: the count of tensors using its storage tells, and when it cannot, every batch gets a new one.
    """

    KEEP = 4

    def __init__(self, shape, pin_memory=False):
        self.shape, self.pin_memory, self.buffers = tuple(shape), pin_memory, []

    def get(self) -> torch.Tensor:
        if self.pin_memory:
            # NOTE: not pooled here: torch's pinned-memory cache reuses a block only once the non_blocking copies
            # to the GPU that read it have finished, which a use count cannot see
            return torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)
        for buffer in self.buffers:
            if _storage_users(buffer) == 1:
                return buffer
        buffer = torch.empty(self.shape, dtype=torch.uint8)
        if len(self.buffers) < self.KEEP and _storage_users(buffer) is not None:
            self.buffers.append(buffer)
        return buffer


def _storage_users(tensor):
    """How many tensors use this tensor's storage (None where torch does not say)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    storage = tensor.untyped_storage()
    return None if count is None else count(storage._cdata) - 1  # NOTE: minus `storage`, which holds one too


class _NumberedBatches(Sampler):
    """The batches of index lists, each index paired with its batch's number (which picks the ring slot)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for number, batch in enumerate(self.batches):
            yield [(number, i) for i in batch]

    def __len__(self):
        return len(self.batches)


class _Numbered(Dataset):
    """A dataset read a batch at a time by (batch number, index) keys: gives (number, items) to the ring."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, keys):
        return keys[0][0], [self.dataset[i] for _, i in keys]

    def set_random_seed(self, seed: int):
        if hasattr(self.dataset, "set_random_seed"):
            self.dataset.set_random_seed(seed)


class BatchLoader:
    """Batches of a dataset, one pass per iteration; len() is the number of batches in a pass."""

    def __init__(self, dataset, batch_size, workers, sampler, generator, drop_last, pin_memory):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        # NOTE: without CUDA there is nothing to pin for (torch.empty(pin_memory=True) raises, DataLoader warns)
        self.generator, self.pin_memory = generator, bool(pin_memory) and torch.cuda.is_available()

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        common = dict(num_workers=self.workers, worker_init_fn=seed_worker, generator=self.generator,
                      pin_memory=self.pin_memory)
        if self.workers == 0 or len(self.dataset) == 0:
            yield from DataLoader(self.dataset, batch_sampler=self.batches, collate_fn=collate, **common)
            return
        shape = tuple(self.dataset[0]["image"].permute(1, 2, 0).shape)  # NOTE: one photo read, to size the ring
        ring = PhotoRing(self.workers * PREFETCH + 1, self.batch_size, shape)
        loader = DataLoader(_Numbered(self.dataset), batch_sampler=_NumberedBatches(self.batches),
                            collate_fn=ring.collate, prefetch_factor=PREFETCH, **common)
        buffers = ReusedBuffers(ring.photos.shape[1:], self.pin_memory)
        for batch in loader:
            yield ring.take(batch, buffers)


def make_loader(dataset, batch_size, workers=2, *, shuffle=False, sampler=None, generator=None, drop_last=False,
                device=None, pin_memory=None) -> BatchLoader:
    """Batches of the dataset: in order, shuffled, or drawn by `sampler`; pinned by default when device is CUDA."""
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    if pin_memory is None:
        pin_memory = device is not None and device.type == "cuda"
    return BatchLoader(dataset, batch_size, workers, sampler, generator, drop_last, pin_memory)


def balanced_sampler(dataset, num_samples, generator) -> WeightedRandomSampler:
    """Draw each 18-class combination of a FaceDataset about equally often (samples with unknown labels by their mask
    class)."""
    joint = labels.encode(dataset.mask, dataset.gender, dataset.age_group)
    keys = np.where(joint >= 0, joint, 100 + dataset.mask)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    weights = torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples, replacement=True, generator=generator)
