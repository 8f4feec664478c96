package iptables

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var example = []Redirect{
	{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: "tcp", ToPort: 37000, Comment: "default/web:http"},
	{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 53, Protocol: "udp", ToPort: 37001, Comment: "default/web:dns"},
	{Kind: ExternalIP, IP: netip.MustParseAddr("203.0.113.7"), Port: 80, Protocol: "tcp", ToPort: 37000, Comment: "default/web:http"},
	{Kind: LoadBalancerIP, IP: netip.MustParseAddr("198.51.100.9"), Port: 80, Protocol: "tcp", ToPort: 37000, Comment: "default/web:http"},
	{Kind: NodePort, Port: 30080, Protocol: "tcp", ToPort: 37000, Comment: "default/web:http"},
	// A name no API server would accept, as a manifest might still carry
	// it: quotes, spaces, a newline and a rule of its own.
	{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.66"), Port: 443, Protocol: "tcp", ToPort: 37002,
		Comment: "evil\" -j ACCEPT\n-A INPUT -j DROP #/x:y"},
	// A Service with no endpoints: redirected all the same, refused in
	// filter; its NodePort is not accepted.
	{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.20"), Port: 53, Protocol: "udp", ToPort: 37003, NoEndpoints: true, Comment: "default/empty:dns"},
	{Kind: NodePort, Port: 30053, Protocol: "udp", ToPort: 37003, NoEndpoints: true, Comment: "default/empty:dns"},
	{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.20"), Port: 80, Protocol: "tcp", ToPort: 37004, NoEndpoints: true, Comment: "default/empty:http"},
}

// example6 is the IPv6 half of a dual-stack Service: /128 matches.
var example6 = []Redirect{
	{Kind: ClusterIP, IP: netip.MustParseAddr("fd00:96::10"), Port: 80, Protocol: "tcp", ToPort: 37010, Comment: "default/web:http"},
	{Kind: ExternalIP, IP: netip.MustParseAddr("2001:db8::7"), Port: 80, Protocol: "tcp", ToPort: 37010, Comment: "default/web:http"},
	{Kind: NodePort, Port: 30080, Protocol: "tcp", ToPort: 37010, Comment: "default/web:http"},
	{Kind: ClusterIP, IP: netip.MustParseAddr("fd00:96::20"), Port: 53, Protocol: "udp", ToPort: 37011, NoEndpoints: true, Comment: "default/empty:dns"},
}

func TestRenderGolden(t *testing.T) {
	transparent := DefaultChains
	transparent.ReplyMark = 0x1000000
	tests := []struct {
		name      string
		chains    Chains
		redirects []Redirect
		bind      netip.Addr
	}{
		{"redirect", DefaultChains, example, netip.IPv4Unspecified()},
		{"dnat", DefaultChains, example, netip.MustParseAddr("10.0.0.5")},
		{"redirect-ipv6", DefaultChains, example6, netip.Addr{}},
		{"preserve-source-ip", transparent, example[:2], netip.IPv4Unspecified()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.chains.Render(tt.redirects, tt.bind)
			path := filepath.Join("testdata", tt.name+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != string(want) {
				t.Errorf("Render(bind %s) =\n%s\nwant\n%s", tt.bind, got, want)
			}
		})
	}
}

func TestRenderEmptyStillDeclaresChains(t *testing.T) {
	got := string(DefaultChains.Render(nil, netip.Addr{}))
	want := "*nat\n:KUP-PORTALS-CONTAINER - [0:0]\n:KUP-PORTALS-HOST - [0:0]\n:KUP-NODEPORT-CONTAINER - [0:0]\n:KUP-NODEPORT-HOST - [0:0]\nCOMMIT\n*filter\n:KUP-NODEPORT-NON-LOCAL - [0:0]\nCOMMIT\n"
	if got != want {
		t.Errorf("Render(nil) = %q, want %q (declaring a chain empties it)", got, want)
	}
}

func TestSafeComment(t *testing.T) {
	tests := map[string]string{
		"default/web:http":        "default/web:http",
		`a" -j ACCEPT`:            "a__-j_ACCEPT",
		"x\ny":                    "x_y",
		string(make([]byte, 300)): repeat('_', 255),
	}
	for in, want := range tests {
		if got := safeComment(in); got != want {
			t.Errorf("safeComment(%q) = %q, want %q", in, got, want)
		}
	}
}

func repeat(c byte, n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = c
	}
	return string(b)
}

func TestChainNamesFitTheKernel(t *testing.T) {
	for _, name := range []string{"", "a", strings.Repeat("x", 63)} {
		c := ChainsFor(name)
		for _, chain := range []string{c.PortalsContainer, c.PortalsHost, c.NodePortContainer, c.NodePortHost, c.NodePortNonLocal, c.Replies} {
			if len(chain) > 28 {
				t.Errorf("chain %s has %d characters; the kernel takes 28", chain, len(chain))
			}
		}
	}
}

// TestChainsPerProxyName: the default proxy keeps the plain names; a named
// one gets chains of its own, the same every time.
func TestChainsPerProxyName(t *testing.T) {
	if ChainsFor("").PortalsContainer != ChainPortalsContainer {
		t.Errorf("default proxy's chain = %s, want %s", ChainsFor("").PortalsContainer, ChainPortalsContainer)
	}
	a, b := ChainsFor("blue"), ChainsFor("green")
	if a.PortalsContainer == b.PortalsContainer || a.PortalsContainer == ChainPortalsContainer || a != ChainsFor("blue") {
		t.Errorf("chains of blue %q, green %q: want distinct from each other and the default, and stable", a.PortalsContainer, b.PortalsContainer)
	}
}

func TestParseCounted(t *testing.T) {
	r, ok := parseCounted("KUP-PORTALS-CONTAINER", `-A KUP-PORTALS-CONTAINER -d 10.96.0.11/32 -p tcp -m comment --comment "default/svc-test-1:http" -m tcp --dport 80 -c 3 180 -j REDIRECT --to-ports 40001`)
	want := Rule{Chain: "KUP-PORTALS-CONTAINER", Spec: `-A KUP-PORTALS-CONTAINER -d 10.96.0.11/32 -p tcp -m comment --comment "default/svc-test-1:http" -m tcp --dport 80 -j REDIRECT --to-ports 40001`, Packets: 3, Bytes: 180}
	if !ok || r != want {
		t.Errorf("parseCounted = %+v, %v; want %+v", r, ok, want)
	}
	if _, ok := parseCounted("X", "-N X"); ok {
		t.Error("a chain declaration parsed as a rule")
	}
}
