package manifest

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// TestWatcherKeepsLastGoodState: a good edit is applied, a bad one is
// rejected while the last good objects keep serving, and fixing it applies.
func TestWatcherKeepsLastGoodState(t *testing.T) {
	path := write(t, "lab.yaml", goodService)
	applied := make(chan *Objects, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	w := &Watcher{Path: path, Interval: 10 * time.Millisecond}
	go func() { done <- w.Run(ctx, func(o *Objects) { applied <- o }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	next := func() *Objects {
		t.Helper()
		select {
		case o := <-applied:
			return o
		case <-time.After(5 * time.Second):
			t.Fatal("no apply within 5s")
			return nil
		}
	}
	if o := next(); len(o.Services) != 1 {
		t.Fatalf("first apply has %d services", len(o.Services))
	}
	rewrite := func(content string) {
		// A new size or modification time is what the watcher notices;
		// make sure the clock has moved on.
		time.Sleep(20 * time.Millisecond)
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rewrite(goodService + "---\n" + pod("web-1", "10.244.1.2", "8080", "True", "app: web-front-end"))
	if o := next(); len(o.Pods) != 1 {
		t.Fatalf("after adding a pod: %d pods", len(o.Pods))
	}
	rewrite(strings.Replace(goodService, "port: 80,", "port: 0,", 1))
	select {
	case o := <-applied:
		t.Fatalf("a bad edit was applied: %d services", len(o.Services))
	case <-time.After(200 * time.Millisecond):
	}
	rewrite(goodService)
	if o := next(); len(o.Pods) != 0 || len(o.Services) != 1 {
		t.Fatalf("after the fix: %d services, %d pods; want 1, 0", len(o.Services), len(o.Pods))
	}
}

func TestWatcherFailsOnABadStart(t *testing.T) {
	path := write(t, "lab.yaml", "kind: Service\n")
	w := &Watcher{Path: path}
	err := w.Run(context.Background(), func(*Objects) { t.Error("apply called for a bad manifest") })
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("Run on a bad manifest = %v; want an error naming %s", err, path)
	}
}
