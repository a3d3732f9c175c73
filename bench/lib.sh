# Shared by the benchmarks (bench/overload.sh, bench/soak.sh, bench/upgrade.sh, bench/plugins.sh);
# sourced, not run. The caller sets GATEWAY and SKIP_BUILD (and CERT and KEY for
# self_signed_cert and https_listener_toml, GW_PORT for the latter) and defines die().

# Installs the Debian packages whose commands are missing: pairs of "command package".
need() {
  local missing=() cmd pkg
  while (($#)); do
    cmd=$1 pkg=$2
    shift 2
    command -v "$cmd" >/dev/null || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Builds the release gateway and the plugins unless SKIP_BUILD=1, then checks that GATEWAY
# and the named plugins exist.
build_gateway_and_plugins() {
  if [[ $SKIP_BUILD != 1 ]]; then
    timeout 1800 cargo build --release --locked -p gateway
    timeout 1800 plugins/build.sh >/dev/null
  fi
  [[ -x $GATEWAY ]] || die "$GATEWAY not found"
  local p
  for p in "$@"; do
    [[ -f plugins/dist/$p.wasm ]] || die "plugins/dist/$p.wasm not found: run plugins/build.sh"
  done
}

# Writes a self-signed certificate for localhost to CERT and KEY unless both exist.
self_signed_cert() {
  if [[ ! -s $CERT || ! -s $KEY ]]; then
    timeout 60 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$KEY" -out "$CERT" -days 30 -subj /CN=localhost 2>/dev/null
  fi
}

# Prints the gateway config of a TLS listener "https" on 127.0.0.1:GW_PORT serving CERT and KEY
# for localhost.
https_listener_toml() {
  cat <<EOF
[[tls.certificates]]
cert = "$CERT"
key = "$KEY"
server_names = ["localhost"]
[[listeners]]
name = "https"
bind = "127.0.0.1:$GW_PORT"
EOF
}

# Waits up to 10 s for URL to answer, then dies with the end of LOG (the gateway's output)
# unless it answers without an error status.
wait_up() {
  local url=$1 log=$2
  for _ in $(seq 100); do curl -sk -o /dev/null "$url" && break; sleep 0.1; done
  curl -skf -o /dev/null "$url" || die "gateway did not come up: $(tail -5 "$log")"
}
