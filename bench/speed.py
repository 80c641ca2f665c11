#!/usr/bin/env python3
"""Training and inference throughput of the three architectures, side by side in one run.

Same trunk, batch and image size for `multihead` (one trunk, three heads), `joint18` (one trunk,
one 18-way head) and `separate` (three trunks, the seed write-ups' approach); random uint8 photos,
so only the model's own cost is measured (bench/loading.py measures the data path). On CUDA it
also compares fp32 with AMP (bf16) + channels_last.

    python -m bench.speed                                   # CPU defaults (2 cores: ~2 minutes)
    python -m bench.speed --model efficientnet_b3 --img-size 240 320 --batch-size 64 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import table, write_json
from mtl.inference import autocast
from mtl.losses import build_loss
from mtl.model import create_model

ARCHS = ("multihead", "joint18", "separate")
LOSSES = {"mask": {"name": "ce"}, "gender": {"name": "bce"}, "age": {"name": "ce"}, "joint": {"name": "ce"}}


class Bench:
    """One architecture's model, batch and step function, timed in rounds interleaved with the others'."""

    def __init__(self, arch, args, device, dtype, channels_last):
        torch.manual_seed(0)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        self.model = create_model(args.model, arch, pretrained=False).to(device).to(memory_format=memory)
        w, h = args.img_size
        n = args.batch_size
        self.x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, device=device).contiguous(memory_format=memory)
        self.targets = {"mask": torch.randint(0, 3, (n,), device=device),
                        "gender": torch.randint(0, 2, (n,), device=device),
                        "age_group": torch.randint(0, 3, (n,), device=device),
                        "age_years": torch.full((n,), 40.0, device=device)}
        self.loss_fn = build_loss(LOSSES, arch, {k: [1] * c for k, c in (("mask", 3), ("gender", 2), ("age", 3),
                                                                         ("joint", 18))}).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.device, self.dtype, self.n = device, dtype, n

    def step(self, train: bool):
        """One training step (returns the loss, not synchronized) or one inference pass (returns None)."""
        if train:
            self.model.train()
            with autocast(self.device, self.dtype):
                out = self.model(self.x)
            loss, _ = self.loss_fn({k: v.float() for k, v in out.items()}, self.targets)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            return loss.detach()
        self.model.eval()
        with torch.inference_mode(), autocast(self.device, self.dtype):
            self.model(self.x)
        return None

    def images_per_s(self, train: bool, steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(train)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * self.n / (time.perf_counter() - t0)


def compare(args, device, dtype, channels_last, archs=ARCHS, deadline=None) -> dict:
    """{arch: (train img/s, inference img/s)}: the median of rounds in which every arch runs in turn."""
    benches = {arch: Bench(arch, args, device, dtype, channels_last) for arch in archs}
    return time_benches(benches, args, deadline)


def time_benches(benches: dict, args, deadline=None) -> dict:
    """compare()'s timing of built benches; past `deadline` (time.perf_counter) no further round starts."""
    for bench in benches.values():
        for _ in range(args.warmup):
            bench.step(True)
            bench.step(False)
    rates = {arch: {True: [], False: []} for arch in benches}
    for k in range(args.rounds):
        if k and deadline is not None and time.perf_counter() > deadline:
            break
        for train in (True, False):
            for arch, bench in benches.items():
                rates[arch][train].append(bench.images_per_s(train, args.steps))
    return {arch: (statistics.median(r[True]), statistics.median(r[False])) for arch, r in rates.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--img-size", type=int, nargs=2, default=[96, 128], metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/results/speed.json")
    args = parser.parse_args()
    from mtl.inference import resolve_device
    device = resolve_device(args.device)
    settings = [("fp32", None, False)]
    if device.type == "cuda":
        settings.append(("amp_bf16+channels_last", torch.bfloat16, True))
    rows = []
    for name, dtype, channels_last in settings:
        rates = compare(args, device, dtype, channels_last)
        for arch, (train, infer) in rates.items():
            rows.append({"arch": arch, "precision": name, "train_img_s": train, "infer_img_s": infer,
                         "train_vs_separate": train / rates["separate"][0],
                         "infer_vs_separate": infer / rates["separate"][1]})
            print(f"{name:>24} {arch:>10}: train {train:.1f} img/s, infer {infer:.1f} img/s", flush=True)
    print()
    print(table(rows, ["arch", "precision", "train_img_s", "infer_img_s", "train_vs_separate", "infer_vs_separate"]))
    path = write_json({"settings": vars(args), "device": str(device), "rows": rows}, args.out)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
