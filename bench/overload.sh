#!/usr/bin/env bash
# On-demand benchmark, not part of CI: the gateway saturated on a busy node.
#
#   bench/overload.sh                             # 2 modes x 60 s
#   DURATION=150 bench/overload.sh                # "several minutes" of load in all
#   GATEWAY=/path/to/gateway SKIP_BUILD=1 bench/overload.sh
#   KEEP=/tmp/overload bench/overload.sh          # keep each mode's metrics, logs, load output
#   QUEUE_MS="50 20 0" bench/overload.sh          # max_queue_time_ms of each mode (0: off)
#
# One gateway (a worker per core) in front of the nginx upstream from bench/nginx, with two
# routes:
#   /api/...  hygiene -> storefront, the storefront plugin re-ranking the upstream's JSON with
#             a sample embedding model through the `ranking` import (plugin body access on);
#   /loop     the hostile fixture in `loop` mode: every call spins until its fuel runs out.
# For each mode (admission control on with the default max_queue_time_ms = 50, then off with
# 0; QUEUE_MS chooses), while four CPU-bound processes run beside it on the same cores, for DURATION seconds:
#   - h2load -c 32 -m 16 (512 concurrent h2 streams) and wrk -c 64 (HTTP/1.1), both over TLS,
#     on /api/recommendations?user=42;
#   - a well-behaved shopper: one new TLS connection and one request every 100 ms, whose
#     latency (p50, p99, max) and failures are recorded;
#   - a probe of /loop every 500 ms: each must be a 500 naming `fuel`, and its time is kept.
# Then the gateway's own counters: plugin calls by outcome, the route's 5xx, requests shed.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-60}
SKIP_BUILD=${SKIP_BUILD:-0}
HOGS=${HOGS:-4}
QUEUE_MS=${QUEUE_MS:-50 0}
UP_PORT=18080
GW_PORT=18447
GW_ADMIN=19904
CERT=/tmp/bench-cert.pem
KEY=/tmp/bench-key.pem
GATEWAY=${GATEWAY:-$ROOT/target/release/gateway}

die() { echo "overload.sh: $*" >&2; exit 1; }
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer"

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need nginx nginx-light wrk wrk h2load nghttp2-client openssl openssl curl curl
build_gateway_and_plugins hygiene storefront hostile
self_signed_cert

