"""predict.py's logic: checkpoints -> the 18-class submission, probability files, ensembles and validation reports.

A run reads top to bottom in `run`:
1) check everything before any model forward: checkpoints load and share one label schema (age
   threshold included), --weights fit, every output folder exists and takes a file, DATA/eval/info.csv
   has an ImageID column and lists only photos that exist inside eval/images (all bad rows named), the
   face-crop settings agree;
2) decode the photos through the same cache as training, once per load size (an unreadable or
   tiny photo stops the run, named);
3) run every checkpoint with its own preprocessing record (`transforms.eval_transform`), members
   that share a record in one pass over the photos;
4) combine: `soft` averages each head's probabilities (weighted) and recombines them with
   `metrics.recombine`; `hard` is a weighted vote of the members' 18-class answers, ties going to
   the soft result;
5) write atomically: the submission (ImageID,ans in info.csv order), --save-probs, or with
   --validate a report on one fold's validation people (per-class metrics, confusion matrices,
   the most confident mistakes, the people most often wrong); an output that cannot be written
   (a full disk) is named in one line after the others are written.

With --images the photos are files, folders or globs instead of DATA/eval, and the answers are rows of
names and probabilities: `mtl.predictor` (the Python API) does that run with the same steps. A checkpoint
trained on face crops given DATA of uncropped photos gets them cropped with its own settings
(`mtl.face_crop`) instead of refusing them (--refuse-uncropped keeps the refusal).

Probability files (--save-probs) hold one row per photo and ensemble member: ImageID, checkpoint,
age_threshold, mask_0..2, gender_0..1, age_0..2 (+ joint_0..17, age_reg when the model has them);
`--from-probs` redoes any ensemble from them without a forward pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import checkpoint as ckpt_io
from mtl import labels
from mtl.cli import add_inference_arguments
from mtl.data import (FACE_CROP_RECORD, eval_samples, format_problems, read_csv_checked, read_face_crop_record,
                      same_face_crop)
from mtl.errors import ConfigError, DataError, MTLError
from mtl.io import WriteError, atomic_write_csv, atomic_write_text, check_parent, check_writable
from mtl.metrics import confusion, per_class_report, predict_classes, recombine, score

METHODS = ("soft", "hard")
HEAD_COLUMNS = {"mask": [f"mask_{i}" for i in range(3)], "gender": [f"gender_{i}" for i in range(2)],
                "age": [f"age_{i}" for i in range(3)], "joint": [f"joint_{i}" for i in range(labels.NUM_JOINT)],
                "age_reg": ["age_reg"]}
REQUIRED_HEADS = ("mask", "gender", "age")

DESCRIPTION = """Predict the 18 mask/gender/age classes of DATA/eval/info.csv's photos and write a submission CSV.

The preprocessing and the age threshold come from each checkpoint, so inference matches training.

  python predict.py --checkpoint runs/NAME/best.pt --data DATA --out submission.csv
  python predict.py --checkpoint 'runs/NAME/fold*/best.pt' --ensemble soft --tta hflip --save-probs probs.csv
  python predict.py --from-probs probs.csv other.csv --ensemble hard --weights 1 1 2 --out submission.csv
  python predict.py --checkpoint runs/NAME/best.pt --data DATA --validate --fold 0 --report report/
  python predict.py --checkpoint runs/NAME/best.pt --images my_photos/ 'more/*.jpg' --out predictions.csv
"""


# ---------------------------------------------------------------- checkpoints
def expand_paths(patterns, flag="--checkpoint") -> list[str]:
    """Paths and globs -> paths (each glob sorted); a glob that matches nothing is a ConfigError naming it."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern) and not os.path.exists(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"{flag} {pattern!r} matches no file")
            paths += matches
        else:
            paths.append(pattern)
    return paths


