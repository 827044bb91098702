#!/bin/bash
set -e
cd /work/main
PY=/work/main/.venv/bin/python
D="data.root=/work/data/cifar10 data.val_dir=test run.out_dir=/work/exp/runs"
T=/work/exp/runs/teacher-s0/best.pt
[ -f /work/exp/runs/teacher-s0/summary.json ] || $PY -m fastkd train --config configs/cifar10/resnet18.yaml --no-progress $D run.name=teacher-s0 run.seed=0
date
$PY -m fastkd distill --config configs/cifar10/kd_resnet18_to_shufflenet_v2_x0_5.yaml --no-progress $D run.name=kd-mixup-s0 run.seed=0 distill.teacher.checkpoint=$T data.mixup_alpha=1.0
date
$PY -m fastkd distill --config configs/cifar10/kd_resnet18_to_shufflenet_v2_x0_5.yaml --no-progress $D run.name=kd-mixup-clip2-s0 run.seed=0 distill.teacher.checkpoint=$T data.mixup_alpha=1.0 optim.grad_clip_norm=2.0
date
