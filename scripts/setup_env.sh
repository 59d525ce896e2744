#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything DenseCLIP needs.
#
# Idempotent: a stamp file records what was installed; a second run with the same inputs only
# checks the stamp. Environment variables:
#   VENV        where the environment lives (default: .venv at the repository root)
#   PYTHON      the interpreter that creates it (default: python3)
#   EXTRAS      setup.py extras to add, comma-separated (make demo-app: demo; make test-browser:
#               demo,browser-test), each recorded in its own stamp; none by default
# A Detectron2 already importable in $VENV (for example one built from source) is kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
# Detectron2 is not on the package registry under its own name. This wheel carries upstream
# detectron2 (commit a59f0563) with two trivial patches; only its detectron2/ package is used.
D2_WHEEL="sal_detectron2-0.7.2-cp310-none-any.whl"
D2_SHA256="491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
D2_REQUIREMENTS="Pillow matplotlib pycocotools termcolor yacs tabulate cloudpickle tqdm tensorboard \
fvcore>=0.1.5,<0.1.6 iopath>=0.1.7,<0.1.10 omegaconf>=2.1,<2.4 hydra-core packaging setuptools<81"

stamp_inputs() {
  cat "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/extract_detectron2.py" "$ROOT/setup.py"
}
install_extras() {
  local extra stamp want
  for extra in ${EXTRAS//,/ }; do
    stamp="$VENV/.denseclip-extra-$extra"
    want="$( (cat "$ROOT/setup.py"; echo "$extra") | sha256sum | cut -d' ' -f1)"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && continue
    echo "[setup] installing the $extra extra"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$ROOT[$extra]"
    echo "$want" > "$stamp"
  done
}
EXTRAS="${EXTRAS:-}"
STAMP="$VENV/.denseclip-setup"
WANT="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "[setup] $VENV is up to date"
  install_extras
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

echo "[setup] installing PyTorch ($TORCH_PINS)"
"${PIP[@]}" $TORCH_PINS

if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "[setup] keeping the Detectron2 already installed in $VENV"
else
  echo "[setup] installing Detectron2 from $D2_WHEEL"
  # shellcheck disable=SC2086
  "${PIP[@]}" $D2_REQUIREMENTS
  CACHE="$VENV/.cache"
  mkdir -p "$CACHE"
  if [[ ! -f "$CACHE/$D2_WHEEL" ]]; then
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --python-version 3.10 --platform manylinux2014_x86_64 -d "$CACHE" sal-detectron2==0.7.2
  fi
  echo "$D2_SHA256  $CACHE/$D2_WHEEL" | sha256sum -c --quiet -
  "$PY" "$ROOT/scripts/extract_detectron2.py" "$CACHE/$D2_WHEEL"
  "$PY" -c "import detectron2; print('[setup] detectron2', detectron2.__version__)"
fi

echo "[setup] installing the denseclip package (editable) and its requirements"
"${PIP[@]}" -e "$ROOT[dev]"

echo "$WANT" > "$STAMP"
install_extras
echo "[setup] done: $VENV"
