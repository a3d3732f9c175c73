#!/usr/bin/env bash
# On-demand benchmark, not part of CI: what WebAssembly plugins cost.
#
#   bench/plugins.sh                         # both parts below
#   bench/plugins.sh chains                  # only the chains through the proxy
#   bench/plugins.sh calls                   # only the per-call cost by language
#   ROUNDS=1 DURATION=3 SKIP_BUILD=1 bench/plugins.sh
#   GATEWAY=/path/to/gateway SKIP_BUILD=1 bench/plugins.sh   # another build, e.g. an older commit
#   BASE=/path/to/older/gateway bench/plugins.sh calls       # per-call cost of two builds, interleaved
#   PLUGINS="noop hello" CALLS=100000 ROUNDS=9 bench/plugins.sh calls   # some of the plugins
#
# Chains: one gateway (1 worker thread) in front of the nginx upstream from bench/nginx, with
# four routes that differ only in their chain: /p0 (no plugin), /p1, /p3 and /p5 (that many
# no-op plugins, each called on request and on response). In the same run, for each route:
#   - latency at low load (wrk -t1 -c1 --latency): p50 and p99, and the p50 added per plugin
#     call relative to /p0 (a plugin on a route makes 2 calls per request);
#   - throughput at saturation (wrk -t1 -c64): requests/s and its ratio to /p0.
# Then the gateway's own histogram of one hook call (gateway_plugin_hook_duration_seconds,
# instance checkout included) is read from /metrics and its p50/p99 bucket bounds printed.
#
# Calls: the same small plugin in Rust (plugins/hello), Python (plugins/python/hello) and
# JavaScript (plugins/js/hello), with the Rust no-op as the floor, each run by
# `gateway plugin check --calls CALLS`: one hook called CALLS times in a row on one thread,
# which reports the CPU time (the thread's clock) and wall time of one call, everything the
# gateway does for it included (instance checkout, limits, the canonical ABI, metrics), and
# its fuel. Paths: /hello (the plugin answers, with a key-value increment and a counter) and
# /other (it adds a header and lets the request through).
#
# Medians over the rounds are reported (and the smallest figure, for the calls). Compare within
# one run; absolute figures drift with the machine's load.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PART=${1:-all}
[[ $PART == all || $PART == chains || $PART == calls ]] || { echo "plugins.sh: unknown part $PART (chains or calls)" >&2; exit 2; }
ROUNDS=${ROUNDS:-3}
CALLS=${CALLS:-20000}
BASE=${BASE:-}
PLUGINS=${PLUGINS:-noop hello python-hello js-hello}
DURATION=${DURATION:-6}
SKIP_BUILD=${SKIP_BUILD:-0}
UP_PORT=18080
GW_PORT=18445
GW_ADMIN=19902
CERT=/tmp/bench-cert.pem
KEY=/tmp/bench-key.pem
GATEWAY=${GATEWAY:-$ROOT/target/dist/gateway}

