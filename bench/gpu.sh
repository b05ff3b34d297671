#!/usr/bin/env bash
# The GPU figures the README asks for, on a lent GPU machine: a bare one that reaches no package
# registry, with its own python3 and torch (CUDA build). Three parts, each a call well inside
# the device tool's 10 minutes; their outputs go to $OUT:
#
#   bash bench/gpu.sh tests   # the tests marked for a GPU (DEVICES in tests/conftest.py), on CUDA
#   bash bench/gpu.sh train   # the Multi30k recipe trained on the GPU, then bench/decode.py on that model
#   bash bench/gpu.sh bench   # bench/train.py --reference at the recipe's size and at Transformer-base
#
# Prepare once, here (what the machine lacks travels in two ignored folders, named in `carry`):
#   printf '/.whl/\n/.data/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .data/bench-peers && cp -r ../shared/data/multi30k .data/ && cp ../shared/bench-peers/torch_reference.py .data/bench-peers/
set -euo pipefail
part=${1:?usage: bash bench/gpu.sh tests|train|bench}
case "$part" in tests|train|bench) ;; *) echo "unknown part '$part': expected tests, train or bench" >&2; exit 2 ;; esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"

case "$part" in
tests)
    python3 -m pytest -q -k "cuda or gpu" -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.log"
    ;;
train)
    run=/tmp/multi30k_de_en
    rm -rf $run  # a machine still warm from an earlier call keeps its /tmp
    python3 -m translator train recipes/multi30k_de_en.yaml --set data.path=.data/multi30k --set out_dir=$run \
        --set train.device=cuda --quiet 2>&1 | tee "$OUT/train.log"
    cp $run/metrics.jsonl "$OUT/"
    python3 bench/decode.py --model $run --device cuda --test-set-only --data .data/multi30k | tee "$OUT/bench_decode.md"
    ;;
bench)
    for size in recipe base; do
        python3 bench/train.py --device cuda --reference --size $size --peers .data/bench-peers --data .data/multi30k \
            | tee "$OUT/bench_train_$size.md"
    done
    ;;
esac
