#!/usr/bin/env bash
# Small scoring requests beside large ones, on the demo's `recs` model (CPU path): latency of
# 8-candidate ranks alone, then while HEAVY clients keep sending 65,536-candidate ranks (the
# per-request limit), same gateway, same run. Prints p50 / p99 / max of the small ones for both
# phases and their ratio. Loopback only; each phase lasts DURATION seconds.
#
#   DURATION=10 HEAVY=4 bench/scoring_isolation.sh
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY=${GATEWAY:-target/dist/gateway}
DURATION=${DURATION:-10}
HEAVY=${HEAVY:-4}
LIGHT=${LIGHT:-8}
PORT=${PORT:-18543}
ADMIN=${ADMIN:-19911}
die() { echo "scoring_isolation.sh: $*" >&2; exit 1; }
for v in DURATION HEAVY LIGHT; do [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"; done
command -v h2load >/dev/null || die "h2load is not installed (apt-get install nghttp2-client)"
[[ -x $GATEWAY ]] || die "$GATEWAY not found (cargo build --profile dist -p gateway)"

OUT=$(mktemp -d /tmp/bench-scoring-isolation.XXXXXX)
GW_PID=
cleanup() {
  [[ -z $GW_PID ]] || kill -INT "$GW_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$GATEWAY" demo --https "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN" >"$OUT/gateway.log" 2>&1 &
GW_PID=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || die "the demo did not start (see $OUT/gateway.log)"

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
# The demo catalog has items 1..=48.
json.dump({"user": 7, "candidates": [2, 8, 14, 20, 26, 32, 38, 44]}, open(f"{out}/light.json", "w"))
json.dump({"user": 7, "candidates": [1 + i % 48 for i in range(65536)]}, open(f"{out}/heavy.json", "w"))
EOF

URL="https://127.0.0.1:$PORT/_gateway/models/recs/rank"
light() {
  h2load -D "$DURATION" -c "$LIGHT" -m 1 -d "$OUT/light.json" -H 'content-type: application/json' \
    --log-file "$OUT/$1.log" "$URL" >"$OUT/$1.txt" 2>&1
}

light alone
h2load -D $((DURATION + 2)) -c "$HEAVY" -m 1 -d "$OUT/heavy.json" -H 'content-type: application/json' \
  "$URL" >"$OUT/heavy.txt" 2>&1 &
HEAVY_PID=$!
sleep 1
light beside_heavy
wait "$HEAVY_PID" || true

python3 - "$OUT" "$HEAVY" <<'EOF'
import sys
out, heavy = sys.argv[1], sys.argv[2]
def stats(name):
    rows = [l.split("\t") for l in open(f"{out}/{name}.log") if l.strip()]
    ok = sorted(int(r[2]) for r in rows if r[1] == "200")
    bad = sum(1 for r in rows if r[1] != "200")
    q = lambda p: ok[min(len(ok) - 1, int(p * len(ok)))] / 1000
    return len(ok), bad, q(0.5), q(0.99), ok[-1] / 1000
a = stats("alone")
b = stats("beside_heavy")
print("small ranks (8 candidates), latency in ms:")
print(f"  alone:                 n={a[0]:6d} non-200={a[1]} p50={a[2]:.2f} p99={a[3]:.2f} max={a[4]:.2f}")
print(f"  beside {heavy} heavy clients: n={b[0]:6d} non-200={b[1]} p50={b[2]:.2f} p99={b[3]:.2f} max={b[4]:.2f}")
print(f"  p99 ratio beside/alone: {b[3] / a[3]:.2f}")
EOF
grep -E "requests:|status codes:" "$OUT/heavy.txt" | sed 's/^/heavy: /'
