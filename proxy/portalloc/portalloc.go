// Package portalloc hands out our listener ports (--proxy-port-range): ports
// of the node, never NodePorts. Each service port gets a listener of its own on the
// node, and the iptables rules send the Service's traffic there; these
// "proxy ports" are private plumbing, never seen by pods.
package portalloc

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"

	utilnet "k8s.io/apimachinery/pkg/util/net"
)

// ErrExhausted is returned when every port of the range is taken.
var ErrExhausted = errors.New("no free port left in --proxy-port-range")

// Range allocates ports from a fixed range. A nil *Range lets the kernel
// choose each port, which is what an empty --proxy-port-range means.
type Range struct {
	base, size int

	mu   sync.Mutex
	used map[int]bool
}

// Parse reads a --proxy-port-range value as kube-proxy did: "begin-end",
// "begin+offset" (begin to begin+offset), a single port, or "" for
// kernel-chosen ports (a nil *Range and no error).
func Parse(s string) (*Range, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	pr, err := utilnet.ParsePortRange(s)
	if err != nil {
		return nil, fmt.Errorf("--proxy-port-range %q: %w (want begin-end, begin+offset, a single port, or empty for kernel-chosen ports)", s, err)
	}
	if pr.Base == 0 {
		return nil, fmt.Errorf("--proxy-port-range %q: port 0 is not a port (want a range inside 1-65535)", s)
	}
	return &Range{base: pr.Base, size: pr.Size, used: make(map[int]bool)}, nil
}

// String gives the range as begin-end, or "kernel-chosen" for a nil range.
func (r *Range) String() string {
	if r == nil {
		return "kernel-chosen"
	}
	return fmt.Sprintf("%d-%d", r.base, r.base+r.size-1)
}

// Allocate finds a port that open can bind and returns the port open bound.
// open is called with a candidate port (0 for a nil Range, meaning "any") and
// returns the port it bound. Candidates start at a random place in the range
// and a port that open fails on, because some other program holds it, is
// skipped, so a busy host port never stops a Service from being proxied.
func (r *Range) Allocate(open func(port int) (int, error)) (int, error) {
	if r == nil {
		// The kernel picks a port on every try. A caller that binds a
		// second socket on the port it got (the DNS stub: UDP, then TCP)
		// can find that one taken; a few more tries get other ports.
		var err error
		for range kernelTries {
			var got int
			if got, err = open(0); err == nil {
				return got, nil
			}
		}
		return 0, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	start := rand.IntN(r.size)
	var lastErr error
	for i := range r.size {
		port := r.base + (start+i)%r.size
		if r.used[port] {
			continue
		}
		got, err := open(port)
		if err != nil {
			lastErr = err
			continue
		}
		r.used[port] = true
		return got, nil
	}
	if lastErr != nil {
		return 0, fmt.Errorf("%w %s (last bind error: %v)", ErrExhausted, r, lastErr)
	}
	return 0, fmt.Errorf("%w %s", ErrExhausted, r)
}

// Reserve marks port as handed out: a listener the proxy took over from
// the process before it holds it. A port outside the range, or a nil
// range, is left alone.
func (r *Range) Reserve(port int) {
	if r == nil || port < r.base || port >= r.base+r.size {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.used[port] = true
}

// kernelTries is how often a nil Range asks the kernel for a port.
const kernelTries = 8

// Release gives port back to the range. Releasing a port that the range did
// not hand out, or a nil range, does nothing.
func (r *Range) Release(port int) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.used, port)
}

// Ephemeral returns the kernel's ephemeral port range
// (net.ipv4.ip_local_port_range) as a Range, for an empty
// --proxy-port-range: the ports the kernel itself would choose from. Asking
// for port 0 lets the kernel search for a free port on every bind, which
// grows slow as thousands are taken (10,000 listeners took 3s of bind calls
// here); binding chosen ports is quick at any count. It returns nil (let the
// kernel choose) when the range cannot be read.
func Ephemeral() *Range {
	data, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return nil
	}
	var lo, hi int
	if _, err := fmt.Sscan(string(data), &lo, &hi); err != nil || lo < 1 || hi < lo || hi > 65535 {
		return nil
	}
	return &Range{base: lo, size: hi - lo + 1, used: make(map[int]bool)}
}
