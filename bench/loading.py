#!/usr/bin/env python3
"""Data loading: training DataLoader images/s with the decoded-image cache vs decoding JPEG every time.

Builds (once) a synthetic data set of 384x512 JPEG photos, then times full passes of the training
DataLoader (2 workers) over it, for each load size (decode + resize target; the network input is
the same size) and augmentation preset, each variant in a fresh process so their peak memory is
measured apart: peak RSS of the main process and of the largest worker. `img_s` is the steady rate
(from the first batch to the last, what a long epoch sees); `img_s_epoch` includes starting the
workers, which weighs on small benchmark epochs only. `prepare_s` is the one-off check (decode
every photo) or opening the cache, which is built (`cache_build_s`, once per load size, by 2
processes) and flushed to disk before anything is timed.

    python -m bench.loading                       # 300 people = 2,100 photos at 384x512
    python -m bench.loading --people 400 --load-sizes 384x512 --augments strong
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, table, write_json


def one_variant(args):
    """Run in a child process: time the loader for one variant, print JSON."""
    import torch

    from mtl.dataset import DataSpec, FaceDataset, load_fold
    from mtl.loader import make_loader
    from mtl.transforms import make_preprocess, train_transform
    torch.set_num_threads(1)
    use_cache = args.variant != "decode"
    t0 = time.perf_counter()
    fold = load_fold(DataSpec(args.data), tuple(args.load_size), cache_dir=args.cache_dir,
                     use_cache=use_cache, workers=args.workers, progress=False, log=lambda *_: None)
    prepare_s = time.perf_counter() - t0
    if args.variant == "build":
        os.sync()  # NOTE: the timed runs must not share the CPU with writing the new cache file back to disk
        print(json.dumps({"build_s": prepare_s}))
        return
    record = make_preprocess(args.load_size, args.load_size)
    ds = FaceDataset(fold.train_samples, fold.train_images, train_transform(record, args.augment))
    loader = make_loader(ds, args.batch_size, args.workers, shuffle=True, generator=torch.Generator().manual_seed(0))
    rates, steady = [], []
    for _ in range(args.epochs):
        t0, n = time.perf_counter(), 0
        for batch in loader:
            if n == 0:
                t_first, n_first = time.perf_counter(), len(batch["image"])
            n += len(batch["image"])
        t_end = time.perf_counter()
        rates.append(n / (t_end - t0))
        steady.append((n - n_first) / (t_end - t_first))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"variant": args.variant, "images": len(ds), "prepare_s": prepare_s,
                      "img_s": statistics.median(steady), "img_s_epoch": statistics.median(rates),
                      "peak_rss_main_mb": own, "peak_rss_worker_mb": workers}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=300)
    parser.add_argument("--data", help="use this data set instead of generating one")
    parser.add_argument("--load-sizes", nargs="+", default=["192x256", "384x512"], metavar="WxH")
    parser.add_argument("--augments", nargs="+", default=["flip", "baseline"], metavar="PRESET")
    parser.add_argument("--load-size", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--augment", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="timed passes; the median is reported")
    parser.add_argument("--out", default="bench/results/loading.json")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return one_variant(args)

    work = Path(tempfile.mkdtemp(prefix="mtl-bench-loading-"))
    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        from data_tools.make_synthetic import make_synthetic
        print(f"generating {args.people} people at 384x512 in {data} ...", flush=True)
        make_synthetic(data, people=args.people, seed=0, eval_people=1, size=(384, 512), progress=True)
    cache_dir = work / "cache"
    rows, built = [], {}
    for size in args.load_sizes:
        w, h = size.split("x")
        for augment in args.augments:
            base = [sys.executable, "-m", "bench.loading", "--data", str(data), "--cache-dir", str(cache_dir),
                    "--load-size", w, h, "--augment", augment, "--batch-size", str(args.batch_size), "--workers",
                    str(args.workers), "--epochs", str(args.epochs)]
            if size not in built:
                result = subprocess.run(base + ["--variant", "build"], cwd=ROOT, capture_output=True, text=True,
                                        check=True)
                built[size] = json.loads(result.stdout.strip().splitlines()[-1])["build_s"]
            pair = []
            for variant in ("decode", "cache"):
                result = subprocess.run(base + ["--variant", variant], cwd=ROOT, capture_output=True, text=True,
                                        check=True)
                pair.append({"load_size": size, "augment": augment, "cache_build_s": built[size],
                             **json.loads(result.stdout.strip().splitlines()[-1])})
            pair[0]["speedup"], pair[1]["speedup"] = 1.0, pair[1]["img_s"] / pair[0]["img_s"]
            rows += pair
            print(f"{size} {augment}: decode {pair[0]['img_s']:.0f} img/s, cache {pair[1]['img_s']:.0f} img/s "
                  f"({pair[1]['speedup']:.2f}x)", flush=True)
    cache_mb = sum(f.stat().st_size for f in cache_dir.rglob("pixels.u8")) / 2**20
    print()
    print(table(rows, ["load_size", "augment", "variant", "images", "img_s", "speedup", "img_s_epoch", "prepare_s",
                       "cache_build_s", "peak_rss_main_mb", "peak_rss_worker_mb"]))
    print(f"\ncache files {cache_mb:.0f} MiB on disk (read with pread, never held in RAM)")
    path = write_json({"settings": {k: v for k, v in vars(args).items() if k not in ("variant", "cache_dir",
                                                                                     "load_size", "augment")},
                       "cache_file_mb": cache_mb, "rows": rows}, args.out)
    print(f"written {path}")
    if not args.data:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
