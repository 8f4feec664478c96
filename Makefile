# kube-userspace-proxy. Every target that touches the network needs root: the
# lab and the tests create network namespaces and iptables rules inside them.
#
#   make demo    the Service story, told by its own output (start here; KEEP=1 leaves the lab up)
#   make test    vet, format check, and every test (unit, real iptables, lab)
#   make bench   loopback benchmarks: our proxy against a direct connection
#   make bench-modes  redirect mode against bind mode in the lab, with wrk
#   make soak    every kind of load at once, good and hostile, for SOAK_DURATION (10m)
#   make build   the binaries, into bin/
#   make image   the node agent's OCI image, built here with no registry (out/image/)
#   make docs    regenerate docs/life-of-a-connection.md from a lab
#   make depcheck  fail on an import that runs against cmd -> proxy -> parts -> service

SHELL := /bin/bash
# A fresh machine may have Go installed but not on PATH.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo v0.0.0-dev)
LDFLAGS := -X main.version=$(VERSION)

# The real control plane of the API tests (etcd, kube-apiserver,
# kube-controller-manager) and the real node's (kube-scheduler, kubelet,
# containerd, kubectl), built once per machine from the Go module proxy
# and cached under a key of its module's go.sum and build script.
KUBE_TESTENV_KEY := $(shell cat hack/kube-testenv/go.sum hack/kube-testenv/build.sh | sha256sum | cut -c1-16)
export KUBE_TESTENV_BIN ?= $(or $(HOME),/root)/.cache/kube-testenv/$(KUBE_TESTENV_KEY)

# The image: a Debian root filesystem of hack/image/packages made by
# mmdebstrap, cached per machine under a key of that list and its script,
# and the static binary, put together by hack/image (go-containerregistry,
# in a module of its own).
IMAGE ?= kube-userspace-proxy:dev
IMAGE_DIR := out/image
IMAGE_ROOTFS_KEY := $(shell cat hack/image/packages hack/image/rootfs.sh | sha256sum | cut -c1-16)
export KUP_IMAGE_ROOTFS ?= $(or $(HOME),/root)/.cache/kup-image/rootfs-$(IMAGE_ROOTFS_KEY).tar
export KUP_IMAGE_ARCHIVE := $(CURDIR)/$(IMAGE_DIR)/kube-userspace-proxy.tar

# The real node's other images (make node-images), built like the proxy's:
# a pause image and the pods' image (kup-lab alone, static), and a second
# tag of the proxy's image for the upgrade test.
NODE_IMAGES := out/node-images
export KUP_NODE_IMAGES := $(CURDIR)/$(NODE_IMAGES)

# System packages the tests, the lab, the image and the real node run:
# mmdebstrap makes the image's root filesystem; runc and the CNI plugins
# run the real node's pods (containerd and kubelet are built by
# hack/kube-testenv).
DEB_PACKAGES := iptables iproute2 curl nftables dnsutils conntrack mmdebstrap runc containernetworking-plugins
BENCH_PACKAGES := iperf3 wrk haproxy socat nginx-light libnginx-mod-stream strace

.PHONY: all build image node-images demo-node depcheck docs kube-testenv test demo soak bench bench-held bench-programming bench-sync bench-modes dnsperf deps bench-deps netbench clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

depcheck:
	$(GO) run ./hack/depcheck

# image: out/image/oci (an OCI layout) and out/image/kube-userspace-proxy.tar
# (a docker-archive: docker load, ctr images import, kind load image-archive).
# The root filesystem takes 2-3 minutes the first time on a machine.
image: deps
	@if [ ! -s "$(KUP_IMAGE_ROOTFS)" ]; then \
		echo "building the image's root filesystem into $(KUP_IMAGE_ROOTFS) (2-3 minutes, once per machine)"; \
		mkdir -p "$$(dirname "$(KUP_IMAGE_ROOTFS)")"; \
		./hack/image/rootfs.sh hack/image/packages "$(KUP_IMAGE_ROOTFS)"; \
	fi
	@mkdir -p $(IMAGE_DIR)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o $(IMAGE_DIR)/kube-userspace-proxy ./cmd/kube-userspace-proxy
	cd hack/image && $(GO) run . --rootfs "$(KUP_IMAGE_ROOTFS)" --binary ../../$(IMAGE_DIR)/kube-userspace-proxy \
		--tag $(IMAGE) --version $(VERSION) --layout ../../$(IMAGE_DIR)/oci --archive ../../$(IMAGE_DIR)/kube-userspace-proxy.tar

# deps installs the Debian packages that are missing (as root).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

kube-testenv:
	@if [ ! -x "$(KUBE_TESTENV_BIN)/kube-apiserver" ]; then \
		echo "building the test control plane and node into $(KUBE_TESTENV_BIN) (20-30 minutes on a new machine, once)"; \
		rm -rf "$(KUBE_TESTENV_BIN).tmp"; \
		(cd hack/kube-testenv && ./build.sh "$(KUBE_TESTENV_BIN).tmp") && mv "$(KUBE_TESTENV_BIN).tmp" "$(KUBE_TESTENV_BIN)"; \
	fi

