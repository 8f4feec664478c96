// Package lab builds a small Kubernetes-shaped network out of Linux network
// namespaces, for the integration tests and for `make demo`:
//
//	                10.200.0.0/24
//	  [ext] ──────────────────────────── [node]  forwarding on, runs the proxy
//	another host                        │  │  │
//	                      10.244.1.0/24 │  │  │ 10.244.N.0/24
//	                                [pod 1] ... [pod N]
//
// Every pod is a namespace of its own joined to the node by a veth pair, with
// the node as its default gateway, as a simple CNI plugin would set it up.
// The lab is dual-stack: every link also has an IPv6 address, the IPv4
// one's twin (fd00:200::1 for the node, fd00:244:N::2 for pod N), so that
// the IPv6 half of a Service can be tested on the same pods.
// The node's default route points at ext, so ClusterIPs (which no interface
// owns) are routable from the node, as on a real node. Nothing is created
// outside the lab's namespaces, and all of them carry the lab's unique ID in
// their names. Close deletes them, with their veths, and ends every process
// the lab started.
package lab

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Addresses of the lab.
var (
	NodeIP  = netip.MustParseAddr("10.200.0.1") // the node, as other hosts see it
	ExtIP   = netip.MustParseAddr("10.200.0.2") // the other host
	NodeIP6 = netip.MustParseAddr("fd00:200::1")
	ExtIP6  = netip.MustParseAddr("fd00:200::2")
)

// PodIP6 is pod n's IPv6 address, fd00:244:n::2.
func PodIP6(n int) netip.Addr {
	return netip.MustParseAddr(fmt.Sprintf("fd00:244:%x::2", n))
}

// ip6 adds IPv6 address a/64 to dev in namespace ns, usable at once: no
// duplicate address detection (nodad), which would hold it "tentative"
// for a second or two, and iptables' REDIRECT skips tentative addresses.
func ip6(ns, a, dev string) []string {
	return []string{"-n", ns, "addr", "add", a + "/64", "dev", dev, "nodad"}
}

// NS is one network namespace of the lab.
type NS struct {
	Name string
}

// Lab is a running lab.
type Lab struct {
	ID   string
	Node *NS // the first node
	Ext  *NS
	Pods []*Pod
	// Nodes are all the nodes: Node, and those AddNode made. Node i is
	// 10.200.i.1 to the others, behind ext (10.200.i.2), which routes
	// between them.
	Nodes []*NS

	mu    sync.Mutex
	procs []*Proc
	nss   []*NS
	etcs  []string // /etc/netns/<name> folders we made

	forwarders []*forwarder
}

// Pod is a pod namespace with its addresses.
type Pod struct {
	NS
	Index int
	IP    netip.Addr
	IP6   netip.Addr
}

// New builds the node and ext namespaces. On error, whatever was built is
// removed again.
func New() (l *Lab, err error) {
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("the lab needs %s (Debian package iproute2 / iptables): %w", tool, err)
		}
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("the lab needs root: it creates network namespaces")
	}
	b := make([]byte, 3)
	rand.Read(b)
	l = &Lab{ID: fmt.Sprintf("kup%s", hex.EncodeToString(b))}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	if l.Node, err = l.newNS("node"); err != nil {
		return nil, err
	}
	if l.Ext, err = l.newNS("ext"); err != nil {
		return nil, err
	}
	steps := [][]string{
		{"link", "add", "ext0", "netns", l.Node.Name, "type", "veth", "peer", "name", "eth0", "netns", l.Ext.Name},
		{"-n", l.Node.Name, "addr", "add", NodeIP.String() + "/24", "dev", "ext0"},
		{"-n", l.Node.Name, "link", "set", "ext0", "up"},
		{"-n", l.Ext.Name, "addr", "add", ExtIP.String() + "/24", "dev", "eth0"},
		{"-n", l.Ext.Name, "link", "set", "eth0", "up"},
		{"-n", l.Node.Name, "route", "add", "default", "via", ExtIP.String()},
		{"-n", l.Ext.Name, "route", "add", "10.244.0.0/16", "via", NodeIP.String()},
		ip6(l.Node.Name, NodeIP6.String(), "ext0"),
		ip6(l.Ext.Name, ExtIP6.String(), "eth0"),
		{"-n", l.Node.Name, "-6", "route", "add", "default", "via", ExtIP6.String()},
		{"-n", l.Ext.Name, "-6", "route", "add", "fd00:244::/32", "via", NodeIP6.String()},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return nil, err
		}
	}
	// Forwarding on, as on every node: pods talk to pods through it; and on
	// ext, which routes between nodes.
	for _, ns := range []*NS{l.Node, l.Ext} {
		if err := ns.forward(); err != nil {
			return nil, err
		}
	}
	l.Nodes = []*NS{l.Node}
	return l, nil
}

