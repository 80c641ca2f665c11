"""The stages of bench/gpu_check.py: each runs one CUDA path (or one measurement) and returns its result.

A stage is a function of a Context (the settings, the device, a work folder, its end time) registered in
STAGES with a one-line `what`, its time limit and the least budget it needs; it returns a dict with `ok`
(its verdict), a one-line `summary`, its numbers, and optionally a `table` for gpu_check.md. ORDER is the
run order: correctness first (on tiny synthetic data), then the speeds at the real size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT

RESUME_REL_TOL = 1e-3  # resumed vs uninterrupted weights, where CUDA is not bitwise: max |a-b| / max |a|
# NOTE: fp32 on CUDA runs cuDNN convolutions in TF32 (torch's default), so it is not the CPU's fp32 either
PREDICT_TOL = {"off": 1e-2, "bf16": 5e-2, "fp16": 2e-2}  # max |p_device - p_cpu| over the task probabilities
BOX_TOL_PX = 3.0       # "a few pixels": largest corner difference of a face box, CUDA vs CPU
STEP_TARGET = 0.9      # our training step's images/s at least this share of the timm-style step's
HEADS = ("mask", "gender", "age", "joint")

# the sizes of each mode: small = the correctness runs, real = the speed runs, loader = the DataLoader data set
SIZES = {
    "full": {"small_model": "tf_efficientnet_lite0", "small_size": [96, 128], "small_people": 40, "small_batch": 32,
             "compile_model": "test_efficientnet", "real_model": "efficientnet_b3", "real_size": [240, 320],
             "real_batch": 64, "loader_people": 150, "loader_workers": [4, 8], "workers": 2},
    "quick": {"small_model": "test_efficientnet", "small_size": [40, 52], "small_people": 24, "small_batch": 32,
              "compile_model": "test_efficientnet", "real_model": "test_efficientnet", "real_size": [40, 52],
              "real_batch": 8, "loader_people": 12, "loader_workers": [2], "workers": 2},
}


def quiet(*_):
    pass


def say(text):
    print(f"[gpu_check] {text}", flush=True)


# ---------------------------------------------------------------- stages
@dataclasses.dataclass
class Stage:
    """One check: its function, what it checks (one line), its time limit and the least budget it starts with."""
    name: str
    fn: object
    what: str
    max_s: float          # stopped past this (or past the budget)
    min_s: float = 10     # not started with less of the budget left
    group: str = "check"  # stages of one group share a worker process ("check": deterministic CUDA algorithms)
    quick_skip: str = ""  # why the stage is left out of --quick on the CPU ("" = it runs)
    kwargs: dict = dataclasses.field(default_factory=dict)


STAGES: dict[str, Stage] = {}


def register(name, what, max_s, min_s=10, group="check", quick_skip="", **kwargs):
    def add(fn):
        STAGES[name] = Stage(name, fn, what, max_s, min_s, group, quick_skip, kwargs)
        return fn
    return add


class Context:
    """What a stage works with: the settings, the device, a work folder, its own end time and earlier results."""

    def __init__(self, args, deadline):
        import torch
        self.args, self.deadline = args, deadline
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.sizes = dict(SIZES["quick" if args.quick else "full"])
        for key in ("real_model", "real_size", "real_batch"):
            if getattr(args, key) is not None:
                self.sizes[key] = getattr(args, key)
        self.work = Path(args.work)
        self.cache = self.work / "cache"
        self.stage_end, self.stage_peak = deadline, 0

    def left(self) -> float:
        return self.stage_end - time.time()

    def folder(self, name) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def synthetic(self, name, people, size, eval_people=None) -> Path:
        """A synthetic data set in the work folder, made once (a `done` file marks it complete)."""
        from data_tools.make_synthetic import make_synthetic
        root = self.work / name
        if not (root / "done").is_file():
            make_synthetic(root / "data", people=people, seed=0, eval_people=eval_people, size=tuple(size),
                           progress=False, overwrite=True, workers=min(8, os.cpu_count() or 1))
            (root / "done").write_text("")
        return root / "data"

    def small_data(self) -> Path:
        return self.synthetic("small", self.sizes["small_people"], (96, 128))

    def earlier(self, name) -> dict | None:
        """The result of an earlier stage of this check (None if it did not run or failed)."""
        records = read_records(self.work / "records.jsonl")
        result = records.get(name)
        return result if result and result.get("status") == "ok" else None


def small_config(ctx, **overrides):
    """The TrainConfig of a correctness run: tiny data, the small model, EMA and age regression on."""
    from mtl import config
    values = {"data": str(ctx.small_data()), "cache_dir": str(ctx.cache), "model": ctx.sizes["small_model"],
              "pretrained": False, "img_size": ctx.sizes["small_size"], "batch_size": ctx.sizes["small_batch"],
              "augment": "flip", "lr": 3e-3, "warmup_epochs": 0.2, "epochs": 2, "workers": ctx.sizes["workers"],
              "progress": False, "drop_path_rate": 0.0, "head_dropout": 0.0, "log_images": 4, "ema": 0.9,
              "age_reg_weight": 0.1, "device": ctx.args.device, "channels_last": True, **overrides}
    return config.build(values, config_file=ROOT / "configs" / "default.yaml")


@contextlib.contextmanager
def deterministic(ctx, notes: list):
    """Deterministic algorithms (CUDA's nondeterministic ops warn; their names go to notes), restored after."""
    import warnings

    import torch
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before[0])
            torch.backends.cudnn.deterministic = before[1]
            notes += sorted({str(w.message).splitlines()[0][:160] for w in caught if "determinis" in str(w.message)})


