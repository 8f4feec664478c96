// Package netnstest runs a test's code in a network namespace of its own,
// so that it can use the real kernel (iptables, conntrack, sockets)
// without touching the machine's.
package netnstest

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
)

// Run runs f on a thread that has entered a new network namespace, with
// its loopback up, so every command f runs and every socket f opens acts
// in that namespace. The namespace is deleted afterwards. Sockets must be
// made by f itself, not by goroutines it starts: those run on other
// threads, in the machine's namespace. (A socket made here may then be
// used from any goroutine.)
func Run(t *testing.T, f func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root: it creates a network namespace (make test runs as root in CI)")
	}
	b := make([]byte, 4)
	rand.Read(b)
	name := "kupt" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	defer exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v: %s", err, out)
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		// This thread's namespace is changed for good: locking it and
		// never unlocking makes the runtime discard the thread when the
		// goroutine ends, so no other goroutine ever runs in it. (f must
		// not start children with Pdeathsig: they would die with the
		// thread.)
		runtime.LockOSThread()
		ns, err := netns.GetFromName(name)
		if err != nil {
			t.Errorf("open netns %s: %v", name, err)
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			t.Errorf("enter netns %s: %v", name, err)
			return
		}
		f()
	}()
	<-done
}
