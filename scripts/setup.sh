#!/usr/bin/env bash
# Installs what building and testing the gateway needs on a fresh Debian machine with rustup.
# Idempotent; safe to run again. Used by .ci/run.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi

# Debian packages the test suite needs: a C compiler for ring, and Mesa's Vulkan drivers for
# lavapipe (software Vulkan), so the scoring kernels really run (and are tested) without a GPU.
packages=()
command -v cc >/dev/null 2>&1 || packages+=(gcc)
dpkg-query -W -f='${Status}' mesa-vulkan-drivers 2>/dev/null | grep -q "install ok installed" ||
  packages+=(mesa-vulkan-drivers)
# promtool (Debian package prometheus) checks and unit-tests config/prometheus/alerts.yml and
# parses the PromQL of config/grafana/dashboard.json (tests/alert_rules_and_dashboard_check.rs).
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
# testssl.sh scans the TLS listener (tests/tls_scan_finds_nothing_the_config_controls.rs).
command -v testssl >/dev/null 2>&1 || packages+=(testssl.sh)
# The distribution registry (Debian package docker-registry): plugins and models pulled from
# and published to an OCI registry are tested against a real one on loopback
# (tests/artifacts_pull_from_an_oci_registry.rs).
command -v docker-registry >/dev/null 2>&1 || packages+=(docker-registry)
# Headless Chromium and its WebDriver: the status page is tested in a real browser.
dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "install ok installed" ||
  packages+=(chromium)
dpkg-query -W -f='${Status}' chromium-driver 2>/dev/null | grep -q "install ok installed" ||
  packages+=(chromium-driver)
# The Python and JavaScript example plugins (plugins/python, plugins/js) are built by the test
# suite with componentize-py (PyPI, in a virtual environment) and componentize-js (npm).
command -v python3 >/dev/null 2>&1 || packages+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)
# systemd-analyze verifies config/systemd/gateway.service and scores its sandboxing
# (tests/deployment_files_validate.rs).
command -v systemd-analyze >/dev/null 2>&1 || packages+=(systemd)
if [ "${#packages[@]}" -gt 0 ]; then
  apt_prefix=()
  [ "$(id -u)" -eq 0 ] || apt_prefix=(sudo)
  "${apt_prefix[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${apt_prefix[@]}" apt-get install -y -qq "${packages[@]}"
fi

# Plugins are WebAssembly components built for wasm32-wasip2.
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

cargo fetch --locked
# The first-party plugins (the demo runs them; the tests build them too if missing).
"$(dirname "$0")/../plugins/build.sh" >/dev/null
# The pinned Python and JavaScript plugin toolchains (plugins/python/requirements.txt,
# plugins/js/package-lock.json); the tests build those plugins with them.
"$(dirname "$0")/../plugins/build.sh" --tools
# The deployment files' checkers, pinned (tests/deployment_files_validate.rs): kubernetes-validate
# and hadolint from PyPI in the virtual environment scripts/deploy-check/.venv
# (requirements.txt), the PodMonitor's schema from npm in scripts/deploy-check/node_modules
# (package-lock.json). Installed again only when a pin changed.
deploy_check="$(dirname "$0")/deploy-check"
if [[ ! -x "$deploy_check/.venv/bin/kubernetes-validate" ]] ||
  [[ "$deploy_check/requirements.txt" -nt "$deploy_check/.venv/bin/kubernetes-validate" ]]; then
  echo "setup: installing kubernetes-validate and hadolint (scripts/deploy-check/requirements.txt)" >&2
  python3 -m venv "$deploy_check/.venv"
  "$deploy_check/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$deploy_check/requirements.txt"
  touch "$deploy_check/.venv/bin/kubernetes-validate"
fi
if [[ ! -d "$deploy_check/node_modules/@kubernetes-models/prometheus-operator" ]] ||
  [[ "$deploy_check/package-lock.json" -nt "$deploy_check/node_modules/.package-lock.json" ]]; then
  echo "setup: installing the prometheus-operator schema (scripts/deploy-check/package-lock.json)" >&2
  (cd "$deploy_check" && npm ci --no-audit --no-fund --loglevel=error)
fi
