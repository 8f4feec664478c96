// Package nsvisit runs a function inside a network namespace, on a thread
// that comes back afterwards: sockets the function makes belong to the
// namespace (a socket keeps the namespace it was made in), and the rest
// of the process stays where it was.
package nsvisit

import (
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs f on a thread that has entered the network namespace named name
// (under /run/netns), then brings the thread back. It must come back
// rather than be discarded: processes started with Pdeathsig (the lab's,
// the control plane's, the node's daemons) are killed when the thread
// that started them exits, and any thread may have started one. Only if
// the way back fails is the thread left locked, so that the runtime ends
// it instead of running other goroutines inside the namespace.
func Do(name string, f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer home.Close()
		ns, err := netns.GetFromName(name)
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		err = f()
		if netns.Set(home) == nil {
			runtime.UnlockOSThread()
		}
		done <- err
	}()
	return <-done
}
