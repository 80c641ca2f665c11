"""Pseudo-labels: label the eval photos a trained model is sure about, for a second round of training.

Use it only where the competition's rules allow it: training on the test (eval) photos, even without their
true labels, is forbidden by many competitions. Check the rules before submitting a model trained this way.

The checkpoint(s) (several, or globs, make a soft ensemble, exactly as in predict.py: same checks, same
preprocessing, same forward pass, each checkpoint's own calibration applied unless --no-calibration) predict
every photo of DATA/eval/info.csv. Each task is judged on its
own: a photo gets the task's most likely class when that probability is at least --min-confidence (or
the task's own --min-confidence-mask/-gender/-age), and -1 (unknown) otherwise, so its loss is masked
out in training. Photos where no task passes the bar are left out. OUT is the partial-label table of
data_tools.import_faces (path,mask,gender,age,person_id; see mtl.data.read_extra), with person_id
`pseudo:<ImageID>`, and a second round adds it with

    python -m data_tools.pseudo_label --checkpoint runs/NAME/best.pt --data DATA --min-confidence 0.9 --out extra.csv
    python train_multitask.py --data DATA --extra extra.csv --age-threshold <the checkpoint's>

The table stores an age in years but the model predicts an age group, so the age is a stand-in for the
group: the model's regressed age (rounded) when it has an age-regression head and that age falls in the
confident group, else a fixed age inside the group (`LabelSchema.stand_in_years`: 25 for <30, the middle
of 30..threshold-1, threshold+5 for the top group). Either way `LabelSchema.group` gives back the predicted
group at the checkpoint's threshold; train the second round with that same --age-threshold.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import data, labels
from mtl.cli import ArgumentParser, add_ensemble_flags, add_inference_arguments, add_tta_flags, main_guard
from mtl.errors import ConfigError, DataError

DEFAULT_MIN_CONFIDENCE = 0.9
PERSON_PREFIX = "pseudo:"
SOURCE = "pseudo"
LEGITIMACY = ("Training on test photos is only legitimate where the competition allows it; check the rules "
              "before submitting a model trained on these labels.")


# ---------------------------------------------------------------- labels from probabilities
def check_bars(min_confidence, per_task=None) -> dict:
    """{task: bar}: --min-confidence for every task unless the task's own bar is given; each must be in 0..1."""
    bars = {}
    for task in labels.TASKS:
        own = (per_task or {}).get(task)
        bar = float(min_confidence if own is None else own)
        if not 0.0 <= bar <= 1.0:
            flag = "--min-confidence" + (f"-{task}" if own is not None else "")
            raise ConfigError(f"{flag} must be a probability from 0 to 1, got {bar:g}")
        bars[task] = bar
    return bars


def pseudo_labels(probs: dict, bars: dict, schema: labels.LabelSchema, use_age_reg=True) -> dict:
    """Per-task probabilities -> {task: label per photo, -1 below the task's bar; task_confidence: its probability;
    'age_group': the age task's label again; 'age_years': an age in that group, in years (-1 unknown), for the
    extra-data table, which holds years; 'age_from_reg': whether the regressed age was used}."""
    out = {}
    for task in labels.TASKS:
        p = np.asarray(probs[task], dtype=np.float64)
        best, confidence = p.argmax(1), p.max(1)
        out[task] = np.where(confidence >= bars[task], best, labels.UNKNOWN).astype(np.int64)
        out[f"{task}_confidence"] = confidence
    group = out["age"]
    years = schema.stand_in_years(group)
    from_reg = np.zeros(len(group), dtype=bool)
    if use_age_reg and "age_reg" in probs:
        reg = np.asarray(probs["age_reg"], dtype=np.float64).reshape(-1)
        finite = np.isfinite(reg)
        rounded = np.where(finite, np.round(reg), -1).astype(np.int64)
        from_reg = finite & (group >= 0) & (rounded >= 0) & (schema.group(rounded) == group)
        years = np.where(from_reg, rounded, years)
    out["age_years"], out["age_group"], out["age_from_reg"] = years.astype(np.int64), group, from_reg
    return out


def pseudo_table(samples: pd.DataFrame, image_ids, found: dict) -> pd.DataFrame:
    """The sample table of the photos with at least one known task (person_id pseudo:<ImageID>)."""
    keep = (found["mask"] >= 0) | (found["gender"] >= 0) | (found["age_group"] >= 0)
    ids = np.asarray(image_ids, dtype=object)
    rows = [(path, f"{PERSON_PREFIX}{image_id}", Path(path).stem, m, g, a, SOURCE)
            for path, image_id, m, g, a in zip(samples["image_path"].to_numpy()[keep], ids[keep],
                                               found["mask"][keep], found["gender"][keep], found["age_years"][keep])]
    return data.sample_table(rows)


