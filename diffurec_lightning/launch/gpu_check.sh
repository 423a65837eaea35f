#!/usr/bin/env bash
# The GPU path in one run (issue: time to accuracy, GPU deliverable). On a machine with CUDA GPUs,
# from the repository root:
#
#   DIFFUREC_DATA_MIRROR=/path/to/mirror bash diffurec_lightning/launch/gpu_check.sh [out_dir]
#
# 1. `make bench` on CUDA (fp32 and bf16-mixed): samples/s, % of the measured matmul peak, users/s;
# 2. a short DiffuRecSys training on one GPU with trainer.precision=auto (bf16-mixed where the GPU
#    has bf16), validation every epoch, then test;
# 3. the same training with DDP on every visible GPU (skipped with one GPU).
# Figures land in <out_dir> (default $OUT, else outputs/gpu_check): bench.json, *.log, the runs'
# results.json. python3 must hold CUDA torch and the project's dependencies; packages missing there
# can be installed from wheels in .whl/ (see the device notes in docs/performance.md).
set -euo pipefail
out="${1:-${OUT:-outputs/gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
python3 - <<'EOF' | tee "$out/gpus.log"
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
print("torch", torch.__version__)
EOF
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
common=(data=toys model=diffurecsys logger=csv callbacks.progress_bar=null
        trainer.max_epochs=3 trainer.check_val_every_n_epoch=1 data.num_workers=2)

python3 -m diffurec_lightning.bench data=toys model=diffurecsys bench.device=cuda \
  "bench.json=$out/bench.json" 2>&1 | tee "$out/bench.log"
python3 -m diffurec_lightning.train "${common[@]}" trainer=gpu \
  "paths.output_dir=$out/train_1gpu" 2>&1 | tee "$out/train_1gpu.log"
if [ "$gpus" -gt 1 ]; then
  python3 -m diffurec_lightning.train "${common[@]}" trainer=ddp trainer.accelerator=gpu \
    "trainer.devices=$gpus" "paths.output_dir=$out/train_ddp" 2>&1 | tee "$out/train_ddp.log"
fi
echo "gpu_check: done ($gpus GPU(s)); figures in $out"
