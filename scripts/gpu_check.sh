#!/usr/bin/env bash
# The CUDA test suite and the GPU benchmarks, on a GPU machine that has its own PyTorch (with
# torchvision) but cannot reach a package registry. Two steps:
#
#   bash scripts/gpu_check.sh download   # on a machine with a registry: this project's other
#                                        # dependencies as wheels for the GPU machine's Python,
#                                        # into $WHEELS (default .whl/ at the repository root)
#   bash scripts/gpu_check.sh run        # on the GPU machine, with $WHEELS copied there: install them
#                                        # into a venv that sees the machine's PyTorch, then run the
#                                        # CUDA tests and the benchmarks, writing everything to $OUT
#
# Environment variables:
#   WHEELS          the wheel folder (default: .whl at the repository root)
#   PY_VERSION      the GPU machine's Python, for download (default 3.12)
#   OUT             where run writes its logs and results (default: output/gpu_check)
#   PYTHON          the GPU machine's interpreter, the one with PyTorch (default: python3)
#   GPU_VENV        the venv run creates (default: /tmp/denseclip-gpu-venv)
#   BENCH_ITERS     timed runs per model in each benchmark (default 10)
#   SKIP_TESTS / SKIP_BENCH   set to 1 to leave out one part of run
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$ROOT/.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
OUT="${OUT:-$ROOT/output/gpu_check}"
PYTHON="${PYTHON:-python3}"
GPU_VENV="${GPU_VENV:-/tmp/denseclip-gpu-venv}"
BENCH_ITERS="${BENCH_ITERS:-10}"
# The Detectron2 wheel and its checksum, as scripts/setup_env.sh takes them.
eval "$(grep -E '^D2_(WHEEL|SHA256)=' "$ROOT/scripts/setup_env.sh")"

# What the GPU machine lacks (it has torch, torchvision, numpy, Pillow, OpenCV, matplotlib, PyYAML,
# tqdm, tabulate, portalocker, regex, timm, safetensors, huggingface_hub and pytest): the versions
# this project's .venv was tested with. Pure-Python packages published only as source are built here.
BINARY_WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0 \
pycocotools==2.0.11 omegaconf==2.3.1 hydra-core==1.3.8 cloudpickle==3.1.3 pytest-timeout==2.4.0"
SOURCE_ONLY="fvcore==0.1.5.post20221221 antlr4-python3-runtime==4.9.3"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
--platform manylinux2014_x86_64 --platform manylinux1_x86_64"

download() {
  mkdir -p "$WHEELS"
  local pip=(python3 -m pip --disable-pip-version-check -q)
  echo "[gpu_check] wheels for Python $PY_VERSION into $WHEELS"
  # shellcheck disable=SC2086
  "${pip[@]}" download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    $PLATFORMS -d "$WHEELS" $BINARY_WHEELS
  # shellcheck disable=SC2086
  "${pip[@]}" wheel --no-deps -w "$WHEELS" $SOURCE_ONLY
  if [[ ! -f "$WHEELS/$D2_WHEEL" ]]; then
    "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.10 --platform manylinux2014_x86_64 \
      -d "$WHEELS" sal-detectron2==0.7.2
  fi
  echo "$D2_SHA256  $WHEELS/$D2_WHEEL" | sha256sum -c --quiet -
  echo "[gpu_check] $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1); copy $WHEELS to the GPU machine"
}

install() {
  "$PYTHON" -m venv --system-site-packages "$GPU_VENV"
  local py="$GPU_VENV/bin/python"
  # $PYTHON may itself be a venv's (the machine's PyTorch lives in one), whose packages a new venv does
  # not see through --system-site-packages: list its package folders after the new venv's own.
  "$PYTHON" -c 'import sysconfig; print(*sorted({sysconfig.get_path(k) for k in ("purelib", "platlib")}), sep="\n")' \
    > "$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/machine-site-packages.pth"
  # Everything but Detectron2's wheel, offline, without dependencies (the machine has the rest).
  find "$WHEELS" -name '*.whl' ! -name "$D2_WHEEL" -print0 |
    xargs -0 "$py" -m pip install --disable-pip-version-check -q --no-index --no-deps --no-compile
  echo "$D2_SHA256  $WHEELS/$D2_WHEEL" | sha256sum -c --quiet -
  "$py" "$ROOT/scripts/extract_detectron2.py" "$WHEELS/$D2_WHEEL"
  "$py" - <<'PYEOF'
import torch, torchvision, detectron2, open_clip, fvcore, pycocotools
print(f"[gpu_check] torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: "
      f"{torch.cuda.is_available()}, {torch.cuda.device_count()} GPU(s)"
      + (f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PYEOF
}

run() {
  mkdir -p "$OUT"
  install 2>&1 | tee "$OUT/install.log"
  local py="$GPU_VENV/bin/python"
  export PYTHONPATH="$ROOT/projects/DenseCLIP${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  cd "$ROOT"
  local status=0
  if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    echo "[gpu_check] the CUDA test suite"
    "$py" -m pytest -m cuda -rA -s -p no:cacheprovider --durations=0 tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" \
      || status=1
  fi
  if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
    local retina=configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml
    local mask=configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_FPN_1x.yaml
    local common=(--device cuda --detectron2 --iterations "$BENCH_ITERS" --warmup 3)
    : > "$OUT/benchmarks.log"
    : > "$OUT/benchmarks.jsonl"
    for config in "$retina" "$mask"; do
      for amp in "" "--amp"; do
        for batch in 1 8; do
          bench "$config" --task inference --batch-size "$batch" $amp "${common[@]}" || status=1
        done
        bench "$config" --task train --batch-size 2 --input-size 800 1333 $amp "${common[@]}" || status=1
      done
    done
  fi
  echo "[gpu_check] outputs in $OUT"
  return $status
}

bench() {
  local py="$GPU_VENV/bin/python"
  echo "[gpu_check] tools/benchmark.py $*" | tee -a "$OUT/benchmarks.log"
  "$py" tools/benchmark.py "$@" --json-out "$OUT/benchmarks.jsonl" 2>>"$OUT/benchmarks.stderr" | tee -a "$OUT/benchmarks.log"
}

case "${1:-}" in
  download) download ;;
  install) install ;;
  run) run ;;
  *) echo "usage: bash scripts/gpu_check.sh download|install|run (see the top of this file)" >&2; exit 2 ;;
esac
