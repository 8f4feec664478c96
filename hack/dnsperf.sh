#!/usr/bin/env bash
# DNS benchmark: dnsperf against the DNS stub (cluster names: an A hit, an
# AAAA with no data, an NXDOMAIN) and against a bare miekg/dns server that
# answers one fixed record, in the same run, on loopback. Throughput first
# (dnsperf unthrottled), then latency at a fixed rate from per-query output.
#   make dnsperf    (needs: apt-get install dnsperf; built binaries in bin/)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${DNSPERF_SECONDS:-10}
rate=${DNSPERF_LATENCY_QPS:-20000}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

./bin/kup-lab dns-stub --listen 127.0.0.1:5301 --manifest docs/examples/lab.yaml --domain cluster.local >"$work/stub.log" 2>&1 &
pids+=($!)
./bin/kup-lab dns --listen 127.0.0.1:5302 --answer fixed.example.org=192.0.2.1 >"$work/bare.log" 2>&1 &
pids+=($!)
sleep 1
printf 'svc-test-1.default.svc.cluster.local A\nsvc-test-1.default.svc.cluster.local AAAA\nmissing.default.svc.cluster.local A\n' >"$work/stub.q"
printf 'fixed.example.org A\n' >"$work/bare.q"

run() { # NAME PORT QUERIES
	dnsperf -s 127.0.0.1 -p "$2" -d "$3" -l "$secs" -c 4 -T 2 -q 200 2>&1 | awk -v n="$1" '/Queries per second/ {print n, "qps", $4}'
	dnsperf -s 127.0.0.1 -p "$2" -d "$3" -l 5 -Q "$rate" -v 2>/dev/null |
		awk '$1 == ">" {print $NF * 1000}' >>"$work/$1.lat" || true
}
pct() { # FILE P -> the P-th percentile, ms
	sort -n "$1" | awk -v p="$2" '{v[NR] = $1} END {i = int(NR * p / 100); if (i < 1) i = 1; printf "%.3f", v[i]}'
}
for r in 1 2; do
	run stub 5301 "$work/stub.q"
	run bare 5302 "$work/bare.q"
done | tee "$work/qps"
awk '{sum[$1] += $3; n[$1]++} END {s = sum["stub"] / n["stub"]; b = sum["bare"] / n["bare"]; printf "mean qps: stub %.0f, bare %.0f, ratio %.2f\n", s, b, s / b}' "$work/qps"
for n in stub bare; do
	echo "$n latency at $rate qps: p50 $(pct "$work/$n.lat" 50) ms, p99 $(pct "$work/$n.lat" 99) ms ($(wc -l <"$work/$n.lat") queries)"
done
