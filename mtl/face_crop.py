"""The face crop: MTCNN finds the face, a fixed geometry cuts it out; shared by data_tools.crop_faces and prediction.

For each photo it takes the largest face MTCNN finds (the person photographed fills the frame;
faces in the background are smaller), enlarges its box by `margin` (a fraction of the box's width
and height on each side), widens or heightens it to the aspect ratio of `size` around the same
centre, moves it inside the photo where it fits (it is padded black only along a side longer than
the photo) and resizes it to `size`. When no face is found it crops the same way around the place
a face usually is in a competition photo (a square 45% of the shorter side, centred at 50% of the
width and 45% of the height).

`crop_images` is the one function that does this to a batch of photos: `crop_faces` runs it over a
data set and saves the crops, `mtl.predictor` runs it at prediction time with the settings a
checkpoint recorded (`crop_settings`, the face_crop.json record), so both give the same pixels.
"""
from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np

from mtl import data
from mtl.errors import ConfigError

DEFAULT_MARGIN = 0.3
DEFAULT_SIZE = (240, 320)     # NOTE: the img_size of configs/default.yaml, so training resizes nothing
DEFAULT_MIN_FACE = 0.1        # smallest face searched, as a fraction of the photo's shorter side
DETECT_MAX_SIDE = 640         # photos larger than this are shrunk for detection only (the crop uses all pixels)
MIN_FACE_PIXELS = 20          # MTCNN's own default minimum face size
# NOTE: MTCNN runs hundreds of tiny operations per photo; on CPU one thread was 3-4x faster than two on a
# busy 2-core machine (0.08-0.19 s against 0.31-0.48 s per 384x512 photo), so --threads starts at 1
DEFAULT_THREADS = 1
DEFAULT_BATCH_SIZE = 32
CHUNK_BATCHES = 4             # photos are decoded and cropped 4 detector batches at a time
FALLBACK_CENTRE = (0.5, 0.45)  # where a face usually is in a competition photo, fractions of width and height
FALLBACK_SIDE = 0.45          # its size, a fraction of the shorter side


@dataclasses.dataclass
class Crop:
    """One photo's crop: the face box used (photo pixels), MTCNN's probability, whether it fell back, the pixels."""
    box: tuple
    prob: float
    fallback: bool
    pixels: np.ndarray


# ---------------------------------------------------------------- geometry
def crop_region(face, image_size, margin, size) -> tuple[float, float, float, float]:
    """The crop (x1, y1, x2, y2) for a face box: margin on each side, grown to the W:H of size, moved inside the photo.

    Along an axis where the crop is longer than the photo it stays centred on the face (cut() pads it black).
    """
    x1, y1, x2, y2 = face
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = (x2 - x1) * (1 + 2 * margin), (y2 - y1) * (1 + 2 * margin)
    aspect = size[0] / size[1]
    if w / h < aspect:
        w = h * aspect
    else:
        h = w / aspect
    start = []
    for centre, length, limit in ((cx, w, image_size[0]), (cy, h, image_size[1])):
        low = centre - length / 2
        if length <= limit:
            low = min(max(low, 0.0), limit - length)
        start.append(low)
    return start[0], start[1], start[0] + w, start[1] + h


