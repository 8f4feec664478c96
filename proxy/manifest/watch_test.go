package manifest

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// loadCPU keeps every CPU busy until the test ends: the watcher must hold
// on a loaded node, where a writer can be descheduled in the middle of a
// write.
func loadCPU(t *testing.T) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range runtime.NumCPU() {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				for i := 0; i < 1e5; i++ {
				}
			}
		})
	}
	t.Cleanup(func() {
		close(stop)
		wg.Wait()
	})
}

// watch runs a Watcher on path until the test ends and returns the channel
// of what it applies.
func watch(t *testing.T, path string) <-chan *Objects {
	t.Helper()
	applied := make(chan *Objects, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	w := &Watcher{Path: path}
	go func() { done <- w.Run(ctx, func(o *Objects) { applied <- o }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return applied
}

// next waits for the next apply.
func next(t *testing.T, applied <-chan *Objects) *Objects {
	t.Helper()
	select {
	case o := <-applied:
		return o
	case <-time.After(10 * time.Second):
		t.Fatal("no apply within 10s")
		return nil
	}
}

// none fails if anything is applied within d. (It cannot fail because the
// machine is slow: a slow watcher applies later, not sooner.)
func none(t *testing.T, applied <-chan *Objects, d time.Duration, why string) {
	t.Helper()
	select {
	case o := <-applied:
		t.Fatalf("%s: applied %d services, %d pods", why, len(o.Services), len(o.Pods))
	case <-time.After(d):
	}
}

const withPod = goodService + "---\n" + `apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web-front-end}}
spec:
  containers:
  - name: web
    ports:
    - {name: web-port, containerPort: 8080}
status:
  podIP: 10.244.1.2
  conditions: [{type: Ready, status: "True"}]
`

// TestWatcherKeepsLastGoodState: a good edit is applied, a bad one is
// rejected while the last good objects keep serving, and fixing it applies;
// on a loaded machine.
func TestWatcherKeepsLastGoodState(t *testing.T) {
	loadCPU(t)
	path := write(t, "lab.yaml", goodService)
	applied := watch(t, path)
	if o := next(t, applied); len(o.Services) != 1 {
		t.Fatalf("first apply has %d services", len(o.Services))
	}
	rewrite := func(content string) {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rewrite(withPod)
	if o := next(t, applied); len(o.Pods) != 1 {
		t.Fatalf("after adding a pod: %d pods", len(o.Pods))
	}
	rewrite(strings.Replace(goodService, "port: 80,", "port: 0,", 1))
	none(t, applied, 300*time.Millisecond, "a bad edit")
	rewrite(goodService)
	if o := next(t, applied); len(o.Pods) != 0 || len(o.Services) != 1 {
		t.Fatalf("after the fix: %d services, %d pods; want 1, 0", len(o.Services), len(o.Pods))
	}
}

// TestWatcherWaitsForTheWriter: `{ sleep 2; cat good.yaml; } > lab.yaml`
// (what `kubectl get -o yaml > lab.yaml` does) truncates the file at once
// and fills it later. Neither the empty file nor the whole one is applied
// while the writer still has it open; the whole one is, once it closes.
func TestWatcherWaitsForTheWriter(t *testing.T) {
	path := write(t, "lab.yaml", goodService)
	applied := watch(t, path)
	next(t, applied)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	none(t, applied, time.Second, "the truncated file, its writer still busy")
	if _, err := f.WriteString(withPod); err != nil {
		t.Fatal(err)
	}
	none(t, applied, 500*time.Millisecond, "the written file, still open for writing")
	f.Close()
	if o := next(t, applied); len(o.Services) != 1 || len(o.Pods) != 1 {
		t.Fatalf("after the writer closed: %d services, %d pods; want 1, 1", len(o.Services), len(o.Pods))
	}
}

// TestWatcherFollowsAConfigMapSwap: a mounted ConfigMap is updated by
// kubelet's atomic writer, which writes a new directory and renames the
// "..data" symlink over the old one; the manifest's own name is a symlink
// through "..data" that never changes.
func TestWatcherFollowsAConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	version := func(name, content string) {
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name, "lab.yaml"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(name, filepath.Join(dir, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	version("..2026_12_02_01", goodService)
	if err := os.Symlink("..data/lab.yaml", filepath.Join(dir, "lab.yaml")); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{dir, filepath.Join(dir, "lab.yaml")} {
		applied := watch(t, path)
		if o := next(t, applied); len(o.Services) != 1 {
			t.Fatalf("watching %s: first apply has %d services", path, len(o.Services))
		}
		version("..2026_12_02_02"+filepath.Base(path), withPod)
		if o := next(t, applied); len(o.Pods) != 1 {
			t.Fatalf("watching %s: after the swap, %d pods; want 1", path, len(o.Pods))
		}
	}
}

// TestLoadRefusesWhatIsNotAWholeFile: a FIFO, an oversized file and an empty
// file are refused, each named, without blocking.
func TestLoadRefusesWhatIsNotAWholeFile(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(dir, "x.yaml"), 0o644); err != nil {
		t.Fatal(err)
	}
	huge := filepath.Join(t.TempDir(), "huge.yaml")
	if err := os.WriteFile(huge, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(huge, MaxFileBytes+1); err != nil { // sparse: no disk used
		t.Fatal(err)
	}
	for _, tt := range []struct{ path, want string }{
		{dir, "x.yaml: not a regular file"},
		{huge, "huge.yaml: 67108865 bytes, over the 64 MiB"},
		{write(t, "empty.yaml", ""), "empty.yaml: empty"},
	} {
		if _, err := Load(tt.path); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Load(%s) = %v; want an error containing %q", tt.path, err, tt.want)
		}
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
