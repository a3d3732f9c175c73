#!/usr/bin/env bash
# Builds the plugins as WebAssembly components into plugins/dist/<name>.wasm:
#
#   plugins/build.sh                  every Rust plugin of this workspace (and the test
#                                     fixtures), wasm32-wasip2, release
#   plugins/build.sh -p hello         one Rust plugin (a workspace member); other arguments
#                                     go to `cargo build` (e.g. --locked)
#   plugins/build.sh --python         every Python plugin, plugins/python/<name>/app.py, with
#                                     componentize-py, into dist/python-<name>.wasm
#   plugins/build.sh --js             every JavaScript plugin, plugins/js/<name>/<name>.js,
#                                     with componentize-js, into dist/js-<name>.wasm
#   plugins/build.sh -p python/hello  one Python (or js/NAME: one JavaScript) plugin
#   plugins/build.sh --all            all of the above
#   plugins/build.sh --tools          only install the Python and JavaScript toolchains
#
# Python and JavaScript plugins are built with the tools' default options, against wit/.
# Their toolchains are pinned and installed on first use: plugins/python/requirements.txt
# (pip, in the virtual environment plugins/python/.venv) and plugins/js/package.json +
# package-lock.json (`npm ci`, into plugins/js/node_modules). A Python or JavaScript plugin whose output is
# newer than its sources, the WIT and the toolchain pins is not built again.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

target=wasm32-wasip2
wit="$here/../wit"

