#!/usr/bin/env bash
# The GPU measurements of the open work, in two back-to-back calls of the device tool (a lent GPU machine without
# network, /tmp kept while it stays warm, 64 MiB carried per call):
#
#   bash benchmarks/gpu_session.sh setup   # carry .gpu/a .gpu/data .whl: packages, data, half of the GGUF, and the
#                                          # GPT-2 124M train-step MFU, also with cuDNN's fused attention
#                                          # (benchmarks/results/sharded_step_124m_*.json)
#   BUDGET=480 bash benchmarks/gpu_session.sh run   # carry .gpu/b, timeout_s >= BUDGET + 60: the other half; the
#        # SmolLM2 table rows in $ROWS at full size (140 windows, 128 x 2048 calibration) merged into
#        # experiments/results/llm_tables_gpu.json, nanoGPT's GPU reference run, LM coding of all of WikiText-2 test
#
# Prepare here (.whl/ and .gpu/ are git-ignored):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl constriction zstandard ml_collections gguf flax optax orbax-checkpoint
#       (this checkout's versions; the image's own are used where they are not older)
#   split -b 47185920 -d ~/.cache/ziplm/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/ggufpart.
#       (.gpu/a/ggufpart.00 = the first piece, .gpu/b/ggufpart.01 = the rest, concatenated)
#   .gpu/data/{wikitext-2/raw/wiki.test.raw, wikitext-2/tokens/wiki.valid.tokens, tinyshakespeare/input.txt}
#       (copies of ../shared/data)
# Results come back as $OUT/results.tgz (files written under benchmarks/results and experiments/results),
# $OUT/summaries.tgz (each row's summary.json) and $OUT/log.txt. With network and the model pulled, the plain
# commands are: python benchmarks/sharded_step.py --shape 124m --dtype bfloat16 --devices 1;
# python benchmarks/shakespeare_char.py gpu; python experiments/llm_tables.py --windows 0 --calib 128
# --out experiments/results/llm_tables_gpu; python experiments/llm_coding.py --bytes 0 --out ..._gpu.json.
#
# 2026-12-04 (first session): setup and MFU 74 s after a cold start; 15 of the 17 rows ran in four processes
# sharing the GPU (the first row of each ~320 s, mostly compiling the last-word shapes; later rows and processes
# ~100 s with the compile cache). Left for the next session: the ROWS default below, nanoGPT, LM coding.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled ZIPLM_CACHE=/tmp/ziplm-cache PYTHONPATH=/tmp/site:$PWD JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
PY=${PY:-python3}
LOG=$OUT/log.txt
GGUF=$ZIPLM_CACHE/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }
touch /tmp/gpu-session-start
collect() {  # whatever finished comes back: result files written since this phase began, the rows' summaries
    find benchmarks/results experiments/results -type f -newer /tmp/gpu-session-start | tar czf "$OUT/results.tgz" -T -
    [ -d /tmp/llm ] && (cd /tmp/llm && tar czf "$OUT/summaries.tgz" $(ls -d llm-*/summary.json 2>/dev/null) 2>/dev/null)
    say "collected: $(tar tzf "$OUT/results.tgz" 2>/dev/null | tr '\n' ' ')"
}

case "${1:-}" in
setup)
    mkdir -p /tmp/site /tmp/gguf /tmp/data
    cp .gpu/a/* /tmp/gguf/ && cp -r .gpu/data/* /tmp/data/
    mkdir -p ../shared && ln -sfn /tmp/data ../shared/data
    # packages the image lacks, and ours where the image's are older
    need=$($PY - <<'EOF'
import importlib.metadata as md, glob, re
from packaging.version import Version
for w in sorted(glob.glob(".whl/*.whl")):
    name, ver = re.match(r".whl/([^-]+)-([^-]+)-", w).groups()
    try:
        have = md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(ver):
        print(w)
EOF
)
    say "installing: $need"
    [ -n "$need" ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $need
    $PY -c "import jax, flax, optax, orbax.checkpoint as o, gguf, constriction; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
    say "MFU: GPT-2 124M train step, bf16, 1 GPU"
    timeout 240 $PY benchmarks/sharded_step.py --shape 124m --dtype bfloat16 --devices 1 --steps 10 --rounds 1 2>&1 \
        | grep -v Warn | tail -15 | tee -a "$LOG"
    collect
    ;;
run)
    mkdir -p "$(dirname "$GGUF")" /tmp/llm ../shared && ln -sfn /tmp/data ../shared/data
    cat /tmp/gguf/ggufpart.00 .gpu/b/ggufpart.01 > "$GGUF"
    got=$(sha256sum "$GGUF" | cut -d' ' -f1)
    [ "$got" = "$SHA" ] || { say "GGUF sha256 $got, expected $SHA: stop"; exit 1; }
    say "GGUF assembled and verified"
    # BUDGET: seconds of work, every job inside it; give the device call a timeout_s of at least BUDGET + 60.
    BUDGET=${BUDGET:-480}
    ROWS=${ROWS:-sparsegpt50_gptq4,mixed_1pct}  # the rows experiments/results/llm_tables_gpu.json lacks
    trap 'collect; exit 124' TERM
    # All jobs share the GPU (wall times are upper bounds). The compile cache makes a later process's compiles
    # cheap: the first rows of the first session's processes took ~320 s (mostly compiling the last-word shapes),
    # later ones ~100 s.
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout $((BUDGET - 20)) $PY benchmarks/shakespeare_char.py gpu \
        > /tmp/nanogpt.log 2>&1 &
    for row in ${ROWS//,/ }; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout $((BUDGET - 60)) $PY experiments/llm_tables.py --rows "$row" \
            --windows 0 --calib 128 --workdir /tmp/llm --out "/tmp/row-$row" > "/tmp/row-$row.log" 2>&1 &
    done
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout $((BUDGET - 40)) $PY experiments/llm_coding.py --bytes 0 --rows dense \
        --batch-size 256 --windows 0 --calib 128 --workdir /tmp/llm-coding \
        --out experiments/results/llm_coding_gpu.json > /tmp/coding.log 2>&1 &
    wait
    for f in /tmp/row-*.log /tmp/nanogpt.log /tmp/coding.log; do say "$f"; grep -v -i "warn" "$f" | tail -15 >> "$LOG"; done
    done_rows=$(cd /tmp/llm && ls -d llm-*/summary.json 2>/dev/null | sed 's/^llm-//; s/\/summary.json$//' | paste -sd,)
    say "finished rows: $done_rows"
    # merged with the committed GPU table's rows (same windows and calibration)
    [ -n "$done_rows" ] && $PY experiments/llm_tables.py --rows "$done_rows" --windows 0 --calib 128 --workdir /tmp/llm \
        --out experiments/results/llm_tables_gpu 2>&1 | grep -v -i warn | tail -25 >> "$LOG"
    collect
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh setup|run" >&2
    exit 2
    ;;
esac
