#!/usr/bin/env python3
"""Issue 22's targets, read off the runs a bench.recipe work folder kept: a candidate against a reference, by seed.

The reference is what users got (default `baseline`, the defaults when the issue was filed, raw answers: predict.py
had no calibration then); the candidate is what they get now (its calibrated answers, as predict.py gives them).
Paired by seed (same fold), over the seeds both ran:

- held-out 18-class F1: the mean paired difference is +0.03 or more;
- bare faces of the other collection answered "not wear": the candidate's mean is 0.85 or more;
- no figure worse beyond the seed spread: for the cross score and each of its five parts, the mean paired
  difference is no lower than minus the noise (bench.recipe's rule: the larger of the paired differences' sd and
  the reference's sd over seeds).

A candidate trained on the other facemask-dev half (`+real_masks`) is scored on the half it never saw: its
facemask figures are on unseen photos of a collection it has seen photos of, and the report says so.

    python -m bench.recipe_targets --work /tmp/recipe --candidate age_reg_0
    python -m bench.recipe_targets --work /tmp/recipe --candidate age_reg_0+real_masks+lr_1e-3 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import table, write_json
from bench.recipe import CROSS_PARTS, NOT_UNSEEN, VARIANTS, mean_sd

F1_GAIN = 0.03  # held-out 18-class F1, mean paired difference
BARE_SHARE = 0.85  # bare faces of the other collection answered "not wear", candidate mean
SHOWN = ("cross",) + CROSS_PARTS
LABELS = {"cross": "cross", "eval_f1": "held-out 18-class F1", "fm_real_mask_acc": "real masks, mask acc",
          "fm_bare_not_wear": "bare faces answered \"not wear\"", "chips_gender_acc": "chips gender acc",
          "chips_age_f1": "chips age F1"}


def kept_results(work: Path, name: str) -> dict[int, dict]:
    """seed -> the figures bench.recipe kept for one variant (work/results/<name>__seed<k>.json)."""
    prefix = f"{name}__seed"
    return {int(path.stem.removeprefix(prefix)): json.loads(path.read_text())
            for path in sorted((work / "results").glob(f"{prefix}*.json"))
            if path.stem.removeprefix(prefix).isdigit()}


def answers(row: dict, key: str, which: str, where: str) -> float:
    value = row.get(key + ("_cal" if which == "cal" else ""))
    if value is None:
        raise SystemExit(f"error: {where} has no {which} {key} (calibrated figures need bench.recipe --rescore)")
    return value


def verdicts(reference: dict[int, dict], candidate: dict[int, dict], reference_answers: str = "raw",
             candidate_answers: str = "cal", seeds=None) -> dict:
    """The three targets over the seeds both ran (or `seeds`), with every figure's means and paired difference."""
    both = sorted(set(reference) & set(candidate))
    if seeds is not None:
        missing = sorted(set(seeds) - set(both))
        if missing:
            raise SystemExit(f"error: seeds {missing} are not kept for both the reference and the candidate "
                             f"(both have {both})")
        both = sorted(seeds)
    if not both:
        raise SystemExit("error: the reference and the candidate share no seed: run them with the same --seeds")
    figures = {}
    for key in SHOWN:
        ref = [answers(reference[s], key, reference_answers, f"reference seed {s}") for s in both]
        cand = [answers(candidate[s], key, candidate_answers, f"candidate seed {s}") for s in both]
        diff_mean, diff_sd = mean_sd([c - r for c, r in zip(cand, ref)])
        ref_mean, ref_sd = mean_sd(ref)
        cand_mean, cand_sd = mean_sd(cand)
        figures[key] = {"reference": ref_mean, "reference_sd": ref_sd, "candidate": cand_mean, "candidate_sd": cand_sd,
                        "difference": diff_mean, "difference_sd": diff_sd, "noise": max(diff_sd, ref_sd),
                        "per_seed": [c - r for c, r in zip(cand, ref)]}
    worse = [key for key, f in figures.items() if f["difference"] < -f["noise"]]
    return {"seeds": both, "figures": figures,
            "f1_gain_met": figures["eval_f1"]["difference"] >= F1_GAIN,
            "bare_share_met": figures["fm_bare_not_wear"]["candidate"] >= BARE_SHARE,
            "worse_beyond_noise": worse, "nothing_worse_met": not worse}


