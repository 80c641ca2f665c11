"""Greedy model soup (Wortsman et al. 2022): average the weights of fine-tuned models that help on validation.

    python -m mtl.soup --checkpoints runs/a/best.pt runs/b/best.pt 'runs/c*/best.pt' --data DATA --fold 0 --out soup.pt

1) every ingredient (same architecture, trunk, head and preprocessing) is scored on one fold's
   validation people; 2) they are sorted by 18-class macro F1, best first; 3) starting from the best,
   each next ingredient is tried: the soup becomes the uniform average of the kept ingredients'
   weights plus this one; 4) it is kept only if the validation F1 does not drop. The soup is written
   as a checkpoint like train's best.pt, plus 'soup' (the ingredient paths kept) and 'soup_validation'
   (the fold and the table of decisions), so predict.py loads it like any other. By construction the
   soup never scores below its best ingredient on the fold it was built on - which is also why that
   fold's score is optimistic for the soup: judge it on another fold or on the leaderboard.

Calibration: averaged weights answer differently from any ingredient, so no ingredient's offsets fit the soup;
the soup gets its own, fitted on its probabilities on this fold (mtl.calibration.fit, cross-validated by
person, the heads the best ingredient's --calibrate names). Every candidate, ingredient or mix, is scored as it
would ship: F1 after offsets fitted on its own probabilities here (f1_calibrated; for an ingredient validated on
this fold, the offsets training fitted, TTA aside). --no-calibration scores raw answers and stores no calibration.
"""
from __future__ import annotations

import argparse
import dataclasses

from mtl.cli import ArgumentParser, add_fold_flags, add_inference_arguments, add_tta_flags
from mtl.errors import ConfigError

SAME_KEYS = ("arch", "model", "head")


def check_ingredients(members):
    """Raise unless every ingredient has the first one's architecture, trunk, head, age regression and preprocessing."""
    first = members[0]
    for other in members[1:]:
        for key in SAME_KEYS:
            if other.config.get(key) != first.config.get(key):
                raise ConfigError(f"{other.path} has --{key} {other.config.get(key)} but {first.path} has "
                                  f"{first.config.get(key)}: a soup averages the weights of one architecture")
        differ = sorted(set(other.checkpoint["model"]) ^ set(first.checkpoint["model"]))
        if differ:
            raise ConfigError(f"{other.path} and {first.path} hold different parameters ({len(differ)} differ, "
                              f"e.g. {differ[0]}; age regression on in one only?): their weights cannot be averaged")
        if other.preprocess != first.preprocess:
            raise ConfigError(f"{other.path} was trained with preprocessing {other.preprocess} but "
                              f"{first.path} with {first.preprocess}: a soup has one input pipeline")


def average_states(states) -> dict:
    """Uniform average of state dicts; integer buffers (e.g. BatchNorm's num_batches_tracked) are the first's."""
    import torch
    out = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value):
            total = sum(s[key].double() for s in states)
            out[key] = (total / len(states)).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


class SoupScorer:
    """Scores weights on one fold's validation photos: the loader, device and model are built once."""

    def __init__(self, template, samples, images, *, batch_size=64, workers=2, device="auto", amp="auto", tta=(),
                 progress=True, calibrate=None):
        from mtl.dataset import FaceDataset
        from mtl.inference import amp_dtype, prepare_model, resolve_device
        from mtl.loader import make_loader
        from mtl.reports import truth_of
        from mtl.transforms import eval_transform
        self.device = resolve_device(device)
        self.dtype, self.channels_last = amp_dtype(amp, self.device), self.device.type == "cuda"
        self.tta, self.progress = tta, progress
        self.schema = template.schema
        dataset = FaceDataset(samples, images, eval_transform(template.preprocess), self.schema)
        self.loader = make_loader(dataset, batch_size, workers, device=self.device)
        self.truth = truth_of(samples, self.schema)
        self.model = prepare_model(template.build_model(), self.device, self.channels_last)
        self.calibrate, self.people = calibrate, samples["person_id"].to_numpy()
        self.fitted = None  # the calibration fitted in the last call (None: calibrate is None)

    def __call__(self, state: dict, desc="scoring") -> dict:
        """Validation metrics (metrics.score) of these weights; with calibrate (the heads that may move), also
        f1_calibrated, the F1 after offsets fitted on these probabilities (kept in `fitted`)."""
        from mtl.calibration import fit
        from mtl.inference import predict_probs
        from mtl.metrics import score
        from mtl.model import clean_state_dict
        self.model.load_state_dict(clean_state_dict(state))
        probs = predict_probs(self.model, self.loader, self.device, dtype=self.dtype, channels_last=self.channels_last,
                              tta=self.tta, progress=self.progress, desc=desc)
        metrics = score(probs, self.truth, self.schema)
        if self.calibrate:
            self.fitted = fit(probs, self.truth, self.schema, groups=self.people, tasks=self.calibrate)
            metrics["f1_calibrated"] = self.fitted.f1_after
        return metrics


@dataclasses.dataclass
class Soup:
    """A greedy soup: its weights, validation metrics and calibration (fitted on its probabilities; None without), the
    ingredients kept (positions in the list given), and the decisions in the order they were taken (rows: path, f1,
    soup_f1, kept: the F1 each was judged by, calibrated where the scorer calibrates), with every ingredient's own
    metrics."""
    state: dict
    metrics: dict
    kept: list
    table: list
    scores: list
    calibration: object = None


