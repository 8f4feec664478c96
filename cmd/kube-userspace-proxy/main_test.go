package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func execute(args ...string) (string, error) {
	cmd := newCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

func TestBadFlags(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--manifests", "x", "--bind-address", "127.0.0.1"}, "--bind-address 127.0.0.1: cannot proxy on a loopback"},
		{[]string{"--manifests", "x", "--bind-address", "nodeA"}, `invalid argument "nodeA" for "--bind-address" flag`},
		{[]string{"--manifests", "x", "--bind-address", "fd00::1"}, "only IPv4 is supported"},
		{[]string{"--manifests", "x", "--proxy-port-range", "9-1"}, `--proxy-port-range "9-1"`},
		{[]string{"--manifests", "x", "--udp-timeout", "0s"}, "--udp-timeout 0s: must be greater than 0"},
		{[]string{"--manifests", "x", "--kube-api-content-type", "text/yaml"}, `--kube-api-content-type "text/yaml": want application/vnd.kubernetes.protobuf or application/json`},
		{[]string{"--manifests", "x", "--kube-api-qps", "0"}, "--kube-api-qps 0, --kube-api-burst 10: both must be greater than 0"},
		{[]string{"--manifests", "x", "--iptables-backend", "bpf"}, `--iptables-backend "bpf": want legacy, nft or auto`},
		{[]string{"--manifests", "x", "--log-format", "xml"}, `--log-format "xml": want text or json`},
		{[]string{"--kubeconfig", "/nonexistent/kubeconfig"}, `--kubeconfig "/nonexistent/kubeconfig"`},
		{[]string{}, "no source of Services: give --manifests PATH, or --kubeconfig/--master, or run in a cluster"},
		{[]string{"--manifests", "x", "--cluster-dns", "10.96.0"}, `invalid argument "10.96.0" for "--cluster-dns" flag`},
		{[]string{"--manifests", "x", "--cluster-dns", "fd00::10"}, "--cluster-dns fd00::10: only IPv4 is supported"},
		{[]string{"--manifests", "x", "--cluster-domain", "bad..domain"}, `--cluster-domain "bad..domain": not a domain name`},
		{[]string{"--manifests", "x", "--dns-upstream", "dns.example"}, `--dns-upstream "dns.example": want an IP address or IP:port`},
		{[]string{"--manifests", "x", "--dns-ttl", "0s"}, "--dns-ttl 0s: must be greater than 0"},
		{[]string{"--manifests", "x", "--dns-ttl", "2h"}, "--dns-ttl 2h0m0s: want 1s to 1h"},
		{[]string{"--manifests", "x", "--mode", "ipvs"}, `--mode "ipvs": want redirect, bind or auto`},
		{[]string{"--manifests", "x", "--udp-timeout", "-1s"}, "--udp-timeout -1s: must be greater than 0"},
		{[]string{"--manifests", "x", "--shutdown-grace-period", "-1s"}, "--shutdown-grace-period -1s: must be 0"},
		{[]string{"--manifests", "x", "--healthz-bind-address", "nowhere"}, `--healthz-bind-address "nowhere": want host:port`},
		{[]string{"--manifests", "x", "--mode", "bind", "--bind-address", "10.0.0.1"}, "applies to --mode redirect only"},
		{[]string{"--manifests", "x", "--nodeport-addresses", "10.0.0.0/33"}, `--nodeport-addresses "10.0.0.0/33": not an IPv4 CIDR`},
		{[]string{"--manifests", "x", "--dns-pod-records", "always"}, `--dns-pod-records "always": want insecure, verified or disabled`},
		{[]string{"--manifests", "x", "--preserve-source-ip"}, "--preserve-source-ip with --manifests needs --local-pod-cidrs"},
		{[]string{"--manifests", "x", "--local-pod-cidrs", "10.244.1.0/24"}, "--local-pod-cidrs is used by --preserve-source-ip only"},
		{[]string{"--manifests", "x", "--preserve-source-ip", "--local-pod-cidrs", "10.244.1/24"}, `--local-pod-cidrs "10.244.1/24": not a CIDR`},
		{[]string{"--manifests", "x", "--preserve-source-ip", "--local-pod-cidrs", "10.244.1.0/24", "--service-proxy-name", "blue"}, "only the default proxy of a node can keep client addresses"},
		{[]string{"--manifests", "x", "extra"}, "does not take any arguments"},
		{[]string{"--no-such-flag"}, "unknown flag: --no-such-flag"},
	}
	for _, tt := range tests {
		_, err := execute(tt.args...)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: error %v, want one containing %q", tt.args, err, tt.want)
		}
	}
}

