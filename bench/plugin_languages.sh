#!/usr/bin/env bash
# On-demand benchmark, not part of CI: what one hook call of the same plugin costs in Rust,
# Python and JavaScript (plugins/hello, plugins/python/hello, plugins/js/hello), with the
# no-op Rust plugin as the floor.
#
#   bench/plugin_languages.sh                    # 2000 calls per plugin and path
#   CALLS=500 SKIP_BUILD=1 bench/plugin_languages.sh
#   GATEWAY=/path/to/gateway SKIP_BUILD=1 bench/plugin_languages.sh
#
# Each plugin is run by `gateway plugin check --calls N`: the gateway's engine with default
# settings (64 MiB memory cap), one instance, on-request with `GET <path>` then on-response,
# N times after a first call; printed are the mean time of one hook call from the gateway's
# own histogram (gateway_plugin_hook_duration_seconds, instance checkout included) and the
# fuel it burned. Paths: /hello (the plugin answers, with a key-value increment and a
# counter) and /other (the plugin adds a header and lets the request through). Compare within
# one run on one machine; absolute figures drift with load.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CALLS=${CALLS:-2000}
SKIP_BUILD=${SKIP_BUILD:-0}
GATEWAY=${GATEWAY:-$ROOT/target/dist/gateway}

die() { echo "plugin_languages.sh: $*" >&2; exit 1; }
[[ $CALLS =~ ^[1-9][0-9]*$ ]] || die "CALLS must be a positive integer"
if [[ $SKIP_BUILD != 1 ]]; then
  timeout 1800 cargo build --profile dist -p gateway
  timeout 1800 plugins/build.sh >/dev/null
  timeout 1800 plugins/build.sh --python --js >/dev/null
fi
[[ -x $GATEWAY ]] || die "$GATEWAY not found"
for p in noop hello python-hello js-hello; do
  [[ -f plugins/dist/$p.wasm ]] || die "plugins/dist/$p.wasm not found: run plugins/build.sh --all"
done

printf '%-14s %-7s %12s %12s %12s %12s\n' plugin path "req us" "req fuel" "resp us" "resp fuel"
for p in noop hello python-hello js-hello; do
  for path in /hello /other; do
    line=$("$GATEWAY" plugin check "plugins/dist/$p.wasm" --path "$path" --calls "$CALLS" \
      --memory-limit-bytes 67108864 2>/dev/null | grep " calls  ") || die "$p $path failed"
    # "  N calls  on-request A us, fuel B; on-response C us, fuel D (...)"
    read -r req_us req_fuel resp_us resp_fuel < <(sed -E \
      's/.*on-request ([0-9.]+) us, fuel ([0-9]+); on-response ([0-9.]+) us, fuel ([0-9]+).*/\1 \2 \3 \4/' <<<"$line")
    printf '%-14s %-7s %12s %12s %12s %12s\n' "$p" "$path" "$req_us" "$req_fuel" "$resp_us" "$resp_fuel"
  done
done
