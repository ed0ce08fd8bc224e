#!/usr/bin/env bash
# Runs controller-gen (the version in scripts/k8s-tools/controller-gen/go.mod,
# built once into ~/.cache/warmpool/k8s) with the given arguments in the
# current directory. go generate ./kube/... calls it.
set -euo pipefail
tools="$(cd "$(dirname "$0")" && pwd)/k8s-tools/controller-gen"
version=$(awk '$1=="require" && $2=="sigs.k8s.io/controller-tools" {print $3}' "$tools/go.mod")
bin="${WARMPOOL_K8S_CACHE:-$HOME/.cache/warmpool/k8s}/controller-gen-$version"
if [ ! -x "$bin" ]; then
  mkdir -p "$(dirname "$bin")"
  (cd "$tools" && GOFLAGS=-mod=mod go build -tags tools -o "$bin.tmp" sigs.k8s.io/controller-tools/cmd/controller-gen)
  mv "$bin.tmp" "$bin"
fi
exec "$bin" "$@"
