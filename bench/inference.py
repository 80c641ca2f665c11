#!/usr/bin/env python3
"""CPU inference: PyTorch vs onnxruntime on the exported model, side by side; and the face crop's cost per photo.

A multihead checkpoint (tf_efficientnet_lite0 trunk with its real ImageNet weights from
../shared/weights when at hand, age regression on) is exported by the product's own command
(`mtl.export`, which checks the file against PyTorch). The same photos (real faces from
../shared/data/utkface-dev when at hand, resized to the input size, uint8 NHWC) in the same batches then
go through PyTorch (the model and the probabilities predict.py computes, under inference_mode) and
through onnxruntime (the exported file, CPU provider), at each thread count, in interleaved rounds
(the median round is reported), so a slow moment of the shared machine hits both alike. Then the
built-in face crop (`mtl.face_crop.crop_images`: MTCNN + the cut, what `--images` runs for a model
trained on crops) on competition-size 384x512 photos with a real face, batch 32, one thread.

    python -m bench.inference                                           # CPU defaults (2 cores: ~4 minutes)
    python -m bench.inference --img-size 240 320 --batch-size 16 --threads 1 2 --crop-photos 64
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import SHARED, table, write_json
from mtl import checkpoint, config, face_crop
from mtl.deploy import DeployModel, sample_photos
from mtl.export import export_checkpoint
from mtl.images import fit_size
from mtl.model import model_from_config, normalization
from mtl.transforms import make_preprocess

WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"
UTKFACE = SHARED / "data" / "utkface-dev"


def make_checkpoint(args, path: Path) -> Path:
    """A checkpoint as training writes it (the trunk's ImageNet weights, untrained heads): what is timed is the same."""
    pretrained = WEIGHTS.is_file()
    cfg = config.build({"model": args.model, "img_size": args.img_size, "age_reg_weight": 0.1, "data": "unused",
                        "pretrained": pretrained, "pretrained_file": str(WEIGHTS) if pretrained else None})
    model = model_from_config(cfg)
    mean, std = normalization(model)
    checkpoint.save({"model": model.state_dict(), "config": cfg.to_dict(), "schema": checkpoint.schema_for(cfg),
                     "preprocess": make_preprocess(cfg.img_size, mean=mean, std=std), "epoch": 0, "metrics": {}},
                    path)
    return path


def faces(n) -> list[np.ndarray]:
    """n real face photos (UTKFace, 200x200), or random photos when they are not at hand."""
    files = sorted(UTKFACE.glob("*.jpg")) if UTKFACE.is_dir() else []
    files = files[:: max(1, len(files) // n)][:n]  # NOTE: spread over the sorted names: all ages
    if not files:
        return list(sample_photos(200, 200, n).numpy())
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def competition_photos(n) -> list[np.ndarray]:
    """384x512 photos like the competition's: a face (about 250 px) on a plain background, placed a little apart."""
    rng = np.random.default_rng(0)
    photos = []
    for face in faces(n):
        canvas = np.empty((512, 384, 3), np.uint8)
        canvas[:] = rng.integers(60, 200, 3)
        x, y = 60 + int(rng.integers(0, 40)), 90 + int(rng.integers(0, 60))
        canvas[y:y + 250, x:x + 250] = fit_size(face, (250, 250))
        photos.append(canvas)
    return photos


def compare(args, model_file, ckpt) -> list[dict]:
    """{engine: img/s} per thread count: the median of rounds in which PyTorch and onnxruntime run in turn."""
    import onnxruntime as ort
    width, height = args.img_size
    photos = np.stack([fit_size(f, (width, height)) for f in faces(args.batch_size * args.steps)])
    batches = [photos[i:i + args.batch_size] for i in range(0, len(photos), args.batch_size)]
    module = DeployModel(checkpoint.build_model(checkpoint.load(ckpt)).eval()).eval()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

        def run_torch():
            with torch.inference_mode():
                return [module(torch.from_numpy(b))["classes"].numpy() for b in batches]

        def run_ort(session=session):
            return [session.run(["classes"], {"image": b})[0] for b in batches]

        agree = np.mean(np.concatenate(run_torch()).argmax(1) == np.concatenate(run_ort()).argmax(1))
        for _ in range(args.warmup):
            run_torch(), run_ort()
        rates = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.rounds):
            for name, fn in (("pytorch", run_torch), ("onnxruntime", run_ort)):
                t0 = time.perf_counter()
                fn()
                rates[name].append(len(photos) / (time.perf_counter() - t0))
        row = {"threads": threads, "batch": args.batch_size, "pytorch_img_s": statistics.median(rates["pytorch"]),
               "onnxruntime_img_s": statistics.median(rates["onnxruntime"]), "same_class": float(agree)}
        row["ort_vs_pytorch"] = row["onnxruntime_img_s"] / row["pytorch_img_s"]
        rows.append(row)
        print(f"{threads} thread(s): PyTorch {row['pytorch_img_s']:.1f} img/s, onnxruntime "
              f"{row['onnxruntime_img_s']:.1f} img/s ({row['ort_vs_pytorch']:.2f}x)", flush=True)
    return rows


def crop_cost(args) -> dict:
    """Seconds per photo of the built-in face crop (detect + cut) on 384x512 photos, after one warm-up batch."""
    photos = competition_photos(args.crop_photos)
    settings = face_crop.crop_settings()
    detector = face_crop.FaceDetector("cpu", settings["min_face"], face_crop.DEFAULT_BATCH_SIZE)
    face_crop.crop_images(photos[:4], detector, settings)
    t0 = time.perf_counter()
    crops = []
    chunk = face_crop.CHUNK_BATCHES * face_crop.DEFAULT_BATCH_SIZE
    for start in range(0, len(photos), chunk):
        crops += face_crop.crop_images(photos[start:start + chunk], detector, settings)
    seconds = time.perf_counter() - t0
    out = {"photos": len(photos), "photo_size": [384, 512], "seconds_per_photo": seconds / len(photos),
           "faces_found": sum(not c.fallback for c in crops), "threads": detector.threads,
           "batch": detector.batch_size, "real_faces": UTKFACE.is_dir()}
    print(f"face crop: {out['seconds_per_photo'] * 1000:.0f} ms per 384x512 photo on the CPU ({out['faces_found']} "
          f"of {len(photos)} faces found)", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--img-size", type=int, nargs=2, default=[240, 320], metavar=("W", "H"),
                        help="input size (default 240 320, configs/default.yaml's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--crop-photos", type=int, default=48, help="photos for the face-crop timing")
    parser.add_argument("--out", default="bench/results/inference.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        ckpt = make_checkpoint(args, Path(work) / "best.pt")
        t0 = time.perf_counter()
        record = export_checkpoint(ckpt, "onnx", Path(work) / "model.onnx")
        export_s = time.perf_counter() - t0
        rows = compare(args, Path(work) / "model.onnx", ckpt)
        size_mb = (Path(work) / "model.onnx").stat().st_size / 2**20
    crop = crop_cost(args)
    print()
    print(table(rows, ["threads", "batch", "pytorch_img_s", "onnxruntime_img_s", "ort_vs_pytorch", "same_class"]))
    path = write_json({"settings": vars(args), "pretrained_trunk": WEIGHTS.is_file(), "export_seconds": export_s,
                       "onnx_mb": size_mb, "check_max_error": record["check"]["max_error"], "rows": rows,
                       "face_crop": crop}, args.out)
    print(f"\nexport {export_s:.0f} s, {size_mb:.1f} MB; written {path}")


if __name__ == "__main__":
    main()
