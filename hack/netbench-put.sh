#!/bin/sh
# Glue between ../shared/bench/netbench.sh and kube-userspace-proxy: the
# harness describes its services in $NB_SERVICES (NAME/PROTO/LISTEN/BACKENDS);
# this writes them as a manifest, one Service and one EndpointSlice each,
# starts the proxy on it, and announces each listener port the proxy chose
# with a "NETBENCH LISTEN <name> <port>" line (run the harness with
# --put-port0). The ClusterIPs used here (10.255.255.N) are never reached: the
# harness redirects its own service addresses to the announced ports.
#   make netbench NETBENCH_ARGS="--endpoints 1"
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
proxy=${KUP_PROXY:-$here/bin/kube-userspace-proxy}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
i=0
for spec in $NB_SERVICES; do
	i=$((i + 1))
	name=${spec%%/*}; rest=${spec#*/}
	proto=$(echo "${rest%%/*}" | tr a-z A-Z); rest=${rest#*/}
	backends=${rest#*/}
	port=${backends##*:}
	{
		printf 'apiVersion: v1\nkind: Service\nmetadata: {name: %s}\n' "$name"
		printf 'spec:\n  clusterIP: 10.255.255.%d\n  ports: [{port: %s, protocol: %s}]\n---\n' "$i" "$port" "$proto"
		printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n'
		printf 'metadata: {name: %s-1, labels: {kubernetes.io/service-name: %s}}\n' "$name" "$name"
		printf 'addressType: IPv4\nports: [{port: %s, protocol: %s}]\nendpoints:\n' "$port" "$proto"
		for be in $(echo "$backends" | tr , ' '); do
			printf -- '- addresses: [%s]\n' "${be%:*}"
		done
		printf -- '---\n'
	} >>"$dir/services.yaml"
done
"$proxy" --manifests "$dir/services.yaml" --log-format json ${KUP_ARGS:-} 2>&1 | while IFS= read -r line; do
	printf '%s\n' "$line"
	case $line in
	*'"msg":"Added service port"'*)
		svc=$(printf '%s' "$line" | sed -n 's/.*"service":"default\/\([^"]*\)".*/\1/p')
		port=$(printf '%s' "$line" | sed -n 's/.*"listener":"\{0,1\}\([0-9]*\).*/\1/p')
		echo "NETBENCH LISTEN $svc $port"
		;;
	esac
done
