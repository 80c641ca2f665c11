#!/usr/bin/env python3
"""The other collection's photos that most kept runs answer wrong, as a captioned contact sheet (PNG) and JSON.

bench.recipe keeps every run's raw answers on the facemask-dev half no variant imports (probs.npz, set `fm`).
This reads them back, counts for each photo of one true mask class how many runs answered it right, and draws
the photos that at least half of the runs got wrong, hardest first, each captioned with the runs' answers. It
shows whether a figure such as "bare faces answered not wear" misses on faces a model should read, or on photos
no answer can be right for (the back of a head, a blur, a hand or a camera over the mouth).

Runs trained on facemask-dev photos (+real_masks) are left out. Only facemask-dev photos are drawn (CC0); never
the UTKFace chips.

    python -m bench.recipe_hard_cases --work /tmp/recipe                       # bare faces (truth: not wear)
    python -m bench.recipe_hard_cases --work /tmp/recipe --truth incorrect --variants baseline age_reg_0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import write_json
from bench.recipe import NOT_UNSEEN, read_probs, run_folder
from bench.recipe_calibration import kept_runs

LISTING = "facemask_test.csv"  # bench.recipe's cropped facemask-dev half never imported (cropped_collection)


def answers_by_photo(work: Path, truth: int, variants=None) -> tuple[list, list, object]:
    """(the runs read, the photos of that true class, an array runs x photos of the mask class each run answered)."""
    import numpy as np
    import pandas as pd
    listing = work / LISTING
    if not listing.is_file():
        raise SystemExit(f"error: {listing} not found: run bench.recipe with --work {work} first")
    photos = pd.read_csv(listing)
    chosen = np.flatnonzero(photos["mask"].to_numpy() == truth)
    runs = [(name, seed) for name, seed in kept_runs(work, variants) if name not in NOT_UNSEEN]
    if not runs:
        raise SystemExit(f"error: no kept run in {work / 'runs'}" + (f" of {variants}" if variants else ""))
    answered = []
    for name, seed in runs:
        probs, _, _ = read_probs(run_folder(work, name, seed) / "probs.npz")
        mask = probs["fm"]["mask"]
        if len(mask) != len(photos):
            raise SystemExit(f"error: {name} seed {seed} answered {len(mask)} facemask photos, {listing} lists "
                             f"{len(photos)}: the work folder was prepared again after it ran")
        answered.append(mask[chosen].argmax(1))
    return runs, photos.iloc[chosen].reset_index(drop=True), np.stack(answered)


def hard_cases(answered, truth: int) -> list[dict]:
    """Photos (column index) that at least half of the runs answered wrong, hardest first, with each answer's count."""
    import numpy as np
    right = (answered == truth).mean(0)
    hard = [int(i) for i in np.argsort(right, kind="stable") if right[i] <= 0.5]
    return [{"photo": i, "right": float(right[i]),
             "answers": np.bincount(answered[:, i], minlength=3).tolist()} for i in hard]


def main(argv=None):
    from mtl import labels
    from mtl.images import decode_image
    from mtl.plots import photo_grid, save_png
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_hard_cases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="bench.recipe's work folder")
    parser.add_argument("--truth", default="not wear", choices=labels.MASK_NAMES,
                        help="the true mask class whose photos are read (default: not wear, the bare faces)")
    parser.add_argument("--variants", nargs="+", help="only these variants' runs (default: every kept run)")
    parser.add_argument("--out", default="bench/results/recipe_hard_cases.png", help="the PNG; JSON beside it")
    args = parser.parse_args(argv)
    truth = labels.MASK_NAMES.index(args.truth)
    work = Path(args.work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # NOTE: as write_json does for the JSON beside it
    runs, photos, answered = answers_by_photo(work, truth, args.variants)
    cases = hard_cases(answered, truth)
    n = len(runs)
    share = float((answered == truth).mean())
    print(f"{len(photos)} photos of true '{args.truth}', {n} runs: {share:.1%} of the answers right; "
          f"{len(cases)} photos wrong in at least half of the runs")
    captions = []
    for case in cases:
        said = ", ".join(f"{labels.MASK_NAMES[k]} {c}" for k, c in enumerate(case["answers"]) if c)
        name = Path(photos["image_path"][case["photo"]]).name
        captions.append(f"{name[:28]}\n{said} (of {n})")
        case["image"] = name
    title = (f"facemask-dev photos of true '{args.truth}' that at least half of {n} runs answer wrong "
             f"({len(cases)} of {len(photos)})")
    fig = photo_grid([decode_image(photos["image_path"][c["photo"]]) for c in cases], captions, title)
    png = save_png(fig, args.out)
    path = write_json({"work": str(work), "truth": args.truth, "runs": [f"{v} seed {s}" for v, s in runs],
                       "photos": len(photos), "share_right": share, "hard_cases": cases},
                      str(Path(args.out).with_suffix(".json")))
    print(f"written {png} and {path}")


if __name__ == "__main__":
    main()
