#!/usr/bin/env bash
# Measures the size of the image config/container/Containerfile builds, where no registry can
# be reached: the runtime stage of the real Containerfile, verbatim, built with buildah on a
# bookworm-slim equivalent made here (debootstrap minbase, trimmed as Debian's official slim
# images are: no docs, man pages or locales, apt's docker-* settings), with the builder stage
# replaced by the artifacts built outside it (the dist binary, the shipped plugins).
#
#   cargo build --locked --profile dist -p gateway && plugins/build.sh
#   config/container/measure-size.sh [--mesa]
#
# Needs root, buildah and debootstrap (Debian packages), and the Debian mirror. Prints the
# base's and the image's sizes as buildah reports them; leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/../.."

variants=(none)
[[ "${1:-}" == "--mesa" ]] && variants+=(mesa)
bin="${GATEWAY_BIN:-${CARGO_TARGET_DIR:-target}/dist/gateway}"
[[ -x "$bin" ]] || { echo "measure-size.sh: no $bin: cargo build --locked --profile dist -p gateway" >&2; exit 1; }
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "measure-size.sh: apt-get install $tool" >&2; exit 1; }
done
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
base=localhost/gateway-measure-base:bookworm-slim
work="$(mktemp -d)"
cleanup() {
    buildah rmi -f "${images[@]}" "$base" >/dev/null 2>&1 || true
    rm -rf "$work"
}
images=()
trap cleanup EXIT

# The base: what debuerreotype's --slim does to a minbase bookworm.
root="$work/root"
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
rm -rf "$root"/usr/share/{doc,man,info}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    >"$root/etc/apt/sources.list.d/debian.sources"
rm -f "$root/etc/apt/sources.list"
ctr="$(buildah from scratch)"
buildah copy "$ctr" "$root" / >/dev/null
buildah commit -q "$ctr" "$base" >/dev/null
buildah rm "$ctr" >/dev/null

# The context: the artifacts in place of the builder stage, and the files copied from the
# repository.
ctx="$work/ctx"
mkdir -p "$ctx/prebuilt/plugins" "$ctx/config/models"
# As the builder stage does (KEEP_DEBUG_INFO=false).
objcopy --strip-debug "$bin" "$ctx/prebuilt/gateway"
for p in hygiene ratelimit canary storefront; do cp "plugins/dist/$p.wasm" "$ctx/prebuilt/plugins/"; done
cp config/models/recs.safetensors "$ctx/config/models/"
{
    echo 'ARG DEBIAN_RELEASE=bookworm'
    echo 'FROM scratch AS builder'
    echo 'COPY prebuilt/gateway /usr/local/bin/gateway'
    echo 'COPY prebuilt/plugins/ /src/plugins/dist/'
    sed -n '/^FROM docker.io\/library\/debian/,$p' config/container/Containerfile |
        sed "s#^FROM docker.io/library/debian:\${DEBIAN_RELEASE}-slim#FROM $base#"
} >"$ctx/Containerfile"

size() { buildah images --format '{{.Size}}' "$1"; }
echo "base (bookworm-slim equivalent): $(size "$base")"
echo "gateway binary: $(du -h --apparent-size "$bin" | cut -f1), $(du -h --apparent-size "$ctx/prebuilt/gateway" | cut -f1) without debug info"
for v in "${variants[@]}"; do
    img="localhost/gateway-measure:$v"
    images+=("$img")
    buildah bud -q --format docker --pull=never --build-arg VULKAN_DRIVERS="$v" \
        -f "$ctx/Containerfile" -t "$img" "$ctx" >/dev/null
    echo "image, VULKAN_DRIVERS=$v: $(size "$img")"
done
