# Sourced by the GPU scripts (bench/gpu_check.sh, bench/gpu_organisms.sh) on a machine with torch and no network:
# installs the carried wheels (bench/gpu_wheels.sh made them) into a private folder and sets the offline environment.
# Sets $out (the folder whose files come back: $OUT, or ./<name>_out) and $py.
out="${OUT:-$PWD/${1:-gpu}_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"  # a dry run here: PYTHON=.venv/bin/python bash bench/<script>.sh --dry-run
wheels="${GPU_WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  # Once per machine and set of wheels (bench/gpu_session.sh sources this twice in one call).
  stamp="$(ls "$wheels" | md5sum | cut -c1-12)"
  if [ ! -f "/tmp/site/.wheels-$stamp" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
    touch "/tmp/site/.wheels-$stamp"
  fi
  export PYTHONPATH=/tmp/site
else
  echo "[gpu_env] no wheels in $wheels/: $py's own packages (bash bench/gpu_wheels.sh makes them for the GPU image)"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
