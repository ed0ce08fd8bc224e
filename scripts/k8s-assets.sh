#!/usr/bin/env bash
# Builds the etcd and kube-apiserver binaries the kube package's tests run
# (controller-runtime's envtest) from the Go module proxy, and caches them
# under ${WARMPOOL_K8S_CACHE:-~/.cache/warmpool/k8s}/kube-VERSION-etcd-VERSION,
# so only a new machine pays the build (~6 min on 2 cores, ~1 GB of modules).
# Prints that directory; KUBEBUILDER_ASSETS=$(scripts/k8s-assets.sh) is what
# the tests use (they call this script themselves when the variable is unset).
# The versions are the ones in scripts/k8s-tools/*/go.mod, which are separate
# modules: nothing here touches warmpool's own go.mod.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools="$here/k8s-tools"
kube_version=$(awk '$1=="require" && $2=="k8s.io/kubernetes" {print $3}' "$tools/kube-apiserver/go.mod")
etcd_version=$(awk '$1=="require" && $2=="go.etcd.io/etcd/server/v3" {print $3}' "$tools/etcd/go.mod")
cache="${WARMPOOL_K8S_CACHE:-$HOME/.cache/warmpool/k8s}"
dir="$cache/kube-$kube_version-etcd-$etcd_version"
if [ -x "$dir/etcd" ] && [ -x "$dir/kube-apiserver" ]; then
  echo "$dir"
  exit 0
fi
mkdir -p "$cache"
# Two test runs starting at once build once: the second waits here.
exec 9>"$cache/.build.lock"
flock 9
if [ -x "$dir/etcd" ] && [ -x "$dir/kube-apiserver" ]; then
  echo "$dir"
  exit 0
fi
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "k8s-assets: building etcd $etcd_version (about 30 s)" >&2
(cd "$tools/etcd" && GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$work/etcd" .)
minor=${kube_version#v1.}
minor=${minor%%.*}
pkg=k8s.io/component-base/version
echo "k8s-assets: building kube-apiserver $kube_version (about 6 min on 2 cores the first time)" >&2
(cd "$tools/kube-apiserver" && GOFLAGS=-mod=mod go build -trimpath -tags tools \
  -ldflags "-s -w -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean" \
  -o "$work/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
"$work/kube-apiserver" --version >&2
mkdir -p "$dir.tmp"
mv "$work/etcd" "$work/kube-apiserver" "$dir.tmp/"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "$dir"
