#!/usr/bin/env bash
# Builds the reference small pathology FM shipped with raypath (registry key
# `raypath-small-ref`, raypath/data/raypath_small_ref.safetensors):
# a 96-slide, 8-site generated study (seed 1000, ids prefixed `pt-`, every
# other tissue real H&E texture) -> ingest -> tile -> `raypath pretrain`
# (DINO from scratch, fixed seed) -> the teacher backbone as float16
# safetensors, copied into the package with its sha256 printed.
# The study's seed and ids are disjoint from every study the project
# validates on (demo seed 0, validation seeds 2000/2001).  Never run in CI.
#
#   bash benchmarks/reference_model.sh [WORKDIR]     (default /tmp/raypath-ref)
#
# Measured on the 2-core CPU machine: about 28 minutes (docs/VALIDATION.md).
# The shipped file came from the pretrain line below run with --workdir /tmp/ref/wd
# --run ref2 (recorded in raypath/data/raypath_small_ref.json); neither enters the weights.
set -euo pipefail
WD=${1:-/tmp/raypath-ref}
RP=${RAYPATH:-raypath}
HERE=$(cd "$(dirname "$0")/.." && pwd)
"$RP" synth --out "$WD/study" --seed 1000 --id-prefix pt- --n-cohorts 8 --slides-per-cohort 12 \
    --slide-px 3072 --texture mixed --objective 20 40 --jpeg-quality 90 75 60 85 --workers 2 --reuse
"$RP" ingest --cohort "$WD/study/cohort.csv" --workdir "$WD/wd"
"$RP" tile --workdir "$WD/wd"
"$RP" pretrain --workdir "$WD/wd" --run ref --seed 1000 --tiles-per-slide 24 --n-local-crops 4 \
    --augmentation strong --head-out-dim 1024 --epochs 25 --warmup-epochs 3 --lr 0.002 \
    --momentum-teacher 0.996 --batch-size 64 --weights-dtype float16
cp "$WD/wd/pretrain/ref/model.safetensors" "$HERE/raypath/data/raypath_small_ref.safetensors"
cp "$WD/wd/pretrain/ref/model_info.json" "$HERE/raypath/data/raypath_small_ref.json"
echo "sha256 (set REFERENCE_SHA256 in raypath/fm/registry.py):"
sha256sum "$HERE/raypath/data/raypath_small_ref.safetensors"