def load_members(patterns) -> list[dict]:
    """Load every checkpoint (paths or globs) and check they share one label schema, age threshold included."""
    members = [ckpt_io.load(path) for path in expand_paths(patterns)]
    for member in members:
        missing = [k for k in ("schema", "preprocess") if k not in member]
        if missing:
            raise ConfigError(f"{member['path']}: no {', '.join(missing)} stored; it was not written by "
                              f"train_multitask.py")
    ckpt_io.check_same_schema(members)
    return members


def check_weights(weights, n: int, what="checkpoint") -> np.ndarray:
    """--weights as an array of n non-negative numbers with a positive sum (all ones when not given)."""
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != n:
        raise ConfigError(f"--weights got {len(weights)} number(s) for {n} {what}(s); give one per {what}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ConfigError(f"--weights must be non-negative numbers with a positive sum, got {weights.tolist()}")
    return weights


def check_face_crop(members, data_root, log=print, crop_raw=False) -> list[bool]:
    """Stop if a checkpoint was trained on face crops DATA does not hold; warn for crops it was not trained on.

    With crop_raw, uncropped DATA is fine for such a checkpoint: the returned flags say which members need
    their photos cropped at prediction time (mtl.predictor, with the checkpoint's own crop settings).
    """
    try:
        record = read_face_crop_record(data_root)
    except ValueError as exc:
        raise DataError(f"{Path(data_root) / FACE_CROP_RECORD}: not valid JSON ({exc})") from None
    needs_crop = []
    for member in members:
        wanted = member["preprocess"].get("face_crop")
        needs_crop.append(crop_raw and wanted is not None and record is None)
        if wanted is not None and not same_face_crop(wanted, record) and not needs_crop[-1]:
            found = "holds uncropped photos" if record is None else f"was cropped with other settings ({record})"
            raise ConfigError(f"{member['path']} was trained on face crops made with {json.dumps(wanted)} but "
                              f"{data_root} {found}; run `python -m data_tools.crop_faces {data_root} OUT` with "
                              f"those settings and pass OUT as --data")
        if wanted is None and record is not None:
            log(f"warning: {member['path']} was trained on uncropped photos but {data_root} holds face crops "
                f"({json.dumps(record)}); its predictions may be poor - pass the uncropped data as --data")
    return needs_crop


def check_output(path, flag="--out") -> Path:
    """An output file path whose folder exists and can be written (check_writable), and which is not itself a
    folder or a device."""
    path = check_parent(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{flag} {path} is not a regular file; give a file name")
    check_writable(path.parent, flag)
    return path


def write_outputs(writes, log=print):
    """Run each (path, write, message) in turn; one that fails (a full disk) is named after the others are written."""
    failed = []
    for path, write, message in writes:
        try:
            write()
        except WriteError as exc:  # NOTE: mtl.io's atomic writes name the file and the reason themselves
            failed.append(f"{exc.path} ({exc.reason})")
        except OSError as exc:
            failed.append(f"{path} ({exc.strerror or exc})")
        else:
            if message:
                log(message)
    if failed:
        rest = "; the other outputs were written" if len(failed) < len(writes) else ""
        raise MTLError(f"could not write {'; '.join(failed)}{rest}")


# ---------------------------------------------------------------- photos and forward passes
def open_sources(paths, load_sizes, cache_dir=None, use_cache=True, workers=2, progress=True, log=print) -> dict:
    """{load size: image source aligned with paths}, each size decoded once; any bad photo is a DataError."""
    from mtl.images import open_images
    sources, problems = {}, []
    for size in dict.fromkeys(load_sizes):
        sources[size], found = open_images(paths, size, cache_dir=cache_dir, use_cache=use_cache, workers=workers,
                                           progress=progress, log=log)
        problems += [p for p in found if p.path not in {q.path for q in problems}]
    if problems:
        raise DataError(format_problems(problems, "bad eval photo"))
    return sources


def load_size_of(member) -> tuple:
    return tuple(int(v) for v in member["preprocess"]["load_size"])


def predict_members(members, samples, sources, batch_size=64, workers=2, device="auto", amp="auto", tta=(),
                    progress=True) -> list[dict]:
    """Each member's per-task probabilities (numpy, samples order); members sharing a preprocessing share a pass."""
    import torch

    from mtl.dataset import FaceDataset
    from mtl.inference import amp_dtype, predict_probs_many, prepare_model, resolve_device
    from mtl.loader import make_loader
    from mtl.transforms import eval_transform
    device = resolve_device(device) if isinstance(device, str) else device
    dtype, channels_last = amp_dtype(amp, device), device.type == "cuda"
    groups = {}
    for i, member in enumerate(members):
        groups.setdefault(json.dumps(member["preprocess"], sort_keys=True), []).append(i)
    results = [None] * len(members)
    for k, indices in enumerate(groups.values(), start=1):
        first = members[indices[0]]
        dataset = FaceDataset(samples, sources[load_size_of(first)], eval_transform(first["preprocess"]),
                              ckpt_io.threshold(first))
        loader = make_loader(dataset, batch_size, workers, device=device)
        # NOTE: a group's models sit on the device together; five folds of an efficientnet_b3 take ~250 MB
        models = [prepare_model(ckpt_io.build_model(members[i]), device, channels_last) for i in indices]
        desc = f"predicting ({len(models)} model{'s' if len(models) > 1 else ''}" + (
            f", group {k}/{len(groups)})" if len(groups) > 1 else ")")
        for i, probs in zip(indices, predict_probs_many(models, loader, device, dtype, channels_last, tta, progress,
                                                        desc)):
            results[i] = probs
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- ensembles
@dataclasses.dataclass
class Ensemble:
    """The combined answer: per-task probabilities (weighted mean), 18-class answers and their confidence."""
    probs: dict
    pred: np.ndarray
    confidence: np.ndarray
    method: str = "soft"


def soft_mean(member_probs, weights) -> dict:
    """Weighted mean of every output all members have ('joint' and 'age_reg' only when every member has them)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    keys = [k for k in member_probs[0] if all(k in p for p in member_probs)]
    return {k: sum(np.float32(wi) * p[k] for wi, p in zip(w, member_probs)).astype(np.float32) for k in keys}


def combine(member_probs, weights=None, method="soft") -> Ensemble:
    """Soft (mean probabilities, then recombine) or hard (weighted vote, ties to the soft result) ensemble."""
    if method not in METHODS:
        raise ConfigError(f"--ensemble must be one of {', '.join(METHODS)}, got {method!r}")
    weights = check_weights(weights, len(member_probs))
    probs = soft_mean(member_probs, weights)
    soft_joint = np.asarray(recombine(probs))
    rows = np.arange(len(soft_joint))
    if method == "soft" or len(member_probs) == 1:
        pred = soft_joint.argmax(1)
        return Ensemble(probs, pred, soft_joint[rows, pred], "soft")
    votes = np.zeros_like(soft_joint, dtype=np.float64)
    for w, p in zip(weights, member_probs):
        np.add.at(votes, (rows, predict_classes(p)), w)
    tied = votes >= votes.max(1, keepdims=True) - 1e-9 * weights.sum()
    pred = np.where(tied, soft_joint, -np.inf).argmax(1)
    return Ensemble(probs, pred, (votes[rows, pred] / weights.sum()).astype(np.float32), "hard")


# ---------------------------------------------------------------- probability files
def probs_table(image_ids, probs: dict, checkpoint: str, age_threshold: int) -> pd.DataFrame:
    """One member's probabilities as a table: ImageID, checkpoint, age_threshold, mask_0.. (see module doc)."""
    table = {"ImageID": list(image_ids), "checkpoint": checkpoint, "age_threshold": int(age_threshold)}
    for head, columns in HEAD_COLUMNS.items():
        if head in probs:
            values = np.asarray(probs[head], dtype=np.float32).reshape(len(table["ImageID"]), -1)
            table.update({c: values[:, j] for j, c in enumerate(columns)})
    return pd.DataFrame(table)


def read_probs(paths) -> tuple[list, list[dict]]:
    """Probability files -> (ImageIDs, [{'name', 'age_threshold', 'probs'}]); all members must list the same photos."""
    required = ["ImageID"] + [c for head in REQUIRED_HEADS for c in HEAD_COLUMNS[head]]
    members = []
    for path in paths:
        table = read_csv_checked(path, required, "probabilities CSV")
        if len(table) == 0:
            raise DataError(f"{path}: holds no rows")
        names = table["checkpoint"] if "checkpoint" in table.columns else pd.Series([""] * len(table))
        for name in dict.fromkeys(names):
            part = table[(names == name).to_numpy()]
            probs = {}
            for head, columns in HEAD_COLUMNS.items():
                if all(c in part.columns for c in columns):
                    try:
                        values = part[columns].astype(np.float32).to_numpy()
                    except ValueError as exc:
                        raise DataError(f"{path}: column(s) {', '.join(columns)} must be numbers ({exc})") from None
                    probs[head] = values[:, 0] if head == "age_reg" else values
            threshold = None
            if "age_threshold" in part.columns:
                found = set(part["age_threshold"].str.strip())
                threshold = int(found.pop()) if len(found) == 1 and next(iter(found)).isdigit() else found
            members.append({"name": f"{path}" + (f" [{name}]" if name else ""), "age_threshold": threshold,
                            "probs": probs, "image_ids": part["ImageID"].tolist()})
    first = members[0]
    for other in members[1:]:
        if other["image_ids"] != first["image_ids"]:
            raise DataError(f"{other['name']} and {first['name']} do not list the same photos in the same order; "
                            f"only probabilities of one data set can be ensembled")
        if other["age_threshold"] != first["age_threshold"]:
            raise ConfigError(f"{other['name']} uses age threshold {other['age_threshold']} but {first['name']} uses "
                              f"{first['age_threshold']}: checkpoints of different schemas cannot be ensembled")
    return first["image_ids"], members


# ---------------------------------------------------------------- submission
def submission_table(image_ids, pred) -> pd.DataFrame:
    """The competition's format: ImageID,ans with ans 0..17, in the given (info.csv) order."""
    return pd.DataFrame({"ImageID": list(image_ids), "ans": np.asarray(pred, dtype=np.int64)})


def class_counts_line(pred) -> str:
    counts = np.bincount(np.asarray(pred, dtype=np.int64), minlength=labels.NUM_JOINT)
    return " ".join(f"{c}:{n}" for c, n in enumerate(counts) if n)


# ---------------------------------------------------------------- validation
def validation_fold(members, data_root, fold=None, folds=None, seed=None, relabel=None, cache_dir=None,
                    use_cache=True, workers=2, progress=True, skip_bad=None, log=print):
    """(validation samples, {load size: images}, (fold, folds, seed)) of one person-level fold, as training split it.

    fold, folds, seed, relabel and skip_bad default to the first checkpoint's training config.
    """
    from mtl.dataset import load_fold
    cfg = members[0]["config"]
    skip_bad = bool(cfg.get("skip_bad", False)) if skip_bad is None else skip_bad
    fold = cfg.get("fold", 0) if fold is None else fold
    folds = cfg.get("folds", 5) if folds is None else folds
    seed = cfg.get("seed", 42) if seed is None else seed
    if relabel is None:
        relabel = cfg.get("relabel")
    relabel = None if relabel in ("", "none") else relabel
    for member in members:
        own = tuple(member["config"].get(k) for k in ("fold", "folds", "seed"))
        if own != (fold, folds, seed):
            log(f"warning: {member['path']} was validated on fold {own[0]} of {own[1]} (seed {own[2]}), not fold "
                f"{fold} of {folds} (seed {seed}): some of these validation people were in its training set, so "
                f"its scores here are optimistic")
    samples, sources = None, {}
    for size in dict.fromkeys(load_size_of(m) for m in members):
        part = load_fold(data_root, size, folds, fold, seed, relabel_csv=relabel, cache_dir=cache_dir,
                         use_cache=use_cache, workers=workers, skip_bad=skip_bad, progress=progress, log=log)
        if samples is None:
            samples = part.val_samples
        sources[size] = part.val_images
    if len(samples) == 0:
        raise DataError(f"fold {fold} of {folds} holds no validation photos")
    return samples, sources, (fold, folds, seed)


def truth_of(samples: pd.DataFrame, age_threshold: int) -> dict:
    """Per-task truth arrays of a sample table (age in years, age group at the threshold, 18-class joint)."""
    mask, gender, age = (samples[c].to_numpy(np.int64) for c in ("mask", "gender", "age"))
    age_grp = labels.age_group(age, age_threshold)
    return {"mask": mask, "gender": gender, "age": age, "age_group": age_grp,
            "joint": labels.encode(mask, gender, age_grp)}


def people_table(samples, truth, result: Ensemble) -> pd.DataFrame:
    """Per person: how many of their photos got wrong 18-class, gender and age-group answers (relabel candidates)."""
    pm, pg, pa = labels.decode(result.pred)
    table = pd.DataFrame({"person_id": samples["person_id"].to_numpy(), "gender": truth["gender"],
                          "age": truth["age"], "age_group": truth["age_group"], "photos": 1,
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
    people["gender"] = [labels.TASK_CLASSES["gender"][g] for g in people["gender"]]
    people["age_group"] = [labels.TASK_CLASSES["age"][a] for a in people["age_group"]]
    if "predicted_age" in people:
        people["predicted_age"] = people["predicted_age"].round(1)
    suspicion = np.maximum(people["gender_wrong"], people["age_wrong"]) / people["photos"]
    return people.assign(_s=suspicion).sort_values(["_s", "wrong"], ascending=False, kind="stable").drop(columns="_s")


def write_report(report_dir, samples, images, result: Ensemble, age_threshold: int, info: dict,
                 n_mistakes=48) -> dict:
    """Write metrics.json, per_class.csv, predictions.csv, mistakes.csv/png, people.csv, confusion PNGs, report.md."""
    from mtl.plots import confusion_figure, photo_grid, save_png
    report_dir = Path(report_dir)
    truth = truth_of(samples, age_threshold)
    metrics = score(result.probs, {k: truth[k] for k in ("mask", "gender", "age")}, age_threshold, pred=result.pred)
    parts = dict(zip(labels.TASKS, labels.decode(result.pred)))
    truths = {"mask": truth["mask"], "gender": truth["gender"], "age": truth["age_group"]}
    names18 = [labels.class_name(c) for c in range(labels.NUM_JOINT)]

    per_class = {"18": per_class_report(truth["joint"], result.pred, names18)}
    per_class.update({task: per_class_report(truths[task], parts[task], labels.TASK_CLASSES[task])
                      for task in labels.TASKS})
    atomic_write_text(json.dumps({**info, "metrics": metrics, "per_class": per_class}, indent=2),
                      report_dir / "metrics.json")
    atomic_write_csv(pd.DataFrame([{"task": task, **row} for task, rows in per_class.items() for row in rows]),
                     report_dir / "per_class.csv", float_format="%.4f")

    figures = {"confusion_18.png": confusion_figure(confusion(truth["joint"], result.pred, labels.NUM_JOINT), names18,
                                                    f"18 classes (F1 {metrics['f1']:.3f})")}
    for task in labels.TASKS:
        names = labels.TASK_CLASSES[task]
        figures[f"confusion_{task}.png"] = confusion_figure(confusion(truths[task], parts[task], len(names)), names,
                                                            f"{task} (F1 {metrics[f'{task}_f1']:.3f})")

    predictions = pd.DataFrame({
        "image_path": samples["image_path"].to_numpy(), "person_id": samples["person_id"].to_numpy(),
        "photo": samples["photo"].to_numpy(), "age": truth["age"], "true": truth["joint"], "pred": result.pred,
        "confidence": np.round(result.confidence.astype(np.float64), 4),
        "true_name": [names18[c] for c in truth["joint"]], "pred_name": [names18[c] for c in result.pred]})
    atomic_write_csv(predictions, report_dir / "predictions.csv")
    wrong = np.flatnonzero(result.pred != truth["joint"])
    wrong = wrong[np.argsort(-result.confidence[wrong], kind="stable")]
    atomic_write_csv(predictions.iloc[wrong], report_dir / "mistakes.csv")
    shown = wrong[:n_mistakes]
    captions = [f"{samples['person_id'].iat[i]} {samples['photo'].iat[i]} (age {truth['age'][i]})\n"
                f"true {names18[truth['joint'][i]]}\npred {names18[result.pred[i]]} ({result.confidence[i]:.2f})"
                for i in shown]
    figures["mistakes.png"] = photo_grid([np.array(images[i]) for i in shown], captions,
                                         f"{len(shown)} most confident of {len(wrong)} mistakes", columns=6)
    for name, fig in figures.items():
        save_png(fig, report_dir / name)
    people = people_table(samples, truth, result)
    atomic_write_csv(people, report_dir / "people.csv")
    atomic_write_text(report_markdown(info, metrics, per_class, people, len(wrong), len(shown)),
                      report_dir / "report.md")
    return metrics


def report_markdown(info, metrics, per_class, people, n_wrong, n_shown) -> str:
    """report.md: the headline metrics, per-class F1, the people most often wrong, links to every file."""
    members = "\n".join(f"- `{p}`" for p in info["checkpoints"])
    lines = [f"# Validation report: fold {info['fold']} of {info['folds']} (seed {info['seed']})", "",
             f"{info['photos']} photos of {info['people']} people; age threshold {info['age_threshold']}; "
             f"ensemble {info['ensemble']}, TTA {info['tta'] or 'none'}.", "", "Checkpoints:", members, "",
             "| metric | 18 classes | mask | gender | age |", "|---|---|---|---|---|",
             f"| macro F1 | {metrics['f1']:.4f} | {metrics['mask_f1']:.4f} | {metrics['gender_f1']:.4f} | "
             f"{metrics['age_f1']:.4f} |",
             f"| accuracy | {metrics['acc']:.4f} | {metrics['mask_acc']:.4f} | {metrics['gender_acc']:.4f} | "
             f"{metrics['age_acc']:.4f} |", ""]
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


def headline(metrics) -> str:
    reg = f", age_reg MAE {metrics['age_reg_mae']:.2f}" if "age_reg_mae" in metrics else ""
    return (f"18-class F1 {metrics['f1']:.4f} (acc {metrics['acc']:.4f}); mask F1 {metrics['mask_f1']:.4f}, "
            f"gender F1 {metrics['gender_f1']:.4f}, age F1 {metrics['age_f1']:.4f}{reg}")


# ---------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="predict.py", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input and output")
    group.add_argument("--checkpoint", nargs="+", action="extend", metavar="PATH",
                       help="checkpoint(s) or glob(s), e.g. 'runs/NAME/fold*/best.pt'; several make an ensemble")
    group.add_argument("--data", default="data", help="data folder with eval/info.csv and eval/images (default: data)")
    group.add_argument("--images", nargs="+", metavar="PATH",
                       help="predict these photos instead: files, folders (recursively) or globs, no info.csv; --out "
                            "gets one row per photo: path, mask, gender, age, class, probabilities (mtl.predictor)")
    group.add_argument("--out", default="submission.csv",
                       help="submission CSV to write, or with --images the predictions CSV (default: submission.csv)")
    group.add_argument("--refuse-uncropped", action="store_true",
                       help="stop when a checkpoint trained on face crops meets uncropped --data photos, instead "
                            "of cropping them with the checkpoint's crop settings")
    group.add_argument("--save-probs", metavar="CSV", help="also write every member's per-task probabilities here")
    group.add_argument("--from-probs", nargs="+", metavar="CSV",
                       help="redo an ensemble from --save-probs files instead of running checkpoints")

    group = parser.add_argument_group("ensemble and TTA")
    group.add_argument("--ensemble", default="soft", choices=METHODS,
                       help="soft: mean of each head's probabilities, then recombine (default); hard: vote on the "
                            "18-class answers, ties to the soft result")
    group.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per ensemble member")
    group.add_argument("--tta", nargs="+", default=["none"], metavar="NAME",
                       help="test-time augmentation: none (default) or hflip (average with the mirrored photo)")

    group = parser.add_argument_group("validation report")
    group.add_argument("--validate", action="store_true",
                       help="predict one fold's validation people instead of eval/ and write a report")
    group.add_argument("--fold", type=int, help="validation fold (default: the first checkpoint's)")
    group.add_argument("--folds", type=int, help="number of folds (default: the first checkpoint's)")
    group.add_argument("--seed", type=int, help="fold seed (default: the first checkpoint's)")
    group.add_argument("--relabel", help="relabel CSV for the truth (default: the first checkpoint's; 'none' for none)")
    group.add_argument("--skip-bad", action="store_const", const=True,
                       help="leave out bad training photos (default: as the first checkpoint was trained), or with "
                            "--images unreadable photos (listed); eval photos are never skipped, every one needs an "
                            "answer")
    group.add_argument("--report", metavar="DIR", default="report", help="report folder (default: report)")
    group.add_argument("--mistakes", type=int, default=48, metavar="N", help="photos on the mistakes page")

    add_inference_arguments(parser.add_argument_group("running"))
    return parser


def check_args(args):
    """Raise a ConfigError for flags that cannot work together or are out of range."""
    from mtl.inference import check_tta
    if bool(args.checkpoint) == bool(args.from_probs):
        raise ConfigError("give --checkpoint (run models) or --from-probs (redo an ensemble), exactly one of them")
    if args.from_probs and args.validate:
        raise ConfigError("--validate runs checkpoints; it cannot start from --from-probs files")
    args.tta = check_tta(args.tta)
    if args.images and (args.from_probs or args.validate):
        raise ConfigError("--images predicts photos with --checkpoint; it cannot go with --from-probs or --validate")
    if args.skip_bad and not (args.validate or args.images):
        raise ConfigError("--skip-bad only applies to --validate and --images: every eval photo needs an answer")
    if args.batch_size < 1 or args.workers < 0 or args.mistakes < 0:
        raise ConfigError("--batch-size must be at least 1, --workers and --mistakes at least 0")


def run(args, log=print) -> dict:
    """Everything predict.py does, in the order of the module docstring; returns what was computed."""
    check_args(args)
    if args.from_probs:
        return run_from_probs(args, log)
    if args.images:
        from mtl.predictor import run_images
        return run_images(args, log)
    members = load_members(args.checkpoint)
    weights = check_weights(args.weights, len(members))
    age_threshold = ckpt_io.threshold(members[0])
    if args.validate:
        report_dir = check_parent(Path(args.report))
        if report_dir.exists() and not report_dir.is_dir():
            raise ConfigError(f"--report {report_dir} is a file; give a folder")
        check_writable(report_dir if report_dir.is_dir() else report_dir.parent, "--report")
    else:
        check_output(args.out)
    if args.save_probs:
        check_output(args.save_probs, "--save-probs")
    needs_crop = check_face_crop(members, args.data, log, crop_raw=not (args.refuse_uncropped or args.validate))
    if args.validate:
        samples, sources, split = validation_fold(members, args.data, args.fold, args.folds, args.seed, args.relabel,
                                                  args.cache_dir, args.cache, args.workers, args.progress,
                                                  args.skip_bad, log)
        image_ids = samples["image_path"].tolist()
    else:
        info, samples = eval_samples(args.data)
        if len(samples) == 0:
            raise DataError(f"{Path(args.data) / 'eval' / 'info.csv'} lists no photos")
        if any(needs_crop):  # raw photos for a model trained on face crops: crop them with its settings
            from mtl.predictor import Predictor
            predictor = Predictor(members, args.device, args.batch_size, args.tta, args.ensemble, weights, args.amp,
                                  args.workers, args.cache_dir, args.cache, progress=args.progress, log=log)
            log(f"{sum(needs_crop)} checkpoint(s) trained on face crops: cropping {args.data}'s uncropped photos "
                f"with their settings")
        else:
            sources = open_sources(samples["image_path"], [load_size_of(m) for m in members], args.cache_dir,
                                   args.cache, args.workers, args.progress, log)
        image_ids = info["ImageID"].tolist()
    log(f"{len(members)} checkpoint(s), {len(samples)} photos, ensemble {args.ensemble if len(members) > 1 else '-'}"
        f", TTA {', '.join(args.tta) or 'none'}, age threshold {age_threshold}")

    if any(needs_crop):
        member_probs = predictor.member_probs(samples["image_path"].tolist())[0]
    else:
        member_probs = predict_members(members, samples, sources, args.batch_size, args.workers, args.device,
                                       args.amp, args.tta, args.progress)
    result = combine(member_probs, weights, args.ensemble)
    out = {"members": members, "member_probs": member_probs, "result": result, "image_ids": image_ids}
    writes = []  # NOTE: the submission first; each output is written even when another one fails
    if not args.validate:
        submission = submission_table(image_ids, result.pred)
        writes.append((args.out, lambda: atomic_write_csv(submission, args.out),
                       f"wrote {args.out}: {len(image_ids)} rows; classes predicted {class_counts_line(result.pred)}"))
    if args.save_probs:
        probs = pd.concat([probs_table(image_ids, p, m["path"], ckpt_io.threshold(m))
                           for m, p in zip(members, member_probs)], ignore_index=True)
        writes.append((args.save_probs, lambda: atomic_write_csv(probs, args.save_probs),
                       f"wrote {args.save_probs}: per-task probabilities of {len(members)} checkpoint(s)"))
    if not args.validate:
        write_outputs(writes, log)
        return out
    info = {"checkpoints": [m["path"] for m in members], "weights": weights.tolist(), "ensemble": args.ensemble,
            "tta": list(args.tta), "fold": split[0], "folds": split[1], "seed": split[2], "data": str(args.data),
            "age_threshold": age_threshold, "photos": len(samples), "people": int(samples["person_id"].nunique())}
    metrics = {}

    def report():
        report_dir.mkdir(exist_ok=True)
        metrics.update(write_report(report_dir, samples, sources[load_size_of(members[0])], result, age_threshold,
                                    info, args.mistakes))
    write_outputs(writes + [(report_dir, report, None)], log)
    log(f"validation fold {split[0]} of {split[1]} ({info['photos']} photos, {info['people']} people): "
        f"{headline(metrics)}")
    log(f"report: {report_dir / 'report.md'}")
    return {**out, "metrics": metrics, "samples": samples}


def run_from_probs(args, log=print) -> dict:
    """--from-probs: read saved probabilities, combine them, write the submission; no model runs."""
    paths = expand_paths(args.from_probs, "--from-probs")
    check_output(args.out)
    image_ids, members = read_probs(paths)
    weights = check_weights(args.weights, len(members), "ensemble member")
    result = combine([m["probs"] for m in members], weights, args.ensemble)
    write_outputs([(args.out, lambda: atomic_write_csv(submission_table(image_ids, result.pred), args.out),
                    f"wrote {args.out}: {len(image_ids)} rows from {len(members)} saved member(s), ensemble "
                    f"{args.ensemble}; classes predicted {class_counts_line(result.pred)}")], log)
    return {"members": members, "result": result, "image_ids": image_ids}


def main(argv=None) -> dict:
    """predict.py: parse the command line (argv, default sys.argv) and run."""
    return run(get_args_parser().parse_args(argv))
