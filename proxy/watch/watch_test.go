package watch

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestStoreTriggers: a slice's trigger time is taken once per new value,
// never for a resync or relist of the same slice, never from before the
// proxy started; every change nudges the loop.
func TestStoreTriggers(t *testing.T) {
	start := time.Now()
	nudges := 0
	s := newStore[*discovery.EndpointSlice](func() { nudges++ })
	s.triggers = &triggers{since: start}
	slice := func(name string, at time.Time) *discovery.EndpointSlice {
		return &discovery.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name,
			Annotations: map[string]string{v1.EndpointsLastChangeTriggerTime: at.UTC().Format(time.RFC3339Nano)}}}
	}
	t1, t2 := start.Add(time.Second), start.Add(2*time.Second)
	steps := []struct {
		what string
		do   func()
		want []time.Time
	}{
		{"first list, a change from before we started", func() { s.Replace([]any{slice("a", start.Add(-time.Hour))}, "1") }, nil},
		{"new trigger time", func() { s.Update(slice("a", t1)) }, []time.Time{t1}},
		{"the same slice again", func() { s.Update(slice("a", t1)) }, nil},
		{"relist: same a, new b", func() { s.Replace([]any{slice("a", t1), slice("b", t2)}, "2") }, []time.Time{t2}},
		{"delete", func() { s.Delete(slice("a", t1)) }, nil},
		{"added back", func() { s.Add(slice("a", t1)) }, []time.Time{t1}},
	}
	for i, st := range steps {
		st.do()
		got := s.triggers.take()
		if len(got) != len(st.want) || (len(got) == 1 && !got[0].Equal(st.want[0])) {
			t.Errorf("%s: triggers %v, want %v", st.what, got, st.want)
		}
		if nudges != i+1 {
			t.Errorf("%s: %d nudges after %d changes", st.what, nudges, i+1)
		}
	}
	if !s.hasSynced() || len(s.list()) != 2 {
		t.Errorf("synced %v, %d objects; want true, 2", s.hasSynced(), len(s.list()))
	}
}

// TestStoreCountsChanges: every object added, updated or deleted counts
// once, as it happens and until taken; a relist counts only what differs.
func TestStoreCountsChanges(t *testing.T) {
	told := 0
	s := newStore[*v1.Service](func() {})
	s.counted = func(n int) { told += n }
	svc := func(name, rv string) *v1.Service {
		return &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, ResourceVersion: rv}}
	}
	s.Replace([]any{svc("a", "1"), svc("b", "1")}, "1") // 2
	s.Update(svc("a", "2"))                             // 1
	s.Delete(svc("b", "1"))                             // 1
	if got := s.takeChanges(); got != 4 || told != 4 {
		t.Errorf("after a list, an update and a delete: %d taken, %d told; want 4, 4", got, told)
	}
	// A relist after a gap: a unchanged, c new, nothing else.
	s.Replace([]any{svc("a", "2"), svc("c", "1")}, "3")
	if got := s.takeChanges(); got != 1 || told != 5 {
		t.Errorf("after a relist: %d taken, %d told; want 1, 5", got, told)
	}
	if got := s.takeChanges(); got != 0 {
		t.Errorf("taken twice: %d; want 0 the second time", got)
	}
}

// TestRunSaysWhyItWaits: while the API server cannot be reached, Run keeps
// saying that nothing is served yet, with the error of the last list, and
// returns once its context is done.
func TestRunSaysWhyItWaits(t *testing.T) {
	// A loopback port with nobody listening: every list is refused.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://" + addr})
	if err != nil {
		t.Fatal(err)
	}
	log, hook := logtest.NewNullLogger()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Run(ctx, Config{Client: client, WaitReport: 100 * time.Millisecond, Log: log}, func(Update) {
			t.Error("apply called without the first lists")
		})
	}()
	defer func() { cancel(); <-done }()
	err = wait.PollUntilContextTimeout(ctx, 20*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		for _, e := range hook.AllEntries() {
			if strings.HasPrefix(e.Message, "Still waiting for the first lists") {
				got, _ := e.Data[logrus.ErrorKey].(error)
				return got != nil && strings.Contains(got.Error(), "connection refused"), nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no \"Still waiting\" line with the list's error: %v; lines: %v", err, hook.AllEntries())
	}
}
