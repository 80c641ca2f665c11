"""predict.py's command line: checkpoints -> the 18-class submission, probability files, ensembles, validation reports.

`run` picks one of four functions, each reading top to bottom:
1) check everything before any model forward: checkpoints load and share one label schema (age
   threshold included), --weights fit, every output folder exists and takes a file, the face-crop
   settings agree; for the submission DATA/eval/info.csv has an ImageID column and lists only photos that
   exist inside eval/images (all bad rows named);
2) decode the photos through the same cache as training, once per load size (an unreadable or
   tiny photo stops the run, named);
3) run every checkpoint with its own preprocessing record over them (`predictor.predict_sources`, the one
   prediction path: members that share a record share one pass over the photos; a checkpoint trained on
   face crops given uncropped photos gets them cropped with its own settings, unless --refuse-uncropped);
4) calibrate and combine: each checkpoint's own calibration (offsets fitted after training to maximise
   macro F1; --no-calibration leaves the raw probabilities) is applied to its probabilities, then `soft`
   averages each head's probabilities (weighted) and recombines them with `metrics.recombine`; `hard` is a
   weighted vote of the members' 18-class answers, ties going to the soft result;
5) write atomically: the submission (ImageID,ans in info.csv order), --save-probs, or with
   --validate a report on one fold's validation people (per-class metrics, confusion matrices,
   the most confident mistakes, the people most often wrong); an output that cannot be written
   (a full disk) is named in one line after the others are written.

`predict_submission` (DATA/eval), `predict_validation` (--validate) and `predict_images` (--images: files,
folders or globs, one row of names and probabilities per photo, through `mtl.Predictor`) each return a
`predictor.Prediction`; `predict_from_probs` (--from-probs) redoes an ensemble from probability files without
a forward pass. Probability files (--save-probs) hold one row per photo and ensemble member: ImageID,
checkpoint, age_threshold, mask_0..2, gender_0..1, age_0..2 (+ joint_0..17, age_reg when the model has them): what
each member answered, calibrated unless --no-calibration (--from-probs applies nothing more).

The steps live where other commands share them: checkpoints as members (`mtl.members`), ensembles
(`mtl.ensemble`), the files written (`mtl.outputs`) and the validation report (`mtl.reports`). Only the flags
are read here before the command runs: --help and a bad flag are answered without loading torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mtl.cli import ArgumentParser, add_ensemble_flags, add_fold_flags, add_inference_arguments, add_tta_flags
from mtl.errors import ConfigError, DataError
from mtl.names import ENSEMBLES

DESCRIPTION = """Predict the 18 mask/gender/age classes of DATA/eval/info.csv's photos and write a submission CSV.

The preprocessing and the age threshold come from each checkpoint, so inference matches training.

  python predict.py --checkpoint runs/NAME/best.pt --data DATA --out submission.csv
  python predict.py --checkpoint 'runs/NAME/fold*/best.pt' --ensemble soft --tta hflip --save-probs probs.csv
  python predict.py --from-probs probs.csv other.csv --ensemble hard --weights 1 1 2 --out submission.csv
  python predict.py --checkpoint runs/NAME/best.pt --data DATA --validate --fold 0 --report report/
  python predict.py --checkpoint runs/NAME/best.pt --images my_photos/ 'more/*.jpg' --out predictions.csv
