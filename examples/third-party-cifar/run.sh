#!/usr/bin/env bash
# Issue 18's check on a model this project did not train, through the CLI only: the Keras CIFAR-10
# CNN of the PyPI package cifar-10-model, as a Python factory and as an exported graph, on the 20
# CIFAR-10 samples foolbox ships. Run prepare.py first; results go to out/.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p out
# an RTS network for this model, trained on the 20 images themselves (a smoke test, not a useful RTS)
underfire train rts -m kerascnn.py:keras_cnn --data cifar --epochs 3 --encoder-epochs 3 --batch-size 8 --out out/kerascnn-rts.safetensors
for model in kerascnn.py:keras_cnn export:kerascnn.pt2; do
  tag=${model%%:*}; tag=${tag%.py}
  underfire evaluate -m "$model" -d cifar --json > "out/$tag-evaluate.json"
  for interpreter in grad smoothgrad gradcam mask rts; do
    underfire explain cifar/*/*.png -m "$model" --rts out/kerascnn-rts.safetensors -i "$interpreter" -o "out/$tag-maps" --json > "out/$tag-explain-$interpreter.json"
  done
  for interpreter in grad gradcam; do
    for attack in pgd adv2; do
      underfire attack --data cifar --limit 20 -m "$model" -i "$interpreter" -a "$attack" -o "out/$tag-$interpreter-$attack" --json > "out/$tag-$interpreter-$attack.json"
    done
  done
done
underfire models --describe export:kerascnn.pt2 --json > out/describe.json
# TorchScript: GRAD's ADV² is refused in one line (exit status 2), explaining works
underfire explain cifar/*/*.png -m torchscript:kerascnn.pt -i grad -o out/torchscript-maps --json > out/torchscript-explain-grad.json
set +e
underfire attack --data cifar --limit 20 -m torchscript:kerascnn.pt -i grad -a adv2 -o out/torchscript-grad-adv2 --json 2> out/torchscript-grad-adv2.err
echo "torchscript ADV² on GRAD: exit $? — $(cat out/torchscript-grad-adv2.err)"