def judged(metrics: dict) -> float:
    """The F1 a candidate is judged by: calibrated when the scorer calibrates (the answers it would ship), else raw."""
    return metrics.get("f1_calibrated", metrics["f1"])


def greedy_soup(members, scorer, log=print) -> Soup:
    """Steps 1-4 of the module docstring."""
    from mtl.model import clean_state_dict
    states = [clean_state_dict(m.checkpoint["model"]) for m in members]
    scores, fits = [], []
    for i, state in enumerate(states):
        scores.append(scorer(state, f"ingredient {i + 1}/{len(members)}"))
        fits.append(getattr(scorer, "fitted", None))
    order = sorted(range(len(members)), key=lambda i: -judged(scores[i]))  # NOTE: stable, ties keep the given order
    kept, soup_state, soup_metrics, soup_fit = [order[0]], states[order[0]], scores[order[0]], fits[order[0]]
    table = [{"path": members[order[0]].path, "f1": judged(scores[order[0]]), "soup_f1": judged(soup_metrics),
              "kept": True}]
    for i in order[1:]:
        candidate = average_states([states[k] for k in kept + [i]])
        metrics = scorer(candidate, f"soup + ingredient {len(table) + 1}/{len(members)}")
        keep = judged(metrics) >= judged(soup_metrics)
        table.append({"path": members[i].path, "f1": judged(scores[i]), "soup_f1": judged(metrics), "kept": keep})
        if keep:
            kept.append(i)
            soup_state, soup_metrics, soup_fit = candidate, metrics, getattr(scorer, "fitted", None)
    log(format_table(table))
    return Soup(soup_state, soup_metrics, kept, table, scores, soup_fit)


def format_table(table) -> str:
    width = max(len(row["path"]) for row in table)
    lines = [f"{'ingredient':<{width}}  {'own F1':>7}  {'soup F1 with it':>15}  decision"]
    for n, row in enumerate(table):
        decision = "start (best)" if n == 0 else ("kept" if row["kept"] else "dropped (F1 would drop)")
        lines.append(f"{row['path']:<{width}}  {row['f1']:7.4f}  {row['soup_f1']:15.4f}  {decision}")
    return "\n".join(lines)


def make_soup(args, log=print) -> Soup:
    """Check every input, score the ingredients, build the greedy soup and write it as a checkpoint."""
    from mtl import checkpoint as ckpt_io
    from mtl import labels
    from mtl.calibration import summary as calibration_summary
    from mtl.members import check_face_crop, load_members
    from mtl.names import check_tta
    from mtl.outputs import check_output, write_all
    from mtl.reports import validation_fold
    tta = check_tta(args.tta)
    members = load_members(args.checkpoints)
    check_ingredients(members)
    out = check_output(args.out)
    check_face_crop(members, args.data, log)
    split = validation_fold(members, args.data, fold=args.fold, folds=args.folds, seed=args.seed, relabel=args.relabel,
                            skip_bad=args.skip_bad, cache_dir=args.cache_dir, use_cache=args.cache,
                            workers=args.workers, progress=args.progress, log=log)
    samples = split.samples
    log(f"greedy soup of {len(members)} ingredient(s) on fold {split.fold} of {split.folds} (seed {split.seed}): "
        f"{len(samples)} photos of {samples['person_id'].nunique()} people")
    calibrate = members[0].config.get("calibrate", list(labels.TASKS)) if args.calibration else None
    scorer = SoupScorer(members[0], samples, split.sources[members[0].load_size], batch_size=args.batch_size,
                        workers=args.workers, device=args.device, amp=args.amp, tta=tta, progress=args.progress,
                        calibrate=calibrate or None)
    soup = greedy_soup(members, scorer, log)
    best = members[soup.kept[0]].checkpoint
    validation = {"data": str(args.data), "fold": split.fold, "folds": split.folds, "seed": split.seed,
                  "tta": list(tta), "table": soup.table}
    record = {"model": soup.state, "config": best["config"], "schema": best["schema"],
              "preprocess": best["preprocess"], "epoch": best.get("epoch"), "metrics": soup.metrics,
              "calibration": soup.calibration.to_dict() if soup.calibration is not None else None,
              "soup": [members[i].path for i in soup.kept], "soup_validation": validation}
    if soup.calibration is not None:
        log(f"the soup's calibration, fitted on fold {split.fold}: {calibration_summary(soup.calibration)}")
    write_all([(out, lambda: ckpt_io.save(record, out),
                f"wrote {out}: soup of {len(soup.kept)} of {len(members)} ingredient(s), validation 18-class "
                f"F1 {judged(soup.metrics):.4f}{' calibrated' if soup.calibration is not None else ''} (best "
                f"ingredient {soup.table[0]['f1']:.4f})")], log)
    return soup


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mtl.soup", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", "--checkpoint", nargs="+", action="extend", required=True, metavar="PATH",
                        help="ingredient checkpoints or globs (same architecture, trunk, head and preprocessing)")
    parser.add_argument("--data", default="data", help="data folder the ingredients were trained on")
    parser.add_argument("--out", default="soup.pt", help="soup checkpoint to write (default: soup.pt)")
    add_fold_flags(parser, "ingredient")
    add_tta_flags(parser)
    add_inference_arguments(parser.add_argument_group("running"))
    return parser


def main(argv=None) -> Soup:
    """python -m mtl.soup: parse the command line (argv, default sys.argv) and make the soup."""
    return make_soup(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    from mtl.cli import main_guard
    main_guard(main)
