#!/bin/bash
# One epoch each on the CIFAR-10 subset: runtime.threads=2 (torch's default here) against 1; alone, interleaved, and two at once
. /work/main/.venv/bin/activate; cd /tmp/thr/snap
C=configs/cifar10
T=/work/exp36/runs/teacher/best.pt
one() {  # name config extra-overrides...
  local name=$1 cfg=$2; shift 2
  rm -rf /tmp/thr/runs/$name
  python -m fastkd $CMD --config $cfg data.root=/work/data/cifar10-sub \
    optim.epochs=1 optim.warmup_epochs=0 run.out_dir=/tmp/thr/runs run.name=$name run.tensorboard=false --no-progress "$@" > /tmp/thr/$name.log 2>&1
}
secs() { python -c "import json,sys; r=json.loads(open('/tmp/thr/runs/$1/metrics.jsonl').readline()); print(r['epoch_seconds'])"; }
thr() { python -c "import json; print(json.load(open('/tmp/thr/runs/$1/env.json'))['torch_threads'])"; }
for round in 1 2; do
  for n in 2 1; do
    CMD=train one r18-t$n-$round $C/resnet18.yaml runtime.threads=$n
    echo "round $round threads=$n($(thr r18-t$n-$round)) resnet18 dali alone: $(secs r18-t$n-$round) s"
    CMD=distill one kd-t$n-$round $C/kd_resnet18_to_shufflenet_v2_x0_5.yaml distill.teacher.checkpoint=$T runtime.threads=$n
    echo "round $round threads=$n($(thr kd-t$n-$round)) kd dali alone: $(secs kd-t$n-$round) s"
    CMD=train one sn-t$n-$round $C/shufflenet_v2_x0_5.yaml runtime.threads=$n
    echo "round $round threads=$n($(thr sn-t$n-$round)) shufflenet dali alone: $(secs sn-t$n-$round) s"
    if [ $round = 1 ]; then
      CMD=train one r18a-t$n $C/resnet18.yaml runtime.threads=$n & CMD=train one r18b-t$n $C/resnet18.yaml runtime.threads=$n & wait
      echo "threads=$n resnet18 dali two at once: $(secs r18a-t$n) $(secs r18b-t$n) s"
      CMD=distill one kda-t$n $C/kd_resnet18_to_shufflenet_v2_x0_5.yaml distill.teacher.checkpoint=$T runtime.threads=$n & CMD=train one snb-t$n $C/shufflenet_v2_x0_5.yaml runtime.threads=$n & wait
      echo "threads=$n kd beside shufflenet, at once: kd $(secs kda-t$n) shufflenet $(secs snb-t$n) s"
    fi
  done
done
