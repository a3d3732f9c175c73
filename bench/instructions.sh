#!/usr/bin/env bash
# On-demand, not part of CI: user-space instructions the gateway spends per proxied request,
# counted by callgrind. Wall-clock figures on a shared machine swing by a third between runs;
# this count repeats to within about 1%, so it shows whether a change to the request path made it
# cheaper before bench/proxy.sh says by how much in req/s.
#
#   bench/instructions.sh h1|h2 [GATEWAY_BINARY|nginx] [REQUESTS]
#   BENCH_CONFIG=other.toml bench/instructions.sh ...   # another gateway config (same listener)
#
# Starts the nginx upstream of bench/proxy.sh (127.0.0.1:18080) and the gateway under
# valgrind --tool=callgrind with bench/gateway-bench.toml (127.0.0.1:18444), warms up with
# 3000 requests, zeroes the counters, sends REQUESTS (20000) with h2load (16 connections; h2:
# 10 streams each, h1: one request at a time each), dumps, and prints instructions per request.
# With `nginx` instead of a binary it measures bench/proxy.sh's nginx proxy the same way (its
# TLS server on 127.0.0.1:18443, one process: master_process off), the peer for the figure.
# The callgrind file stays for callgrind_annotate. Kernel time is not counted. Needs valgrind,
# nginx and h2load (bench/proxy.sh installs the last two); about 30 s per run.
set -euo pipefail

cd "$(dirname "$0")/.."
MODE=${1:-}
GATEWAY=${2:-target/dist/gateway}
REQUESTS=${3:-20000}
die() { echo "instructions.sh: $*" >&2; exit 1; }
[[ $MODE == h1 || $MODE == h2 ]] || die "usage: bench/instructions.sh h1|h2 [GATEWAY_BINARY|nginx] [REQUESTS]"
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "REQUESTS must be a positive integer, got '$REQUESTS'"
[[ $GATEWAY == nginx || -x $GATEWAY ]] || die "$GATEWAY not found (cargo build --profile dist -p gateway)"
for tool in valgrind callgrind_control nginx h2load openssl; do
  command -v $tool >/dev/null || die "$tool is not installed"
done

CERT=/tmp/bench-cert.pem
KEY=/tmp/bench-key.pem
if [[ ! -s $CERT || ! -s $KEY ]]; then
  timeout 60 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$KEY" -out "$CERT" -days 30 -subj /CN=localhost 2>/dev/null
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in 18080 18443 18444 19901; do
  ! port_open $p || die "127.0.0.1:$p is already in use (bench/proxy.sh running?)"
done

OUT=$(mktemp -d /tmp/bench-instructions.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Both die on their own after 5 minutes, even if this script is killed outright.
timeout -k 5 300 nginx -e /tmp/bench-up.err -c "$PWD/bench/nginx/nginx-upstream.conf" \
  >"$OUT/nginx.out" 2>&1 &
PIDS+=($!)
if [[ $GATEWAY == nginx ]]; then
  PORT=18443
  sed 's/^worker_processes 1;/worker_processes 1;\nmaster_process off;/' \
    bench/nginx/nginx-proxy.conf >"$OUT/nginx-proxy.conf"
  SUBJECT=(nginx -e /tmp/bench-px.err -c "$OUT/nginx-proxy.conf")
  VERSION=$(nginx -v 2>&1 | sed 's/^nginx version: //')
else
  PORT=18444
  SUBJECT=("$GATEWAY" run --config "${BENCH_CONFIG:-bench/gateway-bench.toml}")
  VERSION=$("$GATEWAY" --version)
fi
timeout -k 5 300 valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
  --dump-instr=no "${SUBJECT[@]}" >"$OUT/gateway.log" 2>&1 &
PIDS+=($!)
for ((i = 0; i < 300; i++)); do port_open $PORT && port_open 18080 && break; sleep 0.2; done
port_open $PORT || { tail -20 "$OUT/gateway.log" >&2; die "$GATEWAY did not start"; }
VG_PID=$(pgrep -P "${PIDS[1]}" | head -1) # valgrind, the child of its timeout
[[ -n $VG_PID ]] || die "cannot find the valgrind process"

load() { # requests
  local flags=(-t1 -c16 -n "$1")
  if [[ $MODE == h2 ]]; then flags+=(-m10); else flags+=(--h1 -m1); fi
  timeout 120 h2load "${flags[@]}" "https://127.0.0.1:$PORT/" >"$OUT/h2load.txt" 2>&1 ||
    { cat "$OUT/h2load.txt" >&2; die "h2load failed"; }
  grep -q "$1 succeeded" "$OUT/h2load.txt" || { cat "$OUT/h2load.txt" >&2; die "requests failed"; }
}
load 3000
callgrind_control -z "$VG_PID" >/dev/null 2>&1
load "$REQUESTS"
callgrind_control -d "$VG_PID" >/dev/null 2>&1
sleep 1
DUMP=$OUT/callgrind.out.1
[[ -s $DUMP ]] || die "callgrind wrote no dump"
IR=$(awk '/^(summary|totals):/ { print $2; exit }' "$DUMP")
echo "$MODE: $((IR / REQUESTS)) instructions per request over $REQUESTS requests" \
  "($VERSION); callgrind file: $DUMP"
