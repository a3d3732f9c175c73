#!/usr/bin/env bash
# Builds every plugin (and the test fixtures) as WebAssembly components for wasm32-wasip2 and
# copies them to plugins/dist/<name>.wasm. Extra arguments go to `cargo build`
# (e.g. `plugins/build.sh --locked`, or `-p hygiene` to build one plugin).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

target=wasm32-wasip2
plugins=(hygiene ratelimit canary storefront noop hostile wrong-world)

if ! rustup target list --installed | grep -qx "$target"; then
    echo "build.sh: installing the $target target" >&2
    rustup target add "$target"
fi

cargo build --release --target "$target" "$@"

# The plugins workspace's own target dir (never the repository root's), unless overridden.
target_dir="${CARGO_TARGET_DIR:-$here/target}"
case "$target_dir" in /*) ;; *) target_dir="$here/$target_dir" ;; esac
out="$target_dir/$target/release"

# With -p/--package only some plugins are built; otherwise all of them must be there.
partial=false
for arg in "$@"; do
    case "$arg" in -p | --package | -p* | --package=*) partial=true ;; esac
done

mkdir -p dist
copied=0
for name in "${plugins[@]}"; do
    src="$out/${name//-/_}.wasm"
    if [[ ! -f "$src" ]]; then
        if $partial; then continue; fi
        echo "build.sh: error: $src was not built" >&2
        exit 1
    fi
    # A component starts with \0asm then version 0x0d 0x00 and layer 0x01 0x00; a core
    # module has 01 00 00 00 there. Only components can be loaded by the gateway.
    magic="$(head -c 8 "$src" | od -An -tx1 | tr -d ' \n')"
    if [[ "$magic" != "0061736d0d000100" ]]; then
        if [[ "$magic" == "0061736d01000000" ]]; then
            echo "build.sh: error: $src is a core wasm module, not a component" >&2
        else
            echo "build.sh: error: $src is not a wasm component (starts with $magic)" >&2
        fi
        exit 1
    fi
    cp "$src" "dist/$name.wasm"
    printf '%-16s %8d bytes  dist/%s.wasm\n' "$name" "$(wc -c <"$src")" "$name"
    copied=$((copied + 1))
done

if [[ $copied -eq 0 ]]; then
    echo "build.sh: error: no plugin was built" >&2
    exit 1
fi