def fallback_face(image_size) -> tuple[float, float, float, float]:
    """The face box assumed when none is found: FALLBACK_SIDE of the shorter side at FALLBACK_CENTRE."""
    width, height = image_size
    side = FALLBACK_SIDE * min(width, height)
    cx, cy = FALLBACK_CENTRE[0] * width, FALLBACK_CENTRE[1] * height
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def cut(pixels: np.ndarray, region, size) -> np.ndarray:
    """Cut a region (may leave the photo: padded black) out of HxWx3 pixels, resized to size=(W, H)."""
    h, w = pixels.shape[:2]
    x1, y1 = int(np.floor(region[0])), int(np.floor(region[1]))
    x2, y2 = max(int(np.ceil(region[2])), x1 + 1), max(int(np.ceil(region[3])), y1 + 1)
    pad = [max(0, -y1), max(0, y2 - h), max(0, -x1), max(0, x2 - w)]
    inside = pixels[max(0, y1):min(h, y2), max(0, x1):min(w, x2)]
    if any(pad):
        inside = cv2.copyMakeBorder(np.ascontiguousarray(inside), *pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    shrink = inside.shape[1] > size[0] or inside.shape[0] > size[1]
    return cv2.resize(inside, tuple(size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop_photo(image: np.ndarray, face, margin, size) -> Crop:
    """The crop of one photo given its detection (None: no face found, fall back)."""
    height, width = image.shape[:2]
    fallback = face is None
    box, prob = (fallback_face((width, height)), 0.0) if fallback else face
    return Crop(tuple(box), float(prob), fallback, cut(image, crop_region(box, (width, height), margin, size), size))


def pick_face(boxes, probs):
    """The largest of the faces MTCNN found as ((x1, y1, x2, y2), prob), or None."""
    if boxes is None or len(boxes) == 0:
        return None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    i = int(np.argmax(areas))
    return tuple(float(v) for v in boxes[i]), float(np.asarray(probs, dtype=np.float64).reshape(-1)[i])


# ---------------------------------------------------------------- detector
class FaceDetector:
    """MTCNN (facenet-pytorch) on batches of photos: photos of the same size are detected together."""

    def __init__(self, device="auto", min_face=DEFAULT_MIN_FACE, batch_size=DEFAULT_BATCH_SIZE,
                 threads=DEFAULT_THREADS):
        import torch
        from facenet_pytorch import MTCNN

        from mtl.inference import resolve_device
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.min_face, self.batch_size, self.threads = float(min_face), int(batch_size), int(threads)
        self.mtcnn = MTCNN(keep_all=True, device=self.device)

    def detect(self, images) -> list:
        """For each RGB uint8 HxWx3 image: the largest face ((x1, y1, x2, y2), prob) in its pixels, or None."""
        import torch
        if self.device.type != "cpu":
            return self._detect(images)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._detect(images)
        finally:
            torch.set_num_threads(before)

    def _detect(self, images) -> list:
        found = [None] * len(images)
        groups = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for shape, members in groups.items():
            scale = min(1.0, DETECT_MAX_SIDE / max(shape[:2]))
            # NOTE: MTCNN's image pyramid starts at its minimum face size; faces here fill much of the photo
            self.mtcnn.min_face_size = max(MIN_FACE_PIXELS, int(self.min_face * min(shape[:2]) * scale))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = [images[i] for i in chunk]
                if scale < 1.0:
                    size = (round(shape[1] * scale), round(shape[0] * scale))
                    batch = [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in batch]
                for i, face in zip(chunk, self._detect_batch(np.stack(batch))):
                    if face is not None:
                        box, prob = face
                        found[i] = tuple(v / scale for v in box), prob
        return found

    def _detect_batch(self, batch: np.ndarray) -> list:
        try:
            boxes, probs = self.mtcnn.detect(batch)
        except (RuntimeError, ValueError, IndexError):
            if len(batch) == 1:
                return [None]  # NOTE: facenet-pytorch fails on a few degenerate photos; they fall back
            return [face for image in batch for face in self._detect_batch(image[None])]
        return [pick_face(b, p) for b, p in zip(boxes, probs)]


# ---------------------------------------------------------------- settings and the crop itself
def crop_settings(margin=DEFAULT_MARGIN, size=DEFAULT_SIZE, min_face=DEFAULT_MIN_FACE) -> dict:
    """The face_crop.json record: the settings alone, so two crops made the same way have equal records."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        facenet_version = version("facenet-pytorch")
    except PackageNotFoundError:
        facenet_version = None
    return {"detector": "mtcnn", "choice": "largest", "margin": float(margin), "size": [int(s) for s in size],
            "min_face": float(min_face), "detect_max_side": DETECT_MAX_SIDE, "fallback": "center",
            "fallback_centre": list(FALLBACK_CENTRE), "fallback_side": FALLBACK_SIDE, "pad": "shift inside, then black",
            "facenet_pytorch": facenet_version}


def check_settings(record: dict, where: str) -> dict:
    """A face_crop record this code reproduces exactly (its own settings rebuilt), or a ConfigError naming `where`."""
    try:
        own = crop_settings(float(record["margin"]), [int(s) for s in record["size"]], float(record["min_face"]))
    except (KeyError, TypeError, ValueError):
        own = None
    if own is None or not data.same_face_crop(record, own):
        differ = [k for k in data.FACE_CROP_SETTINGS if own is None or record.get(k) != own.get(k)]
        raise ConfigError(f"{where} was trained on face crops made with {json.dumps(record)}, which this version's "
                          f"face crop cannot reproduce ({', '.join(differ)} differ); crop the photos with the tool "
                          f"that made them and predict on those")
    return own


def detector_for(record: dict, device="auto", batch_size=DEFAULT_BATCH_SIZE, threads=DEFAULT_THREADS) -> FaceDetector:
    """The MTCNN detector a face_crop record asks for."""
    return FaceDetector(device, record["min_face"], batch_size, threads)


def crop_images(images, detector, settings: dict) -> list[Crop]:
    """Detect (batched) and crop full-resolution RGB uint8 photos with a face_crop record's margin and size."""
    faces = detector.detect(images)
    return [crop_photo(image, face, settings["margin"], settings["size"]) for image, face in zip(images, faces)]
