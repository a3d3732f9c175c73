#!/usr/bin/env bash
# On-demand benchmark, not part of CI: the gateway against nginx as TLS reverse proxies in front
# of the same nginx upstream, on loopback, in one invocation.
#
#   bench/proxy.sh                          # 4 rounds of 8 s per tool and proxy
#   ROUNDS=1 DURATION=3 SKIP_BUILD=1 bench/proxy.sh
#
# Environment: ROUNDS (4; even, so each proxy runs first equally often), DURATION seconds per run (8), CONNS client connections (64),
# STREAMS concurrent h2 streams per connection (10), SKIP_BUILD=1 to use the existing
# target/dist/gateway.
#
# Peers, all on 127.0.0.1 and all with one worker:
#   18080  nginx upstream, a small JSON answer      bench/nginx/nginx-upstream.conf
#   18443  nginx proxy, TLS, HTTP/1.1 and h2         bench/nginx/nginx-proxy.conf (also 18081 plain)
#   18444  gateway, TLS, HTTP/1.1 and h2             bench/gateway-bench.toml (admin on 19901)
# Load: `wrk -t1 -c64 --latency` (HTTP/1.1 over TLS, keep-alive) and `h2load -t1 -c64 -m10`
# (h2 over TLS); each pair of runs alternates which proxy goes first. Printed: req/s, p50/p99
# latency and the proxy's CPU time per request, the median over the rounds, and gateway/nginx
# ratios. h2load prints no percentiles, so
# they are computed from its --log-file (per-request duration in microseconds, 3rd column).
# Logs stay in /tmp for a look afterwards: bench-gw.log, bench-up.err, bench-px.err.
# The client, the proxies and the upstream share the machine's cores: compare the two proxies
# within one invocation, not absolute figures across machines.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-8}
CONNS=${CONNS:-64}
STREAMS=${STREAMS:-10}
SKIP_BUILD=${SKIP_BUILD:-0}

UP_PORT=18080
NGINX_PLAIN_PORT=18081
NGINX_PORT=18443
GW_PORT=18444
GW_ADMIN_PORT=19901
CERT=/tmp/bench-cert.pem
KEY=/tmp/bench-key.pem
GW_LOG=/tmp/bench-gw.log
GATEWAY=$ROOT/target/dist/gateway

die() { echo "proxy.sh: $*" >&2; exit 1; }

for v in ROUNDS DURATION CONNS STREAMS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done

# --- tools -------------------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}: install them or run as root"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get"
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
NGINX_VERSION=$(nginx -v 2>&1 | sed 's/^nginx version: //')

# --- gateway -----------------------------------------------------------------------------------
if [[ $SKIP_BUILD != 1 ]]; then
  timeout 1800 cargo build --profile dist -p gateway
fi
[[ -x $GATEWAY ]] || die "$GATEWAY not found (build it or unset SKIP_BUILD)"
GW_VERSION=$("$GATEWAY" --version)

# --- certificate -------------------------------------------------------------------------------
if [[ ! -s $CERT || ! -s $KEY ]]; then
  timeout 60 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$KEY" -out "$CERT" -days 30 -subj /CN=localhost 2>/dev/null
fi
"$GATEWAY" check --config bench/gateway-bench.toml >/dev/null

# --- start the peers ---------------------------------------------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for p in $UP_PORT $NGINX_PLAIN_PORT $NGINX_PORT $GW_PORT $GW_ADMIN_PORT; do
  ! port_open "$p" || die "127.0.0.1:$p is already in use (a previous run still going?)"
done