WORK=$(mktemp -d /tmp/bench-overload.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -P $$ 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

config() { # $1: max_queue_time_ms
  cat <<EOF
[logging]
level = "warn"
access_log = false
[limits]
max_queue_time_ms = $1
[admin]
bind = "127.0.0.1:$GW_ADMIN"
$(https_listener_toml)
[[upstreams]]
name = "store"
backends = ["127.0.0.1:$UP_PORT"]
pool_max_idle_per_backend = 256
[scoring]
backend = "cpu"
[[models]]
name = "recs"
path = "$WORK/recs.safetensors"
[[plugins]]
name = "hygiene"
path = "$ROOT/plugins/dist/hygiene.wasm"
[[plugins]]
name = "storefront"
path = "$ROOT/plugins/dist/storefront.wasm"
config = { paths = ["/api/recommendations"], list_fields = ["products"], model = "recs" }
[[plugins]]
name = "loop"
path = "$ROOT/plugins/dist/hostile.wasm"
config = "loop"
instances = 1
[[routes]]
name = "api"
path_prefix = "/api"
upstream = "store"
plugins = ["hygiene", "storefront"]
plugin_body_access = true
[[routes]]
name = "loop"
path_prefix = "/loop"
upstream = "store"
plugins = ["loop"]
EOF
}

to_ms() { awk '{printf "%.2f\n", $1 * 1000}'; }
pct() { sort -g | awk -v q="$1" '{a[NR]=$1} END {if (NR == 0) {print "-"; exit} i = int(NR * q + 0.999999); if (i < 1) i = 1; print a[i]}'; }
metric() { # $1: series name; then label=regex pairs that must all match; prints the sum
  local name=$1
  shift
  awk -v name="$name" -v conds="$*" '
    BEGIN { n = split(conds, c, " ") }
    index($0, name "{") == 1 || $1 == name {
      for (i = 1; i <= n; i++) {
        split(c[i], kv, "=")
        if (!match($0, kv[1] "=\"[^\"]*\"")) next
        v = substr($0, RSTART + length(kv[1]) + 2, RLENGTH - length(kv[1]) - 3)
        if (v !~ "^(" kv[2] ")$") next
      }
      s += $NF
    }
    END { printf "%d\n", s }' "$WORK/metrics"
}

timeout -k 5 3600 nginx -e /tmp/bench-up.err -c "$ROOT/bench/nginx/nginx-upstream.conf" &
PIDS+=($!)

declare -A ROW
for qt in $QUEUE_MS; do
  if ((qt > 0)); then mode=on-$qt; else mode=off; fi
  config "$qt" >"$WORK/gateway.toml"
  "$GATEWAY" sample-files --config "$WORK/gateway.toml" >/dev/null
  "$GATEWAY" check --config "$WORK/gateway.toml" >/dev/null
  timeout -k 5 3600 "$GATEWAY" run --config "$WORK/gateway.toml" >"$WORK/gw-$mode.log" 2>&1 &
  gw=$!
  url="https://127.0.0.1:$GW_PORT/api/recommendations?user=42"
  wait_up "$url" "$WORK/gw-$mode.log"

  for _ in $(seq "$HOGS"); do timeout "$((DURATION + 5))" sh -c 'while :; do :; done' & done
  timeout $((DURATION + 60)) h2load -D "$DURATION" -c 32 -m 16 -t 1 "$url" >"$WORK/h2load-$mode" 2>&1 &
  h2=$!
  timeout $((DURATION + 60)) wrk -t1 -c64 -d"${DURATION}s" "$url" >"$WORK/wrk-$mode" 2>&1 &
  wr=$!
  : >"$WORK/shopper-$mode"
  : >"$WORK/loop-$mode"
  end=$((SECONDS + DURATION))
  (while ((SECONDS < end)); do
    curl -sk -o /dev/null --max-time 10 -w '%{http_code} %{time_total}\n' "$url" >>"$WORK/shopper-$mode" || echo "000 10" >>"$WORK/shopper-$mode"
    sleep 0.1
  done) &
  sh=$!
  (while ((SECONDS < end)); do
    curl -sk --max-time 10 -w '\n%{http_code} %{time_total}\n' "https://127.0.0.1:$GW_PORT/loop" |
      awk 'NR==1 {fuel = ($0 ~ /\(fuel\)/)} END {print $1, $2, fuel}' >>"$WORK/loop-$mode" || true
    sleep 0.5
  done) &
  lp=$!
  wait "$h2" "$wr" "$sh" "$lp" || true
  curl -s "http://127.0.0.1:$GW_ADMIN/metrics" >"$WORK/metrics"
  if [[ -n ${KEEP:-} ]]; then mkdir -p "$KEEP" && cp "$WORK/metrics" "$KEEP/metrics-$mode" && cp "$WORK/gw-$mode.log" "$WORK/h2load-$mode" "$WORK/wrk-$mode" "$KEEP/"; fi
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
  sleep 2

  h2_ok=$(awk '/^status codes:/ {gsub(",", ""); print $3}' "$WORK/h2load-$mode")
  h2_5xx=$(awk '/^status codes:/ {gsub(",", ""); print $9}' "$WORK/h2load-$mode")
  h2_failed=$(awk '/^requests:/ {gsub(",", ""); for (i = 1; i <= NF; i++) if ($(i+1) == "failed") print $i}' "$WORK/h2load-$mode")
  wrk_total=$(awk '/requests in/ {print $1}' "$WORK/wrk-$mode")
  wrk_non2xx=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk-$mode")
  shop_n=$(wc -l <"$WORK/shopper-$mode")
  shop_bad=$(awk '$1 != 200' "$WORK/shopper-$mode" | wc -l)
  shop_503=$(awk '$1 == 503' "$WORK/shopper-$mode" | wc -l)
  shop_p50=$(awk '$1 == 200 {print $2}' "$WORK/shopper-$mode" | pct 0.5 | to_ms)
  shop_p99=$(awk '$1 == 200 {print $2}' "$WORK/shopper-$mode" | pct 0.99 | to_ms)
  shop_max=$(awk '$1 == 200 {print $2}' "$WORK/shopper-$mode" | pct 1 | to_ms)
  loop_n=$(wc -l <"$WORK/loop-$mode")
  loop_fuel=$(awk '$1 == 500 && $3 == 1' "$WORK/loop-$mode" | wc -l)
  loop_p50=$(awk '$1 == 500 {print $2}' "$WORK/loop-$mode" | pct 0.5 | to_ms)
  loop_max=$(awk '$1 == 500 {print $2}' "$WORK/loop-$mode" | pct 1 | to_ms)
  waits=$(metric gateway_plugin_instance_waits_total outcome=got)
  gave_up=$(metric gateway_plugin_instance_waits_total outcome=gave_up)
  healthy_fail=$(metric gateway_plugin_invocations_total 'plugin=hygiene|storefront' 'outcome=trap|timeout|memory|bad_output|fuel')
  unavailable=$(metric gateway_plugin_invocations_total 'plugin=hygiene|storefront' outcome=unavailable)
  healthy_ok=$(metric gateway_plugin_invocations_total 'plugin=hygiene|storefront' 'outcome=ok|local_response')
  loop_stops=$(metric gateway_plugin_invocations_total plugin=loop outcome=fuel)
  loop_other=$(metric gateway_plugin_invocations_total plugin=loop 'outcome=ok|trap|timeout|memory|unavailable')
  route_5xx=$(metric gateway_requests_total route=api status_class=5xx)
  shed=$(metric gateway_shed_requests_total)
  echo "== admission control $mode (max_queue_time_ms = $qt), $DURATION s, $HOGS CPU hogs"
  echo "   h2load (512 streams): $h2_ok 2xx, $h2_5xx 5xx, $h2_failed failed | wrk (64 conns): $wrk_total requests, ${wrk_non2xx:-0} non-2xx"
  up_err=$(awk '/^gateway_upstream_errors_total\{/ && $NF > 0 {match($0, /kind="[^"]*"/); printf "%s%s %d", sep, substr($0, RSTART + 6, RLENGTH - 7), $NF; sep = ", "}' "$WORK/metrics")
  echo "   healthy plugin calls: $healthy_ok ok, $healthy_fail failed (trap, timeout, fuel, ...), $unavailable found no instance in time (503); route 5xx (not shed): $route_5xx; shed with 503: $shed"
  echo "   upstream errors by kind: ${up_err:-none}; calls that waited for an instance slot: $waits got one, $gave_up gave up (503)"
  echo "   shopper (1 req / 100 ms, new TLS connection each): $shop_n requests, $shop_bad not 200 ($shop_503 were 503); p50 $shop_p50 ms, p99 $shop_p99 ms, max $shop_max ms"
  echo "   /loop probe: $loop_fuel of $loop_n stopped by fuel (gateway: $loop_stops fuel, $loop_other other); answer p50 $loop_p50 ms, max $loop_max ms"
  ROW[$mode]="| $mode | $h2_ok / $h2_5xx | $wrk_total / ${wrk_non2xx:-0} | $healthy_fail | $unavailable | $route_5xx | $shed | $shop_p50 / $shop_p99 / $shop_max | $shop_bad | $loop_fuel of $loop_n ($loop_max ms max) |"
done
echo
echo "gateway $("$GATEWAY" --version), nproc $(nproc), $HOGS CPU hogs, $DURATION s per mode"
echo "| admission | h2load 2xx / 5xx | wrk requests / non-2xx | healthy plugin failures | no instance in time (503) | route 5xx | shed (503) | shopper p50 / p99 / max ms | shopper not 200 | loop stopped by fuel |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for qt in $QUEUE_MS; do
  if ((qt > 0)); then echo "${ROW[on-$qt]}"; else echo "${ROW[off]}"; fi
done
