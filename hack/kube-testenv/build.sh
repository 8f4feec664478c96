#!/bin/bash
# Builds etcd, kube-apiserver and kube-controller-manager from the Go module
# proxy, for the integration tests' real control plane. The flags never vary:
# changing -trimpath or -ldflags costs a full ~9-minute recompile.
# Usage: build.sh <outdir>   (run from this folder)
set -euo pipefail
OUT=${1:-bin}
mkdir -p "$OUT"
V=k8s.io/component-base/version
C=k8s.io/client-go/pkg/version
LD="-s -w -X $V.gitVersion=v1.37.2 -X $V.gitMajor=1 -X $V.gitMinor=37 -X $V.gitTreeState=clean"
LD="$LD -X $C.gitVersion=v1.37.2 -X $C.gitMajor=1 -X $C.gitMinor=37 -X $C.gitTreeState=clean"
go build -trimpath -ldflags "$LD" -o "$OUT/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  go.etcd.io/etcd/server/v3
# a package path ending in /v3 gives a binary named after the element before it
if [ -e "$OUT/server" ]; then mv "$OUT/server" "$OUT/etcd"; fi
ls -l "$OUT"
