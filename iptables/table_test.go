package iptables

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/netnstest"
)

func save(t *testing.T, backend Backend, family Family) string {
	out, err := exec.Command(family.tool(backend, "-save")).CombinedOutput()
	if err != nil {
		t.Errorf("%s: %v: %s", family.tool(backend, "-save"), err, out)
	}
	return string(out)
}

func run(t *testing.T, args ...string) {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// TestTableInNetns writes, repairs and removes our chains with the real
// iptables of each backend, in a namespace of its own.
func TestTableInNetns(t *testing.T) {
	for _, tt := range []struct {
		backend  Backend
		family   Family
		rules    []Redirect
		wantRule string
	}{
		{NFT, IPv4, example, "-A KUP-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j REDIRECT --to-ports 37000"},
		{Legacy, IPv4, example, "-A KUP-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j REDIRECT --to-ports 37000"},
		{NFT, IPv6, example6, "-A KUP-PORTALS-CONTAINER -d fd00:96::10/128 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j REDIRECT --to-ports 37010"},
		{Legacy, IPv6, example6, "-A KUP-PORTALS-CONTAINER -d fd00:96::10/128 -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j REDIRECT --to-ports 37010"},
	} {
		backend, family, example := tt.backend, tt.family, tt.rules
		t.Run(string(backend)+"-"+string(family), func(t *testing.T) {
			netnstest.Run(t, func() {
				ipt := family.tool(backend, "")
				// Somebody else's rules, which we must never touch.
				run(t, ipt, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8443", "-j", "REDIRECT", "--to-ports", "443")
				run(t, ipt, "-t", "nat", "-N", "OTHER-CHAIN")
				run(t, ipt, "-t", "nat", "-A", "OTHER-CHAIN", "-j", "RETURN")

				tab, err := New(backend, family, netip.IPv4Unspecified(), DefaultChains)
				if err != nil {
					t.Fatal(err)
				}
				// Probe on a fresh table makes our chains, and only them.
				if err := tab.Probe(); err != nil {
					t.Fatalf("Probe: %v", err)
				}
				if got := save(t, backend, family); !strings.Contains(got, ":"+ChainPortalsContainer) || strings.Contains(got, "-j "+ChainPortalsContainer) {
					t.Errorf("after Probe on a fresh table, want our chain and no jump yet:\n%s", got)
				}
				if err := tab.Sync(example); err != nil {
					t.Fatalf("Sync: %v", err)
				}
				if err := tab.Sync(example[:1]); err != nil {
					t.Fatalf("second Sync: %v", err)
				}
				got := save(t, backend, family)
				for _, want := range []string{
					"-A PREROUTING -m comment --comment \"kube-userspace-proxy service portals\" -j KUP-PORTALS-CONTAINER",
					tt.wantRule,
					"-A PREROUTING -p tcp -m tcp --dport 8443 -j REDIRECT --to-ports 443",
					"-A OTHER-CHAIN -j RETURN",
				} {
					if !strings.Contains(got, want) {
						t.Errorf("iptables-save lacks %q:\n%s", want, got)
					}
				}
				if strings.Contains(got, "--dport 30080") || strings.Contains(got, "37001") {
					t.Errorf("rules of the first Sync survived the second:\n%s", got)
				}
				if n := strings.Count(got, "-j KUP-PORTALS-CONTAINER"); n != 1 {
					t.Errorf("%d jumps to KUP-PORTALS-CONTAINER, want exactly 1:\n%s", n, got)
				}
				// The portal jump must come before the other PREROUTING rule.
				if strings.Index(got, "-j KUP-PORTALS-CONTAINER") > strings.Index(got, "--dport 8443") {
					t.Errorf("our portal jump is not first in PREROUTING:\n%s", got)
				}

				// Someone deletes our jump and adds a rule to our chain:
				// the next Sync repairs both.
				run(t, ipt, "-t", "nat", "-D", "OUTPUT", "-m", "comment", "--comment", "kube-userspace-proxy service portals", "-j", ChainPortalsHost)
				run(t, ipt, "-t", "nat", "-A", ChainPortalsHost, "-j", "RETURN")
				if err := tab.Sync(example[:1]); err != nil {
					t.Fatalf("repairing Sync: %v", err)
				}
				got = save(t, backend, family)
				if !strings.Contains(got, "-A OUTPUT -m comment --comment \"kube-userspace-proxy service portals\" -j KUP-PORTALS-HOST") {
					t.Errorf("the deleted jump was not put back:\n%s", got)
				}
				if strings.Contains(got, "-A KUP-PORTALS-HOST -j RETURN") {
					t.Errorf("a foreign rule in our chain survived Sync:\n%s", got)
				}

				// Probe (as a restart's mode and IPv6 checks do) leaves
				// what a previous run wrote in place.
				if err := tab.Probe(); err != nil {
					t.Fatalf("Probe: %v", err)
				}
				if got := save(t, backend, family); !strings.Contains(got, tt.wantRule) {
					t.Errorf("Probe removed our rules:\n%s", got)
				}

				for range 2 {
					if err := tab.Cleanup(); err != nil {
						t.Fatalf("Cleanup: %v", err)
					}
				}
				got = save(t, backend, family)
				if strings.Contains(got, "KUP-") {
					t.Errorf("Cleanup left our chains behind:\n%s", got)
				}
				for _, want := range []string{"--dport 8443", "-A OTHER-CHAIN -j RETURN"} {
					if !strings.Contains(got, want) {
						t.Errorf("Cleanup removed somebody else's rule %q:\n%s", want, got)
					}
				}
			})
		})
	}
}