rust=true
tools=false
python=()
js=()
cargo_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) python+=(all); rust=false ;;
        --js) js+=(all); rust=false ;;
        --all) python+=(all); js+=(all) ;;
        --tools) tools=true; rust=false ;;
        -p | --package)
            [[ $# -ge 2 ]] || { echo "build.sh: $1 needs a plugin name" >&2; exit 2; }
            case "$2" in
                python/*) python+=("${2#python/}"); rust=false ;;
                js/*) js+=("${2#js/}"); rust=false ;;
                *) cargo_args+=("$1" "$2") ;;
            esac
            shift ;;
        -p* | --package=*)
            name="${1#-p}"; name="${name#--package=}"
            case "$name" in
                python/*) python+=("${name#python/}"); rust=false ;;
                js/*) js+=("${name#js/}"); rust=false ;;
                *) cargo_args+=("$1") ;;
            esac ;;
        *) cargo_args+=("$1") ;;
    esac
    shift
done
# Naming a Rust package with -p keeps the Rust build on.
for a in "${cargo_args[@]+"${cargo_args[@]}"}"; do
    case "$a" in -p | --package | -p* | --package=*) rust=true ;; esac
done

mkdir -p dist

# Checks that $1 is a component (not a core module) and copies it to dist/$2.wasm.
ship() {
    local src="$1" name="$2"
    # A component starts with \0asm then version 0x0d 0x00 and layer 0x01 0x00; a core
    # module has 01 00 00 00 there. Only components can be loaded by the gateway.
    local magic
    magic="$(head -c 8 "$src" | od -An -tx1 | tr -d ' \n')"
    if [[ "$magic" != "0061736d0d000100" ]]; then
        if [[ "$magic" == "0061736d01000000" ]]; then
            echo "build.sh: error: $src is a core wasm module, not a component" >&2
        else
            echo "build.sh: error: $src is not a wasm component (starts with $magic)" >&2
        fi
        exit 1
    fi
    if [[ "$src" != "dist/$name.wasm" ]]; then
        cp "$src" "dist/$name.wasm"
    fi
    printf '%-16s %9d bytes  dist/%s.wasm\n' "$name" "$(wc -c <"dist/$name.wasm")" "$name"
}

# Whether dist/$1.wasm is newer than every file given after it.
up_to_date() {
    local out="dist/$1.wasm"
    shift
    [[ -f "$out" ]] || return 1
    [[ -z "$(find "$@" -newer "$out" -print -quit 2>/dev/null)" ]]
}

if $rust; then
    if ! rustup target list --installed | grep -qx "$target"; then
        echo "build.sh: installing the $target target" >&2
        rustup target add "$target"
    fi
    # Every .wasm that cargo reports building is a plugin: the workspace's cdylib crates,
    # whatever their names, so a new member comes out without editing this script.
    log="$(mktemp)"
    trap 'rm -f "$log"' EXIT
    if ! cargo build --release --target "$target" --message-format=json-render-diagnostics \
        "${cargo_args[@]+"${cargo_args[@]}"}" >"$log"; then
        for a in "${cargo_args[@]+"${cargo_args[@]}"}"; do
            case "$a" in -p | --package | -p* | --package=*)
                echo "build.sh: a plugin named with -p must be a member of plugins/Cargo.toml's" \
                    "workspace (add its directory to \`members\`)" >&2 ;;
            esac
        done
        exit 1
    fi
    mapfile -t built < <(grep '"reason":"compiler-artifact"' "$log" |
        grep -o '"filenames":\[[^]]*\]' | grep -o '"[^"]*\.wasm"' | tr -d '"' | sort -u)
    if [[ ${#built[@]} -eq 0 ]]; then
        echo "build.sh: error: no plugin was built: a plugin crate needs" \
            "\`[lib] crate-type = [\"cdylib\"]\` in its Cargo.toml" >&2
        exit 1
    fi
    # A package named with -p that produced no .wasm is not a plugin crate: say so.
    for ((i = 0; i < ${#cargo_args[@]}; i++)); do
        a="${cargo_args[$i]}"
        case "$a" in
            -p | --package) pkg="${cargo_args[$((i + 1))]:-}" ;;
            -p* | --package=*) pkg="${a#-p}"; pkg="${pkg#--package=}" ;;
            *) continue ;;
        esac
        file="${pkg//-/_}.wasm"
        if ! printf '%s\n' "${built[@]}" | grep -q "/$file\$"; then
            echo "build.sh: error: package $pkg built no $file: a plugin crate needs" \
                "\`[lib] crate-type = [\"cdylib\"]\` in its Cargo.toml" >&2
            exit 1
        fi
    done
    for src in "${built[@]}"; do
        stem="$(basename "$src" .wasm)"
        ship "$src" "${stem//_/-}"
    done
fi

# The plugins of one language: "all" or the names given.
select_plugins() {
    local dir="$1"
    shift
    if [[ " $* " == *" all "* ]]; then
        find "$dir" -mindepth 1 -maxdepth 1 -type d ! -name node_modules ! -name '.*' \
            -printf '%f\n' | sort
    else
        printf '%s\n' "$@"
    fi
}

# The pinned toolchains, installed on first use: componentize-py in a virtual environment
# (plugins/python/.venv), componentize-js with npm (plugins/js/node_modules).
python_tools() {
    if [[ ! -x python/.venv/bin/componentize-py ]] ||
        [[ python/requirements.txt -nt python/.venv/bin/componentize-py ]]; then
        echo "build.sh: installing componentize-py (python/requirements.txt) in python/.venv" >&2
        python3 -m venv python/.venv
        python/.venv/bin/python -m pip install --quiet --disable-pip-version-check \
            -r python/requirements.txt
        touch python/.venv/bin/componentize-py
    fi
}
js_tools() {
    if [[ ! -x js/node_modules/.bin/componentize-js ]] ||
        [[ js/package-lock.json -nt js/node_modules/.bin/componentize-js ]]; then
        echo "build.sh: installing componentize-js (js/package-lock.json) in js/node_modules" >&2
        (cd js && npm ci --no-audit --no-fund --loglevel=error)
        touch js/node_modules/.bin/componentize-js
    fi
}
if $tools; then
    python_tools
    js_tools
fi

if [[ ${#python[@]} -gt 0 ]]; then
    python_tools
    for name in $(select_plugins python "${python[@]}"); do
        src="python/$name"
        [[ -f "$src/app.py" ]] || { echo "build.sh: error: $src/app.py not found" >&2; exit 1; }
        if ! up_to_date "python-$name" "$src" "$wit" python/requirements.txt; then
            # Defaults only: the world, the WIT and the app module.
            (cd "$src" && "$here/python/.venv/bin/componentize-py" -d "$wit" -w plugin componentize app \
                -o "$here/dist/python-$name.wasm" >/dev/null)
        fi
        ship "dist/python-$name.wasm" "python-$name"
    done
fi

if [[ ${#js[@]} -gt 0 ]]; then
    js_tools
    for name in $(select_plugins js "${js[@]}"); do
        src="js/$name"
        [[ -f "$src/$name.js" ]] || { echo "build.sh: error: $src/$name.js not found" >&2; exit 1; }
        if ! up_to_date "js-$name" "$src" "$wit" js/package-lock.json; then
            # Defaults only: the WIT, the world and the module.
            (cd "$src" && "$here/js/node_modules/.bin/componentize-js" --wit "$wit" \
                --world-name plugin -o "$here/dist/js-$name.wasm" "$name.js" >/dev/null)
        fi
        ship "dist/js-$name.wasm" "js-$name"
    done
fi
