#!/usr/bin/env bash
# The SmolLM2 studies on a lent single-GPU machine whose calls carry at most 64 MiB and
# which reaches nothing outside itself (see launch/device_study.py for what runs there).
#
#   launch/device_study.sh prepare          # here: split the GGUF, fetch the missing wheels
#   launch/device_study.sh part1            # there, call 1: keep the first half in /tmp,
#                                           #   smoke-test the machine's packages
#   launch/device_study.sh run [BUDGET_S]   # there, call 2 (within ~30 s): join, install, study
#                                           #   (DATASETS=cds,industrial SEEDS=0,1,2 by default;
#                                           #   RECIPE=bigrec for BIGRec grounding instead of D3;
#                                           #   EXTRA="--config.K=V ..." for more overrides,
#                                           #   e.g. K factors or an M-latent ensemble, with
#                                           #   WHERE=h200_k3 naming the result files)
#
# The GGUF file (94 MB) goes over two calls: `part1` carries .device/part1 and copies it to
# /tmp; `run` carries .device/part2, the two data folders (20 MB; ../shared does not
# travel) and the wheels (.whl: ml-collections and gguf, which the machine's image lacks),
# joins the halves, checks the SHA-256, and runs launch/device_study.py with $OUT as the
# output folder. Both folders are ignored by git (.git/info/exclude); the calls carry
# .device/part1, then .device/part2, .device/part2.sha256, .device/data and .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
HALF=$((56 * 1024 * 1024))   # each call: its part + the working tree (+ data, wheels) <= 64 MiB

usage() {
  echo "usage: launch/device_study.sh prepare | part1 | run [BUDGET_S]"
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  -h|--help)
    usage; exit 0
    ;;
  -*)
    echo "launch/device_study.sh: unknown flag $1" >&2; usage >&2; exit 2
    ;;
  prepare)
    mkdir -p .device .whl
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    head -c "$HALF" "$GGUF" > .device/part1
    tail -c +$((HALF + 1)) "$GGUF" > .device/part2
    sha256sum "$GGUF" | cut -d' ' -f1 > .device/part2.sha256
    mkdir -p .device/data
    for d in CDs_and_Vinyl Industrial_and_Scientific; do
      cp -r "$(dirname "$GGUF")/../data/amazon18/$d" .device/data/
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
      -d .whl ml-collections gguf
    ls -la .device .whl
    ;;
  part1)
    mkdir -p /tmp/smol && cp .device/part1 /tmp/smol/part1 && ls -la /tmp/smol
    # A smoke test of the machine's own flax/optax/orbax with this code (a tiny SFT run
    # that writes checkpoints); if it fails and .whl_pin holds the versions the tests here
    # use, they are installed to /tmp/site_pin, the test reruns, and `run` uses them.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
      'flax', flax.__version__, 'optax', optax.__version__, 'orbax', getattr(o, '__version__', '?'), jax.devices())" || true
    smoke() { timeout 120 python3 -m latentr3_jax sft --config configs/sft_tiny.py \
      --config.workdir=/tmp/smoke_$1 > /tmp/smol/smoke_$1.log 2>&1; }
    if smoke own; then
      echo "smoke test: passed with the machine's packages"
    elif ls .whl_pin/*.whl > /dev/null 2>&1; then
      tail -5 /tmp/smol/smoke_own.log
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site_pin .whl_pin/*.whl
      if PYTHONPATH=/tmp/site_pin:$PYTHONPATH smoke pinned; then
        touch /tmp/smol/use_pin; echo "smoke test: passed with .whl_pin's packages"
      else
        tail -20 /tmp/smol/smoke_pinned.log; echo "smoke test: FAILED"
      fi
    else
      tail -20 /tmp/smol/smoke_own.log; echo "smoke test: FAILED"
    fi
    ;;
  run)
    BUDGET=${2:-520}
    DATASETS=${DATASETS:-cds,industrial}   # e.g. DATASETS=industrial SEEDS=0 for one more run
    SEEDS=${SEEDS:-0,1,2}
    RECIPE=${RECIPE:-d3}                   # RECIPE=bigrec: configs/smollm2.py's bigrec variant
    case "$RECIPE" in d3) SPEC_TAIL="" ;; bigrec) SPEC_TAIL=",bigrec" ;;
      *) echo "RECIPE must be d3 or bigrec, got $RECIPE"; exit 2 ;; esac
    EXTRA_ARGS=()
    for x in ${EXTRA:-}; do
      case "$x" in --config.*=*) EXTRA_ARGS+=("--extra=$x") ;;
        *) echo "EXTRA: each word must be --config.KEY=VALUE, got $x"; exit 2 ;; esac
    done
    test -f /tmp/smol/part1 || { echo "part1 is gone from /tmp: rerun part1, then run at once"; exit 3; }
    cat /tmp/smol/part1 .device/part2 > /tmp/smol/model.gguf
    echo "$(cat .device/part2.sha256)  /tmp/smol/model.gguf" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    if [ -f /tmp/smol/use_pin ]; then export PYTHONPATH=/tmp/site_pin:$PYTHONPATH; fi
    python3 launch/device_study.py --out "$OUT" --budget-s "$BUDGET" --model /tmp/smol/model.gguf \
      --config-spec "configs/smollm2.py:{dataset},gpu$SPEC_TAIL" --start-fraction 0.6 \
      --data-root .device/data --datasets "$DATASETS" --seeds "$SEEDS" --where "${WHERE:-h200}" \
      ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} 2>&1 | tee "$OUT/console.log" | grep -v '^sft:\|^grpo:'
    ;;
  *)
    usage >&2; exit 2
    ;;
esac
