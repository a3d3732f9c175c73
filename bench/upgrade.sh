#!/usr/bin/env bash
# On-demand benchmark, not part of CI: the binary replaced several times under load.
#
#   bench/upgrade.sh                                  # 30 s, 5 upgrades
#   DURATION=60 UPGRADES=10 bench/upgrade.sh
#   GATEWAY=/path/to/gateway SKIP_BUILD=1 bench/upgrade.sh
#   KEEP=/tmp/upgrade bench/upgrade.sh                # keep the logs and the load output
#
# One gateway (a worker per core), run from a copy of the binary in a work directory with
# --pid-file, in front of an nginx of its own with two upstreams that log every request they
# answer: `/h2/` for h2load and `/h1/` for wrk. For DURATION seconds:
#   - h2load (16 connections x 8 streams, h2 over TLS) on /h2/ and wrk (16 HTTP/1.1
#     connections over TLS) on /h1/. wrk opens a new connection after a response that says
#     `connection: close`; h2load does not reconnect after a GOAWAY (its clients then idle
#     until the time is up), so after each upgrade but the last another h2load starts for the
#     time left, and the figures are the sum of them all;
#   - UPGRADES times, evenly spaced: the binary in the work directory is replaced (a fresh
#     copy renamed over it, as a package manager does) and `gateway upgrade --pid-file` runs;
#     each must exit 0 naming a new pid.
# Reported: requests, failures and non-2xx answers by client, how many requests each upstream
# answered, the upgrades done and the pids. The h2 upstream must have answered at least as
# many requests as h2load counts succeeded, and at most that plus the streams still in flight
# when the time was up (started, not done); when it answered exactly that sum, no stream
# h2load counts failed was processed (they are streams nghttp2 refused to open once the GOAWAY
# had arrived; RFC 9113 section 6.8), and otherwise at most the difference was. wrk stops without waiting either, so its upstream may have answered up to 16 more than
# wrk counts.
# Exit 1 on a socket error, a non-2xx answer, a failed upgrade, an old process still running,
# or upstream counts that do not match.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-30}
UPGRADES=${UPGRADES:-5}
SKIP_BUILD=${SKIP_BUILD:-0}
UP_H2=18094
UP_H1=18095
GW_PORT=18449
GW_ADMIN=19906
CERT=/tmp/bench-cert.pem
KEY=/tmp/bench-key.pem
GATEWAY=${GATEWAY:-$ROOT/target/release/gateway}

