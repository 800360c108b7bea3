#!/usr/bin/env bash
# One prepared GPU benchmark run, under 10 minutes in all (issue 13 item 7):
#   train   GPT-2 124M training tokens/s and MFU, bf16, compiled: ours vs a minimal nanoGPT loop
#   mmlu    MMLU 0/5-shot questions/s: ours vs lm-eval's hf backend, prediction agreement
#   decode  greedy decode tokens/s: ours vs transformers generate, tokens equal?
#   dp      data-parallel eval: torchrun over the GPUs vs one process, records identical?
# Each arm runs in its own process under its own timeout (a hang or a crash costs that arm only),
# writes one JSON part; the parts become one results file and one table at the end.
#
#   bench/gpu.sh [--device auto|cuda|cpu] [--smoke] [--out FILE] [--arms train,mmlu,decode,dp]
#                [--data DIR] [--models DIR]   (and the driver's --batch/--context/--steps/--no-compile)
#   bench/gpu.sh --device cpu --smoke          # the dry run: every code path, tiny sizes, on the CPU
#   bench/gpu.sh --prepare                     # here, with the network: what a device run carries
#
# Python: $PYTHON, else .venv/bin/python, else python3 (the device machine's own, which holds its
# torch). Wheels in .whl/ (bench/README.md lists them) are installed into /tmp/site first.
# Data and models: --data/--models, else $HARNESS_DATA/$HARNESS_MODELS, else shared/{data,models}
# in the tree, else ../shared/{data,models}. An arm whose files or packages are missing says so.
set -u
cd "$(dirname "$0")/.."
start=$SECONDS

device=auto prepare="" smoke="" out="" arms="train,mmlu,decode,dp" data="" models="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --smoke) smoke=--smoke; shift ;;
    --out) out=$2; shift 2 ;;
    --arms) arms=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --batch|--context|--steps) extra+=("$1" "$2"); shift 2 ;;
    --no-compile) extra+=("$1"); shift ;;
    --prepare) prepare=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

py=${PYTHON:-}
[ -z "$py" ] && { [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3; }
pick() {  # first existing folder among the arguments
  for d in "$@"; do [ -n "$d" ] && [ -d "$d" ] && { echo "$d"; return; }; done; echo ""
}
arg_data=$data arg_models=$models
data=$(pick "$data" "${HARNESS_DATA:-}" shared/data ../shared/data)
models=$(pick "$models" "${HARNESS_MODELS:-}" shared/models ../shared/models)
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -n "$prepare" ]; then
  # For a device machine (bench/README.md): the Python packages its image lacks as wheels in .whl/,
  # the MMLU CSVs of the full run's subjects in shared/data/ (shared/ travels with the tree), and the
  # 94 MiB GGUF, over one transfer's 64 MiB, in two halves: .gguf1/ for a first call, .gguf2/ for
  # the second, made while the machine is still warm. All four folders are git-ignored here.
  set -e
  src_data=$(pick "$arg_data" "${HARNESS_DATA:-}" ../shared/data)
  src_models=$(pick "$arg_models" "${HARNESS_MODELS:-}" ../shared/models)
  [ -f "$src_models/$gguf" ] && [ -d "$src_data/mmlu/test" ] || { echo "--prepare needs --data/--models with mmlu/ and $gguf" >&2; exit 1; }
  exclude=$(git rev-parse --git-path info/exclude)
  for d in /.whl/ /.gguf1/ /.gguf2/ /shared/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"; done
  mkdir -p .whl shared/data/mmlu/test shared/data/mmlu/dev shared/data/mmlu/val .gguf1 .gguf2
  for s in $("$py" -c 'import sys; sys.path.insert(0, "bench"); from gpu_bench import SUBJECTS; print(*SUBJECTS[False])'); do
    for split in test dev; do cp "$src_data/mmlu/$split/${s}_$split.csv" shared/data/mmlu/$split/; done
  done
  plat="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  "$py" -m pip download -q --no-deps --only-binary=:all: $plat -d .whl \
    lm_eval==0.4.13 gguf==0.19.0 omegaconf==2.3.1 hydra-core==1.3.8 dill==0.4.1 more_itertools==11.2.1
  "$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 sqlitedict==2.1.0 word2number==1.1  # sdists only
  rm -f .gguf1/* .gguf2/*
  split -n 2 -a 2 "$src_models/$gguf" ".gguf1/$gguf.part-" && mv ".gguf1/$gguf.part-ab" .gguf2/
  du -sh .whl shared .gguf1 .gguf2
  exit 0
fi
# Wheels only where this Python lacks the packages (the device machine's image); never shadow a venv's.
if compgen -G ".whl/*.whl" >/dev/null && ! "$py" -c 'import lm_eval, omegaconf, hydra, gguf' 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "bench/gpu.sh: installing .whl/ failed; arms that need them will say so"
fi
# A GGUF too large for one transfer may come as pieces (--prepare): join them once into /tmp.
parts=$(for f in ${models:+$models/}$gguf.part-* .gguf*/$gguf.part-*; do [ -f "$f" ] && echo "${f##*/} $f"; done \
  | sort | cut -d' ' -f2- | tr '\n' ' ')
if [ -n "$parts" ] && [ ! -f "${models:-/nonexistent}/$gguf" ]; then
  mkdir -p /tmp/gpu-bench-models && cat $parts > /tmp/gpu-bench-models/$gguf && models=/tmp/gpu-bench-models
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
[ -n "$smoke" ] && mode=smoke || mode=full
[ -z "$out" ] && { [ -n "$smoke" ] && out=bench/results/gpu_smoke_$device.json || out=bench/results/gpu.json; }
parts_dir=$(mktemp -d /tmp/gpu-bench.XXXXXX)
"$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, cuda {torch.cuda.is_available()} x{torch.cuda.device_count()}")' \
  || { echo "bench/gpu.sh: $py cannot import torch"; exit 1; }
echo "data: ${data:-none}   models: ${models:-none}   mode: $mode   out: $out"

# Per-arm limits (seconds) on a GPU; they add up to 540 s, leaving a minute for start-up and the
# collect step inside the issue's 10 minutes. A CPU run gets three times as long: compiling even the
# tiny smoke model takes minutes on two shared cores, and no ten-minute window applies there.
declare -A limit=([train]=210 [mmlu]=150 [decode]=70 [dp]=110)
if [ "$device" = cpu ]; then for a in "${!limit[@]}"; do limit[$a]=$((3 * limit[$a])); done; fi
IFS=, read -ra todo <<<"$arms"
for arm in "${todo[@]}"; do
  [ -z "${limit[$arm]:-}" ] && { echo "bench/gpu.sh: unknown arm $arm" >&2; exit 2; }
  echo "--- $arm (limit ${limit[$arm]}s) ---"
  timeout -k 10 "${limit[$arm]}" "$py" bench/gpu_bench.py --arm "$arm" --part "$parts_dir/$arm.json" \
    --device "$device" $smoke --data "$data" --models "$models" "${extra[@]}"
  rc=$?
  if [ ! -s "$parts_dir/$arm.json" ]; then
    why="exited $rc"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && why="timed out after ${limit[$arm]}s"
    printf '{"arm": "%s", "status": "failed: %s"}\n' "$arm" "$why" > "$parts_dir/$arm.json"
  fi
done
"$py" bench/gpu_bench.py --collect "$parts_dir" --out "$out" --arms "$arms" --device "$device" $smoke
echo "total $((SECONDS - start))s"
rm -rf "$parts_dir"