// AddNode makes another node, number len(Nodes): 10.200.i.1 on its link to
// ext, which is its default gateway.
func (l *Lab) AddNode(name string) (*NS, error) {
	i := len(l.Nodes)
	n, err := l.newNS(name)
	if err != nil {
		return nil, err
	}
	nodeIP, gw := fmt.Sprintf("10.200.%d.1", i), fmt.Sprintf("10.200.%d.2", i)
	nodeIP6, gw6 := fmt.Sprintf("fd00:200:%x::1", i), fmt.Sprintf("fd00:200:%x::2", i)
	link := fmt.Sprintf("node%d", i)
	steps := [][]string{
		{"link", "add", "ext0", "netns", n.Name, "type", "veth", "peer", "name", link, "netns", l.Ext.Name},
		{"-n", n.Name, "addr", "add", nodeIP + "/24", "dev", "ext0"},
		{"-n", n.Name, "link", "set", "ext0", "up"},
		{"-n", l.Ext.Name, "addr", "add", gw + "/24", "dev", link},
		{"-n", l.Ext.Name, "link", "set", link, "up"},
		{"-n", n.Name, "route", "add", "default", "via", gw},
		ip6(n.Name, nodeIP6, "ext0"),
		ip6(l.Ext.Name, gw6, link),
		{"-n", n.Name, "-6", "route", "add", "default", "via", gw6},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return nil, err
		}
	}
	if err := n.forward(); err != nil {
		return nil, err
	}
	l.Nodes = append(l.Nodes, n)
	return n, nil
}

// forward turns IPv4 and IPv6 forwarding on in n, as on every node and
// router.
func (n *NS) forward() error {
	_, err := n.Run(context.Background(), "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
	return err
}

func (l *Lab) newNS(role string) (*NS, error) {
	ns := &NS{Name: l.ID + "-" + role}
	if err := ip("netns", "add", ns.Name); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.nss = append(l.nss, ns)
	l.mu.Unlock()
	if err := ip("-n", ns.Name, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	return ns, nil
}

// AddPod makes pod number n (1 to 254) on the first node, with address
// 10.244.n.2 and the node at 10.244.n.1 as its gateway.
func (l *Lab) AddPod(name string, n int) (*Pod, error) { return l.AddPodOn(l.Node, name, n) }

// AddPodOn makes pod number n on node.
func (l *Lab) AddPodOn(node *NS, name string, n int) (*Pod, error) {
	if n < 1 || n > 254 {
		return nil, fmt.Errorf("pod number %d: want 1 to 254", n)
	}
	for _, p := range l.Pods {
		if p.Index == n {
			return nil, fmt.Errorf("pod number %d is taken by %s", n, p.Name)
		}
	}
	ns, err := l.newNS(name)
	if err != nil {
		return nil, err
	}
	p := &Pod{NS: *ns, Index: n, IP: netip.AddrFrom4([4]byte{10, 244, byte(n), 2}), IP6: PodIP6(n)}
	gw, gw6 := fmt.Sprintf("10.244.%d.1", n), fmt.Sprintf("fd00:244:%x::1", n)
	veth := fmt.Sprintf("pod%d", n)
	steps := [][]string{
		{"link", "add", veth, "netns", node.Name, "type", "veth", "peer", "name", "eth0", "netns", p.Name},
		{"-n", node.Name, "addr", "add", gw + "/24", "dev", veth},
		ip6(node.Name, gw6, veth),
		{"-n", node.Name, "link", "set", veth, "up"},
		{"-n", p.Name, "addr", "add", p.IP.String() + "/24", "dev", "eth0"},
		ip6(p.Name, p.IP6.String(), "eth0"),
		{"-n", p.Name, "link", "set", "eth0", "up"},
		{"-n", p.Name, "route", "add", "default", "via", gw},
		{"-n", p.Name, "-6", "route", "add", "default", "via", gw6},
	}
	for i, nd := range l.Nodes {
		if nd == node && i > 0 {
			// ext sends this pod's subnet to its node (the first node's
			// pods are reached through ext's route for all of 10.244/16).
			steps = append(steps,
				[]string{"-n", l.Ext.Name, "route", "add", fmt.Sprintf("10.244.%d.0/24", n), "via", fmt.Sprintf("10.200.%d.1", i)},
				[]string{"-n", l.Ext.Name, "-6", "route", "add", fmt.Sprintf("fd00:244:%x::/64", n), "via", fmt.Sprintf("fd00:200:%x::1", i)})
		}
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return nil, err
		}
	}
	l.Pods = append(l.Pods, p)
	return p, nil
}

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// SetResolvConf gives namespace n its own /etc/resolv.conf: `ip netns exec`
// bind-mounts /etc/netns/<name>/resolv.conf over /etc/resolv.conf for every
// command it runs there. Close removes the folder.
func (l *Lab) SetResolvConf(n *NS, content string) error {
	dir := filepath.Join("/etc/netns", n.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	l.mu.Lock()
	l.etcs = append(l.etcs, dir)
	l.mu.Unlock()
	return os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(content), 0o644)
}

// Run runs a command inside the namespace and returns its standard output.
func (n *NS) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("in %s: %s %s: %w: %s", n.Name, name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

// Proc is a process the lab started in one of its namespaces.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set when done is closed

	mu      sync.Mutex
	lines   []string        // what it printed, stdout and stderr
	waiters []chan struct{} // closed at the next line
}

// Start starts a long-running command inside the namespace. Its output is
// kept, line by line, and can be waited for with WaitFor.
func (l *Lab) Start(n *NS, name string, args ...string) (*Proc, error) {
	// ip netns exec replaces itself with the command, so the PID we hold is
	// the command's own.
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	r, w := io.Pipe()
	cmd.Stdout, cmd.Stderr = w, w
	p := &Proc{Name: name, cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", name, n.Name, err)
	}
	l.mu.Lock()
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	read := make(chan struct{})
	go func() {
		defer close(read)
		p.read(r)
	}()
	go func() {
		p.err = cmd.Wait()
		w.Close()
		// Wait has copied the output into the pipe, but the reader may
		// not have stored its last lines yet: done must come after
		// them, or WaitFor could report an exit before a line the
		// process did print.
		<-read
		close(p.done)
	}()
	return p, nil
}

func (p *Proc) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		p.mu.Lock()
		p.lines = append(p.lines, line)
		for _, w := range p.waiters {
			close(w)
		}
		p.waiters = nil
		p.mu.Unlock()
	}
}

