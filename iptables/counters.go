package iptables

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// Rule is one rule of our nat chains as the kernel holds it now, with its
// counters: how many packets it has caught. For a REDIRECT, conntrack
// sends only a flow's first packet through the nat table, so Packets
// counts connections (or UDP flows), not all their packets.
type Rule struct {
	Chain   string
	Spec    string // as iptables -S prints it, without the counters
	Packets uint64
	Bytes   uint64
}

// Rules lists the rules of our nat chains (PORTALS and NODEPORT, container
// and host) with their counters, in chain order.
func (t *Table) Rules() ([]Rule, error) {
	var out []Rule
	for _, chain := range []string{t.chains.PortalsContainer, t.chains.PortalsHost, t.chains.NodePortContainer, t.chains.NodePortHost} {
		lines, err := t.ipt.ListWithCounters("nat", chain)
		if err != nil {
			return nil, fmt.Errorf("list nat/%s: %w", chain, err)
		}
		for _, line := range lines {
			if r, ok := parseCounted(chain, line); ok {
				out = append(out, r)
			}
		}
	}
	return out, nil
}

// Redirections lists the rules of the nat chains that send the node's
// own traffic to the listeners (PORTALS and NODEPORT, host), in one
// iptables-save run: a proxy restarting after a crash reads them first
// of all, to reopen the listeners they point at, and four listings cost
// it four times the wait.
func (t *Table) Redirections() ([]Rule, error) {
	save := t.family.tool(t.backend, "-save")
	out, err := exec.Command(save, "-t", "nat").Output()
	if err != nil {
		return nil, fmt.Errorf("%s -t nat: %w", save, err)
	}
	var rules []Rule
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) > 1 && f[0] == "-A" && (f[1] == t.chains.PortalsHost || f[1] == t.chains.NodePortHost) {
			rules = append(rules, Rule{Chain: f[1], Spec: strings.TrimSpace(line)})
		}
	}
	return rules, nil
}

// parseCounted reads one line of "iptables -v -S chain": an "-A chain ..."
// line whose counters are "-c packets bytes" among its arguments.
func parseCounted(chain, line string) (Rule, bool) {
	if !strings.HasPrefix(line, "-A ") {
		return Rule{}, false
	}
	f := strings.Fields(line)
	r := Rule{Chain: chain}
	var spec []string
	for i := 0; i < len(f); i++ {
		if f[i] == "-c" && i+2 < len(f) {
			r.Packets, _ = strconv.ParseUint(f[i+1], 10, 64)
			r.Bytes, _ = strconv.ParseUint(f[i+2], 10, 64)
			i += 2
			continue
		}
		spec = append(spec, f[i])
	}
	r.Spec = strings.Join(spec, " ")
	return r, true
}
