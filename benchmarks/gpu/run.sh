#!/usr/bin/env bash
# The prepared GPU run: GPU tests, smoke runs of train/distill on CUDA, then throughput figures.
#
#   benchmarks/gpu/run.sh OUT_DIR [PART ...]     PARTS: env tests smoke loader kd extra (default: all)
#
# REHEARSE=1 runs the same commands on the CPU with small data and sizes (to check the script
# and every override it passes before spending GPU time; its figures mean nothing).
# Run from the repository root on a machine with a CUDA GPU and NVIDIA DALI importable (staged
# into /tmp/site as ../shared/gpu/README.md describes, or installed). Each part writes its log
# under OUT_DIR as it goes (a run cut off still leaves what it did); bench rows go to
# OUT_DIR/bench.jsonl. Data, runs and caches go to WORK (default /tmp/fastkd-gpu, with REHEARSE=1 /tmp/fastkd-gpu-rehearsal), kept between
# calls on the same machine. Ordered to fail fast: tests, then short runs, then benchmarks.
set -uo pipefail
out=${1:?usage: benchmarks/gpu/run.sh OUT_DIR [env tests smoke loader kd extra]}
shift
parts=${*:-env tests smoke loader kd extra}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=${PYTHONPATH:-$PWD}
# Data, runs and caches stay out of OUT_DIR (only logs and result rows belong there).
work=${WORK:-/tmp/fastkd-gpu$([ "${REHEARSE:-0}" = 1 ] && echo -rehearsal)}  # a rehearsal's small data stays apart
mkdir -p "$work"
export FASTKD_CACHE_DIR=$work/cache PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
failed=0

per_class=800
small=()
gpu_decode=data.dali.device=gpu
synthetic=(data.backend=synthetic data.synthetic.train_samples=4096 data.synthetic.val_samples=512)
if [ "${REHEARSE:-0}" = 1 ]; then
  per_class=6
  small=(runtime.device=cpu data.image_size=64 data.val_resize=73 data.batch_size=8)
  gpu_decode=data.dali.device=cpu  # DALI's GPU decoder needs a GPU: the rehearsal decodes on the CPU
  synthetic=(data.backend=synthetic data.synthetic.train_samples=64 data.synthetic.val_samples=16)
elif ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "benchmarks/gpu/run.sh: needs a CUDA GPU (torch.cuda.is_available() is False here; REHEARSE=1 to" \
       "rehearse on the CPU)" >&2
  exit 2
fi

# step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, keep going on failure.
step() {
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  echo "== $name: $*" >> "$out/steps.log"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - started ))s" | tee -a "$out/steps.log"
  if [ $rc -ne 0 ]; then failed=1; tail -n 25 "$out/$name.log"; fi
}
fastkd=("$py" -m fastkd)
want() { [[ " $parts " == *" $1 "* ]]; }

data=$work/data
bench=(--out "$out/bench.jsonl" data.root="$data" data.generate_demo=false "${small[@]}")
runs=(run.out_dir="$work/runs" run.tensorboard=false)

if want env; then
  { nvidia-smi; "$py" - <<'EOF'
import json, torch, torchvision
from fastkd.env import collect_env
print(json.dumps(collect_env(torch.device("cuda")), indent=2))
try:
    import nvidia.dali as dali
    print("nvidia.dali", dali.__version__, dali.__file__)
except ImportError as exc:
    print("nvidia.dali: NOT IMPORTABLE:", exc)
EOF
  "${fastkd[@]}" --version
  } > "$out/env.log" 2>&1
  grep -E "Driver Version|\"device\"|\"torch\"|\"dali\"|\"cuda\"" "$out/env.log"
fi

if want tests; then
  step pytest-gpu 240 "$py" -m pytest -q -m gpu -p no:cacheprovider tests
fi

if want smoke || want loader || want kd || want extra; then
  # ImageNet-sized JPEGs (300-500 px sides): 8,000 training and 300 validation images.
  # (a folder without the finished marker is a generation cut off: start it again)
  [ -f "$data/fastkd-demo.json" ] || { rm -rf "$data"; step data 120 "${fastkd[@]}" data synth "$data" --train-per-class "$per_class" \
    --val-per-class 30; }
fi

