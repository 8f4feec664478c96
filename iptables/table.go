package iptables

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"

	goipt "github.com/coreos/go-iptables/iptables"
)

// Backend is which iptables the node uses. The kernel has two rule stores,
// the legacy xtables one and nf_tables, and a rule added to one is invisible
// to the other; we must write where the node's other rules (kubelet's,
// the CNI's) live.
type Backend string

// The iptables backends.
const (
	Legacy Backend = "legacy"
	NFT    Backend = "nft"
)

// runner is the part of go-iptables' *IPTables that Table uses.
type runner interface {
	List(table, chain string) ([]string, error)
	ListWithCounters(table, chain string) ([]string, error)
	Insert(table, chain string, pos int, rulespec ...string) error
	Append(table, chain string, rulespec ...string) error
	DeleteIfExists(table, chain string, rulespec ...string) error
	ChainExists(table, chain string) (bool, error)
	NewChain(table, chain string) error
	ClearAndDeleteChain(table, chain string) error
}

// Family is the IP family a Table writes rules for: IPv4 rules live in
// iptables, IPv6 rules in ip6tables, two separate rule sets in the kernel.
type Family string

// The families.
const (
	IPv4 Family = "IPv4"
	IPv6 Family = "IPv6"
)

// tool is the name of an iptables binary of family f and backend b:
// iptables-nft, ip6tables-legacy-restore...
func (f Family) tool(b Backend, suffix string) string {
	name := "iptables-"
	if f == IPv6 {
		name = "ip6tables-"
	}
	return name + string(b) + suffix
}

// Table keeps our chains in one backend and family equal to the Redirects
// it is given.
type Table struct {
	backend Backend
	family  Family
	bind    netip.Addr
	chains  Chains
	ipt     runner
	restore string // the iptables-restore binary of the backend
}

// DetectBackend picks the backend the node already uses, as kube-proxy's
// iptables-wrapper does: the one holding more rules, nf_tables on a tie. A
// node with only one of the two gets that one.
func DetectBackend() (Backend, error) {
	// Both at once: a proxy restarting after a crash waits for this
	// before it can reopen its listeners.
	var legacy int
	var errL error
	done := make(chan struct{})
	go func() {
		defer close(done)
		legacy, errL = countRules("iptables-legacy-save")
	}()
	nft, errN := countRules("iptables-nft-save")
	<-done
	switch {
	case errL != nil && errN != nil:
		return "", fmt.Errorf("no usable iptables (install the iptables package): %w", errors.Join(errL, errN))
	case errN != nil:
		return Legacy, nil
	case errL != nil:
		return NFT, nil
	case legacy > nft:
		return Legacy, nil
	default:
		return NFT, nil
	}
}

func countRules(save string) (int, error) {
	out, err := exec.Command(save).Output()
	if err != nil {
		return 0, fmt.Errorf("run %s: %w", save, err)
	}
	n := 0
	for line := range strings.Lines(string(out)) {
		if strings.HasPrefix(line, "-A ") {
			n++
		}
	}
	return n, nil
}

// Available lists the backends whose tools for family are installed.
func Available(family Family) []Backend {
	var bs []Backend
	for _, b := range []Backend{Legacy, NFT} {
		if _, err := exec.LookPath(family.tool(b, "-restore")); err == nil {
			bs = append(bs, b)
		}
	}
	return bs
}

// New returns a Table that writes the rules of family to backend, in
// chains. bind is --bind-address (see Render), for IPv4 only.
func New(backend Backend, family Family, bind netip.Addr, chains Chains) (*Table, error) {
	if backend != Legacy && backend != NFT {
		return nil, fmt.Errorf("iptables backend %q: want %q or %q", backend, Legacy, NFT)
	}
	proto := goipt.ProtocolIPv4
	if family == IPv6 {
		proto = goipt.ProtocolIPv6
		bind = netip.Addr{}
	}
	path, err := exec.LookPath(family.tool(backend, ""))
	if err != nil {
		return nil, fmt.Errorf("iptables backend %s, %s: %w", backend, family, err)
	}
	ipt, err := goipt.New(goipt.Path(path), goipt.IPFamily(proto), goipt.Timeout(5))
	if err != nil {
		return nil, fmt.Errorf("iptables backend %s, %s: %w", backend, family, err)
	}
	restore, err := exec.LookPath(family.tool(backend, "-restore"))
	if err != nil {
		return nil, fmt.Errorf("iptables backend %s, %s: %w", backend, family, err)
	}
	return &Table{backend: backend, family: family, bind: bind, chains: chains, ipt: ipt, restore: restore}, nil
}

