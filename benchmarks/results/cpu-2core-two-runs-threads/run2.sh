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
  for policy in default spin10k spin1k threads1; do
    case $policy in
      default) E=(FASTKD_X=1);; spin10k) E=(GOMP_SPINCOUNT=10000);; spin1k) E=(GOMP_SPINCOUNT=1000);; threads1) E=(OMP_NUM_THREADS=1);;
    esac
    one alone-$policy-$round "${E[@]}"
    echo "round $round $policy alone: epoch $(secs alone-$policy-$round) s"
    one a-$policy-$round "${E[@]}" & one b-$policy-$round "${E[@]}" & wait
    echo "round $round $policy two at once: epochs $(secs a-$policy-$round) $(secs b-$policy-$round) s"
  done
done
