#!/usr/bin/env bash
# `make gpu-bundle`: what a GPU machine without a network needs to run the project, in one ignored folder
# (.gpu-bundle/, at most GPU_BUNDLE_LIMIT_MIB): the wheels of scripts/gpu-requirements.txt for the GPU
# image (CPython 3.12, manylinux x86-64) and Debian's redis-server and redis-cli with every shared library
# they link beyond glibc. Runs where PyPI and Debian's packages can be reached; see docs/gpu.md.
#
#   .gpu-bundle/wheels/*.whl
#   .gpu-bundle/redis/bin/{redis-server,redis-cli}      wrappers: LD_LIBRARY_PATH for these two only
#   .gpu-bundle/redis/libexec/{redis-server,redis-cli}  Debian's binaries
#   .gpu-bundle/redis/lib/*.so.*                        their libraries, from Debian's packages
#   .gpu-bundle/MANIFEST.json                           files, sizes, sha256, glibc needed
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
LIMIT_MIB=${GPU_BUNDLE_LIMIT_MIB:-60}  # the device machine takes 64 MiB with the working tree
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ARCH=$(dpkg --print-architecture 2>/dev/null || echo none)
if [ "$ARCH" != amd64 ]; then
  echo "gpu-bundle: needs a Debian amd64 machine (dpkg says '$ARCH'): the GPU machine is x86-64" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
out="$work/bundle"
mkdir -p "$out/wheels" "$out/redis/bin" "$out/redis/libexec" "$out/redis/lib" "$work/debs" "$work/root"

# 1. Wheels, one version of each, no dependencies resolved (the list is complete; the dry run checks it).
tags=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 any; do
  tags+=(--platform "$p")
done
grep -vE '^\s*(#|$)' scripts/gpu-requirements.txt | while read -r spec; do
  echo "gpu-bundle: wheel $spec" >&2
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: "${tags[@]}" \
    -d "$out/wheels" "$spec" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done

# 2. Debian's redis-server (the binary lives in redis-tools; redis-server's is a link to it) and the
# packages of every library it links. The image of the GPU machine is not Debian's: only glibc and
# GCC's runtime are taken from it (below).
unpack() {  # apt-get download PACKAGE... and unpack them into $work/root (lists updated once if stale)
  local dir
  dir=$(mktemp -d "$work/debs/XXXX")
  if ! (cd "$dir" && apt-get download -q "$@" >/dev/null 2>&1); then
    if [ "$(id -u)" != 0 ] || ! apt-get update -qq || ! (cd "$dir" && apt-get download -q "$@" >/dev/null 2>&1); then
      echo "gpu-bundle: apt-get download $* failed (run 'apt-get update' as root, then again)" >&2
      exit 1
    fi
  fi
  for deb in "$dir"/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
    echo "$(dpkg-deb -f "$deb" Package)=$(dpkg-deb -f "$deb" Version)" >> "$work/debs.txt"
  done
}
unpack redis-tools
# redis picks its mode from the name it runs as: the copy must be called redis-server.
cp "$work/root/usr/bin/redis-check-rdb" "$out/redis/libexec/redis-server"
cp "$work/root/usr/bin/redis-cli" "$out/redis/libexec/redis-cli"

# Taken from the image: glibc, and GCC's runtime (libstdc++, libgcc_s), which torch itself links, so any
# image that runs torch has them, newer than Debian 12's or as new. Debian's libstdc++ would raise the
# glibc the bundle needs from 2.34 (redis-server's own) to 2.36.
glibc='^(linux-vdso|libc|libm|libpthread|libdl|librt|libresolv|ld-linux-x86-64|libstdc\+\+|libgcc_s)\.so'
libs=$(for b in "$out"/redis/libexec/*; do ldd "$b"; done | awk '$2 == "=>" {print $1 " " $3}' | sort -u)
if echo "$libs" | grep -q "not found"; then
  echo "gpu-bundle: redis-server links a library this machine lacks; 'make setup' installs redis-server:" >&2
  echo "$libs" | grep "not found" >&2
  exit 1
fi
pkgs=""
while read -r soname path; do
  [ -n "$soname" ] || continue
  if echo "$soname" | grep -qE "$glibc"; then continue; fi
  real=$(readlink -f "$path")
  pkg=""
  for p in "$path" "$real" "/usr$path" "/usr$real" "${path#/usr}" "${real#/usr}"; do
    pkg=$(dpkg -S "$p" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$pkg" ] && break
  done
  if [ -z "$pkg" ]; then
    echo "gpu-bundle: no Debian package owns $path ($soname)" >&2
    exit 1
  fi
  pkgs="$pkgs $pkg"
  echo "$soname" >> "$work/sonames"
done <<< "$libs"
# shellcheck disable=SC2086
unpack $(echo $pkgs | tr ' ' '\n' | sort -u)
while read -r soname; do
  found=$(find "$work/root" -name "$soname" \( -type f -o -type l \) | head -1)
  if [ -z "$found" ]; then
    echo "gpu-bundle: $soname is not in its package" >&2
    exit 1
  fi
  cp -L "$found" "$out/redis/lib/$soname"
done < "$work/sonames"
# Nothing may resolve outside the bundle but glibc and GCC's runtime.
for b in "$out"/redis/libexec/*; do
  outside=$(LD_LIBRARY_PATH="$out/redis/lib" ldd "$b" | awk '$2 == "=>" {print $1 " " $3}' \
            | grep -vE "$glibc" | grep -v " $out/redis/lib/" || true)
  if [ -n "$outside" ]; then
    echo "gpu-bundle: $(basename "$b") still links outside the bundle: $outside" >&2
    exit 1
  fi
done
for name in redis-server redis-cli; do
  cat > "$out/redis/bin/$name" <<'EOF'
#!/bin/sh
# Debian's binary with the libraries it was built against, which lie beside it (scripts/gpu-bundle.sh).
# Only this process gets them: the image's own libraries stay as they are for everything else.
here=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/libexec/$(basename -- "$0")" "$@"
EOF
done
chmod 755 "$out"/redis/bin/* "$out"/redis/libexec/*
"$out/redis/bin/redis-server" --version >&2

# 3. The manifest (and the size limit), then the folder replaces the old one whole.
"$PY" scripts/gpu_check.py manifest "$out" --limit-mib "$LIMIT_MIB" --debs "$work/debs.txt"
rm -rf "$BUNDLE"
mv "$out" "$BUNDLE"
du -sh "$BUNDLE" >&2
