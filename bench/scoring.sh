#!/usr/bin/env bash
# On-demand benchmark, not part of CI: the scoring engine's GPU path against its CPU path, in one
# invocation (gateway/crates/scoring/examples/scoring_bench.rs), on synthetic models built in memory.
#
#   bench/scoring.sh                              # auto backend, full sizes (1M x 128 catalog)
#   bench/scoring.sh --backend gpu --peak-gbps 3350
#   bench/scoring.sh --items 200000 --iters 30    # small, e.g. on lavapipe
#   SKIP_BUILD=1 bench/scoring.sh --skip-retrieval
#
# 1. Batched ranking: 64 requests x 500 candidates, dim 64, dot (Model::rank vs Model::rank_cpu):
#    batches/s, requests/s, p50/p99 per batch, GPU/CPU throughput ratio.
# 2. Full-catalog retrieval: 1,000,000 items x 128 dims (512 MB), top-100, batches of 1 and 16
#    queries (Model::top_k vs Model::top_k_cpu): queries/s, p50/p99 per batch, the GB/s of item
#    matrix read (each query re-reads the whole matrix in shaders/topk_scan.wgsl; the CPU path
#    reads it once per batch, so its batch > 1 figure is an effective rate) and, with
#    --peak-gbps, the fraction of the device's peak memory bandwidth.
#
# --peak-gbps is the device's spec-sheet memory bandwidth in GB/s and must be set by whoever runs
# it (3350 is the H100 SXM5 80GB figure; an H100 PCIe is 2000, an H200 4800): the benchmark does
# not know it. Without it the %peak column stays blank.
# Every argument is passed through to the example; `bench/scoring.sh --help` lists them
# (--backend auto|gpu|software-gpu|cpu, --iters, --max-seconds, --items, --dim, --k, --batches,
# --scan-groups, --skip-rank, --skip-retrieval, --skip-cpu, --peak-gbps, --f16, ...).
# --f16 holds the item tables as f16 (f16_storage): on a GPU with SHADER_F16 a scan reads half
# the bytes.
# The CPU path runs on one core per call (the batcher's thread): compare it per core. The full-size run needs about 2 GB of host
# memory (model bytes, host copy of the weights, upload).
set -euo pipefail

cd "$(dirname "$0")/.."

SKIP_BUILD=${SKIP_BUILD:-0}
BIN=target/dist/examples/scoring_bench

if [[ "$SKIP_BUILD" != 1 ]]; then
    cargo build --profile dist --example scoring_bench -p gateway-scoring
fi

# The example's defaults: --backend auto --iters 200 --warmup 5 --max-seconds 15 --items 1000000
# --dim 128 --k 100 --batches 1,16 (and 64 x 500 ranking at dim 64 over 100,000 items).
status=0
"$BIN" "$@" || status=$?

cat <<'EOF'

On a GPU machine (Vulkan driver installed):
  bench/scoring.sh --backend gpu --peak-gbps 3350
  (3350 GB/s is the H100 SXM spec-sheet bandwidth: set --peak-gbps to your device's own figure.)
EOF
exit $status
