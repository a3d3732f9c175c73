#!/usr/bin/env bash
# On-demand measurement, not part of CI: time from the start of an upload to the first request
# served by the new version, for a plugin and for a ~100 MB model, through `gateway plugin
# push` / `gateway model push` against a running dist-profile gateway on loopback.
#
#   bench/upload.sh                  # 3 rounds each
#   ROUNDS=1 SKIP_BUILD=1 bench/upload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
GATEWAY=$ROOT/target/dist/gateway
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  cargo build --profile dist -p gateway
  plugins/build.sh >/dev/null
fi
command -v curl >/dev/null || { echo "upload.sh: curl is needed" >&2; exit 1; }

WORK=$(mktemp -d /tmp/bench-upload.XXXXXX)
PID=
cleanup() { [[ -n $PID ]] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$WORK/key.pem" \
  -out "$WORK/cert.pem" -days 2 -subj /CN=localhost 2>/dev/null
echo "bench-token" >"$WORK/admin.token"
"$GATEWAY" model sample --kind embedding --items 1000 --dim 128 --users 100 --seed 1 --out "$WORK/small.safetensors" >/dev/null
for i in $(seq "$ROUNDS"); do
  "$GATEWAY" model sample --kind embedding --items 200000 --dim 128 --users 1000 --seed $((i + 10)) --out "$WORK/big$i.safetensors" >/dev/null
done
cat >"$WORK/gateway.toml" <<TOML
[server]
watch_files = false
[logging]
level = "warn"
access_log = false
[proxy]
version_headers = true
[admin]
bind = "127.0.0.1:19903"
token_file = "admin.token"
[[tls.certificates]]
cert = "cert.pem"
key = "key.pem"
[[listeners]]
name = "https"
bind = "127.0.0.1:18446"
[[upstreams]]
name = "up"
backends = ["127.0.0.1:19904"]
[[routes]]
name = "all"
upstream = "up"
plugins = ["p"]
plugin_failure = "fail-open"
[[plugins]]
name = "p"
path = "$ROOT/plugins/dist/noop.wasm"
[[models]]
name = "recs"
path = "small.safetensors"
[store]
dir = "store"
TOML
timeout -k 5 600 "$GATEWAY" run --config "$WORK/gateway.toml" >"$WORK/gw.log" 2>&1 &
PID=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:19903/healthz && break; sleep 0.1; done
ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
push() { "$GATEWAY" "$1" push "$2" --name "$3" --admin http://127.0.0.1:19903 --token-file "$WORK/admin.token" 2>/dev/null | tail -1; }

for i in $(seq "$ROUNDS"); do
  wasm=$ROOT/plugins/dist/hygiene.wasm; [[ $((i % 2)) == 0 ]] && wasm=$ROOT/plugins/dist/noop.wasm
  want=$(sha256sum "$wasm" | cut -c1-12)
  t0=$(ms); push plugin "$wasm" p >/dev/null
  until curl -sk -D - -o /dev/null https://127.0.0.1:18446/ | grep -qi "x-plugin-versions: p@$want"; do :; done
  echo $(( $(ms) - t0 )) >>"$WORK/plugin"
  want=$(sha256sum "$WORK/big$i.safetensors" | cut -c1-12)
  t0=$(ms); push model "$WORK/big$i.safetensors" recs >/dev/null
  until curl -sk -D - -o /dev/null -d '{"user": 1, "k": 5}' https://127.0.0.1:18446/_gateway/models/recs/topk | grep -qi "x-model-version: $want"; do :; done
  echo $(( $(ms) - t0 )) >>"$WORK/model"
  echo "round $i: plugin $(tail -1 "$WORK/plugin") ms, model $(tail -1 "$WORK/model") ms"
done
size=$(stat -c %s "$WORK/big1.safetensors")
echo
echo "upload -> first request served by the new version (median of $ROUNDS, nproc $(nproc), dist build, loopback)"
echo "  plugin ($(stat -c %s "$ROOT/plugins/dist/hygiene.wasm") bytes):  $(median <"$WORK/plugin") ms"
echo "  model  ($size bytes):  $(median <"$WORK/model") ms"
grep -iE "error|panic" "$WORK/gw.log" | head -5 || true
