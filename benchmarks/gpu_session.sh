#!/usr/bin/env bash
# Every GPU measurement the open work asks for, in one short session on a lent GPU machine that has no network.
#
#   bash benchmarks/gpu_session.sh setup   # packages, data, the first half of the GGUF; the 124M MFU benchmark
#   bash benchmarks/gpu_session.sh run     # the second half; the full SmolLM2 tables (140 windows, 128 x 2048
#                                          # calibration), nanoGPT's GPU reference run, LM coding if time is left
#
# What travels (git-ignored, named in the device tool's `carry`): `.whl/` (wheels of the packages the machine's
# image lacks: constriction, zstandard, ml_collections, gguf, and flax / optax / orbax-checkpoint at this checkout's
# versions, installed only where the image's are older), `.gpu/data/` (wiki.test.raw, wiki.valid.tokens, Tiny
# Shakespeare from ../shared/data), `.gpu/a/` and `.gpu/b/` (the SmolLM2 GGUF split in two: one call carries 64 MiB
# at most). The machine keeps /tmp between back-to-back calls. Results come back as $OUT/results.tgz (the files
# written under benchmarks/results and experiments/results), $OUT/summaries.tgz (each table row's summary.json) and
# $OUT/log.txt. On a machine with network and the model pulled, the same commands run without the setup step:
#   python benchmarks/sharded_step.py --shape 124m --dtype bfloat16 --devices 1
#   python benchmarks/shakespeare_char.py gpu
#   python experiments/llm_tables.py --windows 0 --calib 128 --out experiments/results/llm_tables_gpu
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled ZIPLM_CACHE=/tmp/ziplm-cache PYTHONPATH=/tmp/site JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
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
    BUDGET=${BUDGET:-540}
    # nanoGPT's GPU reference run beside the tables (its wall time is then an upper bound: the GPU is shared)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 timeout $((BUDGET - 30)) $PY benchmarks/shakespeare_char.py gpu \
        > /tmp/nanogpt.log 2>&1 &
    lanes=("dense,rtn4_g128,gptq4_g128,magnitude50" "rtn4_channel,gptq4_channel,wanda50,sparsegpt50"
        "rtn3_g128,gptq3_g128,magnitude24,wanda24" "sparsegpt24,codebook4,q4_1_requant,sparsegpt50_gptq4,mixed_1pct")
    for i in "${!lanes[@]}"; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 timeout $((BUDGET - 90)) $PY experiments/llm_tables.py --rows "${lanes[$i]}" \
            --windows 0 --calib 128 --workdir /tmp/llm --out /tmp/lane$i > /tmp/lane$i.log 2>&1 &
    done
    wait
    for f in /tmp/lane*.log /tmp/nanogpt.log; do say "$f"; grep -v -i "warn" "$f" | tail -15 >> "$LOG"; done
    done_rows=$(cd /tmp/llm && ls -d llm-*/summary.json 2>/dev/null | sed 's/^llm-//; s/\/summary.json$//' | paste -sd,)
    say "finished rows: $done_rows"
    [ -n "$done_rows" ] && $PY experiments/llm_tables.py --rows "$done_rows" --windows 0 --calib 128 --workdir /tmp/llm \
        --out experiments/results/llm_tables_gpu 2>&1 | grep -v -i warn | tail -25 >> "$LOG"
    left=$((BUDGET - ($(date +%s) - T0)))
    if [ $left -gt 120 ]; then
        say "LM coding, all of WikiText-2 test, dense model ($left s left)"
        timeout $((left - 20)) $PY experiments/llm_coding.py --bytes 0 --rows dense --batch-size 256 --windows 0 \
            --calib 128 --workdir /tmp/llm --out experiments/results/llm_coding_gpu.json 2>&1 | grep -v -i warn | tail -12 >> "$LOG"
    fi
    collect
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh setup|run" >&2
    exit 2
    ;;
esac
