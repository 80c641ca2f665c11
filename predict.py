"""Predict the competition's 18 classes (mask x gender x age group) for DATA/eval and write the submission CSV.

Reads DATA/eval/info.csv, runs one checkpoint or an ensemble of them (paths or globs, soft or hard,
optionally weighted, optional hflip TTA) with the preprocessing and age threshold stored in each
checkpoint, and writes `ImageID,ans` in info.csv's order; --save-probs keeps the probabilities so
an ensemble can be redone with --from-probs. With --validate it predicts one fold's validation
people instead and writes a report (per-class metrics, confusion matrices, the worst mistakes).
With --images it predicts any photo files, folders or globs instead (one row of names and
probabilities per photo; face-crop models crop each photo first with their own settings).

    python predict.py --checkpoint runs/NAME/best.pt --data DATA --out submission.csv
    python predict.py --checkpoint 'runs/NAME/fold*/best.pt' --tta hflip --out submission.csv
    python predict.py --checkpoint runs/NAME/best.pt --data DATA --validate --fold 0 --report report/
    python predict.py --checkpoint runs/NAME/best.pt --images my_photos/ --out predictions.csv   # any photos

The logic lives in mtl/predict.py; a greedy model soup is made with `python -m mtl.soup`.
"""
from mtl.cli import main_guard
from mtl.predict import main

if __name__ == "__main__":
    main_guard(main)