"""


# ---------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="predict.py", description=DESCRIPTION,
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
    add_ensemble_flags(group, ENSEMBLES)
    add_tta_flags(group)

    group = parser.add_argument_group("validation report")
    group.add_argument("--validate", action="store_true",
                       help="predict one fold's validation people instead of eval/ and write a report")
    add_fold_flags(group, skip_bad_help="leave out bad training photos (default: as the first checkpoint was "
                                        "trained), or with --images unreadable photos (listed); eval photos are "
                                        "never skipped, every one needs an answer")
    group.add_argument("--report", metavar="DIR", default="report", help="report folder (default: report)")
    group.add_argument("--mistakes", type=int, default=48, metavar="N", help="photos on the mistakes page")

    add_inference_arguments(parser.add_argument_group("running"))
    return parser


def check_args(args):
    """Raise a ConfigError for flags that cannot work together or are out of range (before anything is read)."""
    if bool(args.checkpoint) == bool(args.from_probs):
        raise ConfigError("give --checkpoint (run models) or --from-probs (redo an ensemble), exactly one of them")
    if args.from_probs and args.validate:
        raise ConfigError("--validate runs checkpoints; it cannot start from --from-probs files")
    if args.from_probs and not args.calibration:
        raise ConfigError("--no-calibration applies where checkpoints run; --from-probs files hold what the members "
                          "answered when they were saved (calibrated unless saved with --no-calibration)")
    if args.images and (args.from_probs or args.validate):
        raise ConfigError("--images predicts photos with --checkpoint; it cannot go with --from-probs or --validate")
    if args.skip_bad and not (args.validate or args.images):
        raise ConfigError("--skip-bad only applies to --validate and --images: every eval photo needs an answer")
    if args.batch_size < 1 or args.workers < 0 or args.mistakes < 0:
        raise ConfigError("--batch-size must be at least 1, --workers and --mistakes at least 0")


def run(args, log=print):
    """Everything predict.py does, in the order of the module docstring; returns the Prediction computed."""
    check_args(args)
    if args.from_probs:
        return predict_from_probs(args, log)
    if args.images:
        return predict_images(args, log)
    if args.validate:
        return predict_validation(args, log)
    return predict_submission(args, log)


def main(argv=None):
    """predict.py: parse the command line (argv, default sys.argv) and run."""
    return run(get_args_parser().parse_args(argv))


# ---------------------------------------------------------------- the three predictions and --from-probs
def predict_submission(args, log=print):
    """DATA/eval/info.csv's photos -> the submission (and --save-probs)."""
    from mtl.data import eval_samples, format_problems
    from mtl.members import check_face_crop, open_sources
    from mtl.outputs import check_output
    from mtl.photos import GivenPhotos
    from mtl.predictor import RAW
    members, weights = load_checked(args)
    out = check_output(args.out)
    check_save_probs(args)
    crop = check_face_crop(members, args.data, log, crop_raw=not args.refuse_uncropped)
    info, samples = eval_samples(args.data)
    if len(samples) == 0:
        raise DataError(f"{Path(args.data) / 'eval' / 'info.csv'} lists no photos")
    sizes = [m.load_size for m, c in zip(members, crop) if not c]
    sources, problems = open_sources(samples["image_path"], sizes, cache_dir=args.cache_dir, use_cache=args.cache,
                                     workers=args.workers, progress=args.progress, log=log)
    if not sizes:  # NOTE: every member crops the photos itself: each one is still checked before any model runs
        from mtl.images import check_images
        problems = check_images(samples["image_path"], workers=max(1, args.workers), progress=args.progress)
    if problems:
        raise DataError(format_problems(problems, "bad eval photo"))
    if any(crop):  # raw photos for a model trained on face crops: cropped with its settings
        sources[RAW] = GivenPhotos(samples["image_path"])
        log(f"{sum(crop)} checkpoint(s) trained on face crops: cropping {args.data}'s uncropped photos with their "
            f"settings")
    prediction = predict(args, members, weights, image_ids=info["ImageID"].tolist(), samples=samples, sources=sources,
                         crop=crop, log=log)
    write_predictions(args, prediction, [submission_write(out, prediction)], log)
    return prediction


def predict_validation(args, log=print):
    """One fold's validation people -> the validation report (and --save-probs)."""
    from mtl.ensemble import combine
    from mtl.io import check_parent, check_writable
    from mtl.members import check_face_crop
    from mtl.reports import calibration_caveat, calibration_info, headline, validation_fold, write_report
    members, weights = load_checked(args)
    report_dir = check_parent(Path(args.report))
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"--report {report_dir} is a file; give a folder")
    check_writable(report_dir if report_dir.is_dir() else report_dir.parent, "--report")
    check_save_probs(args)
    check_face_crop(members, args.data, log)
    split = validation_fold(members, args.data, fold=args.fold, folds=args.folds, seed=args.seed,
                            relabel=args.relabel, skip_bad=args.skip_bad, cache_dir=args.cache_dir,
                            use_cache=args.cache, workers=args.workers, progress=args.progress, log=log)
    samples, schema = split.samples, members[0].schema
    prediction = predict(args, members, weights, image_ids=samples["image_path"].tolist(), samples=samples,
                         sources=split.sources, log=log)
    info = {"checkpoints": [m.path for m in members], "weights": weights.tolist(), "ensemble": args.ensemble,
            "tta": list(prediction_tta(args)), "fold": split.fold, "folds": split.folds, "seed": split.seed,
            "data": str(args.data), "age_threshold": schema.age_threshold, "photos": len(samples),
            "people": int(samples["person_id"].nunique()),
            "calibration": calibration_info(members, split, args.data, applied=prediction.calibrated)}
    raw = combine(prediction.raw_probs, weights, args.ensemble) if info["calibration"]["applied"] else None
    prediction.metrics = {}

    def report():
        report_dir.mkdir(exist_ok=True)
        prediction.metrics.update(write_report(report_dir, samples=samples, images=split.sources[members[0].load_size],
                                               result=prediction.ensemble, raw=raw, schema=schema, info=info,
                                               n_mistakes=args.mistakes))
    write_predictions(args, prediction, [(report_dir, report, None)], log)
    log(f"validation fold {split.fold} of {split.folds} ({info['photos']} photos, {info['people']} people): "
        f"{headline(prediction.metrics)}")
    if info["calibration"]["applied"] and info["calibration"]["fitted_here"]:
        log(f"note: {calibration_caveat(info['calibration'])}")
    log(f"report: {report_dir / 'report.md'}")
    return prediction