def state_diff(a: dict, b: dict) -> dict:
    """How far two state dicts (or optimizer states) differ: bitwise?, max |a-b|, and that over max |a|."""
    import torch
    flat_a, flat_b = _flatten(a), _flatten(b)
    if flat_a.keys() != flat_b.keys():
        return {"bitwise": False, "max_abs_diff": math.inf, "rel_diff": math.inf, "keys_differ": True}
    bitwise, worst, scale = True, 0.0, 0.0
    for key, x in flat_a.items():
        y = flat_b[key]
        if not isinstance(x, torch.Tensor):
            bitwise &= x == y
            continue
        if not torch.equal(x, y):
            bitwise = False
            if x.is_floating_point():
                worst = max(worst, float((x.double() - y.double()).abs().max()))
            else:
                worst = math.inf
        if x.is_floating_point() and x.numel():
            scale = max(scale, float(x.double().abs().max()))
    return {"bitwise": bool(bitwise), "max_abs_diff": worst, "rel_diff": worst / max(scale, 1e-12)}


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(obj, (list, tuple)):
        return _flatten(dict(enumerate(obj)), prefix)
    return {prefix: obj}


def epoch_losses(run_dir) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [e.value for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []


def train_and_resume(ctx, amp, compile_=False, model=None):
    """2 epochs straight, and 1 epoch + a resume for the 2nd: losses finite, the two last.pt files equal."""
    from mtl import checkpoint
    from mtl.train import Interrupted, interrupt_after, train
    out = ctx.folder(f"train_{amp}{'_compile' if compile_ else ''}")
    overrides = {"amp": amp, "compile": compile_, **({"model": model} if model else {})}
    notes, times = [], {}
    with deterministic(ctx, notes):
        t0 = time.perf_counter()
        full = train(small_config(ctx, out=str(out / "full"), **overrides), log=quiet)
        times["straight_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with contextlib.suppress(Interrupted):
            train(small_config(ctx, out=str(out / "part"), **overrides), on_epoch=interrupt_after(1), log=quiet)
        saved = checkpoint.load(out / "part" / "last.pt")
        from mtl import config
        resumed = train(config.build({"resume": str(out / "part" / "last.pt")}, base=saved["config"]), log=quiet)
        times["stopped_and_resumed_s"] = time.perf_counter() - t0
    a, b = checkpoint.load(out / "full" / "last.pt"), checkpoint.load(out / "part" / "last.pt")
    weights, optimizer = state_diff(a["model"], b["model"]), state_diff(a["optimizer"], b["optimizer"])
    losses = epoch_losses(out / "full") + epoch_losses(out / "part")
    finite = bool(losses) and all(math.isfinite(v) for v in losses) and math.isfinite(full.best_f1)
    bitwise = weights["bitwise"] and optimizer["bitwise"] and a["scaler"] == b["scaler"]
    close = max(weights["rel_diff"], optimizer["rel_diff"]) <= RESUME_REL_TOL
    ok = finite and b["epoch"] == 2 and resumed.epochs_run == 1 and (bitwise or close)
    scale = a["scaler"].get("scale") if a["scaler"] else None
    summary = (f"losses {', '.join(f'{v:.3f}' for v in losses)}; resumed = straight run "
               f"{'bitwise' if bitwise else (f'within {RESUME_REL_TOL:.0e} (not bitwise)' if close else 'NO')}"
               f" (weights: largest difference {weights['max_abs_diff']:.1e})"
               + (f"; grad scale {scale:g}" if scale is not None else ""))
    return {"ok": ok, "summary": summary, "losses": losses, "finite": finite, "bitwise": bitwise,
            "weights": weights, "optimizer": optimizer, "scaler": a["scaler"], "val_f1": full.best_f1,
            "nondeterministic_ops": notes, "checkpoint": str(out / "full" / "best.pt"), **times}


@register("environment", "the machine, the packages, what torch sees", max_s=60, min_s=5)
def environment(ctx):
    import importlib.metadata
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cpu_count": os.cpu_count(), "device": str(ctx.device)}
    requirements = [line.split("==")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    versions, missing = {}, []
    for name in requirements:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    info.update(packages=versions, missing=missing)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        from mtl.inference import native_bf16
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), native_bf16=native_bf16(ctx.device),
                    cudnn_tf32=torch.backends.cudnn.allow_tf32, matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    import mtl.train  # noqa: F401 - the training code imports here (albumentations, timm, tensorboard)
    where = f"{info['gpu']} x{info['gpus']}, compute {info['capability']}" if ctx.cuda else "CPU"
    summary = f"{where}; torch {torch.__version__}; missing: {', '.join(missing) or 'none'}"
    return {"ok": True, "summary": summary, **info}


@register("pinned_loader", "batch ring with pinned memory = unpinned batches (and after async copies)", max_s=60)
def pinned_loader(ctx):
    import warnings

    import torch

    from mtl.dataset import DataSpec, FaceDataset, load_fold
    from mtl.loader import make_loader
    from mtl.transforms import eval_transform, make_preprocess
    size = tuple(ctx.sizes["small_size"])
    fold = load_fold(DataSpec(ctx.small_data()), size, cache_dir=ctx.cache, workers=2, progress=False, log=quiet)
    dataset = FaceDataset(fold.train_samples, fold.train_images, eval_transform(make_preprocess(size)))
    rows = []
    for workers in (0, 2):
        plain = list(make_loader(dataset, 16, workers, pin_memory=False))
        on_device, pinned, equal = [], [], True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch, ref in zip(make_loader(dataset, 16, workers, pin_memory=True), plain):
                pinned.append(batch["image"].is_pinned())
                equal &= all(torch.equal(batch[k], ref[k]) for k in ref)
                if ctx.cuda:  # NOTE: the batch is let go at once, so its pinned block can be handed out again
                    on_device.append(batch["image"].to(ctx.device, non_blocking=True))
        if ctx.cuda:
            torch.cuda.synchronize()
        copies_equal = all(torch.equal(d.cpu(), r["image"]) for d, r in zip(on_device, plain)) if ctx.cuda else None
        warned = sorted({str(w.message).splitlines()[0][:120] for w in caught if "pin" in str(w.message).lower()})
        as_expected = all(pinned) if ctx.cuda else not any(pinned)
        rows.append({"workers": workers, "batches": len(plain), "equal": equal, "pinned": all(pinned),
                     "copies_equal": copies_equal, "pin_warnings": warned,
                     "ok": equal and as_expected and copies_equal is not False and not warned and len(pinned) > 0})
    ok = all(r["ok"] for r in rows)
    what = "pinned, equal after non_blocking copies" if ctx.cuda else "no CUDA: not pinned, no warning"
    summary = (f"workers 0 and 2: {sum(r['batches'] for r in rows)} batches equal to the unpinned path; {what}"
               if ok else f"FAILED: {rows}")
    return {"ok": ok, "summary": summary, "rows": rows}


for _amp in ("off", "fp16", "bf16"):
    register(f"train_{'fp32' if _amp == 'off' else _amp}",
             f"{'fp32' if _amp == 'off' else _amp} + channels_last: 2 epochs; stopped after 1 and resumed = straight",
             max_s=90, min_s=15, quick_skip="" if _amp != "fp16" else "fp16 autocast on the CPU is no product path",
             amp=_amp)(train_and_resume)


@register("train_compile", "bf16 + channels_last + --compile: 2 epochs; resumed = straight", max_s=100, min_s=45,
          quick_skip="inductor's C++ build takes minutes on 2 cores (tests/test_cuda_twins.py runs it, marked slow)",
          amp="bf16", compile_=True)
def train_compile(ctx, amp, compile_):
    import timm
    model = ctx.sizes["compile_model"] if timm.is_model(ctx.sizes["compile_model"]) else None  # NOTE: older timm
    return train_and_resume(ctx, amp, compile_, model=model)


def small_checkpoint(ctx) -> str:
    """best.pt of the fp32 correctness run, or of a new 1-epoch run when that stage did not succeed."""
    earlier = ctx.earlier("train_fp32")
    if earlier and Path(earlier["checkpoint"]).is_file():
        return earlier["checkpoint"]
    from mtl.train import train
    out = ctx.folder("predict_model")
    return str(Path(train(small_config(ctx, out=str(out), epochs=1, amp="off"), log=quiet).out) / "best.pt")


@register("predict", "predict.py on the device = on the CPU, same checkpoint (fp32, hflip TTA, bf16, fp16)",
          max_s=75, min_s=15)
def predict(ctx):
    import numpy as np

    from mtl import predict as predict_cli
    from mtl.metrics import predict_classes
    checkpoint, data, out = small_checkpoint(ctx), ctx.small_data(), ctx.folder("predict")

    def probs(device, amp, tta):
        argv = ["--checkpoint", checkpoint, "--data", str(data), "--out", str(out / f"{device}_{amp}_{tta}.csv"),
                "--device", device, "--amp", amp, "--tta", tta, "--workers", str(ctx.sizes["workers"]),
                "--cache-dir", str(ctx.cache), "--no-progress"]
        return predict_cli.run(predict_cli.get_args_parser().parse_args(argv), log=quiet).member_probs[0]

    reference = {tta: probs("cpu", "off", tta) for tta in ("none", "hflip")}
    cases = [("off", "none"), ("off", "hflip"), ("bf16", "none")] + ([("fp16", "none")] if ctx.cuda else [])
    rows = []
    for amp, tta in cases:
        got, ref = probs(ctx.args.device, amp, tta), reference[tta]
        worst = max(float(np.abs(got[k] - ref[k]).max()) for k in HEADS if k in ref)
        agree = float(np.mean(predict_classes(got) == predict_classes(ref)))
        age_reg = float(np.abs(got["age_reg"] - ref["age_reg"]).max()) if "age_reg" in ref else None
        rows.append({"amp": amp, "tta": tta, "photos": len(ref["mask"]), "max_prob_diff": worst,
                     "tolerance": PREDICT_TOL[amp], "same_18_class": agree, "age_reg_max_diff_years": age_reg,
                     "ok": worst <= PREDICT_TOL[amp]})
    ok = all(r["ok"] for r in rows)
    summary = "; ".join(f"{'fp32' if r['amp'] == 'off' else r['amp']}{' + hflip' if r['tta'] != 'none' else ''} "
                        f"probabilities within {r['max_prob_diff']:.1e} (tol {r['tolerance']:.0e}), same class "
                        f"{r['same_18_class']:.0%}" for r in rows)
    return {"ok": ok, "summary": f"{ctx.args.device} vs cpu: {summary}", "rows": rows,
            "table": {"title": f"Predictions on {ctx.args.device} vs the CPU (fp32), same checkpoint",
                      "columns": ["amp", "tta", "photos", "max_prob_diff", "tolerance", "same_18_class",
                                  "age_reg_max_diff_years", "ok"], "rows": rows}}


def face_data(ctx) -> tuple[Path, int]:
    """A few synthetic photos with a real face pasted into each where real faces are at hand: (data, faces)."""
    import numpy as np
    import pandas as pd
    from PIL import Image
    root = ctx.synthetic("faces", 3, (192, 256), eval_people=1)
    places = [Path(p) for p in ([ctx.args.faces] if ctx.args.faces else [])] + [
        ROOT / ".whl" / "faces", ROOT.parent / "shared" / "data" / "utkface-dev"]
    source = next((p for p in places if p.is_dir() and any(p.glob("*.jpg"))), None)
    if source is None:
        return root, 0
    faces = sorted(source.glob("*.jpg"))
    photos = [root / "train" / "images" / person / name for person in pd.read_csv(root / "train" / "train.csv",
                                                                                  dtype=str)["path"]
              for name in sorted(os.listdir(root / "train" / "images" / person))]
    photos += sorted((root / "eval" / "images").iterdir())
    rng = np.random.default_rng(0)
    for k, path in enumerate(photos):
        with Image.open(path) as photo, Image.open(faces[k * 37 % len(faces)]) as face:
            canvas = photo.convert("RGB")
            side = int(rng.integers(80, 140))
            x, y = int(rng.integers(0, 192 - side)), int(rng.integers(0, 256 - side))
            canvas.paste(face.convert("RGB").resize((side, side)), (x, y))
            canvas.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)
    return root, len(photos)


@register("crop_faces", "crop_faces --device DEVICE finds the CPU's face boxes within a few pixels", max_s=90)
def crop_faces(ctx):
    import csv
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        raise RuntimeError("facenet-pytorch is not installed (on a bare GPU machine: bench/gpu_wheels.sh carries "
                           "it)") from None
    from data_tools.crop_faces import BOXES_FILE, crop_dataset
    data, pasted = face_data(ctx)
    out = ctx.folder("crop")
    boxes = {}
    for device in ("cpu", ctx.args.device):
        target = out / f"on_{device.replace(':', '')}"
        shutil.rmtree(target, ignore_errors=True)
        crop_dataset(data, target, size=(96, 128), device=device, batch_size=16, workers=2, progress=False, log=quiet)
        with open(target / BOXES_FILE, newline="") as f:
            boxes[device] = {row["path"]: row for row in csv.DictReader(f)}
    cpu, dev = boxes["cpu"], boxes[ctx.args.device]
    both, shifts, disagree = 0, [], []
    for path, a in cpu.items():
        b = dev[path]
        if a["fallback"] != b["fallback"]:
            found = a if a["fallback"] == "0" else b
            disagree.append({"path": path, "found_on": "cpu" if found is a else ctx.args.device,
                             "prob": float(found["prob"])})
        elif a["fallback"] == "0":
            both += 1
            shifts.append(max(abs(float(a[k]) - float(b[k])) for k in ("x1", "y1", "x2", "y2")))
    worst = max(shifts, default=0.0)
    # NOTE: a face MTCNN is unsure of (prob < 0.9: a drawn one) may be found on one device only
    ok = set(cpu) == set(dev) and worst <= BOX_TOL_PX and all(d["prob"] < 0.9 for d in disagree) and both > 0
    summary = (f"{len(cpu)} photos ({pasted} with a real face pasted): faces found on both in {both}, largest box "
               f"shift {worst:.1f} px (tol {BOX_TOL_PX:g}); found on one device only: {len(disagree)}")
    return {"ok": ok, "summary": summary, "photos": len(cpu), "real_faces_pasted": pasted, "both_found": both,
            "max_shift_px": worst, "disagreements": disagree}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_one_rank(ctx) -> dict:
    """A 1-rank process group (NCCL on CUDA, gloo on the CPU): a DDP step has the plain model's gradients."""
    import copy

    import torch
    import torch.distributed as dist

    from mtl.model import create_model
    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = create_model(ctx.sizes["small_model"], "multihead", pretrained=False).to(ctx.device)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            copy.deepcopy(plain), device_ids=[ctx.device.index or 0] if ctx.cuda else None)
        w, h = ctx.sizes["small_size"]
        x = torch.randint(0, 256, (4, 3, h, w), dtype=torch.uint8, device=ctx.device)
        notes = []
        with deterministic(ctx, notes):
            for model in (plain, wrapped):
                model.train()
                torch.manual_seed(1)  # NOTE: the same dropout masks for both
                sum(v.float().sum() for v in model(x).values()).backward()
        grads = state_diff({n: p.grad for n, p in plain.named_parameters()},
                           {n.removeprefix("module."): p.grad for n, p in wrapped.named_parameters()})
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": dist.get_rank()})
        ok = grads["rel_diff"] <= 1e-5 and gathered == [{"rank": 0}]
        return {"backend": backend, "grads": grads, "ok": ok}
    finally:
        dist.destroy_process_group()


