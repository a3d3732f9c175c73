#!/usr/bin/env bash
# On-demand soak test, not part of CI: steady load while plugins, models and the config are
# swapped over and over; what was lost, and whether memory and file descriptors stay flat.
#
#   bench/soak.sh                                   # 300 s, a swap round every 10 s
#   DURATION=600 EVERY=5 GATEWAY=target/release/gateway SKIP_BUILD=1 bench/soak.sh
#
# One gateway (a worker per core) in front of the nginx upstream from bench/nginx: route `/`
# runs plugin `p`, and model `recs` is served on the scoring endpoint. For DURATION seconds:
#   - h2load (16 connections x 8 streams, h2 over TLS) on `/`, and wrk (16 HTTP/1.1
#     connections over TLS) on `/`;
#   - a client ranking with `recs` on the scoring endpoint every 50 ms;
#   - every EVERY seconds one swap, in turn: plugin `p` uploaded (hygiene and noop
#     alternately), model `recs` uploaded (two versions alternately), the config file edited
#     and reloaded (POST /admin/reload);
#   - every 5 s the gateway's RSS and open file descriptors are sampled.
# Reported: requests and failures by client, swaps done and refused, RSS and fds at start
# (after warm-up), end and peak.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-300}
EVERY=${EVERY:-10}
SKIP_BUILD=${SKIP_BUILD:-0}
UP_PORT=18080
GW_PORT=18448
GW_ADMIN=19905
GATEWAY=${GATEWAY:-$ROOT/target/release/gateway}

die() { echo "soak.sh: $*" >&2; exit 1; }
for v in DURATION EVERY; do [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"; done

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need nginx nginx-light wrk wrk h2load nghttp2-client curl curl
build_gateway_and_plugins hygiene noop

WORK=$(mktemp -d /tmp/bench-soak.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -P $$ 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem \
  -out cert.pem -days 2 -subj /CN=localhost 2>/dev/null
echo "soak-token" >admin.token
for i in 1 2; do
  "$GATEWAY" model sample --kind embedding --items 5000 --dim 64 --users 100 --seed "$i" \
    --out "recs$i.safetensors" >/dev/null
done
cp recs1.safetensors recs.safetensors
config() { # $1: the route's retry count, the field the reloads flip
  cat <<TOML
[server]
watch_files = false
[logging]
level = "warn"
access_log = false
[admin]
bind = "127.0.0.1:$GW_ADMIN"
token_file = "admin.token"
[[tls.certificates]]
cert = "cert.pem"
key = "key.pem"
[[listeners]]
name = "https"
bind = "127.0.0.1:$GW_PORT"
[[upstreams]]
name = "up"
backends = ["127.0.0.1:$UP_PORT"]
pool_max_idle_per_backend = 64
max_retries = $1
[[routes]]
name = "all"
upstream = "up"
plugins = ["p"]
[[plugins]]
name = "p"
path = "$ROOT/plugins/dist/noop.wasm"
[[models]]
name = "recs"
path = "recs.safetensors"
[store]
dir = "store"
TOML
}
config 1 >gateway.toml
"$GATEWAY" check --config gateway.toml >/dev/null

timeout -k 5 7200 nginx -e /tmp/bench-up.err -c "$ROOT/bench/nginx/nginx-upstream.conf" &
PIDS+=($!)
timeout -k 5 7200 "$GATEWAY" run --config gateway.toml >gw.log 2>&1 &
GW=$!
PIDS+=($GW)
url="https://127.0.0.1:$GW_PORT/"
wait_up "$url" gw.log
admin=(--admin "http://127.0.0.1:$GW_ADMIN" --token-file admin.token)
# The gateway itself, not the `timeout` that runs it.
GWP=$(pgrep -P "$GW" | head -1)
[[ -n $GWP ]] || die "no gateway process under $GW"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$GWP/status"; }
fds() { ls "/proc/$GWP/fd" | wc -l; }

# Warm-up: one round of each swap and some load, then the baseline.
timeout 60 h2load -n 2000 -c 16 -m 8 "$url" >/dev/null 2>&1 || true
"$GATEWAY" plugin push "$ROOT/plugins/dist/hygiene.wasm" --name p "${admin[@]}" >/dev/null
"$GATEWAY" model push recs2.safetensors --name recs "${admin[@]}" >/dev/null
sleep 2
rss0=$(rss_kb) fd0=$(fds)

end=$((SECONDS + DURATION))
timeout $((DURATION + 60)) h2load -D "$DURATION" -c 16 -m 8 -t 1 "$url" >h2load.out 2>&1 &
h2=$!
timeout $((DURATION + 60)) wrk -t1 -c16 -d"${DURATION}s" "$url" >wrk.out 2>&1 &
wr=$!
(while ((SECONDS < end)); do
  curl -sk -o /dev/null --max-time 10 -w '%{http_code}\n' -d '{"user": 3, "candidates": [1, 2, 3, 4]}' \
    "https://127.0.0.1:$GW_PORT/_gateway/models/recs/rank" >>rank.out || echo 000 >>rank.out
  sleep 0.05
done) &
rk=$!
(while ((SECONDS < end)); do
  echo "$(rss_kb) $(fds)" >>samples
  sleep 5
done) &
sm=$!
round=0 plugin_swaps=0 model_swaps=0 reloads=0 refused=0
while ((SECONDS + EVERY < end)); do
  sleep "$EVERY"
  round=$((round + 1))
  case $((round % 3)) in
    1)
      wasm=$ROOT/plugins/dist/noop.wasm
      ((round % 2)) || wasm=$ROOT/plugins/dist/hygiene.wasm
      if "$GATEWAY" plugin push "$wasm" --name p "${admin[@]}" >/dev/null 2>>swaps.err; then
        plugin_swaps=$((plugin_swaps + 1))
      else refused=$((refused + 1)); fi
      ;;
    2)
      m=recs1.safetensors
      ((round % 2)) || m=recs2.safetensors
      if "$GATEWAY" model push "$m" --name recs "${admin[@]}" >/dev/null 2>>swaps.err; then
        model_swaps=$((model_swaps + 1))
      else refused=$((refused + 1)); fi
      ;;
    0)
      config $((round % 2 + 1)) >gateway.toml.new && mv gateway.toml.new gateway.toml
      if curl -sf -X POST -H "authorization: Bearer soak-token" \
        "http://127.0.0.1:$GW_ADMIN/admin/reload" >/dev/null 2>>swaps.err; then
        reloads=$((reloads + 1))
      else refused=$((refused + 1)); fi
      ;;
  esac