WORK=$(mktemp -d /tmp/bench-proxy.XXXXXX)
PIDS=()
TOOL_PID=
cleanup() {
  local pid i
  [[ -z $TOOL_PID ]] || kill -TERM "$TOOL_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do # still there after 5 s: the peer under timeout, then timeout
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Every peer dies on its own after this long, even if this script is killed outright.
LIFETIME=$((ROUNDS * 4 * (DURATION + 10) + 120))
: >/tmp/bench-up.err
: >/tmp/bench-px.err
timeout -k 5 "$LIFETIME" nginx -e /tmp/bench-up.err -c "$ROOT/bench/nginx/nginx-upstream.conf" \
  >"$WORK/nginx-up.out" 2>&1 &
PIDS+=($!); UP_PID=$!
timeout -k 5 "$LIFETIME" nginx -e /tmp/bench-px.err -c "$ROOT/bench/nginx/nginx-proxy.conf" \
  >"$WORK/nginx-px.out" 2>&1 &
PIDS+=($!); NGINX_PID=$!
timeout -k 5 "$LIFETIME" "$GATEWAY" run --config bench/gateway-bench.toml >"$GW_LOG" 2>&1 &
PIDS+=($!); GW_PID=$!

wait_port() { # port pid log name
  local i
  for ((i = 0; i < 100; i++)); do
    port_open "$1" && return 0
    kill -0 "$2" 2>/dev/null || { tail -20 "$3" >&2; die "$4 exited before listening on :$1"; }
    sleep 0.1
  done
  tail -20 "$3" >&2
  die "$4 not listening on :$1 after 10 s"
}
wait_port $UP_PORT $UP_PID /tmp/bench-up.err "nginx upstream"
wait_port $NGINX_PORT $NGINX_PID /tmp/bench-px.err "nginx proxy"
wait_port $GW_PORT $GW_PID "$GW_LOG" "gateway"

alive() { # name pid log
  kill -0 "$2" 2>/dev/null || { tail -20 "$3" >&2; die "$1 died during the benchmark"; }
}
check_all_alive() {
  alive "nginx upstream" $UP_PID /tmp/bench-up.err
  alive "nginx proxy" $NGINX_PID /tmp/bench-px.err
  alive "gateway" $GW_PID "$GW_LOG"
}

# Both proxies must answer 2xx over both protocols before anything is measured.
sanity() { # name port
  local proto flag out
  for proto in h2 http/1.1; do
    flag=(); [[ $proto == h2 ]] || flag=(--h1)
    out=$(timeout 20 h2load "${flag[@]}" -n 20 -c 1 "https://127.0.0.1:$2/" 2>&1) || true
    if ! grep -q '20 succeeded' <<<"$out" || ! grep -q 'status codes: 20 2xx' <<<"$out" ||
       ! grep -qi "application protocol: $proto" <<<"$out"; then
      echo "$out" >&2
      die "$1 on :$2 does not answer 20 requests with 2xx over $proto"
    fi
  done
}
sanity nginx $NGINX_PORT
sanity gateway $GW_PORT

# --- measure -----------------------------------------------------------------------------------
RESULTS=$WORK/results # tool proxy round rps p50_ms p99_ms errors requests cpu_percent cpu_us_per_request
: >"$RESULTS"

CLK_TCK=$(getconf CLK_TCK)
tree_ticks() { # pid: CPU ticks (user + system) used so far by pid and its descendants
  local t=0 c
  [[ -r /proc/$1/stat ]] && t=$(sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }')
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do t=$((t + $(tree_ticks "$c"))); done
  echo "$t"
}
proxy_pid() { if [[ $1 == nginx ]]; then echo $NGINX_PID; else echo $GW_PID; fi; }

measure() { # tool proxy round: one run, with the proxy's CPU use appended to its result line
  local pid t0 t1 w0 w1 line
  pid=$(proxy_pid "$2")
  t0=$(tree_ticks "$pid"); w0=$(date +%s.%N)
  "run_$1" "$2" "$3"
  t1=$(tree_ticks "$pid"); w1=$(date +%s.%N)
  line=$(tail -1 "$RESULTS")
  sed -i '$d' "$RESULTS"
  awk -v l="$line" -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v w0="$w0" -v w1="$w1" \
    'BEGIN { split(l, f, " ")
             printf "%s %.0f %.2f\n", l, 100 * t / hz / (w1 - w0), (f[8] > 0 ? t / hz * 1e6 / f[8] : 0) }' \
    >>"$RESULTS"
}

# Runs a load generator bounded in time; in the background, so that INT/TERM act at once.
bounded() { # seconds command...
  local rc=0
  timeout "$@" &
  TOOL_PID=$!
  wait "$TOOL_PID" || rc=$?
  TOOL_PID=
  return "$rc"
}

port_of() { if [[ $1 == nginx ]]; then echo $NGINX_PORT; else echo $GW_PORT; fi; }