# The fuzz budget is a count, not a duration: a -fuzztime duration hits a
# race in Go 1.26's fuzz coordinator (golang/go#75804) that fails with
# "context deadline exceeded" and no crasher.
test: deps kube-testenv image node-images
	@big=$$(git ls-files -z | xargs -0 -r stat -c '%s %n' 2>/dev/null | awk '$$1 > 1048576 {print $$2}'); if [ -n "$$big" ]; then echo "tracked files over 1 MB (build outputs do not belong in git):"; echo "$$big"; exit 1; fi
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run ./hack/depcheck
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /integration/node)
	@# The real node last, alone: kubelet's timings want the machine to itself.
	$(GO) test -race -count=1 -timeout 20m ./integration/node/
	cd hack/image && $(GO) vet ./... && $(GO) test -count=1 ./...
	$(GO) test -run '^$$' -fuzz FuzzAnswer -fuzztime 200000x ./dnsstub/

node-images: image
	@mkdir -p $(NODE_IMAGES)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o $(NODE_IMAGES)/kup-lab ./cmd/kup-lab
	cd hack/image && $(GO) run . --binary ../../$(NODE_IMAGES)/kup-lab --path /kup-lab --entrypoint /kup-lab,pause \
		--tag kup/pause:test --archive ../../$(NODE_IMAGES)/pause.tar
	cd hack/image && $(GO) run . --binary ../../$(NODE_IMAGES)/kup-lab --path /kup-lab \
		--tag kup/lab:test --archive ../../$(NODE_IMAGES)/lab.tar
	cd hack/image && $(GO) run . --rootfs "$(KUP_IMAGE_ROOTFS)" --binary ../../$(IMAGE_DIR)/kube-userspace-proxy \
		--tag kube-userspace-proxy:v2 --version $(VERSION)-v2 --archive ../../$(NODE_IMAGES)/kube-userspace-proxy-v2.tar

# demo-node: the Service story on a real node (kubelet, containerd, the
# DaemonSet), told with kubectl. It needs the node's build (make
# kube-testenv: about 25 minutes on a new machine, once) and the images.
demo-node: deps kube-testenv node-images
	./$(NODE_IMAGES)/kup-lab demo-node --bin "$(KUBE_TESTENV_BIN)" --proxy-image "$(KUP_IMAGE_ARCHIVE)" --images "$(KUP_NODE_IMAGES)" $(if $(KEEP),--keep)

# docs: docs/life-of-a-connection.md, made from a lab (its commands' real
# output); TestLifeOfAConnectionDoc fails when the committed one differs.
docs: deps build
	./bin/kup-lab walk -o docs/life-of-a-connection.md

# make demo KEEP=1 leaves the lab running after the story, to explore it.
demo: deps build
	./bin/kup-lab demo $(if $(KEEP),--keep)

bench-deps: deps
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# bench: the proxy against a direct connection, measured in the same run;
# compare the "proxy" and "direct" lines of each benchmark (docs/performance.md).
bench: deps
	$(GO) test -run '^$$' -bench . -benchtime 2s -count 3 ./proxy/userspace/

# bench-held: 10,000 proxied connections held at once (as many as the
# machine's open file limit allows): the proxy's descriptors and memory.
bench-held: deps kube-testenv
	$(GO) test -run '^$$' -bench HeldConnections -benchtime 1x ./integration/

# bench-programming: network programming latency against the real API
# server, p50 and p99 over 100 EndpointSlice changes.
bench-programming: deps kube-testenv
	$(GO) test -run '^$$' -bench NetworkProgramming -benchtime 100x ./integration/

# bench-sync: time from the proxy's start to 1,000 and 10,000 Services
# programmed, listed from the real API server, and the proxy's peak memory.
bench-sync: deps kube-testenv
	$(GO) test -run '^$$' -bench FirstSyncFromAPI -benchtime 3x ./integration/

# soak: one lab under every kind of load at once (HTTP keep-alive and per
# request with byte checks, UDP, DNS, a UDP spray, a TCP flood, idle
# /healthz connections, backends killed, the manifest rewritten slowly) for
# SOAK_DURATION (default 10m); prints what failed and what the proxy held.
soak: deps
	$(GO) test -run '^$$' -bench Soak -benchtime 1x -timeout 0 ./integration/

# bench-modes: redirect mode against bind mode (and a direct connection) in
# one lab and one run, with wrk.
bench-modes: bench-deps build
	./bin/kup-lab bench-modes

# dnsperf: the DNS stub against a bare miekg/dns server, same run.
dnsperf: build
	@command -v dnsperf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf >/dev/null; }
	./hack/dnsperf.sh

# netbench: the shared network benchmark harness, with our binary as the
# proxy under test beside HAProxy, nginx (stream) and the Go yardstick, one
# endpoint, medians of 3 (needs ../shared/bench; ~10 minutes).
NETBENCH_ARGS ?= --endpoints 1 -d 5 -r 3 --prio --quiet-wait 30
netbench: bench-deps build
	../shared/bench/netbench.sh --put "$(CURDIR)/hack/netbench-put.sh" --put-name kup --put-port0 \
		--paths "direct dnat haproxy nginx put ref" $(NETBENCH_ARGS)

clean:
	rm -rf bin
