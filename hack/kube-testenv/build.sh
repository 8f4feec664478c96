#!/bin/bash
# Builds, from the Go module proxy, everything the integration tests run of
# Kubernetes: the control plane (etcd, kube-apiserver,
# kube-controller-manager), the node (kube-scheduler, kubelet, containerd v2
# with its runc shim and ctr) and kubectl. kubelet, kube-scheduler and
# kubectl come from the same k8s.io/kubernetes module as the control plane
# and share most of its packages, so one go build makes them all. The flags
# never vary: changing -trimpath or -ldflags costs a full recompile.
# Usage: build.sh <outdir>   (run from this folder)
set -euo pipefail
OUT=$(realpath -m "${1:-bin}")
mkdir -p "$OUT"
V=k8s.io/component-base/version
C=k8s.io/client-go/pkg/version
LD="-s -w -X $V.gitVersion=v1.37.2 -X $V.gitMajor=1 -X $V.gitMinor=37 -X $V.gitTreeState=clean"
LD="$LD -X $C.gitVersion=v1.37.2 -X $C.gitMajor=1 -X $C.gitMinor=37 -X $C.gitTreeState=clean"
go build -trimpath -ldflags "$LD" -o "$OUT/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kubectl \
  go.etcd.io/etcd/server/v3
# a package path ending in /v3 gives a binary named after the element before it
if [ -e "$OUT/server" ]; then mv "$OUT/server" "$OUT/etcd"; fi
# containerd v2: Kubernetes 1.36 and later refuse containerd 1.x (Debian's).
# Its own module, at a fixed version; no btrfs headers are needed.
CONTAINERD=github.com/containerd/containerd/v2
GOBIN="$OUT" GOFLAGS=-tags=no_btrfs go install -trimpath -ldflags "-s -w -X $CONTAINERD/version.Version=v2.4.2" \
  $CONTAINERD/cmd/containerd@v2.4.2 \
  $CONTAINERD/cmd/containerd-shim-runc-v2@v2.4.2 \
  $CONTAINERD/cmd/ctr@v2.4.2
ls -l "$OUT"
