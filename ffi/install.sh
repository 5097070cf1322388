#!/usr/bin/env bash
# Installs the C ABI under PREFIX (default /usr/local): lib/libnixl.{so,a},
# include/nixl.h and lib/pkgconfig/nixl.pc. Builds it first if needed.
#   ffi/install.sh [PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${1:-/usr/local}"
case "$PREFIX" in /*) ;; *) PREFIX="$PWD/$PREFIX" ;; esac
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -p nixl-ffi
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
install -d "$PREFIX/lib/pkgconfig" "$PREFIX/include"
install -m 0755 "$TARGET/release/libnixl.so" "$PREFIX/lib/libnixl.so"
install -m 0644 "$TARGET/release/libnixl.a" "$PREFIX/lib/libnixl.a"
install -m 0644 ffi/include/nixl.h "$PREFIX/include/nixl.h"
cat > "$PREFIX/lib/pkgconfig/nixl.pc" <<PC
prefix=$PREFIX
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: nixl
Description: nixl-rs data movement for distributed inference (C ABI)
Version: $VERSION
Cflags: -I\${includedir}
Libs: -L\${libdir} -lnixl
Libs.private: -lpthread -ldl -lm
PC
echo "installed libnixl $VERSION under $PREFIX (pkg-config: PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig)"