done
wait "$h2" "$wr" "$rk" "$sm" || true
sleep 2
rss1=$(rss_kb) fd1=$(fds)
peak=$(awk 'BEGIN {m = 0} $1 > m {m = $1} END {print m}' samples)

h2_line=$(awk '/^requests:/' h2load.out)
h2_codes=$(awk '/^status codes:/' h2load.out)
wrk_total=$(awk '/requests in/ {print $1}' wrk.out)
wrk_errors=$(awk '/Socket errors/ {print} /Non-2xx/ {print}' wrk.out | tr '\n' ' ')
rank_total=$(wc -l <rank.out)
rank_bad=$(awk '$1 != 200' rank.out | wc -l)
echo "gateway $("$GATEWAY" --version), nproc $(nproc), $DURATION s, a swap every $EVERY s"
echo "  h2load (16 x 8 streams): $h2_line | $h2_codes"
echo "  wrk (16 connections): $wrk_total requests ${wrk_errors:-, no errors, all 2xx}"
echo "  scoring client: $rank_total requests, $rank_bad not 200"
echo "  swaps: $plugin_swaps plugin uploads, $model_swaps model uploads, $reloads config reloads, $refused refused"
echo "  RSS: start $((rss0 / 1024)) MiB, end $((rss1 / 1024)) MiB, peak $((peak / 1024)) MiB; fds: start $fd0, end $fd1"
if [[ -s swaps.err ]]; then echo "  swap errors:"; head -5 swaps.err; fi
grep -iE "panic" gw.log | head -5 || true