def predict_images(args, log=print):
    """--images: any photo files, folders or globs -> one row of names and probabilities per photo (mtl.Predictor)."""
    import json

    from mtl.io import atomic_write_csv
    from mtl.outputs import check_output
    from mtl.photos import find_photos
    from mtl.predictor import Predictor
    out = check_output(args.out)
    check_save_probs(args)
    predictor = Predictor(args.checkpoint, device=args.device, batch_size=args.batch_size, tta=args.tta,
                          ensemble=args.ensemble, weights=args.weights, amp=args.amp, workers=args.workers,
                          cache_dir=args.cache_dir, use_cache=args.cache, progress=args.progress,
                          calibration=args.calibration, log=log)
    photos = find_photos(args.images)
    crops = sorted({json.dumps(m.face_crop, sort_keys=True) for m in predictor.members if m.face_crop is not None})
    log(headline_of(args, predictor.members, f"{len(photos)} photos", predictor.schema)
        + (f", face crop {', '.join(crops)}" if crops else ""))
    prediction = predictor.predict_items(photos, photos, skip_bad=bool(args.skip_bad))
    table = predictor.answers(prediction)
    faces = (f"; a face was found in {int(table['face_found'].sum())} of {len(table)}"
             if "face_found" in table else "")
    skipped = f" ({len(prediction.skipped)} unreadable photo(s) left out)" if prediction.skipped else ""
    write_predictions(args, prediction, [(out, lambda: atomic_write_csv(table, out, float_format="%.6f"),
                                          f"wrote {out}: {len(table)} rows{skipped}{faces}")], log)
    return prediction


def predict_from_probs(args, log=print):
    """--from-probs: read saved probabilities, combine them, write the submission; no model runs."""
    from mtl.ensemble import check_weights, combine
    from mtl.members import expand_paths
    from mtl.outputs import check_output, read_probs, write_all
    from mtl.predictor import Prediction
    paths = expand_paths(args.from_probs, "--from-probs")
    out = check_output(args.out)
    image_ids, members = read_probs(paths)
    weights = check_weights(args.weights, len(members), "ensemble member")
    member_probs = [m.probs for m in members]
    prediction = Prediction(image_ids=image_ids, members=members, member_probs=member_probs,
                            ensemble=combine(member_probs, weights, args.ensemble))
    write_all([submission_write(out, prediction, f" from {len(members)} saved member(s), ensemble {args.ensemble}")],
              log)
    return prediction


# ---------------------------------------------------------------- the steps they share
def load_checked(args):
    """(members, weights) of --checkpoint and --weights, all checked together."""
    from mtl.ensemble import check_weights
    from mtl.members import load_members
    members = load_members(args.checkpoint)
    return members, check_weights(args.weights, len(members))


def check_save_probs(args):
    from mtl.outputs import check_output
    if args.save_probs:
        check_output(args.save_probs, "--save-probs")


def prediction_tta(args) -> tuple:
    from mtl.names import check_tta
    return check_tta(args.tta)


def headline_of(args, members, photos, schema) -> str:
    """'2 checkpoint(s), 30 photos, ensemble soft, TTA hflip, age threshold 60, calibrated (2 of 2 checkpoints hold
    offsets)': what a run is about to do."""
    from mtl.members import calibration_state
    return (f"{len(members)} checkpoint(s), {photos}, ensemble {args.ensemble if len(members) > 1 else '-'}, TTA "
            f"{', '.join(prediction_tta(args)) or 'none'}, age threshold {schema.age_threshold}, "
            f"{calibration_state(members, args.calibration)}")


def predict(args, members, weights, *, image_ids, samples, sources, crop=None, log=print):
    """The members over the sources (predictor.predict_sources), each calibrated, combined: the Prediction of the
    photos in samples."""
    from mtl.predictor import Prediction, predict_sources
    log(headline_of(args, members, f"{len(samples)} photos", members[0].schema))
    member_probs, face_found = predict_sources(
        members, samples, sources, crop=crop, batch_size=args.batch_size, workers=args.workers, device=args.device,
        amp=args.amp, tta=prediction_tta(args), progress=args.progress)
    return Prediction.of(image_ids, members, member_probs, weights=weights, ensemble=args.ensemble,
                         calibration=args.calibration, face_found=face_found)


def submission_write(out, prediction, about="") -> tuple:
    """The (path, write, message) of the submission: ImageID,ans in the prediction's order."""
    from mtl.io import atomic_write_csv
    from mtl.outputs import class_counts_line, submission_table
    pred = prediction.ensemble.pred
    table = submission_table(prediction.image_ids, pred)
    return out, lambda: atomic_write_csv(table, out), (f"wrote {out}: {len(table)} rows{about}; classes predicted "
                                                       f"{class_counts_line(pred)}")


def write_predictions(args, prediction, writes, log):
    """Write the command's own outputs, then --save-probs; each is written even when another one fails."""
    import pandas as pd

    from mtl.io import atomic_write_csv
    from mtl.outputs import probs_table, write_all
    if args.save_probs:
        schema = prediction.members[0].schema
        probs = pd.concat([probs_table(prediction.image_ids, p, m.path, schema)
                           for m, p in zip(prediction.members, prediction.member_probs)], ignore_index=True)
        writes = writes + [(args.save_probs, lambda: atomic_write_csv(probs, args.save_probs),
                            f"wrote {args.save_probs}: per-task probabilities of {len(prediction.members)} "
                            f"checkpoint(s)")]
    write_all(writes, log)
