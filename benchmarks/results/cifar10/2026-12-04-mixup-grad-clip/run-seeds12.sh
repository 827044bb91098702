#!/bin/bash
set -e
cd /work/main
PY=/work/main/.venv/bin/python
D="data.root=/work/data/cifar10 data.val_dir=test run.out_dir=/work/exp/runs"
for s in 1 2; do
  T=/work/exp/runs/teacher-s$s/best.pt
  [ -f /work/exp/runs/teacher-s$s/summary.json ] || $PY -m fastkd train --config configs/cifar10/resnet18.yaml --no-progress $D run.name=teacher-s$s run.seed=$s
  date
done
for s in 1 2; do
  T=/work/exp/runs/teacher-s$s/best.pt
  $PY -m fastkd distill --config configs/cifar10/kd_resnet18_to_shufflenet_v2_x0_5.yaml --no-progress $D run.name=kd-mixup-clip2-s$s run.seed=$s distill.teacher.checkpoint=$T data.mixup_alpha=1.0 optim.grad_clip_norm=2.0
  date
done