// Backend is the backend t writes to.
func (t *Table) Backend() Backend { return t.backend }

// Sync makes our chains hold exactly redirects, in one iptables-restore call,
// then makes sure the kernel's chains jump to ours. Restoring with --noflush
// rewrites only the chains the input names, all at once: other chains and
// everybody else's rules stay as they are, and no packet ever sees a
// half-written chain. Jumps deleted by someone else are put back here, so
// calling Sync again repairs the node.
func (t *Table) Sync(redirects []Redirect) error {
	cmd := exec.Command(t.restore, "--noflush", "--wait", "5")
	cmd.Stdin = bytes.NewReader(t.chains.Render(redirects, t.bind))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", t.restore, err, strings.TrimSpace(stderr.String()))
	}
	// Listing a built-in chain is quick whatever our chains hold; "iptables
	// -C" with the nft backend reads the whole table (0.13s each with
	// 20,000 rules).
	listed := map[[2]string][]string{}
	for _, j := range t.chains.jumps() {
		k := [2]string{j.table, j.from}
		if _, ok := listed[k]; !ok {
			rules, err := t.ipt.List(j.table, j.from)
			if err != nil {
				return fmt.Errorf("list %s/%s: %w", j.table, j.from, err)
			}
			listed[k] = rules
		}
		if err := t.ensureJump(j, listed[k]); err != nil {
			return err
		}
	}
	return nil
}

// Probe tells whether this table can hold our rules (the kernel has the nat
// table, iptables works) without changing the rules it already holds: our
// chains are created empty where they are missing, and left as they are
// where they exist. A restart must never wipe the rules of the run before
// it until the new run has its Services to write: until then, those rules
// lead to where the traffic will be served again (see --mode auto).
func (t *Table) Probe() error {
	for _, j := range t.chains.jumps() {
		chain := j.spec[len(j.spec)-1]
		ok, err := t.ipt.ChainExists(j.table, chain)
		if err == nil && !ok {
			err = t.ipt.NewChain(j.table, chain)
		}
		if err != nil {
			return fmt.Errorf("%s %s table, chain %s: %w", t.family, j.table, chain, err)
		}
	}
	return nil
}

// ensureJump adds jump j unless rules, the chain it belongs in, already
// send packets to our chain.
func (t *Table) ensureJump(j jump, rules []string) error {
	target := "-j " + j.spec[len(j.spec)-1]
	for _, r := range rules {
		if strings.HasSuffix(strings.TrimSpace(r), target) {
			return nil
		}
	}
	var err error
	if j.first {
		err = t.ipt.Insert(j.table, j.from, 1, j.spec...)
	} else {
		err = t.ipt.Append(j.table, j.from, j.spec...)
	}
	if err != nil {
		return fmt.Errorf("add jump %s/%s -> %s: %w", j.table, j.from, j.spec[len(j.spec)-1], err)
	}
	return nil
}

// Cleanup removes our jumps and chains, and nothing else. Running it when
// there is nothing to remove is not an error.
func (t *Table) Cleanup() error {
	var errs []error
	for _, j := range t.chains.allJumps() {
		if ok, _ := t.ipt.ChainExists(j.table, j.spec[len(j.spec)-1]); !ok {
			continue
		}
		if err := t.ipt.DeleteIfExists(j.table, j.from, j.spec...); err != nil {
			errs = append(errs, fmt.Errorf("delete jump %s/%s: %w", j.table, j.from, err))
		}
	}
	for _, j := range t.chains.allJumps() {
		chain := j.spec[len(j.spec)-1]
		ok, err := t.ipt.ChainExists(j.table, chain)
		if err != nil {
			errs = append(errs, fmt.Errorf("look up chain %s/%s: %w", j.table, chain, err))
			continue
		}
		if ok {
			if err := t.ipt.ClearAndDeleteChain(j.table, chain); err != nil {
				errs = append(errs, fmt.Errorf("delete chain %s/%s: %w", j.table, chain, err))
			}
		}
	}
	return errors.Join(errs...)
}