def summary(found: dict, written: int, out: Path, bars: dict, schema: labels.LabelSchema) -> str:
    """Per task: photos labelled (per class) and unknown; what was written; how to train with it."""
    n = len(found["mask"])
    lines = [f"wrote {out}: {written} of {n} eval photos with at least one confident task "
             f"({n - written} with none left out)"]
    for task in labels.TASKS:
        values = found["age_group" if task == "age" else task]
        known = ", ".join(f"{name} {int((values == k).sum())}" for k, name in enumerate(schema.class_names[task]))
        lines.append(f"  {task + ':':8s}{int((values >= 0).sum())} labelled ({known}), "
                     f"{int((values < 0).sum())} unknown (bar {bars[task]:g})")
    ages, age_threshold = schema.stand_in_years([0, 1, 2]), schema.age_threshold
    lines.append(f"  age is a stand-in for the group at threshold {age_threshold}: the regressed age for "
                 f"{int(found['age_from_reg'].sum())} photos, else {ages[0]}, {ages[1]} or {ages[2]}; train with "
                 f"--age-threshold {age_threshold}")
    lines.append(f"train with: python train_multitask.py --data DATA --extra {out} --age-threshold {age_threshold}")
    lines.append(LEGITIMACY)
    return "\n".join(lines)


# ---------------------------------------------------------------- the run
def check_args(args):
    """Raise a ConfigError for flags out of range; returns the per-task bars."""
    from mtl.names import check_tta
    args.tta = check_tta(args.tta)
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
    return check_bars(args.min_confidence, {t: getattr(args, f"min_confidence_{t}") for t in labels.TASKS})


def run(args, log=print) -> dict:
    """Check every input, predict the eval photos (soft ensemble), keep the confident tasks, write OUT atomically."""
    # NOTE: mtl.members imports timm (seconds); imported here so --help and argument errors stay quick
    from mtl.ensemble import check_weights
    from mtl.members import calibration_state, check_face_crop, load_members, open_sources
    from mtl.outputs import check_output, write_all
    from mtl.predictor import Prediction, predict_sources
    bars = check_args(args)
    out = check_output(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    members = load_members(args.checkpoint)
    weights = check_weights(args.weights, len(members))
    schema = members[0].schema  # NOTE: load_members checked that every member shares it
    check_face_crop(members, args.data, log)
    info, samples = data.eval_samples(args.data)
    if len(samples) == 0:
        raise DataError(f"{Path(args.data) / 'eval' / 'info.csv'} lists no photos")
    sources, problems = open_sources(samples["image_path"], [m.load_size for m in members], cache_dir=args.cache_dir,
                                     use_cache=args.cache, workers=args.workers, progress=args.progress, log=log)
    if problems:
        raise DataError(data.format_problems(problems, "bad eval photo"))
    log(f"{len(members)} checkpoint(s), {len(samples)} eval photos, TTA {', '.join(args.tta) or 'none'}, "
        f"age threshold {schema.age_threshold}, {calibration_state(members, args.calibration)}; bars "
        + ", ".join(f"{t} {b:g}" for t, b in bars.items()))

    member_probs, _ = predict_sources(members, samples, sources, batch_size=args.batch_size, workers=args.workers,
                                      device=args.device, amp=args.amp, tta=args.tta, progress=args.progress)
    image_ids = info["ImageID"].str.strip().tolist()
    result = Prediction.of(image_ids, members, member_probs, weights=weights, calibration=args.calibration).ensemble
    found = pseudo_labels(result.probs, bars, schema, use_age_reg=args.age_reg)
    table = pseudo_table(samples, image_ids, found)
    if len(table) == 0:
        best = ", ".join(f"{t} {found[f'{t}_confidence'].max():.4f}" for t in labels.TASKS)
        raise DataError(f"no eval photo reaches the bar on any task (highest probabilities: {best}); nothing "
                        f"written - lower --min-confidence")
    write_all([(out, lambda: data.write_extra(table, out), summary(found, len(table), out, bars, schema))], log)
    return {"members": members, "result": result, "image_ids": image_ids, "labels": found, "table": table,
            "schema": schema, "out": out}


# ---------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m data_tools.pseudo_label", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LEGITIMACY)
    group = parser.add_argument_group("input and output")
    group.add_argument("--checkpoint", nargs="+", action="extend", metavar="PATH", required=True,
                       help="checkpoint(s) or glob(s), e.g. 'runs/NAME/fold*/best.pt'; several make a soft ensemble")
    group.add_argument("--data", default="data", help="data folder with eval/info.csv and eval/images (default: data)")
    group.add_argument("--out", required=True,
                       help="partial-label CSV to write (its folder must exist); photo paths are relative to its "
                            "folder when inside it, else absolute")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    group = parser.add_argument_group("which labels to keep")
    group.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE, metavar="P",
                       help="keep a task's label when the model gives its class at least this probability; else "
                            f"the task stays unknown (-1) (default {DEFAULT_MIN_CONFIDENCE})")
    for task in labels.TASKS:
        group.add_argument(f"--min-confidence-{task}", type=float, metavar="P",
                           help=f"the bar for {task} alone (default: --min-confidence)")
    group.add_argument("--no-age-reg", dest="age_reg", action="store_false",
                       help="write the fixed stand-in age of each group (25, the middle of 30..threshold-1, "
                            "threshold+5) even when the model regresses age; by default a regressed age that falls "
                            "in the predicted group is written instead. Either way the age only stands for the group")

    group = parser.add_argument_group("ensemble and TTA")
    add_ensemble_flags(group, weights_help="one weight per checkpoint in the soft ensemble (default: equal)")
    add_tta_flags(group)

    add_inference_arguments(parser.add_argument_group("running"))
    return parser


def main(argv=None) -> dict:
    """python -m data_tools.pseudo_label: parse the command line (argv, default sys.argv) and run."""
    return run(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main_guard(main)