die() { echo "upgrade.sh: $*" >&2; exit 1; }
for v in DURATION UPGRADES; do [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"; done

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need nginx nginx-light wrk wrk h2load nghttp2-client openssl openssl curl curl
build_gateway_and_plugins
self_signed_cert

WORK=$(mktemp -d /tmp/bench-upgrade.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # The processes the upgrades started are not this script's children.
  if [[ -s $WORK/gw.pid ]]; then kill "$(cat "$WORK/gw.pid")" 2>/dev/null || true; fi
  if [[ -s $WORK/nginx.pid ]]; then kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
  pkill -P $$ 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

mkdir -p "$WORK/bin"
cp "$GATEWAY" "$WORK/bin/gateway"
cat >"$WORK/gateway.toml" <<CONF
[logging]
level = "info"
access_log = false
[admin]
bind = "127.0.0.1:$GW_ADMIN"
[server]
drain_timeout_ms = 10000
$(https_listener_toml)
[[upstreams]]
name = "h2"
backends = ["127.0.0.1:$UP_H2"]
pool_max_idle_per_backend = 256
[[upstreams]]
name = "h1"
backends = ["127.0.0.1:$UP_H1"]
pool_max_idle_per_backend = 256
[[routes]]
name = "h2"
path_prefix = "/h2/"
upstream = "h2"
[[routes]]
name = "h1"
path_prefix = "/h1/"
upstream = "h1"
CONF
"$WORK/bin/gateway" check --config "$WORK/gateway.toml" >/dev/null
cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  server {
    listen 127.0.0.1:$UP_H2 backlog=4096;
    keepalive_requests 1000000;
    access_log $WORK/h2-upstream.log;
    location / { default_type application/json; return 200 '{"products":[{"id":1,"name":"shoe"}]}'; }
  }
  server {
    listen 127.0.0.1:$UP_H1 backlog=4096;
    keepalive_requests 1000000;
    access_log $WORK/h1-upstream.log;
    location / { default_type application/json; return 200 '{"products":[{"id":1,"name":"shoe"}]}'; }
  }
}
CONF

timeout -k 5 3600 nginx -c "$WORK/nginx.conf" &
PIDS+=($!)
"$WORK/bin/gateway" run --config "$WORK/gateway.toml" --pid-file "$WORK/gw.pid" >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
url="https://127.0.0.1:$GW_PORT"
wait_up "$url/h1/" "$WORK/gateway.log"
first=$(cat "$WORK/gw.pid")
: >"$WORK/h1-upstream.log"
: >"$WORK/h2-upstream.log"

start=$SECONDS
h2pids=()
h2load_for_the_time_left() {
  timeout $((DURATION + 60)) h2load -D "$((start + DURATION - SECONDS))" -c 16 -m 8 -t 1 \
    "$url/h2/" >"$WORK/h2load.${#h2pids[@]}" 2>&1 &
  h2pids+=($!)
}
h2load_for_the_time_left
timeout $((DURATION + 60)) wrk -t1 -c16 -d"${DURATION}s" "$url/h1/" >"$WORK/wrk" 2>&1 &
wr=$!

# Upgrades at DURATION * i / (UPGRADES + 1) seconds, so load runs before the first and after
# the last.
pids=("$first")
failed_upgrades=0
for i in $(seq "$UPGRADES"); do
  at=$((start + DURATION * i / (UPGRADES + 1)))
  while ((SECONDS < at)); do sleep 0.2; done
  cp "$GATEWAY" "$WORK/bin/.gateway.new"
  mv -f "$WORK/bin/.gateway.new" "$WORK/bin/gateway"
  t0=$(date +%s.%N)
  if out=$("$WORK/bin/gateway" upgrade --pid-file "$WORK/gw.pid" 2>&1); then
    t1=$(date +%s.%N)
    pids+=("$(cat "$WORK/gw.pid")")
    echo "upgrade $i at $((SECONDS - start)) s: $out ($(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s)"
    # Not after the last one: the h2load running then has no stream in flight when the time
    # is up (its connections were closed by the GOAWAY), so its counts are exact.
    if ((i < UPGRADES && start + DURATION - SECONDS >= 1)); then h2load_for_the_time_left; fi
  else
    failed_upgrades=$((failed_upgrades + 1))
    echo "upgrade $i at $((SECONDS - start)) s FAILED: $out"
  fi
done
wait "${h2pids[@]}" "$wr" || true
# Let the last old process finish its drain, and nginx write its logs.
sleep 2
upgrades_total=$(curl -s "http://127.0.0.1:$GW_ADMIN/metrics" | awk '/^gateway_upgrades_total\{outcome="took_over"\}/ {print $NF}')
# Every old process must have exited after its drain.
left=0
for p in "${pids[@]:0:${#pids[@]}-1}"; do
  if kill -0 "$p" 2>/dev/null; then left=$((left + 1)); fi
done

if [[ -n ${KEEP:-} ]]; then mkdir -p "$KEEP" && cp "$WORK/gateway.log" "$WORK"/h2load.* "$WORK/wrk" "$KEEP/"; fi

# Sums field $2 of the line matching $1 over every h2load's output.
sum() { cat "$WORK"/h2load.* | awk -v re="$1" -v f="$2" '$0 ~ re {gsub(",", ""); s += $f; n++} END {if (n) print s}'; }
h2_runs=${#h2pids[@]}
h2_total=$(sum '^requests:' 2)
h2_started=$(sum '^requests:' 4)
h2_done=$(sum '^requests:' 6)
h2_ok=$(sum '^requests:' 8)
h2_failed=$(sum '^requests:' 10)
h2_errored=$(sum '^requests:' 12)
h2_2xx=$(sum '^status codes:' 3)
h2_non2xx=$(cat "$WORK"/h2load.* | awk '/^status codes:/ {gsub(",", ""); s += $5 + $7 + $9} END {print s + 0}')
wrk_total=$(awk '/requests in/ {print $1}' "$WORK/wrk")
wrk_sock=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$WORK/wrk")
wrk_non2xx=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk")
up_h2=$(wc -l <"$WORK/h2-upstream.log")
up_h1=$(wc -l <"$WORK/h1-upstream.log")

echo
echo "gateway $("$GATEWAY" --version), nproc $(nproc), $DURATION s, $UPGRADES upgrades; pids ${pids[*]}"
echo "| client | requests | failed / errors | non-2xx | its upstream answered |"
echo "|---|---|---|---|---|"
echo "| h2load, h2 + TLS, 16 conns x 8 streams ($h2_runs runs) | ${h2_total:-?} (${h2_ok:-?} succeeded, ${h2_2xx:-?} 2xx) | ${h2_failed:-?} failed, ${h2_errored:-?} errored | ${h2_non2xx:-?} | $up_h2 |"
echo "| wrk, HTTP/1.1 + TLS, 16 conns | ${wrk_total:-?} | ${wrk_sock:-0} socket errors | ${wrk_non2xx:-0} | $up_h1 |"
echo "upgrades: $((UPGRADES - failed_upgrades)) of $UPGRADES handed over; the last process counts took_over=${upgrades_total:-?}; old processes still running: $left"
h2_unfinished=$((${h2_started:-0} - ${h2_done:-0}))
echo "h2: the upstream answered $up_h2 = ${h2_ok:-?} succeeded + $((up_h2 - ${h2_ok:-0})) of the $h2_unfinished still in flight when h2load stopped; so at most $((${h2_ok:-0} + h2_unfinished - up_h2)) of the ${h2_failed:-?} that h2load counts failed can have reached it"

ok=1
[[ ${h2_non2xx:-1} == 0 && -n ${h2_ok:-} ]] || ok=0
((up_h2 >= h2_ok && up_h2 <= h2_ok + h2_unfinished)) || ok=0
[[ ${wrk_sock:-0} == 0 && ${wrk_non2xx:-0} == 0 && -n ${wrk_total:-} ]] || ok=0
((ok == 1 && up_h1 >= wrk_total && up_h1 <= wrk_total + 16 && failed_upgrades == 0 && left == 0)) ||
  die "requests or upgrades failed (see above)"