func TestAllBadFlagsReportedAtOnce(t *testing.T) {
	_, err := execute("--manifests", "x", "--udp-timeout", "-1s", "--iptables-sync-period", "0s")
	if err == nil || !strings.Contains(err.Error(), "--udp-timeout") || !strings.Contains(err.Error(), "--iptables-sync-period") {
		t.Errorf("error %v; want both bad flags named", err)
	}
}

func TestVersion(t *testing.T) {
	out, err := execute("--version")
	if err != nil || out != "kube-userspace-proxy "+version+"\n" {
		t.Errorf("--version = %q, %v", out, err)
	}
}

// TestKubeadmConfigAccepted: the KubeProxyConfiguration kubeadm writes into
// the kube-proxy ConfigMap loads unchanged, and --write-config-to shows what
// was taken from it (and that a flag wins over the file).
func TestKubeadmConfigAccepted(t *testing.T) {
	out := filepath.Join(t.TempDir(), "effective.yaml")
	if _, err := execute("--config", "testdata/kubeadm-config.conf", "--proxy-port-range", "30000-30999", "--write-config-to", out); err != nil {
		t.Fatalf("kubeadm's config: %v", err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"apiVersion: kubeproxy.config.k8s.io/v1alpha1", "kind: KubeProxyConfiguration", "bindAddress: 0.0.0.0", "portRange: 30000-30999", "syncPeriod: 30s", "contentType: application/vnd.kubernetes.protobuf", "qps: 5"} {
		if !strings.Contains(string(got), want) {
			t.Errorf("effective config lacks %q:\n%s", want, got)
		}
	}
	// What was written reads back.
	if _, err := execute("--config", out, "--write-config-to", filepath.Join(t.TempDir(), "again.yaml")); err != nil {
		t.Errorf("reading back --write-config-to output: %v", err)
	}
}

func TestBadConfig(t *testing.T) {
	tests := []struct{ body, want string }{
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAdress: 0.0.0.0\n", `unknown field "bindAdress"`},
		{"apiVersion: v1\nkind: ConfigMap\n", "want apiVersion kubeproxy.config.k8s.io/v1alpha1, kind KubeProxyConfiguration"},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: 127.0.0.1\n", "--bind-address 127.0.0.1: cannot proxy on a loopback"},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: node-a\n", `KubeProxyConfiguration.bindAddress: Invalid value: "node-a"`},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nportRange: 9-1\n", `--proxy-port-range "9-1"`},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nhealthzBindAddress: nowhere\n", `--healthz-bind-address "nowhere": want host:port`},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnodePortAddresses: [10.0.0.0/40]\n", `--nodeport-addresses "10.0.0.0/40": not an IPv4 CIDR`},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables: {syncPeriod: -1s}\n", "--iptables-sync-period -1s: must be greater than 0"},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclientConnection: {qps: -1}\n", "--kube-api-qps -1, --kube-api-burst 10: both must be greater than 0"},
		{"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclientConnection: {contentType: text/yaml}\n", `--kube-api-content-type "text/yaml": want`},
	}
	for _, tt := range tests {
		path := filepath.Join(t.TempDir(), "config.yaml")
		os.WriteFile(path, []byte(tt.body), 0o644)
		_, err := execute("--config", path, "--manifests", "x")
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("config\n%s\nerror %v, want one containing %q", tt.body, err, tt.want)
		}
	}
}

// TestConfigValuesNamedByFlag: a value from --config that fails the flags'
// rules is reported by its flag, with a pointer to the file it came from.
func TestConfigValuesNamedByFlag(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	os.WriteFile(path, []byte("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables: {syncPeriod: -1s}\n"), 0o644)
	_, err := execute("--config", path, "--manifests", "x")
	if err == nil || !strings.Contains(err.Error(), "--iptables-sync-period -1s") || !strings.Contains(err.Error(), "--config "+path) {
		t.Errorf("error %v; want the flag's rule and the file named", err)
	}
}
