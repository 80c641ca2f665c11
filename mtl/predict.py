"""predict.py's command line: checkpoints -> the 18-class submission, probability files, ensembles, validation reports.

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

The steps live where other commands share them: checkpoints as members (`mtl.members`), ensembles
(`mtl.ensemble`), the files written (`mtl.outputs`) and the validation report (`mtl.reports`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mtl import checkpoint as ckpt_io
from mtl.cli import ArgumentParser, add_ensemble_flags, add_fold_flags, add_inference_arguments, add_tta_flags
from mtl.data import eval_samples
from mtl.ensemble import check_weights, combine
from mtl.errors import ConfigError, DataError
from mtl.io import atomic_write_csv, check_parent, check_writable
from mtl.members import check_face_crop, expand_paths, load_members, load_size_of, open_sources
from mtl.names import ENSEMBLES
from mtl.outputs import check_output, class_counts_line, probs_table, read_probs, submission_table, write_outputs
from mtl.reports import headline, validation_fold, write_report

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
    schema = ckpt_io.label_schema(members[0])  # NOTE: load_members checked that every member shares it
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
        f", TTA {', '.join(args.tta) or 'none'}, age threshold {schema.age_threshold}")

    if any(needs_crop):
        member_probs = predictor.member_probs(samples["image_path"].tolist())[0]
    else:
        from mtl.members import predict_members  # NOTE: looked up at each run, so tests can stand in for it
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
        probs = pd.concat([probs_table(image_ids, p, m["path"], schema)
                           for m, p in zip(members, member_probs)], ignore_index=True)
        writes.append((args.save_probs, lambda: atomic_write_csv(probs, args.save_probs),
                       f"wrote {args.save_probs}: per-task probabilities of {len(members)} checkpoint(s)"))
    if not args.validate:
        write_outputs(writes, log)
        return out
    info = {"checkpoints": [m["path"] for m in members], "weights": weights.tolist(), "ensemble": args.ensemble,
            "tta": list(args.tta), "fold": split[0], "folds": split[1], "seed": split[2], "data": str(args.data),
            "age_threshold": schema.age_threshold, "photos": len(samples),
            "people": int(samples["person_id"].nunique())}
    metrics = {}

    def report():
        report_dir.mkdir(exist_ok=True)
        metrics.update(write_report(report_dir, samples, sources[load_size_of(members[0])], result, schema,
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
