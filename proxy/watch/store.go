package watch

import (
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// store is where a reflector keeps what it lists and watches: the latest
// copy of every object, by namespace/name. It calls changed after every
// change, and knows whether the first full list has arrived.
type store[T metav1.Object] struct {
	changed func()
	// triggers, when set, collects the last-change-trigger-time of every
	// object whose annotation changed.
	triggers *triggers
	// counted, when set, is told of every object change (an object added,
	// updated or deleted) as it happens; untaken holds the changes since
	// the last takeChanges.
	counted func(n int)
	untaken atomic.Int64

	mu     sync.Mutex
	byKey  map[string]T
	synced bool
}

func newStore[T metav1.Object](changed func()) *store[T] {
	return &store[T]{changed: changed, byKey: map[string]T{}}
}

func key(o metav1.Object) string {
	if o.GetNamespace() == "" {
		return o.GetName()
	}
	return o.GetNamespace() + "/" + o.GetName()
}

// put stores obj; the caller holds mu.
func (s *store[T]) put(obj any) {
	o, ok := obj.(T)
	if !ok {
		return // the reflector checks types; nothing else reaches here
	}
	k := key(o)
	if s.triggers != nil {
		old, had := s.byKey[k]
		var before map[string]string
		if had {
			before = old.GetAnnotations()
		}
		s.triggers.note(before, o.GetAnnotations())
	}
	s.byKey[k] = o
}

// Add, Update, Delete, Replace and Resync make store a
// cache.ReflectorStore.

func (s *store[T]) Add(obj any) error { return s.Update(obj) }
func (s *store[T]) Update(obj any) error {
	s.locked(func() { s.put(obj) })
	s.count(1)
	return nil
}

func (s *store[T]) Delete(obj any) error {
	if o, ok := obj.(T); ok {
		s.locked(func() { delete(s.byKey, key(o)) })
		s.count(1)
	}
	return nil
}

func (s *store[T]) count(n int) {
	if n == 0 {
		return
	}
	s.untaken.Add(int64(n))
	if s.counted != nil {
		s.counted(n)
	}
}

// takeChanges returns the number of object changes since the last call.
func (s *store[T]) takeChanges() int { return int(s.untaken.Swap(0)) }

// Replace takes a whole new list: the first one, or a relist after a watch
// could not resume.
func (s *store[T]) Replace(objs []any, _ string) error {
	changes := 0
	s.locked(func() {
		old := s.byKey
		s.byKey = make(map[string]T, len(objs))
		for _, obj := range objs {
			if o, ok := obj.(T); ok {
				prev, had := old[key(o)]
				if had {
					s.byKey[key(o)] = prev // so that put compares with it
				}
				if !had || prev.GetResourceVersion() != o.GetResourceVersion() {
					changes++
				}
				s.put(obj)
			}
		}
		for k := range old {
			if _, kept := s.byKey[k]; !kept {
				changes++ // deleted while we were not watching
			}
		}
		s.synced = true
	})
	s.count(changes)
	return nil
}

// Resync hands everything on again (the resync period).
func (s *store[T]) Resync() error { s.changed(); return nil }

func (s *store[T]) locked(f func()) {
	s.mu.Lock()
	f()
	s.mu.Unlock()
	s.changed()
}

func (s *store[T]) hasSynced() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.synced
}

func (s *store[T]) list() []T {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]T, 0, len(s.byKey))
	for _, o := range s.byKey {
		out = append(out, o)
	}
	return out
}

func (s *store[T]) get(k string) (T, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.byKey[k]
	return o, ok
}

// triggers collects last-change-trigger-times (the annotation the
// EndpointSlice controller sets to when the change behind a write
// happened) until they are taken.
type triggers struct {
	since time.Time // older ones predate us: not ours to measure

	mu      sync.Mutex
	pending []time.Time
}

// note records the trigger time in after, when it is new: not the one in
// before (a resync or relist of an unchanged slice) and not older than
// since.
func (t *triggers) note(before, after map[string]string) {
	v := after[v1.EndpointsLastChangeTriggerTime]
	if v == "" || v == before[v1.EndpointsLastChangeTriggerTime] {
		return
	}
	// The annotation often comes from a pod condition's transition time,
	// which the API keeps to the second: compare at that precision, or a
	// change made in the second we started would be dropped.
	at, err := time.Parse(time.RFC3339Nano, v)
	if err != nil || at.Before(t.since.Truncate(time.Second)) {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.pending = append(t.pending, at)
}

func (t *triggers) take() []time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.pending
	t.pending = nil
	return p
}

var _ cache.ReflectorStore = (*store[*discovery.EndpointSlice])(nil)
