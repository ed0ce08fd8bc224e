#!/usr/bin/env bash
# Installs what warmpool and its tests need on a fresh Debian machine: QEMU,
# the tools the guest image builds use (debootstrap and e2fsprogs included), a C compiler for go test -race,
# procps, iproute2 and nftables, promtool, an apt index that knows the
# guest kernel package, staticcheck, and (where Node.js is installed) the
# E2B SDK the E2B test drives.
# Idempotent and quiet when everything is already there.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v zstd >/dev/null || need+=(zstd)
command -v xz >/dev/null || need+=(xz-utils)
# Root filesystem images (package rootfs): mkfs.ext4 -d builds the disk and
# debugfs reads it in the tests (e2fsprogs); debootstrap builds debian:SUITE.
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || need+=(e2fsprogs)
command -v debugfs >/dev/null || [ -x /usr/sbin/debugfs ] || need+=(e2fsprogs)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
# What the tests run besides the above: the race detector needs a C
# compiler, and the template test looks for leftover processes with pgrep.
command -v gcc >/dev/null || need+=(gcc)
command -v pgrep >/dev/null || need+=(procps)
# The network package's tests make namespaces and list what is left with
# ip and nft.
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
# promtool (in Debian's prometheus package) checks the daemon's /metrics.
command -v promtool >/dev/null || need+=(prometheus)
# The guest kernel is resolved and downloaded with apt (guest.Build), which
# needs a package index that lists it.
index_ok=true
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || index_ok=false
if [ ${#need[@]} -gt 0 ] || [ "$index_ok" = false ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "warmpool: missing packages (${need[*]:-none}) or an apt index without linux-image-cloud-amd64; run as root, or: sudo apt-get update && sudo apt-get install -y ${need[*]:-}" >&2
    exit 1
  fi
  echo "updating the apt index" >&2
  apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
if ! command -v staticcheck >/dev/null && [ ! -x "$(go env GOPATH)/bin/staticcheck" ]; then
  echo "installing staticcheck" >&2
  go install honnef.co/go/tools/cmd/staticcheck@latest
fi
# The E2B SDK test (daemon/e2etest TestQEMUE2BSDK) drives warmpool with the
# official E2B SDK from npm, pinned by e2b/sdktest/package-lock.json; it
# needs Node.js (skipped without it).
if command -v node >/dev/null && command -v npm >/dev/null; then
  sdk="$(dirname "$0")/../e2b/sdktest"
  if ! grep -q '"version": "2.51.0"' "$sdk/node_modules/e2b/package.json" 2>/dev/null; then
    echo "installing the E2B SDK (npm ci in e2b/sdktest)" >&2
    (cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
fi
# The kube package's tests run a real kube-apiserver and etcd, built from the
# Go module proxy once per machine (about 6 minutes on 2 cores) and cached.
"$(dirname "$0")/k8s-assets.sh" >/dev/null
