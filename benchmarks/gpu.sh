#!/usr/bin/env bash
# The GPU benchmarks in one short run (about 8 minutes on one H200):
#   1. KAN layer core, KAGN forward+backward vs plain conv, the arithmetic floor and
#      torch-conv-kan, in fp32 and bf16 (benchmarks/layers.py --quick);
#   2. cost of the hippocampus networks: parameters, GFLOPs/patch, training patches/s
#      (kanseg models --cost, 40x56x40 patches, batch 8);
#   3. hippocampus fold 0 at equal wall-clock: every network of configs/msd_hippocampus.yaml's
#      benchmark trained for $SEG_MINUTES minutes, seed 0 (benchmarks/segmentation.py).
# Usage: benchmarks/gpu.sh OUT_DIR [HIPPOCAMPUS_ROOT] [TORCH_CONV_KAN_CHECKOUT]
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [HIPPOCAMPUS_ROOT] [TORCH_CONV_KAN_CHECKOUT]}
data=${2:-../shared/data/hippocampus}
tck=${3:-../shared/reference/torch-conv-kan}
minutes=${SEG_MINUTES:-1}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"
} 2>&1 | tee "$out/env.txt"

for dtype in fp32 bf16; do
  timeout 150 $py benchmarks/layers.py --quick --device cuda --dtype "$dtype" --repeats 20 \
    --batch-scale 8 --tck "$tck" 2>&1 | tee "$out/layers_$dtype.md"
done

cost="kanseg.cli models --cost --device cuda --patch 40,56,40 --in-channels 1 --out-channels 3 --batch 8 --steps 10"
{ timeout 120 $py -m $cost --models ukanet,monai_unet,segresnet,dynunet,swinunetr \
    --model-arg ukanet.depth=2 --model-arg ukanet.stem_stride=2 --model-arg 'ukanet.kan_levels=[2]' \
    --model-arg monai_unet.depth=3 --model-arg dynunet.depth=3
  echo "all-KAN UKANet (width 16, depth 3: the model of the earlier hippocampus config):"
  timeout 60 $py -m $cost --models ukanet --model-arg ukanet.depth=3
} 2>&1 | tee "$out/cost.txt"

sed "s#../shared/data/hippocampus#$data#; s#num_workers: 1#num_workers: 6#" \
  configs/msd_hippocampus.yaml > "$out/hippocampus_gpu.yaml"
timeout 330 $py benchmarks/segmentation.py --config "$out/hippocampus_gpu.yaml" \
  --minutes "$minutes" --seeds 0 --out /tmp/bench_gpu --variant ukanet --variant monai_unet \
  --variant segresnet --variant dynunet:model.name=dynunet,model.width=16,model.depth=3 \
  > "$out/segmentation.log" 2>&1
cp /tmp/bench_gpu/results.md "$out/segmentation.md" 2>/dev/null
tail -n 30 "$out/segmentation.log"