@register("torchrun", "torchrun: 1 process completes an epoch (2 when 2 GPUs); a 1-rank DDP step", max_s=150,
          min_s=30)
def torchrun(ctx):
    import torch
    rows = [{"run": "ddp_one_rank", **ddp_one_rank(ctx)}]
    counts = [1] + ([2] if ctx.cuda and torch.cuda.device_count() >= 2 else [])
    for n in counts:
        out = ctx.folder(f"torchrun{n}")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                   str(free_port()), "train_multitask.py", "--config", "configs/demo.yaml", "--data",
                   str(ctx.small_data()), "--cache-dir", str(ctx.cache), "--out", str(out / "run"), "--epochs", "1",
                   "--workers", str(ctx.sizes["workers"]), "--device", ctx.args.device, "--no-progress"]
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(10, ctx.left()))
        ok = done.returncode == 0 and (out / "run" / "best.pt").is_file() and done.stdout.count("epoch 1/1") == 1
        rows.append({"run": f"torchrun {n} process{'es' if n > 1 else ''}", "ok": ok, "rc": done.returncode,
                     "seconds": time.perf_counter() - t0, "tail": "" if ok else (done.stdout + done.stderr)[-1500:]})
    if len(counts) == 1:
        rows.append({"run": "torchrun 2 processes", "ok": None, "skipped": "one GPU visible" if ctx.cuda else
                     "CPU (tests/test_train.py runs 2 gloo processes)"})
    ok = all(r["ok"] is not False for r in rows)
    said = {True: "ok", False: "FAILED", None: "skipped"}
    summary = "; ".join(f"{r['run']}: {said[r['ok']]}{', ' + r['skipped'] if 'skipped' in r else ''}"
                        for r in rows) + f" ({rows[0]['backend']})"
    return {"ok": ok, "summary": summary, "rows": rows}


