#!/bin/bash
# One epoch of ShuffleNet-v2 x0.5 on the CIFAR-10 subset, DALI CPU; alone and two at once, per env
cd /work/main && . .venv/bin/activate
one() {  # name env...
  local name=$1; shift
  rm -rf /tmp/thr/runs/$name
  env "$@" python -m fastkd train --config configs/cifar10/shufflenet_v2_x0_5.yaml data.root=/work/data/cifar10-sub \
    optim.epochs=1 optim.warmup_epochs=0 run.out_dir=/tmp/thr/runs run.name=$name run.tensorboard=false --no-progress > /tmp/thr/$name.log 2>&1
}
secs() { python -c "import json,sys; print(json.loads(open('/tmp/thr/runs/$1/metrics.jsonl').readline())['epoch_seconds'])"; }
for round in 1 2; do
  for policy in default PASSIVE; do
    E=(); [ $policy = PASSIVE ] && E=(OMP_WAIT_POLICY=PASSIVE)
    [ ${#E[@]} -eq 0 ] && E=(FASTKD_X=1)
    t0=$(date +%s.%N); one alone-$policy-$round "${E[@]}"; t1=$(date +%s.%N)
    echo "round $round $policy alone: epoch $(secs alone-$policy-$round) s, command $(echo "$t1-$t0"|bc) s"
    t0=$(date +%s.%N); one a-$policy-$round "${E[@]}" & one b-$policy-$round "${E[@]}" & wait; t1=$(date +%s.%N)
    echo "round $round $policy two at once: epochs $(secs a-$policy-$round) $(secs b-$policy-$round) s, both commands $(echo "$t1-$t0"|bc) s"
  done
done
