package portalloc

import (
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/netnstest"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    string // String() of the range; "" for an error
		wantErr bool
	}{
		{"", "kernel-chosen", false},
		{"  ", "kernel-chosen", false},
		{"30000-30009", "30000-30009", false},
		{"30000+9", "30000-30009", false},
		{"30000", "30000-30000", false},
		{"30009-30000", "", true},
		{"0-10", "", true},
		{"abc", "", true},
		{"1-70000", "", true},
	}
	for _, tt := range tests {
		r, err := Parse(tt.in)
		if tt.wantErr {
			if err == nil {
				t.Errorf("Parse(%q) = %v, want an error", tt.in, r)
			}
			continue
		}
		if err != nil || r.String() != tt.want {
			t.Errorf("Parse(%q) = %v, %v; want %s", tt.in, r, err, tt.want)
		}
	}
}

// bind returns an open function that really binds TCP on loopback and keeps
// the listeners in lns.
func bind(lns *[]net.Listener) func(int) (int, error) {
	return func(port int) (int, error) {
		ln, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			return 0, err
		}
		*lns = append(*lns, ln)
		return ln.Addr().(*net.TCPAddr).Port, nil
	}
}

// TestAllocateWholeRangeThenExhausted runs in a network namespace of its
// own: a fixed range of the machine's could be in use by any other process.
func TestAllocateWholeRangeThenExhausted(t *testing.T) {
	netnstest.Run(t, func() { allocateWholeRangeThenExhausted(t) })
}

func allocateWholeRangeThenExhausted(t *testing.T) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	r, err := Parse("41000-41009")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for range 10 {
		p, err := r.Allocate(bind(&lns))
		if err != nil {
			t.Fatalf("Allocate: %v", err)
		}
		if p < 41000 || p > 41009 || seen[p] {
			t.Fatalf("Allocate = %d: outside the range or handed out twice", p)
		}
		seen[p] = true
	}
	if _, err := r.Allocate(bind(&lns)); !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate on a full range: %v, want ErrExhausted", err)
	}
	// Give one back: it can be handed out again.
	lns[3].Close()
	freed := lns[3].Addr().(*net.TCPAddr).Port
	r.Release(freed)
	if p, err := r.Allocate(bind(&lns)); err != nil || p != freed {
		t.Fatalf("Allocate after Release(%d) = %d, %v", freed, p, err)
	}
}

func TestAllocateSkipsPortsInUseElsewhere(t *testing.T) {
	busy, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port := busy.Addr().(*net.TCPAddr).Port
	r, err := Parse(strconv.Itoa(port) + "+1") // two ports, the first one busy
	if err != nil {
		t.Fatal(err)
	}
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	p, err := r.Allocate(bind(&lns))
	if err != nil {
		// The second port may be busy too on a loaded machine; that is an
		// exhausted range, and the message must say why.
		t.Fatalf("Allocate next to a busy port: %v", err)
	}
	if p != port+1 {
		t.Errorf("Allocate = %d, want %d (the port not in use)", p, port+1)
	}
}

func TestNilRangeLetsTheKernelChoose(t *testing.T) {
	var r *Range
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	p1, err1 := r.Allocate(bind(&lns))
	p2, err2 := r.Allocate(bind(&lns))
	if err1 != nil || err2 != nil || p1 == 0 || p1 == p2 {
		t.Errorf("kernel-chosen ports = %d, %d (%v, %v); want two distinct non-zero ports", p1, p2, err1, err2)
	}
	r.Release(p1) // does nothing, must not panic
}

func TestEphemeralIsTheKernelsRange(t *testing.T) {
	data, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Join(strings.Fields(string(data)), "-")
	if got := Ephemeral().String(); got != want {
		t.Errorf("Ephemeral() = %s, want the kernel's %s", got, want)
	}
}

// TestKernelChosenRetries: with no range, a failed open is tried again
// (the kernel picks another port each time), a few times, not forever.
func TestKernelChosenRetries(t *testing.T) {
	var r *Range
	calls := 0
	got, err := r.Allocate(func(port int) (int, error) {
		calls++
		if port != 0 {
			t.Errorf("open(%d); want 0, the kernel's choice", port)
		}
		if calls < 3 {
			return 0, errors.New("the second socket's port is taken")
		}
		return 40000 + calls, nil
	})
	if err != nil || got != 40003 || calls != 3 {
		t.Errorf("Allocate = %d, %v after %d calls; want 40003 after 3", got, err, calls)
	}
	calls = 0
	if _, err := r.Allocate(func(int) (int, error) { calls++; return 0, errors.New("always taken") }); err == nil || calls != kernelTries {
		t.Errorf("always failing: %v after %d calls; want an error after %d", err, calls, kernelTries)
	}
}
