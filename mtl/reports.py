"""Validation of checkpoints on one fold: its photos and truth, and the report predict.py --validate writes.

`validation_fold` loads one person-level fold's validation people exactly as training split them (fold,
folds, seed, relabel and skip_bad default to the first checkpoint's training config; mtl.soup scores its
ingredients on it too); `truth_of` gives their per-task truth. `write_report` writes, into one folder:
metrics.json, per_class.csv, predictions.csv, mistakes.csv and mistakes.png (the most confident mistakes),
people.csv (per person, how often their answers are wrong: relabel candidates), one confusion PNG per task
and for the 18 classes, and report.md, which links them all. Everything scores the answers predict.py gives:
calibrated (each checkpoint's offsets fitted after training) unless --no-calibration; the 18-class F1 of the raw
answers sits beside it (f1_raw, f1_calibrated), and `calibration_info` says when the offsets were fitted on the
very people validated, which makes the calibrated figure optimistic.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import labels
from mtl.ensemble import Ensemble
from mtl.errors import DataError
from mtl.io import atomic_write_csv, atomic_write_text
from mtl.metrics import confusion, macro_f1, per_class_report, score


# ---------------------------------------------------------------- one fold's validation people
@dataclasses.dataclass
class ValidationFold:
    """One person-level fold's validation photos as training split them, decoded at each members' load size."""
    samples: pd.DataFrame
    sources: dict  # {load size: images aligned with samples}
    fold: int
    folds: int
    seed: int


def validation_fold(members, data_root, *, fold=None, folds=None, seed=None, relabel=None, skip_bad=None,
                    cache_dir=None, use_cache=True, workers=2, progress=True, log=print) -> ValidationFold:
    """The validation people of one person-level fold, as training split them.

    fold, folds, seed, relabel and skip_bad default to the first checkpoint's training config.
    """
    from mtl.dataset import DataSpec, load_fold
    cfg = members[0].config
    relabel = cfg.get("relabel") if relabel is None else relabel
    spec = DataSpec(root=data_root, fold=cfg.get("fold", 0) if fold is None else fold,
                    folds=cfg.get("folds", 5) if folds is None else folds,
                    seed=cfg.get("seed", 42) if seed is None else seed,
                    relabel=None if relabel in ("", "none") else relabel,
                    skip_bad=bool(cfg.get("skip_bad", False)) if skip_bad is None else skip_bad)
    for member in members:
        own = tuple(member.config.get(k) for k in ("fold", "folds", "seed"))
        if own != (spec.fold, spec.folds, spec.seed):
            log(f"warning: {member.path} was validated on fold {own[0]} of {own[1]} (seed {own[2]}), not fold "
                f"{spec.fold} of {spec.folds} (seed {spec.seed}): some of these validation people were in its "
                f"training set, so its scores here are optimistic")
    samples, sources = None, {}
    for size in dict.fromkeys(m.load_size for m in members):
        part = load_fold(spec, size, cache_dir=cache_dir, use_cache=use_cache, workers=workers, progress=progress,
                         log=log)
        if samples is None:
            samples = part.val_samples
        sources[size] = part.val_images
    if len(samples) == 0:
        raise DataError(f"fold {spec.fold} of {spec.folds} holds no validation photos")
    return ValidationFold(samples, sources, spec.fold, spec.folds, spec.seed)


def calibration_info(members, split: ValidationFold, data_root, *, applied: bool) -> dict:
    """What the report says about calibration: whether it was applied (on, and some checkpoint holds offsets), which
    checkpoints hold offsets, and which were fitted on these very people (the fold training validated, or a soup's
    fold: same data, folds, fold and seed), whose calibrated figure is then optimistic."""
    holding = [m for m in members if m.calibration is not None]
    here = []
    for member in holding:
        fitted = {**member.config, **member.checkpoint.get("soup_validation", {})}  # NOTE: a soup refits on its fold
        same = tuple(fitted.get(k) for k in ("fold", "folds", "seed")) == (split.fold, split.folds, split.seed)
        if same and os.path.realpath(str(fitted.get("data"))) == os.path.realpath(str(data_root)):
            here.append(member.path)
    return {"applied": bool(applied and holding), "checkpoints": [m.path for m in holding], "fitted_here": here}


def calibration_caveat(info: dict) -> str:
    """The sentence saying the calibrated figure is optimistic (the offsets of these checkpoints were fitted here)."""
    return (f"the calibrated F1 is optimistic: the offsets of {', '.join(info['fitted_here'])} were fitted on these "
            f"validation people (the raw F1 is the fair figure here; judge the calibration on other people)")


def truth_of(samples: pd.DataFrame, schema: labels.LabelSchema) -> dict:
    """Per-task truth arrays of a sample table: mask, gender, age_years, age_group (at the threshold), joint."""
    mask, gender, years = (samples[c].to_numpy(np.int64) for c in ("mask", "gender", "age"))
    age_grp = schema.group(years)
    return {"mask": mask, "gender": gender, "age_years": years, "age_group": age_grp,
            "joint": schema.encode(mask, gender, age_grp)}


def people_table(samples, truth, result: Ensemble, schema: labels.LabelSchema) -> pd.DataFrame:
    """Per person: how many of their photos got wrong 18-class, gender and age-group answers (relabel candidates)."""
    pm, pg, pa = labels.decode(result.pred)
    table = pd.DataFrame({"person_id": samples["person_id"].to_numpy(), "gender": truth["gender"],
                          "age": truth["age_years"], "age_group": truth["age_group"], "photos": 1,
                          "wrong": (result.pred != truth["joint"]).astype(int),
                          "gender_wrong": (pg != truth["gender"]).astype(int),
                          "age_wrong": (pa != truth["age_group"]).astype(int)})
    if "age_reg" in result.probs:
        table["predicted_age"] = np.asarray(result.probs["age_reg"], dtype=np.float64)
    agg = {"gender": "first", "age": "first", "age_group": "first", "photos": "sum", "wrong": "sum",
           "gender_wrong": "sum", "age_wrong": "sum"}
    if "predicted_age" in table:
        agg["predicted_age"] = "mean"
    people = table.groupby("person_id", sort=False).agg(agg).reset_index()
    names = schema.class_names
    people["gender"] = [names["gender"][g] for g in people["gender"]]
    people["age_group"] = [names["age"][a] for a in people["age_group"]]
    if "predicted_age" in people:
        people["predicted_age"] = people["predicted_age"].round(1)
    suspicion = np.maximum(people["gender_wrong"], people["age_wrong"]) / people["photos"]
    return people.assign(_s=suspicion).sort_values(["_s", "wrong"], ascending=False, kind="stable").drop(columns="_s")


# ---------------------------------------------------------------- the report
def write_report(report_dir, *, samples, images, result: Ensemble, schema: labels.LabelSchema, info: dict, raw=None,
                 n_mistakes=48) -> dict:
    """Write metrics.json, per_class.csv, predictions.csv, mistakes.csv/png, people.csv, confusion PNGs, report.md.

    result: the answers given; raw: the ensemble of the uncalibrated probabilities when result is calibrated (its
    18-class F1 becomes f1_raw, result's f1_calibrated)."""
    from mtl.plots import confusion_figure, photo_grid, save_png
    report_dir = Path(report_dir)
    truth = truth_of(samples, schema)
    metrics = score(result.probs, truth, schema, pred=result.pred)
    metrics["f1_raw"] = macro_f1(truth["joint"], raw.pred) if raw is not None else metrics["f1"]
    if raw is not None:
        metrics["f1_calibrated"] = metrics["f1"]
    parts = dict(zip(labels.TASKS, labels.decode(result.pred)))
    truths = {"mask": truth["mask"], "gender": truth["gender"], "age": truth["age_group"]}
    names18 = schema.joint_names

    per_class = {"18": per_class_report(truth["joint"], result.pred, names18)}
    per_class.update({task: per_class_report(truths[task], parts[task], schema.class_names[task])
                      for task in labels.TASKS})
    atomic_write_text(json.dumps({**info, "metrics": metrics, "per_class": per_class}, indent=2),
                      report_dir / "metrics.json")
    atomic_write_csv(pd.DataFrame([{"task": task, **row} for task, rows in per_class.items() for row in rows]),
                     report_dir / "per_class.csv", float_format="%.4f")

    figures = {"confusion_18.png": confusion_figure(confusion(truth["joint"], result.pred, labels.NUM_JOINT), names18,
                                                    f"18 classes (F1 {metrics['f1']:.3f})")}
    for task in labels.TASKS:
        names = schema.class_names[task]
        figures[f"confusion_{task}.png"] = confusion_figure(confusion(truths[task], parts[task], len(names)), names,
                                                            f"{task} (F1 {metrics[f'{task}_f1']:.3f})")

    predictions = pd.DataFrame({
        "image_path": samples["image_path"].to_numpy(), "person_id": samples["person_id"].to_numpy(),
        "photo": samples["photo"].to_numpy(), "age": truth["age_years"], "true": truth["joint"], "pred": result.pred,
        "confidence": np.round(result.confidence.astype(np.float64), 4),
        "true_name": [names18[c] for c in truth["joint"]], "pred_name": [names18[c] for c in result.pred]})
    atomic_write_csv(predictions, report_dir / "predictions.csv")
    wrong = np.flatnonzero(result.pred != truth["joint"])
    wrong = wrong[np.argsort(-result.confidence[wrong], kind="stable")]
    atomic_write_csv(predictions.iloc[wrong], report_dir / "mistakes.csv")
    shown = wrong[:n_mistakes]
    captions = [f"{samples['person_id'].iat[i]} {samples['photo'].iat[i]} (age {truth['age_years'][i]})\n"
                f"true {names18[truth['joint'][i]]}\npred {names18[result.pred[i]]} ({result.confidence[i]:.2f})"
                for i in shown]
    figures["mistakes.png"] = photo_grid([np.array(images[i]) for i in shown], captions,
                                         f"{len(shown)} most confident of {len(wrong)} mistakes", columns=6)
    for name, fig in figures.items():
        save_png(fig, report_dir / name)
    people = people_table(samples, truth, result, schema)
    atomic_write_csv(people, report_dir / "people.csv")
    atomic_write_text(report_markdown(info, metrics, per_class, people, n_wrong=len(wrong), n_shown=len(shown)),
                      report_dir / "report.md")
    return metrics


def report_markdown(info, metrics, per_class, people, *, n_wrong, n_shown) -> str:
    """report.md: the headline metrics, per-class F1, the people most often wrong, links to every file."""
    members = "\n".join(f"- `{p}`" for p in info["checkpoints"])
    lines = [f"# Validation report: fold {info['fold']} of {info['folds']} (seed {info['seed']})", "",
             f"{info['photos']} photos of {info['people']} people; age threshold {info['age_threshold']}; "
             f"ensemble {info['ensemble']}, TTA {info['tta'] or 'none'}.", "", "Checkpoints:", members, "",
             "| metric | 18 classes | mask | gender | age |", "|---|---|---|---|---|",
             f"| macro F1 | {metrics['f1']:.4f} | {metrics['mask_f1']:.4f} | {metrics['gender_f1']:.4f} | "
             f"{metrics['age_f1']:.4f} |",
             f"| accuracy | {metrics['acc']:.4f} | {metrics['mask_acc']:.4f} | {metrics['gender_acc']:.4f} | "
             f"{metrics['age_acc']:.4f} |", "", calibration_markdown(info.get("calibration"), metrics), ""]
    if "age_reg_mae" in metrics:
        lines += [f"Age regression: MAE {metrics['age_reg_mae']:.2f} years, age-group F1 {metrics['age_reg_f1']:.4f} "
                  f"(18-class F1 with it: {metrics['f1_age_reg']:.4f}).", ""]
    lines += ["## Per class (18)", "", "| class | name | precision | recall | F1 | support |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['class']} | {r['name']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
              f"{r['support']} |" for r in per_class["18"]]
    suspects = people[(people["gender_wrong"] + people["age_wrong"]) > 0].head(15)
    lines += ["", "## People most often wrong", "",
              "A person whose gender or age group is wrong on most of their photos is a candidate for a "
              "relabel CSV (`--relabel`). All people are in [people.csv](people.csv).", ""]
    if len(suspects):
        lines += ["| person | gender | age | photos | wrong | gender wrong | age wrong |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.person_id} | {r.gender} | {r.age} | {r.photos} | {r.wrong} | {r.gender_wrong} | "
                  f"{r.age_wrong} |" for r in suspects.itertuples()]
    else:
        lines.append("No person has a wrong gender or age group.")
    lines += ["", f"## Most confident mistakes ({n_shown} of {n_wrong}; all in [mistakes.csv](mistakes.csv))", "",
              "![mistakes](mistakes.png)", "", "## Confusion matrices", "",
              "![18 classes](confusion_18.png)", "", "![mask](confusion_mask.png) ![gender](confusion_gender.png) "
              "![age](confusion_age.png)", "",
              "Files: [metrics.json](metrics.json), [per_class.csv](per_class.csv), "
              "[predictions.csv](predictions.csv), [mistakes.csv](mistakes.csv), [people.csv](people.csv).", ""]
    return "\n".join(lines)


def calibration_markdown(info, metrics) -> str:
    """report.md's paragraph on calibration: raw and calibrated 18-class F1, and whether the latter is optimistic."""
    if info is None or not info["checkpoints"]:
        return "Calibration: no checkpoint holds offsets; the answers are the heads' raw probabilities."
    if not info["applied"]:
        return (f"Calibration off (--no-calibration): the answers are the heads' raw probabilities (18-class F1 "
                f"{metrics['f1_raw']:.4f}).")
    text = (f"Calibration: each checkpoint's offsets (fitted after training to maximise macro F1) are applied; "
            f"18-class macro F1 {metrics['f1_raw']:.4f} raw, {metrics['f1_calibrated']:.4f} calibrated.")
    return text + (f" Note: {calibration_caveat(info)}." if info["fitted_here"] else "")


def headline(metrics) -> str:
    reg = f", age_reg MAE {metrics['age_reg_mae']:.2f}" if "age_reg_mae" in metrics else ""
    raw = f" calibrated, {metrics['f1_raw']:.4f} raw" if "f1_calibrated" in metrics else ""
    return (f"18-class F1 {metrics['f1']:.4f}{raw} (acc {metrics['acc']:.4f}); mask F1 {metrics['mask_f1']:.4f}, "
            f"gender F1 {metrics['gender_f1']:.4f}, age F1 {metrics['age_f1']:.4f}{reg}")
