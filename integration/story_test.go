package integration

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestServiceStory tells the story of svc-test-1 against the real binary,
// with the steps `make demo` narrates (lab.Steps): a pod and the node reach
// the ClusterIP, the path of one connection is seen hop by hop, the name
// resolves through the DNS stub, the Service scales, loses a pod, moves to
// v2 by a selector change, is reached through its NodePort, is explained,
// and leaves nothing behind after --cleanup. It is told twice: in redirect
// mode (iptables rules) and in bind mode, where after every step the node
// must have no netfilter rule or chain at all.
func TestServiceStory(t *testing.T) {
	for _, mode := range []string{"redirect", "bind"} {
		t.Run(mode, func(t *testing.T) { serviceStory(t, mode) })
	}
}

func serviceStory(t *testing.T, mode string) {
	ctx := context.Background()
	var narration strings.Builder
	tour, err := lab.NewTour(tools, mode, &narration)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tour.Close(); err != nil {
			t.Errorf("tear down the lab: %v", err)
		}
	})
	for _, step := range lab.Steps() {
		narration.Reset()
		ok := t.Run(step.Title, func(t *testing.T) {
			if err := step.Run(ctx, tour); err != nil {
				t.Fatalf("%v\nthe step printed:\n%s", err, narration.String())
			}
			// In bind mode, no netfilter anywhere, and the ClusterIP is
			// ours (until the cleanup at the end).
			if mode == "bind" && tour.Proxy.Running() {
				noNetfilter(t, tour.Lab)
				if addrs := ourAddresses(t, tour.Lab); !strings.Contains(addrs, lab.ClusterIP.String()+"/32") {
					t.Errorf("bind mode: the ClusterIP is not among our addresses:\n%s", addrs)
				}
			}
		})
		if !ok {
			return // the steps build on each other
		}
	}
}

func equalTally(got, want map[string]int) bool {
	if len(got) != len(want) {
		return false
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

// noNetfilter fails t if the node has any iptables (legacy or nft) or
// nftables rule or chain.
func noNetfilter(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, cmd := range [][]string{{"iptables-legacy-save"}, {"iptables-nft-save"}, {"nft", "list", "ruleset"}} {
		out, err := l.Node.Run(context.Background(), cmd[0], cmd[1:]...)
		if err != nil {
			t.Errorf("%s: %v", cmd, err)
			continue
		}
		for line := range strings.Lines(string(out)) {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				t.Errorf("%s in bind mode shows netfilter state:\n%s", strings.Join(cmd, " "), out)
				break
			}
		}
	}
}

// ourAddresses lists the node's addresses that carry our label.
func ourAddresses(t *testing.T, l *lab.Lab) string {
	t.Helper()
	out, err := l.Node.Run(context.Background(), "ip", "-4", "-o", "addr", "show")
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, ":kup") {
			ours = append(ours, strings.TrimSpace(line))
		}
	}
	return strings.Join(ours, "\n")
}

// metricValue finds the value of one series in Prometheus text output; -1
// when it is not there.
func metricValue(text, series string) float64 {
	for line := range strings.Lines(text) {
		if name, value, ok := strings.Cut(strings.TrimSpace(line), " "); ok && name == series {
			var v float64
			if _, err := fmt.Sscan(value, &v); err == nil {
				return v
			}
		}
	}
	return -1
}
