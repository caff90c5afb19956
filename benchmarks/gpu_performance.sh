#!/usr/bin/env bash
# The GPU table of docs/performance.md on one GPU: every model through benchmarks/throughput.py, SIVT at the
# paper's settings beside its PyTorch twin. One JSON line per measurement, on stdout and appended to
# ${OUT:-.}/performance.jsonl. See benchmarks/README.md.
#
#   bash benchmarks/gpu_performance.sh [compile] [sivt] [models] [twin]   (no argument: the last three)
#
# Compiled programs go to JAX's persistent cache (JAX_COMPILATION_CACHE_DIR, default .xla_cache/ in the
# checkout, git-ignored and kept between device calls), so a rerun can load what an earlier call
# compiled. `compile` only compiles the GAN `:paper` steps (minutes each): run it in its own call
# first, then `models`. A fast load shows as an xla_compile_s of seconds (on the CPU, large programs
# load as slowly as they compile; on the GPU not measured yet).
#
# TWIN: path of the PyTorch twin of SIVT, a script outside this repository (default benchmarks/torch_sivt.py).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-.}/performance.jsonl"
groups="${*:-sivt models twin}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.xla_cache}"
twin="${TWIN:-}"
[ -z "$twin" ] && for t in benchmarks/torch_sivt.py; do
  [ -f "$t" ] && twin="$t" && break
done
steps="${STEPS:-20}"

# The GPU machine lacks some of jaxad's pure-Python dependencies: install the carried wheels (.whl/).
python -c "import grain, dm_pix, clu, ml_collections" 2>/dev/null || pip install -q --no-deps .whl/*.whl

emit() { tee -a "$out"; }
tp() { python benchmarks/throughput.py --steps "$steps" --repeats 5 "$@" --config.dtype=auto | emit; }

# Backbone weights do not change the speed; 'random' needs no ported file on the GPU machine.
paper_sivt=(--config configs/sivt.py:paper --config.backbone.weights=random)
for g in $groups; do
  case "$g" in
    sivt)
      for b in 64 8; do
        # Like the twin: backbone every step; bf16, 10 heads on cuDNN fused attention (the config).
        tp "${paper_sivt[@]}" --batch "$b" --config.backbone.cache_features=False \
           --config.attention_implementation=cudnn
        # The harness default: training reads the cached backbone features.
        tp "${paper_sivt[@]}" --batch "$b" --config.attention_implementation=cudnn
        # The issue's baseline: 12 heads (head dim 20), XLA attention.
        tp "${paper_sivt[@]}" --batch "$b" --config.backbone.cache_features=False --config.sivt.num_heads=12
      done ;;
    compile)
      for c in configs/tmirn.py:paper configs/mask_vitgan.py:paper; do
        python benchmarks/throughput.py --config "$c" --compile_only --config.dtype=auto | emit
      done ;;
    models)
      tp --config configs/vit_memae.py:paper
      tp --config configs/mask_vitgan.py:paper
      tp --config configs/rbae.py:paper --config.backbone.weights=random
      tp --config configs/tmirn.py:paper
      tp --config configs/mean_image.py ;;
    twin)
      if [ -z "$twin" ]; then echo "no PyTorch twin found (set TWIN=path)" >&2; continue; fi
      for args in "64" "8" "64 --no-cnn"; do
        python "$twin" $args | sed -n 's/^RESULT //p' | python -c \
          'import json,sys; print(json.dumps({"model": "torch_sivt", "mode": "eager", **json.loads(sys.stdin.read())}))' | emit
        python - "$twin" $args <<'EOF' | sed -n 's/^RESULT //p' | python -c \
          'import json,sys; print(json.dumps({"model": "torch_sivt", "mode": "torch.compile", **json.loads(sys.stdin.read())}))' | emit
import importlib.util, sys
import torch
path = sys.argv[1]
sys.argv = [path] + sys.argv[2:]
spec = importlib.util.spec_from_file_location('torch_sivt', path)
twin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(twin)
eager = twin.SIVT
twin.SIVT = lambda *a, **k: torch.compile(eager(*a, **k))
twin.main()
EOF
      done ;;
    *) echo "unknown group $g (sivt, models, twin)" >&2; exit 2 ;;
  esac
done