if want smoke; then
  # A rerun on the same machine starts the smoke runs afresh (run folders are never overwritten,
  # and the cached smoke must replay the teacher this run trains).
  rm -rf "$work/runs" "$work/teacher-cache"
  smoke=(--no-progress "${runs[@]}" data.root="$data" data.generate_demo=false optim.epochs=1 runtime.sync_debug=true)
  step smoke-train-synthetic 120 "${fastkd[@]}" train --config configs/bench/gpu_224.yaml "${smoke[@]}" run.name=s1 distill=null \
    "${synthetic[@]}" "${small[@]}"
  # s2 is the later smokes' teacher: a gentle lr keeps its logits within an fp16 cache's range
  # (at 0.1 it diverges on the small data, and the cache recording refuses it).
  step smoke-train-dali-gpu-fp16 150 "${fastkd[@]}" train --config configs/bench/gpu_224.yaml "${smoke[@]}" run.name=s2 distill=null \
    model.arch=resnet18 runtime.precision=fp16 "$gpu_decode" optim.lr=0.01 "${small[@]}"
  step smoke-distill-dali-gpu-bf16 150 "${fastkd[@]}" distill --config configs/bench/gpu_224.yaml "${smoke[@]}" \
    run.name=s3 distill.teacher.arch=resnet18 distill.teacher.checkpoint="$work/runs/s2/best.pt" \
    distill.allow_weak_teacher=true distill.teacher.precision=fp32 runtime.precision=bf16 "$gpu_decode" "${small[@]}"
  step smoke-train-compiled 240 "${fastkd[@]}" train --config configs/bench/gpu_r50_r18_224.yaml "${smoke[@]}" \
    run.name=s5 distill=null "${synthetic[@]}" runtime.compile=true "${small[@]}"
  cache=(distill.teacher.arch=resnet18 distill.teacher.checkpoint="$work/runs/s2/best.pt" distill.allow_weak_teacher=true
         distill.teacher_cache="$work/teacher-cache" "$gpu_decode")
  step smoke-teacher-cache-record 150 "${fastkd[@]}" teacher-cache --config configs/bench/gpu_224.yaml --epochs 1 \
    --no-progress "${runs[@]}" data.root="$data" data.generate_demo=false optim.epochs=1 "${cache[@]}" "${small[@]}"
  step smoke-distill-cached 150 "${fastkd[@]}" distill --config configs/bench/gpu_224.yaml "${smoke[@]}" \
    run.name=s6 "${cache[@]}" "${small[@]}"
  # The teacher normalized its own way: its inputs remapped on the device, on fp16 batches.
  step smoke-distill-dali-hybrid 150 "${fastkd[@]}" distill --config configs/bench/gpu_224.yaml "${smoke[@]}" \
    run.name=s4 distill.teacher.arch=resnet18 distill.teacher.checkpoint="$work/runs/s2/best.pt" \
    distill.allow_weak_teacher=true data.dali.device=cpu "distill.teacher.mean=[0.5,0.5,0.5]" \
    "distill.teacher.std=[0.5,0.5,0.5]" "${small[@]}"
  # A size schedule (two epochs: 160 then 224 px), the teacher's own 224 px view of each crop,
  # validation at 256 px: two resizes per crop on the GPU, and a new size with no new pipeline.
  res=(data.size_schedule.start_image_size=160 data.image_size=224 distill.teacher.image_size=224 data.val_image_size=256)
  [ "${REHEARSE:-0}" = 1 ] && res=(data.size_schedule.start_image_size=32 data.image_size=64 distill.teacher.image_size=64
                                   data.val_image_size=80)
  step smoke-distill-resolution 200 "${fastkd[@]}" distill --config configs/bench/gpu_224.yaml "${smoke[@]}" \
    run.name=s7 optim.epochs=2 distill.teacher.arch=resnet18 distill.teacher.checkpoint="$work/runs/s2/best.pt" \
    distill.allow_weak_teacher=true "$gpu_decode" "${small[@]}" "${res[@]}" data.size_schedule.ramp_epochs=[0,1] \
    data.size_schedule.image_size_step=32 data.val_resize=null
  # mixup and CutMix in the batch stage, on fp16 GPU batches and the teacher's own 224 px view,
  # under sync_debug (a pageable copy of the stage's table would be a host sync).
  mixed=(data.mix.mixup_alpha=0.8 data.mix.cutmix_alpha=1.0 distill.teacher.image_size=224)
  [ "${REHEARSE:-0}" = 1 ] && mixed=(data.mix.mixup_alpha=0.8 data.mix.cutmix_alpha=1.0 distill.teacher.image_size=64)
  step smoke-distill-mixed 150 "${fastkd[@]}" distill --config configs/bench/gpu_224.yaml "${smoke[@]}" \
    run.name=s8 distill.teacher.arch=resnet18 distill.teacher.checkpoint="$work/runs/s2/best.pt" \
    distill.allow_weak_teacher=true runtime.precision=fp16 "$gpu_decode" "${small[@]}" "${mixed[@]}"
fi

if want loader; then
  step bench-loader 200 "${fastkd[@]}" bench --config configs/bench/gpu_224.yaml --what loader \
    --backends dali-gpu,dali-cpu,torchvision,synthetic --steps 30 --warmup 10 --repeats 3 "${bench[@]}"
fi

if want kd; then
  window=(--steps 20 --warmup 8 --repeats 3)
  step bench-r50-r18 300 "${fastkd[@]}" bench --config configs/bench/gpu_r50_r18_224.yaml --what train,distill,distill-cached \
    --backends synthetic,dali-gpu,torchvision "${window[@]}" "${bench[@]}"
  step bench-shufflenet 300 "${fastkd[@]}" bench --config configs/bench/gpu_224.yaml --what train,distill \
    --backends synthetic,dali-gpu,torchvision "${window[@]}" "${bench[@]}"
fi

if want extra; then
  window=(--steps 20 --warmup 8 --repeats 3)
  stage_device=cuda
  [ "${REHEARSE:-0}" = 1 ] && stage_device=cpu
  step bench-batch-stage 120 "$py" benchmarks/batch_stage.py --device "$stage_device" --out "$out/batch_stage.jsonl"
  step bench-shufflenet-nchw 200 "${fastkd[@]}" bench --config configs/bench/gpu_224.yaml --what train,distill \
    --backends synthetic "${window[@]}" "${bench[@]}" runtime.channels_last=false
  step bench-r50-r18-hybrid 200 "${fastkd[@]}" bench --config configs/bench/gpu_r50_r18_224.yaml --what distill \
    --backends dali-cpu "${window[@]}" "${bench[@]}"
  step bench-r50-r18-compile 300 "${fastkd[@]}" bench --config configs/bench/gpu_r50_r18_224.yaml --what train,distill \
    --backends synthetic "${window[@]}" "${bench[@]}" runtime.compile=true
fi

grep -h -E "is bounded by|skipped" "$out"/bench-*.log 2>/dev/null | sort -u > "$out/bottlenecks.txt" || true
echo "logs in $out (steps.log lists every step and its exit code)"
exit $failed
