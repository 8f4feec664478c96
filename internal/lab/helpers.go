package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Tools are the binaries the lab runs: the proxy under test and kup-lab,
// which serves as the pods' web server and the clients.
type Tools struct {
	Proxy  string // kube-userspace-proxy
	Helper string // kup-lab
}

// AddWeb makes the pod of web pod w on the first node and starts its web
// server.
func (l *Lab) AddWeb(t Tools, w WebPod) (*Proc, error) { return l.AddWebOn(l.Node, t, w) }

// AddWebOn makes the pod of web pod w on node and starts its web server.
func (l *Lab) AddWebOn(node *NS, t Tools, w WebPod) (*Proc, error) {
	p, err := l.AddPodOn(node, w.Name, w.Index)
	if err != nil {
		return nil, err
	}
	return l.StartWeb(p, t, w)
}

// StartWeb starts web pod w's server in pod p, which exists: the first
// time, or again after the server was killed. extra are more flags of
// kup-lab web, such as --log-peers.
func (l *Lab) StartWeb(p *Pod, t Tools, w WebPod, extra ...string) (*Proc, error) {
	args := append([]string{"web", "--listen", "::", // both families
		"--port", strconv.Itoa(w.WebPort), "--udp-port", strconv.Itoa(UDPTargetPort), "--text", w.Greeting()}, extra...)
	proc, err := l.Start(&p.NS, t.Helper, args...)
	if err != nil {
		return nil, err
	}
	if _, err := proc.WaitFor(0, 10*time.Second, func(s string) bool { return strings.HasPrefix(s, "serving") }); err != nil {
		return nil, err
	}
	return proc, nil
}

// StartProxy starts the proxy in the first node on manifest (none: the
// extra arguments name its source), with JSON logs, and waits until it has
// programmed its first state.
func (l *Lab) StartProxy(t Tools, manifest string, extra ...string) (*Proc, error) {
	return l.StartProxyOn(l.Node, t, manifest, extra...)
}

// StartProxyOn is StartProxy on node.
func (l *Lab) StartProxyOn(node *NS, t Tools, manifest string, extra ...string) (*Proc, error) {
	args := append([]string{"--log-format", "json", "-v", "3"}, extra...)
	if manifest != "" {
		args = append(args, "--manifests", manifest)
	}
	proc, err := l.Start(node, t.Proxy, args...)
	if err != nil {
		return nil, err
	}
	if _, err := proc.WaitFor(0, 15*time.Second, LogMessage("Synced")); err != nil {
		return nil, err
	}
	return proc, nil
}

// LogMessage matches a JSON log line with the given msg.
func LogMessage(msg string) func(string) bool {
	return func(line string) bool {
		var entry struct {
			Msg string `json:"msg"`
		}
		return json.Unmarshal([]byte(line), &entry) == nil && entry.Msg == msg
	}
}

// LogEntry decodes one JSON log line.
func LogEntry(line string) map[string]any {
	m := map[string]any{}
	json.Unmarshal([]byte(line), &m)
	return m
}

// Curl fetches url from inside ns with curl and returns the body.
func (n *NS) Curl(ctx context.Context, url string) (string, error) {
	out, err := n.Run(ctx, "curl", "-sS", "--max-time", "5", url)
	return strings.TrimSpace(string(out)), err
}

// Tally makes n requests to url from inside ns, each on a new connection,
// and returns how often each answer came back, and the number of failures.
func (n *NS) Tally(ctx context.Context, t Tools, url string, requests int) (map[string]int, int, error) {
	out, err := n.Run(ctx, t.Helper, "get", "-n", strconv.Itoa(requests), "--parallel", "4", url)
	if err != nil {
		return nil, 0, err
	}
	tally := map[string]int{}
	failures := -1
	for line := range strings.Lines(string(out)) {
		count, body, ok := strings.Cut(strings.TrimSpace(line), "\t")
		c, err := strconv.Atoi(count)
		if !ok || err != nil {
			return nil, 0, fmt.Errorf("unexpected tally line %q", line)
		}
		if body == "failures" {
			failures = c
		} else {
			tally[body] = c
		}
	}
	if failures < 0 {
		return nil, 0, fmt.Errorf("tally without a failure count:\n%s", out)
	}
	return tally, failures, nil
}

// UDP sends one datagram of size bytes to addr from inside ns and returns
// the first line of the reply (the answering pod's greeting).
func (n *NS) UDP(ctx context.Context, t Tools, addr netip.AddrPort, size int) (string, error) {
	out, err := n.Run(ctx, t.Helper, "udp", addr.String(), "--size", strconv.Itoa(size))
	if err != nil {
		return "", err
	}
	greeting, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\t")
	return greeting, nil
}

// OurRules returns the lines of iptables-save in the node namespace that
// mention our chains.
func (l *Lab) OurRules(ctx context.Context) (string, error) {
	out, err := l.Node.Run(ctx, "iptables-save")
	if err != nil {
		return "", err
	}
	var ours []string
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, "KUP-") {
			ours = append(ours, strings.TrimRight(line, "\n"))
		}
	}
	return strings.Join(ours, "\n"), nil
}