def cuda_peak_reset(ctx):
    """Start a new GPU memory peak (the stage's own peak keeps the highest of all)."""
    import torch
    if ctx.cuda:
        torch.cuda.synchronize()
        ctx.stage_peak = max(ctx.stage_peak, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mb(ctx):
    """The GPU memory peak since the last cuda_peak_reset, MiB (None on the CPU)."""
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if ctx.cuda else None


def precisions(ctx, full_set):
    """(name, autocast dtype, channels_last, archs) of the speed runs."""
    import torch

    from bench.speed import ARCHS
    both = [("fp32", None, False, ARCHS), ("bf16 + channels_last", torch.bfloat16, True, ARCHS)]
    if not full_set:
        return both
    one = ("multihead",)
    return both + [("fp32 + channels_last", None, True, one), ("bf16", torch.bfloat16, False, one),
                   ("fp16 + channels_last", torch.float16, True, one)]


@register("speed_archs", "train / inference img/s: multihead vs separate vs joint18, fp32 vs AMP + channels_last",
          max_s=100, min_s=40, group="speed")
def speed_archs(ctx):
    import types

    import torch

    from bench.speed import Bench, time_benches
    s = ctx.sizes
    quick = ctx.args.quick
    args = types.SimpleNamespace(model=s["real_model"], img_size=s["real_size"], batch_size=s["real_batch"],
                                 steps=2 if quick else 3, rounds=2 if quick else 4, warmup=1 if quick else 2)
    settings = precisions(ctx, full_set=ctx.cuda)
    rows, finite = [], True
    for k, (name, dtype, channels_last, archs) in enumerate(settings):
        share = ctx.left() * len(archs) / sum(len(a) for *_, a in settings[k:])  # NOTE: time by the archs timed
        benches = {arch: Bench(arch, args, ctx.device, dtype, channels_last) for arch in archs}
        rates = time_benches(benches, args, deadline=time.perf_counter() + 0.6 * share)
        for arch, bench in benches.items():
            cuda_peak_reset(ctx)
            loss = bench.step(True)
            finite &= bool(torch.isfinite(loss))
            row = {"arch": arch, "precision": name, "train_img_s": rates[arch][0], "infer_img_s": rates[arch][1],
                   "loss": float(loss), "train_step_peak_mb": cuda_peak_mb(ctx)}
            if "separate" in rates:
                row.update(train_vs_separate=rates[arch][0] / rates["separate"][0],
                           infer_vs_separate=rates[arch][1] / rates["separate"][1])
            rows.append(row)
        del benches
        if ctx.cuda:
            torch.cuda.empty_cache()
        say(f"  speed {name}: " + ", ".join(f"{r['arch']} {r['train_img_s']:.0f}/{r['infer_img_s']:.0f}"
                                           for r in rows if r["precision"] == name) + " img/s (train/infer)")
    by = {(r["arch"], r["precision"]): r for r in rows}
    multi = by[("multihead", "bf16 + channels_last")]
    summary = (f"{s['real_model']} {s['real_size'][0]}x{s['real_size'][1]} batch {s['real_batch']}: multihead "
               f"{by[('multihead', 'fp32')]['train_img_s']:.0f} -> {multi['train_img_s']:.0f} img/s training (fp32 -> "
               f"bf16 + channels_last), {multi['train_vs_separate']:.2f}x separate; losses finite: {finite}")
    return {"ok": finite, "summary": summary, "rows": rows,
            "table": {"title": f"Architectures at the real size ({s['real_model']}, {s['real_size'][0]}x"
                               f"{s['real_size'][1]}, batch {s['real_batch']}, random weights)",
                      "columns": ["arch", "precision", "train_img_s", "infer_img_s", "train_vs_separate",
                                  "infer_vs_separate", "train_step_peak_mb"], "rows": rows}}


def fake_batch(ctx, n, size):
    """A batch as the loader gives it (uint8 photos in channels_last layout, the task targets), on the device."""
    import torch
    w, h = size
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    ages = torch.randint(18, 80, (n,), generator=g)
    batch = {"image": image, "mask": torch.randint(0, 3, (n,), generator=g),
             "gender": torch.randint(0, 2, (n,), generator=g), "age_group": (ages >= 30).long() + (ages >= 60).long(),
             "age_years": ages.float()}
    return {k: v.to(ctx.device) for k, v in batch.items()}


def timed(ctx, step, steps) -> float:
    """Seconds of `steps` calls of step(), the device synchronized before and after."""
    import torch
    if ctx.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(steps)
    if ctx.cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def our_step(ctx, amp):
    """(run(n steps), config) through train.py's own setup and train_one_epoch, batches already on the device."""
    from mtl import config
    from mtl.train import setup, train_one_epoch
    s = ctx.sizes
    out = ctx.folder(f"step_{amp}")
    cfg = config.build({"data": str(ctx.small_data()), "cache_dir": str(ctx.cache), "out": str(out),
                        "model": s["real_model"], "img_size": s["real_size"], "batch_size": s["real_batch"],
                        "pretrained": False, "amp": amp, "device": ctx.args.device, "workers": ctx.sizes["workers"],
                        "progress": False, "channels_last": True},
                       config_file=ROOT / "configs" / "efficientnet_b3.yaml")
    state = setup(cfg, log=quiet)  # a train.Run
    batch = fake_batch(ctx, s["real_batch"], s["real_size"])

    def run(n):
        return train_one_epoch(state, [batch] * n, 1, writer=None)  # NOTE: no TensorBoard writer here
    return run, cfg, state


def timm_step(ctx, cfg, dtype):
    """timm benchmark.py's training step for the same trunk: random input, autocast, cross-entropy, AdamW."""
    import timm
    import torch
    import torch.nn.functional as F

    from mtl.inference import autocast
    s = ctx.sizes
    torch.manual_seed(0)
    model = timm.create_model(s["real_model"], pretrained=False, drop_path_rate=cfg.drop_path_rate or None)
    model = model.to(ctx.device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    w, h = s["real_size"]
    x = torch.randn(s["real_batch"], 3, h, w, device=ctx.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (s["real_batch"],), device=ctx.device)
    losses = []

    def run(n):
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with autocast(ctx.device, dtype):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if ctx.cuda:
                torch.cuda.synchronize()  # NOTE: as benchmark.py, whose timer synchronizes after every step
            losses.append(loss.detach())
    return run, losses


@register("train_step", "our training step (train_one_epoch) vs a timm benchmark.py-style step, same trunk and size",
          max_s=90, min_s=30, group="speed")
def train_step(ctx):
    import torch

    from mtl.inference import amp_dtype
    s = ctx.sizes
    amps = ["off", "bf16"] + (["fp16"] if ctx.cuda else [])
    rows, finite = [], True
    for k, amp in enumerate(amps):
        share = ctx.left() / (len(amps) - k)
        t_end = time.perf_counter() + share
        ours, cfg, state = our_step(ctx, amp)
        dtype = amp_dtype(amp, ctx.device)
        runs = {"ours": ours}
        if amp != "fp16":
            runs["timm-style"], timm_losses = timm_step(ctx, cfg, dtype)
        probe = {}
        benchmark_modes = [False, True] if ctx.cuda and amp == "bf16" else [False]  # NOTE: the default precision
        for bench in benchmark_modes:
            torch.backends.cudnn.benchmark = bench
            for who, run in runs.items():
                run(2)  # NOTE: warm-up: cuDNN's algorithm choice (and its autotuning when benchmark is on)
                one = timed(ctx, run, 2) / 2
                left = (t_end - time.perf_counter()) / max(1, 2 * len(benchmark_modes) * len(runs))
                steps = int(min(30, max(3, left / max(one, 1e-6))))
                cuda_peak_reset(ctx)
                seconds = timed(ctx, run, steps)
                probe[(who, bench)] = steps * s["real_batch"] / seconds
                rows.append({"step": who, "precision": "fp32" if amp == "off" else amp, "channels_last": True,
                             "cudnn_benchmark": bench, "steps": steps, "img_s": probe[(who, bench)],
                             "peak_mb": cuda_peak_mb(ctx)})
        torch.backends.cudnn.benchmark = False
        epoch_loss = ours(1)["loss"]
        finite &= math.isfinite(epoch_loss) and all(bool(torch.isfinite(v)) for v in (timm_losses if amp != "fp16"
                                                                                       else []))
        for row in rows:
            if row["precision"] == ("fp32" if amp == "off" else amp) and (("timm-style", row["cudnn_benchmark"])
                                                                        in probe):
                row["vs_timm"] = probe[(row["step"], row["cudnn_benchmark"])] / probe[("timm-style",
                                                                                        row["cudnn_benchmark"])]
        if amp == "fp16":
            rows[-1]["grad_scale"] = float(state.scaler.get_scale()) if state.scaler.is_enabled() else None
        del ours, runs, run, state  # NOTE: the next precision's models get the memory
        if ctx.cuda:
            torch.cuda.empty_cache()
    main = [r for r in rows if r["step"] == "ours" and r["precision"] == "bf16" and not r["cudnn_benchmark"]][0]
    meets = main["vs_timm"] >= STEP_TARGET
    summary = (f"ours {main['img_s']:.0f} img/s = {main['vs_timm']:.0%} of the timm-style step (bf16 + channels_last, "
               f"cudnn.benchmark off; target {STEP_TARGET:.0%}: {'met' if meets else 'NOT met'})")
    best = [r for r in rows if r["step"] == "ours" and r["precision"] == "bf16" and r["cudnn_benchmark"]]
    if best:
        summary += f"; with cudnn.benchmark on {best[0]['img_s']:.0f} img/s"
    return {"ok": finite, "summary": summary + f"; losses finite: {finite}", "target_met": meets, "rows": rows,
            "model_img_s": main["img_s"],
            "table": {"title": f"Our training step vs a timm benchmark.py-style step ({s['real_model']}, "
                               f"{s['real_size'][0]}x{s['real_size'][1]}, batch {s['real_batch']})",
                      "columns": ["step", "precision", "cudnn_benchmark", "steps", "img_s", "vs_timm", "peak_mb",
                                  "grad_scale"], "rows": rows}}


@register("loader", "DataLoader img/s (decoded-image cache; 4 and 8 workers) vs the model's training img/s",
          max_s=80, min_s=25, group="speed")
def loader(ctx):
    import torch

    from mtl.dataset import DataSpec, FaceDataset, load_fold
    from mtl.loader import make_loader
    from mtl.transforms import make_preprocess, train_transform
    s = ctx.sizes
    size = tuple(s["real_size"])
    data = ctx.synthetic("loader", s["loader_people"], size, eval_people=4)
    fold = load_fold(DataSpec(data), size, cache_dir=ctx.cache, workers=min(8, os.cpu_count() or 1), progress=False,
                     log=quiet)
    earlier = ctx.earlier("train_step")
    model_rate = earlier["model_img_s"] if earlier else None
    rows = []
    for augment in ("strong", "flip"):
        dataset = FaceDataset(fold.train_samples, fold.train_images, train_transform(make_preprocess(size, size),
                                                                                     augment))
        for workers in s["loader_workers"]:
            rates = []
            for epoch in range(2):
                batches = make_loader(dataset, s["real_batch"], workers, shuffle=True, drop_last=True,
                                      generator=torch.Generator().manual_seed(epoch), device=ctx.device)
                n = 0
                for batch in batches:
                    image = batch["image"].to(ctx.device, non_blocking=True)
                    if n == 0:
                        t_first, n_first = time.perf_counter(), len(image)
                    n += len(image)
                if ctx.cuda:
                    torch.cuda.synchronize()
                rates.append((n - n_first) / max(time.perf_counter() - t_first, 1e-9))
            rate = max(rates)
            rows.append({"augment": augment, "workers": workers, "photos": len(dataset), "loader_img_s": rate,
                         "model_img_s": model_rate, "loader_vs_model": rate / model_rate if model_rate else None,
                         "starved": (rate < model_rate) if model_rate else None})
            say(f"  loader {augment}, {workers} workers: {rate:.0f} img/s")
    strong = [r for r in rows if r["augment"] == "strong"]
    if model_rate:
        verdict = ", ".join(f"{r['workers']} workers {r['loader_img_s']:.0f} img/s ({r['loader_vs_model']:.2f}x)"
                            for r in strong)
        summary = f"strong augmentation: {verdict} against the model's {model_rate:.0f} img/s"
    else:
        summary = "strong augmentation: " + ", ".join(f"{r['workers']} workers {r['loader_img_s']:.0f} img/s"
                                                      for r in strong) + " (no model rate: train_step did not run)"
    return {"ok": True, "summary": summary, "rows": rows,
            "table": {"title": f"DataLoader from the decoded-image cache vs the model ({size[0]}x{size[1]} photos, "
                               f"batch {s['real_batch']}, steady rate of the better of 2 passes)",
                      "columns": ["augment", "workers", "photos", "loader_img_s", "model_img_s", "loader_vs_model",
                                  "starved"], "rows": rows}}


ORDER = ["environment", "pinned_loader", "train_fp32", "train_fp16", "train_bf16", "predict", "crop_faces",
         "torchrun", "train_compile", "speed_archs", "train_step", "loader"]




# ---------------------------------------------------------------- the records file
def read_records(path) -> dict:
    """records.jsonl -> {stage: its last record's result} (a start without an end has status 'running')."""
    out = {}
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # NOTE: a line cut short by a kill
        if record["event"] == "start":
            out[record["stage"]] = {"status": "running", "started": record["t"], "kill_at": record["kill_at"]}
        elif record["event"] == "end":
            out[record["stage"]] = record["result"]
    return out


def append_record(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