def report(result: dict, reference: str, candidate: str) -> str:
    """The verdicts and every figure as Markdown."""
    f = result["figures"]
    bare = f["fm_bare_not_wear"]
    ref_answers, cand_answers = result["answers"]

    def diff(key):
        return f"{f[key]['difference']:+.3f} ± {f[key]['difference_sd']:.3f}"

    def verdict(met):
        return "met" if met else "**not met**"
    seeds = ", ".join(map(str, result["seeds"]))
    worse = ", ".join(LABELS[k] for k in result["worse_beyond_noise"]) or "none"
    rows = [{"target": f"held-out 18-class F1 +{F1_GAIN:.2f} or more", "paired difference": diff("eval_f1"),
             "detail": "per seed " + " ".join(f"{d:+.3f}" for d in f["eval_f1"]["per_seed"]),
             "verdict": verdict(result["f1_gain_met"])},
            {"target": f"bare faces answered \"not wear\" >= {BARE_SHARE:.0%}",
             "paired difference": diff("fm_bare_not_wear"),
             "detail": f"candidate {bare['candidate']:.1%} ± {bare['candidate_sd']:.1%}",
             "verdict": verdict(result["bare_share_met"])},
            {"target": "no figure worse beyond the seed spread", "paired difference": f"worse: {worse}",
             "detail": "", "verdict": verdict(result["nothing_worse_met"])}]
    figures = [{"figure": LABELS[k], f"{reference} ({ref_answers})": f"{v['reference']:.3f} ± {v['reference_sd']:.3f}",
                f"{candidate} ({cand_answers})": f"{v['candidate']:.3f} ± {v['candidate_sd']:.3f}",
                "paired difference": diff(k) + (" ~" if abs(v["difference"]) <= v["noise"] else "")}
               for k, v in f.items()]
    note = (f"\n{candidate} trained on the other facemask-dev half: its facemask figures are on unseen photos of a "
            "collection it has seen.\n") if result["candidate_trained_on_facemask"] else ""
    return "\n".join([f"### Targets: {candidate} ({cand_answers}) against {reference} ({ref_answers}), seeds {seeds}",
                      "", table(rows, ["target", "paired difference", "detail", "verdict"]), "",
                      table(figures, list(figures[0])), note])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="bench.recipe's work folder")
    parser.add_argument("--candidate", required=True, choices=list(VARIANTS), metavar="NAME",
                        help="the variant judged (bench.recipe --list)")
    parser.add_argument("--reference", default="baseline", choices=list(VARIANTS), metavar="NAME",
                        help="the variant it is judged against (default baseline)")
    parser.add_argument("--reference-answers", choices=("raw", "cal"), default="raw",
                        help="the reference's answers (default raw: predict.py before calibration existed)")
    parser.add_argument("--candidate-answers", choices=("raw", "cal"), default="cal",
                        help="the candidate's answers (default cal: what predict.py gives)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: every seed both kept")
    parser.add_argument("--out", help="also write the verdicts as JSON here")
    return parser


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    work = Path(args.work)
    if not (work / "results").is_dir():
        parser.error(f"--work {work} holds no bench.recipe results (no results/ folder)")
    kept = {}
    for name in (args.reference, args.candidate):
        kept[name] = kept_results(work, name)
        if not kept[name]:
            parser.error(f"no kept run of {name} in {work / 'results'}: run bench.recipe --variants {name} first")
    result = verdicts(kept[args.reference], kept[args.candidate], args.reference_answers, args.candidate_answers,
                      args.seeds)
    result.update(reference=args.reference, candidate=args.candidate,
                  answers=[args.reference_answers, args.candidate_answers],
                  candidate_trained_on_facemask=args.candidate in NOT_UNSEEN)
    print(report(result, args.reference, args.candidate))
    if args.out:
        print(f"written {write_json(result, args.out)}")


if __name__ == "__main__":
    main()