run_wrk() { # proxy round
  local out=$WORK/wrk-$1-$2.txt
  if ! bounded $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
      "https://127.0.0.1:$(port_of "$1")/" >"$out" 2>&1; then
    cat "$out" >&2; die "wrk against $1 failed or timed out"
  fi
  awk -v proxy="$1" -v round="$2" '
    function ms(v) {
      if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0
      if (v ~ /[0-9]m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return -1
    }
    /^Requests\/sec:/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { reqs = $1 }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) err += $i + 0 }
    END {
      if (rps == "" || p50 == "" || p99 == "") exit 1
      printf "wrk %s %s %s %.3f %.3f %d %d\n", proxy, round, rps, p50, p99, err, reqs
    }' "$out" >>"$RESULTS" || { cat "$out" >&2; die "cannot parse wrk output"; }
}

run_h2load() { # proxy round
  local out=$WORK/h2load-$1-$2.txt log=$WORK/h2load-$1-$2.log n p50 p99
  rm -f "$log" # h2load appends to an existing log file
  if ! bounded $((DURATION + 30)) h2load -t1 -c"$CONNS" -m"$STREAMS" -D "$DURATION" \
      --log-file="$log" "https://127.0.0.1:$(port_of "$1")/" >"$out" 2>&1; then
    cat "$out" >&2; die "h2load against $1 failed or timed out"
  fi
  read -r n p50 p99 < <(cut -f3 "$log" | sort -n | awk '
    { v[NR] = $1 }
    END {
      if (NR == 0) { print 0, -1, -1; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
      i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
      printf "%d %.3f %.3f\n", NR, v[i50] / 1000, v[i99] / 1000
    }')
  rm -f "$log"
  awk -v proxy="$1" -v round="$2" -v p50="$p50" -v p99="$p99" '
    /^finished in/ { rps = $4 }
    /^requests:/ { reqs = $2; for (i = 1; i < NF; i++) if ($(i + 1) ~ /^(failed|errored|timeout)/) err += $i }
    /^status codes:/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^[345]xx/) err += $i }
    END {
      if (rps == "" || p50 < 0) exit 1
      printf "h2load %s %s %s %s %s %d %d\n", proxy, round, rps, p50, p99, err, reqs
    }' "$out" >>"$RESULTS" || { cat "$out" >&2; die "cannot parse h2load output"; }
}

echo "proxy benchmark: $ROUNDS round(s) x ${DURATION}s per tool and proxy, $CONNS connections," \
  "h2 x$STREAMS streams; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for ((round = 1; round <= ROUNDS; round++)); do
  first=$round
  for tool in wrk h2load; do
    # Which proxy runs first alternates from round to round for each tool (an even ROUNDS gives
    # each order equally often): the second run of a pair can find the machine warmer or busier.
    if ((first % 2 == 1)); then order=(nginx gateway); else order=(gateway nginx); fi
    first=$((first + 1))
    for proxy in "${order[@]}"; do
      measure "$tool" "$proxy" "$round"
      check_all_alive
      awk '{ printf "  round %s  %-6s %-7s %10.1f req/s  p50 %7.3f ms  p99 %7.3f ms  proxy CPU %3d%% %6.2f us/req  errors %d of %d\n",
             $3, $1, $2, $4, $5, $6, $9, $10, $7, $8 }' < <(tail -1 "$RESULTS")
      sleep 1
    done
  done
done

