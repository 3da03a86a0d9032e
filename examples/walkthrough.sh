#!/usr/bin/env bash
# From nothing to a plotted, GIS-viewable flight on generated data, on a CPU: every step of sarloc with the
# folder names the commands use. Usage (in the set-up venv): bash examples/walkthrough.sh [WORK_FOLDER]
# Sizes can be set through the SARLOC_WALK_* variables below; tests/test_walkthrough.py runs it at tiny sizes.
set -euo pipefail
W="${1:-runs/walkthrough}"
PX="${SARLOC_WALK_PX:-512}"            # generated scene side, pixels (10 m each)
PRESET="${SARLOC_WALK_PRESET:-quick}"  # training preset
STEPS="${SARLOC_WALK_STEPS:-400}"      # encoder training steps
QUERIES="${SARLOC_WALK_QUERIES:-300}"  # queries per scene for the refiner and verifier, and for eval
REFINER_STEPS="${SARLOC_WALK_REFINER_STEPS:-600}"  # graph refiner training steps
STRIPS="${SARLOC_WALK_STRIPS:-12}"     # strips of the simulated flight
STRIP_PX="${SARLOC_WALK_STRIP_PX:-160}" # strip width and rows, pixels
STRIP_ROWS="${SARLOC_WALK_STRIP_ROWS:-256}"
set -x

# 1. Data: generated co-registered SAR / optical scenes (your own: see docs/scenes.md). Four to train the encoder,
#    two to fit the refiner and verifier, one held out: the flight happens over it.
for s in 101 102 103 104; do sarloc synth --out "$W/scenes/train/s$s" --seed "$s" --width-px "$PX" --height-px "$PX"; done
for s in 201 202; do sarloc synth --out "$W/scenes/refiner/s$s" --seed "$s" --width-px "$PX" --height-px "$PX"; done
sarloc synth --out "$W/scenes/test" --seed 7 --width-px "$PX" --height-px "$PX"

# 2. Train the cross-modal encoder and measure it on the held-out scene.
sarloc train --scenes "$W/scenes/train" --out "$W/train" --preset "$PRESET" --steps "$STEPS"
sarloc eval --checkpoint "$W/train/checkpoint.pt" --scene "$W/scenes/test" --queries "$QUERIES" \
    --json "$W/train/eval.json"

# 3. The export folder: the encoders as ONNX (checked against PyTorch), then the graph refiner, the verifier and
#    the shortlister fitted on scenes the encoder did not see, written into the same folder. The daemon loads it.
sarloc export --checkpoint "$W/train/checkpoint.pt" --out "$W/export"
sarloc train-refiner --checkpoint "$W/train/checkpoint.pt" --scenes "$W/scenes/refiner" --out "$W/export" \
    --queries "$QUERIES" --steps "$REFINER_STEPS"
sarloc eval --export "$W/export" --scene "$W/scenes/test" --queries "$QUERIES"

# 4. INT8 models beside the FP32 ones (optional; a held-out --guard-scene refuses an INT8 model that loses accuracy).
sarloc calib --export "$W/export" --scenes "$W/scenes/train" --n-per-scene 16

# 5. The map pack: the held-out scene's optical image, tiled and embedded once.
sarloc map build --basemap "$W/scenes/test" --export "$W/export" --out "$W/pack"
sarloc map info "$W/pack" --footprint "$W/pack_footprint.geojson"

# 6. A simulated flight over the held-out scene: SAR strips and the truth.
sarloc simulate --scene "$W/scenes/test" --out "$W/flight" --track curve --n-strips "$STRIPS" \
    --strip-width-px "$STRIP_PX" --strip-rows "$STRIP_ROWS"

# 7. The onboard daemon on those strips (add --mavlink udpout:127.0.0.1:14550 to feed an autopilot).
sarloc run --source "dir://$W/flight" --export "$W/export" --pack "$W/pack" --out "$W/run" --no-follow

# 8. The flight scored against the truth, plotted over the optical image.
sarloc report --records "$W/run/records.jsonl" --truth "$W/flight/truth.json" --scene "$W/scenes/test" \
    --plot "$W/run/track.png" --json "$W/run/report.json" --geojson "$W/run/fixes.geojson" --csv "$W/run/fixes.csv"