die() { echo "plugins.sh: $*" >&2; exit 1; }
for v in ROUNDS DURATION CALLS; do [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"; done

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
if [[ $SKIP_BUILD != 1 ]]; then
  timeout 1800 cargo build --profile dist -p gateway
  timeout 1800 plugins/build.sh >/dev/null
  if [[ $PART != chains ]]; then timeout 1800 plugins/build.sh --python --js >/dev/null; fi
fi
[[ -x $GATEWAY ]] || die "$GATEWAY not found"
[[ -z $BASE || -x $BASE ]] || die "BASE=$BASE is not an executable"
[[ -f plugins/dist/noop.wasm ]] || die "plugins/dist/noop.wasm not found: run plugins/build.sh"
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# The per-call cost of one plugin with one gateway build: "req_cpu req_wall req_fuel resp_cpu
# resp_wall resp_fuel" (microseconds, fuel units).
one_call() {
  local gw="$1" plugin="$2" path="$3" line
  line=$("$gw" plugin check "plugins/dist/$plugin.wasm" --path "$path" --calls "$CALLS" \
    --memory-limit-bytes 67108864 2>/dev/null | grep " calls  on-request ") ||
    die "$plugin $path failed with $gw"
  # "  N calls  on-request A us CPU, B us wall, fuel C; on-response D us CPU, E us wall, fuel F (...)"
  sed -E 's/.*on-request ([0-9.]+) us CPU, ([0-9.]+) us wall, fuel ([0-9-]+); on-response ([0-9.]+) us CPU, ([0-9.]+) us wall, fuel ([0-9-]+).*/\1 \2 \3 \4 \5 \6/' <<<"$line"
}

per_call() {
  for p in $PLUGINS; do
    [[ -f plugins/dist/$p.wasm ]] || die "plugins/dist/$p.wasm not found: run plugins/build.sh --all"
  done
  local work builds=("$GATEWAY") b p path round
  work=$(mktemp -d /tmp/bench-calls.XXXXXX)
  [[ -n $BASE ]] && builds+=("$BASE")
  for round in $(seq "$ROUNDS"); do
    for p in $PLUGINS; do
      for path in /hello /other; do
        # Builds interleaved, so both see the same machine.
        for b in "${!builds[@]}"; do
          one_call "${builds[$b]}" "$p" "$path" >>"$work/$b-$p-${path#/}"
        done
      done
    done
    echo "  calls: round $round of $ROUNDS done" >&2
  done
  col() { awk -v c="$1" '{print $c}' "$2"; }
  ratio() { awk -v a="$(col "$1" "$2" | median)" -v z="$(col "$1" "$3" | median)" 'BEGIN{printf "%.3f", a/z}'; }
  echo
  for b in "${!builds[@]}"; do
    echo "per hook call, ${builds[$b]} ($("${builds[$b]}" --version)), $CALLS calls per hook, medians (smallest) of $ROUNDS round(s), nproc $(nproc):"
    printf '%-13s %-7s %20s %10s %20s %10s\n' plugin path "on-request CPU us" fuel "on-response CPU us" fuel
    for p in $PLUGINS; do
      for path in /hello /other; do
        f="$work/$b-$p-${path#/}"
        printf '%-13s %-7s %20s %10s %20s %10s\n' "$p" "$path" \
          "$(col 1 "$f" | median) ($(col 1 "$f" | sort -g | head -1))" "$(col 3 "$f" | median)" \
          "$(col 4 "$f" | median) ($(col 4 "$f" | sort -g | head -1))" "$(col 6 "$f" | median)"
      done
    done
  done
  if [[ -n $BASE ]]; then
    echo "ratio of CPU per call, $GATEWAY / $BASE (medians):"
    for p in $PLUGINS; do
      for path in /hello /other; do
        printf '  %-13s %-7s on-request %s, on-response %s\n' "$p" "$path" \
          "$(ratio 1 "$work/0-$p-${path#/}" "$work/1-$p-${path#/}")" \
          "$(ratio 4 "$work/0-$p-${path#/}" "$work/1-$p-${path#/}")"
      done
    done
  fi
  rm -rf "$work"
}

if [[ $PART == calls ]]; then
  per_call
  exit 0
fi

need nginx nginx-light wrk wrk openssl openssl
self_signed_cert

WORK=$(mktemp -d /tmp/bench-plugins.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

{
  cat <<EOF
[server]
worker_threads = 1
[logging]
level = "warn"
access_log = false
[proxy]
forwarded = "none"
[admin]
bind = "127.0.0.1:$GW_ADMIN"
$(https_listener_toml)
[[upstreams]]
name = "store"
backends = ["127.0.0.1:$UP_PORT"]
pool_max_idle_per_backend = 256
EOF
  for i in 1 2 3 4 5; do
    printf '[[plugins]]\nname = "noop%s"\npath = "%s"\ninstances = 8\n' "$i" "$ROOT/plugins/dist/noop.wasm"
  done
  for n in 0 1 3 5; do
    chain=""
    for ((i = 1; i <= n; i++)); do chain+="\"noop$i\","; done
    printf '[[routes]]\nname = "p%s"\npath_prefix = "/p%s"\nupstream = "store"\nplugins = [%s]\n' "$n" "$n" "${chain%,}"
  done
} >"$WORK/gateway.toml"
"$GATEWAY" check --config "$WORK/gateway.toml" >/dev/null

timeout -k 5 3600 nginx -e /tmp/bench-up.err -c "$ROOT/bench/nginx/nginx-upstream.conf" &
PIDS+=($!)
timeout -k 5 3600 "$GATEWAY" run --config "$WORK/gateway.toml" >"$WORK/gw.log" 2>&1 &
PIDS+=($!)
wait_up "https://127.0.0.1:$GW_PORT/p5" "$WORK/gw.log"

# wrk's latency lines print units (us, ms, s); convert to microseconds.
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000000} else print v}'; }
for round in $(seq "$ROUNDS"); do
  for n in 0 1 3 5; do
    out=$(timeout $((DURATION + 30)) wrk -t1 -c1 -d"${DURATION}s" --latency "https://127.0.0.1:$GW_PORT/p$n/")
    echo "$out" | awk '$1=="50%"{print $2}' | to_us >>"$WORK/p50_$n"
    echo "$out" | awk '$1=="99%"{print $2}' | to_us >>"$WORK/p99_$n"
    out=$(timeout $((DURATION + 30)) wrk -t1 -c64 -d"${DURATION}s" "https://127.0.0.1:$GW_PORT/p$n/")
    echo "$out" | awk '/^Requests\/sec/{print $2}' >>"$WORK/rps_$n"
    echo "  round $round  /p$n  p50 $(tail -1 "$WORK/p50_$n") us  rps $(tail -1 "$WORK/rps_$n")"
  done
done

base_p50=$(median <"$WORK/p50_0")
base_rps=$(median <"$WORK/rps_0")
echo
echo "gateway $("$GATEWAY" --version), 1 worker, nproc $(nproc); medians of $ROUNDS round(s) x ${DURATION}s; no-op plugins, 2 calls per plugin per request"
printf '%-8s %12s %12s %22s %12s %10s\n' chain "p50 us" "p99 us" "added p50/plugin call" "req/s" "rps ratio"
for n in 0 1 3 5; do
  p50=$(median <"$WORK/p50_$n"); p99=$(median <"$WORK/p99_$n"); rps=$(median <"$WORK/rps_$n")
  if ((n == 0)); then per="-"; else per=$(awk -v a="$p50" -v b="$base_p50" -v n="$n" 'BEGIN{printf "%.2f us", (a-b)/(2*n)}'); fi
  ratio=$(awk -v a="$rps" -v b="$base_rps" 'BEGIN{printf "%.3f", a/b}')
  printf '%-8s %12s %12s %22s %12s %10s\n' "$n" "$p50" "$p99" "$per" "$rps" "$ratio"
done

# One hook call as the gateway measures it (bucket upper bounds, so an upper estimate).
metrics=$(curl -s "http://127.0.0.1:$GW_ADMIN/metrics")
total=$(echo "$metrics" | awk '/^gateway_plugin_hook_duration_seconds_count/ {t += $2} END {print t + 0}')
echo "$metrics" | awk '/^gateway_plugin_hook_duration_seconds_bucket/ && !/le="\+Inf"/ {
    match($0, /le="[^"]*"/); cum[substr($0, RSTART + 4, RLENGTH - 5) + 0] += $2 } END { for (k in cum) print k, cum[k] }' |
  sort -g | awk -v total="$total" '
    !p50 && $2 >= total * 0.5 { p50 = $1 }
    !p99 && $2 >= total * 0.99 { p99 = $1 }
    END { printf "one hook call (gateway histogram, %d calls): p50 <= %.1f us, p99 <= %.1f us\n", total, p50 * 1e6, p99 * 1e6 }'

if [[ $PART == all ]]; then
  per_call
fi