// PID is the process ID.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Output is everything the process printed so far.
func (p *Proc) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// Lines returns the lines printed from line number from on.
func (p *Proc) Lines(from int) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if from > len(p.lines) {
		return nil
	}
	return append([]string(nil), p.lines[from:]...)
}

// WaitFor waits until the process prints a line, at line number from or
// later, for which match is true, and returns that line's number. It fails
// if the process exits or the timeout passes first.
func (p *Proc) WaitFor(from int, timeout time.Duration, match func(string) bool) (int, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		p.mu.Lock()
		for i := from; i < len(p.lines); i++ {
			if match(p.lines[i]) {
				p.mu.Unlock()
				return i, nil
			}
		}
		from = max(from, len(p.lines))
		wake := make(chan struct{})
		p.waiters = append(p.waiters, wake)
		p.mu.Unlock()
		select {
		case <-wake:
		case <-p.done:
			p.mu.Lock()
			n := len(p.lines)
			p.mu.Unlock()
			if from < n {
				continue // lines printed just before the exit
			}
			return 0, fmt.Errorf("%s exited (%v) before printing what was awaited; it printed:\n%s", p.Name, p.err, p.Output())
		case <-timer.C:
			return 0, fmt.Errorf("%s did not print what was awaited within %s; it printed:\n%s", p.Name, timeout, p.Output())
		}
	}
}

// NumLines is how many lines the process has printed so far.
func (p *Proc) NumLines() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.lines)
}

// Signal sends sig to the process and, for SIGTERM and SIGKILL, waits for it
// to exit, returning how it exited.
func (p *Proc) Signal(sig syscall.Signal) error {
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	if sig != syscall.SIGTERM && sig != syscall.SIGKILL {
		return nil
	}
	select {
	case <-p.done:
		return p.err
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not exit within 10s of %s; killed", p.Name, sig)
	}
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Running reports whether the process has not exited yet.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Close ends every process the lab started (by PID), then deletes its
// namespaces, which takes their veths with them. It is safe to call twice.
func (l *Lab) Close() error {
	l.mu.Lock()
	procs, nss, etcs, fwds := l.procs, l.nss, l.etcs, l.forwarders
	l.procs, l.nss, l.etcs, l.forwarders = nil, nil, nil, nil
	l.mu.Unlock()
	for _, f := range fwds {
		f.close()
	}
	for _, p := range procs {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	var errs []error
	for _, dir := range etcs {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(nss) - 1; i >= 0; i-- {
		if err := ip("netns", "del", nss[i].Name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
