#!/usr/bin/env bash
# Prepare .whl/ (ignored by git) for bench/gpu_check.py on a GPU machine that cannot download anything.
#
# That machine's image (Python 3.12, torch 2.11, timm, numpy, opencv, pandas, scikit-learn, tensorboard, ...)
# lacks albumentations (with albucore, pydantic and their compiled helpers) and facenet-pytorch; this fetches
# their Python 3.12 manylinux wheels from PyPI, at the versions requirements.txt pins and this machine runs,
# without dependencies (each one needed is named here), and copies a few real face photos for the crop_faces
# stage from ../shared/data/utkface-dev when it is there (they stay out of git, as .whl/ does). Optuna is left
# out: the check does not tune. Then run the one-line device command of BENCHMARKS.md ("GPU check").
#
#     bash bench/gpu_wheels.sh            # ~10 MB into .whl/, once per checkout
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
    typing-extensions==4.16.0   # NOTE: pydantic 2.13 needs >= 4.14.1; the image's own may be older
    facenet-pytorch==2.5.3
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
    PLATFORMS+=(--platform "$p")
done

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
# NOTE: one version of each package only: two make the device's `pip install .whl/*.whl` refuse all
for name in "${WHEELS[@]}"; do
    stem=$(echo "${name%%==*}" | tr '-' '_')
    count=$(find .whl -maxdepth 1 -iname "${stem}-*.whl" | wc -l)
    if [ "$count" -ne 1 ]; then
        echo "error: .whl holds $count wheels of ${name%%==*}; remove the stale ones" >&2
        exit 2
    fi
done

FACES=../shared/data/utkface-dev
if [ -d "$FACES" ]; then
    mkdir -p .whl/faces
    find "$FACES" -maxdepth 1 -name '*.jpg' | sort | awk 'NR % 150 == 1' | head -n 28 | xargs -I{} cp {} .whl/faces/
fi
echo "$(find .whl -maxdepth 1 -name '*.whl' | wc -l) wheels and $(find .whl/faces -name '*.jpg' 2>/dev/null | wc -l)" \
     "face photos in .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU machine (BENCHMARKS.md, GPU check)"
