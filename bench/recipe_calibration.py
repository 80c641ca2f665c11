#!/usr/bin/env python3
"""Which heads the macro-F1 calibration should move: compared on the runs bench.recipe kept, on people it never fit.

bench.recipe keeps every set's raw probabilities beside each best.pt (probs.npz: the run's validation people,
the held-out eval people, the unseen facemask-dev half and the raw UTKFace chips). For each kept run this fits
`mtl.calibration.fit` on the validation people only (as training does: cross-validated by person, the offsets
kept only when they raise F1 on validation people they were not fitted on) once per choice of movable heads,
applies the offsets to the other sets, and reports each choice's paired difference from the raw answers
(same run): 18-class F1 on the eval people, real-mask accuracy and bare faces answered "not wear" on facemask-dev,
gender accuracy and age F1 on the chips, and the cross-collection score, as bench.recipe defines them.

Nothing is predicted again (minutes on a CPU; the fits dominate). Runs trained on facemask-dev photos
(+real_masks) are left out of the facemask figures.

    python -m bench.recipe_calibration --work /tmp/recipe                        # every kept run
    python -m bench.recipe_calibration --work /tmp/recipe --variants baseline defaults
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import recipe
from bench.common import table, write_json
from bench.recipe import CROSS_PARTS, NOT_UNSEEN, collection_figures, mean_sd, read_probs, run_folder

CHOICES = {"age": ("age",), "gender": ("gender",), "mask": ("mask",), "all heads": ("mask", "gender", "age")}
SHOWN = ("cross",) + CROSS_PARTS


def kept_runs(work: Path, variants) -> list[tuple[str, int]]:
    """(variant, seed) of every finished run in --work (probs.npz and train.json), in a stable order."""
    runs = []
    for npz in sorted((work / "runs").glob("*/seed*/probs.npz")):
        name, seed = npz.parent.parent.name, int(npz.parent.name.removeprefix("seed"))
        if (variants is None or name in variants) and (npz.parent / "train.json").is_file():
            runs.append((name, seed))
    return runs


def scored(probs: dict, prepared, fm_unseen: bool) -> dict:
    """bench.recipe's figures of one set of answers; facemask figures and cross None where the run saw facemask-dev."""
    row = collection_figures(probs, prepared)
    if not fm_unseen:
        row.update({"fm_real_mask_acc": None, "fm_bare_not_wear": None, "cross": None})
    return row


def compare(work: Path, prepared, variants=None, log=print) -> dict:
    """Every kept run's raw figures and each head choice's, with the paired differences' mean and sd."""
    from mtl import calibration, labels
    rows = []
    for name, seed in kept_runs(work, variants):
        folder = run_folder(work, name, seed)
        probs, val_truth, people = read_probs(folder / "probs.npz")
        config = json.loads((folder / "train.json").read_text())["config"]
        schema = labels.as_schema(config["age_threshold"])  # the run's own boundary, as its calibration was fitted
        unseen = name not in NOT_UNSEEN
        row = {"variant": name, "seed": seed, "raw": scored(probs, prepared, unseen)}
        for choice, heads in CHOICES.items():
            fitted = calibration.fit(probs["val"], val_truth, schema, groups=people, tasks=heads)
            row[choice] = scored({w: calibration.apply(p, fitted) for w, p in probs.items()}, prepared, unseen)
            row[choice]["moved"] = any(v != 0 for offsets in fitted.offsets.values() for v in offsets)
        log(f"{name} seed {seed}: eval F1 raw {row['raw']['eval_f1']:.3f}, calibrated minus raw: " + ", ".join(
            f"{c} {row[c]['eval_f1'] - row['raw']['eval_f1']:+.3f}" for c in CHOICES))
        rows.append(row)
    differences = {}
    for choice in CHOICES:
        differences[choice] = {"runs_moved": sum(r[choice]["moved"] for r in rows)}
        for key in SHOWN:
            paired = [r[choice][key] - r["raw"][key] for r in rows if r["raw"][key] is not None]
            mean, sd = mean_sd(paired)
            differences[choice][key] = {"mean": mean, "sd": sd, "runs": len(paired)}
    return {"runs": rows, "differences": differences}


def report(result: dict) -> str:
    rows = [{"heads fitted": choice, "runs": len(result["runs"]), "offsets kept in": d["runs_moved"],
             **{key: f"{d[key]['mean']:+.3f} ± {d[key]['sd']:.3f}" for key in SHOWN}}
            for choice, d in result["differences"].items()]
    return ("### Calibrated minus raw, paired by run (mean ± sd over runs; fitted on each run's validation people, "
            "scored on people and photos it never saw)\n\n" + table(rows, ["heads fitted", "runs", "offsets kept in",
                                                                         *SHOWN]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="bench.recipe's work folder (its runs/ and prepared data)")
    parser.add_argument("--variants", nargs="+", help="only these variants' runs (default: every kept run)")
    parser.add_argument("--out", default="bench/results/recipe_calibration.json")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if not (work / "prepared.json").is_file():
        parser.error(f"--work {work}: no bench.recipe work folder there (prepared.json missing)")
    budget = recipe.budget_from_args(recipe.get_args_parser().parse_args(["--work", str(work)]))
    prepared = recipe.prepare(work, budget, real_masks=False)  # NOTE: the folder's kept data, made already
    result = compare(work, prepared, set(args.variants) if args.variants else None)
    if not result["runs"]:
        parser.error(f"--work {work}: no kept run (runs/<variant>/seed<k>/probs.npz and train.json)")
    text = report(result)
    print("\n" + text)
    path = write_json({"settings": {"work": str(work), "variants": args.variants, "choices": CHOICES},
                       **result, "report": text}, args.out)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
