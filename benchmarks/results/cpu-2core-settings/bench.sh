#!/bin/bash
cd /work/main && . .venv/bin/activate
for c in shufflenet_v2_x0_5 resnet18; do
  echo "== $c"; date
  python -m fastkd bench --config configs/cifar10/$c.yaml data.root=/work/data/cifar10 --what settings \
    --backends dali-cpu,synthetic --out /tmp/thr/bench/settings.jsonl 2>&1 | grep -v "^\[bench\]"
done
date