# --- report ------------------------------------------------------------------------------------
median() { # tool proxy column
  awk -v t="$1" -v p="$2" -v c="$3" '$1 == t && $2 == p { print $c }' "$RESULTS" | sort -g | awk '
    { v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
paired() { # tool column: median over rounds of gateway/nginx, each round's pair run back to back
  awk -v t="$1" -v c="$2" '$1 == t { v[$2, $3] = $c; r[$3] = 1 }
    END { for (k in r) if (v["nginx", k] > 0) print v["gateway", k] / v["nginx", k] }' "$RESULTS" |
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2];
      else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
total() { awk -v t="$1" -v p="$2" -v c="$3" '$1 == t && $2 == p { s += $c } END { print s + 0 }' "$RESULTS"; }

echo
echo "nproc $(nproc), $NGINX_VERSION, $GW_VERSION; 1 worker each; loopback TLS;" \
  "medians of $ROUNDS round(s) x ${DURATION}s"
fmt="%-17s %11s %13s %9s %13s %17s %19s %9s %12s %17s %10s %12s\n"
printf "$fmt" "tool/protocol" "nginx req/s" "gateway req/s" "rps gw/ng" "paired gw/ng" \
  "nginx p50/p99 ms" "gateway p50/p99 ms" "p99 gw/ng" "CPU% ng/gw" "CPU us/req ng/gw" \
  "us/req g/n" "errors ng/gw"
for tool in wrk h2load; do
  if [[ $tool == wrk ]]; then label="wrk HTTP/1.1+TLS"; else label="h2load h2+TLS"; fi
  n_rps=$(median $tool nginx 4); g_rps=$(median $tool gateway 4)
  n50=$(median $tool nginx 5); n99=$(median $tool nginx 6)
  g50=$(median $tool gateway 5); g99=$(median $tool gateway 6)
  n_err=$(total $tool nginx 7); g_err=$(total $tool gateway 7)
  n_cpu=$(median $tool nginx 9); g_cpu=$(median $tool gateway 9)
  n_us=$(median $tool nginx 10); g_us=$(median $tool gateway 10)
  read -r rps_ratio p99_ratio us_ratio < <(awk -v a="$g_rps" -v b="$n_rps" -v c="$g99" \
    -v d="$n99" -v e="$g_us" -v f="$n_us" \
    'BEGIN { printf "%.2f %.2f %.2f\n", (b > 0 ? a / b : 0), (d > 0 ? c / d : 0), (f > 0 ? e / f : 0) }')
  printf "$fmt" "$label" "$(printf %.0f "$n_rps")" "$(printf %.0f "$g_rps")" "$rps_ratio" \
    "$(printf '%.2f' "$(paired $tool 4)")" "$(printf '%.2f / %.2f' "$n50" "$n99")" "$(printf '%.2f / %.2f' "$g50" "$g99")" \
    "$p99_ratio" "$(printf '%.0f / %.0f' "$n_cpu" "$g_cpu")" \
    "$(printf '%.2f / %.2f' "$n_us" "$g_us")" "$us_ratio" "$n_err / $g_err"
done
for tool in wrk h2load; do
  # Round by round: the spread of the req/s ratio, and in how many rounds the gateway's p99 was
  # at or below nginx's.
  awk -v t="$tool" '$1 == t { rps[$2, $3] = $4; p99[$2, $3] = $6; r[$3] = 1 }
    END {
      n = 0; le = 0; lo = 1e9; hi = 0
      for (k in r) if (rps["nginx", k] > 0 && p99["nginx", k] > 0) {
        x = rps["gateway", k] / rps["nginx", k]; n++
        if (x < lo) lo = x; if (x > hi) hi = x
        if (p99["gateway", k] <= p99["nginx", k]) le++
      }
      if (n) printf "%-6s per round: gw/ng req/s from %.2f to %.2f; gateway p99 <= nginx p99 in %d of %d rounds\n", t, lo, hi, le, n
    }' "$RESULTS"
done
echo "(paired gw/ng: the median over rounds of the req/s ratio within a round, where the two" \
  "runs are back to back; it drifts less than the ratio of medians when the machine's speed" \
  "changes between rounds."
echo " CPU%: the proxy's processes, 100 = one core. CPU us/req: their user + system CPU time" \
  "per answered request, the cost that decides throughput at one worker and the figure least" \
  "moved by other load on the machine; below 1.00 the gateway is cheaper. errors: wrk non-2xx/3xx answers and socket" \
  "errors, h2load failed/errored/timed-out requests and non-2xx answers, summed over the rounds)"

gw_problems=$(awk '/WARN|ERROR/ { n++ } END { print n + 0 }' "$GW_LOG")
ng_problems=$(awk 'END { print NR }' /tmp/bench-px.err)
echo "gateway log: $gw_problems warning/error line(s) in $GW_LOG;" \
  "nginx proxy: $ng_problems line(s) in /tmp/bench-px.err"
if ((gw_problems > 0)); then
  echo "gateway warnings/errors, by count (colour codes and timestamps removed):"
  sed 's/\x1b\[[0-9;]*m//g' "$GW_LOG" | awk '/WARN|ERROR/' | sed -E 's/^[0-9T:.Z-]+ +//' |
    sort | uniq -c | sort -rn | head -10 | sed 's/^/  /'
fi
