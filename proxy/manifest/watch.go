package manifest

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/sirupsen/logrus"
)

// Watcher reads a manifest path and reads it again whenever it changes.
type Watcher struct {
	// Path is a file or a directory of files (--manifests).
	Path string
	// Interval is how often the files are looked at. Zero means 500ms. Only
	// their names, sizes and modification times are looked at; they are read
	// again when one of those changed and then stayed the same for one more
	// interval (so a change is applied within two intervals).
	Interval time.Duration
	// Log receives the errors of bad edits. Nil discards them.
	Log logrus.FieldLogger
}

// Run loads the manifest and calls apply with it, then again after every
// change that loads cleanly, until ctx is done. An error in the first load is
// returned, since there is nothing to serve; a later bad edit is logged and
// the last good objects keep serving. apply is called from Run's goroutine
// only, never concurrently.
func (w *Watcher) Run(ctx context.Context, apply func(*Objects)) error {
	stamp, _ := w.stamp()
	pending := stamp
	objs, err := Load(w.Path)
	if err != nil {
		return err
	}
	w.logIgnored(objs)
	apply(objs)

	interval := w.Interval
	if interval <= 0 {
		interval = 500 * time.Millisecond
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		now, _ := w.stamp() // "" when the files cannot be listed: Load says why, once
		if now == stamp {
			continue
		}
		if now != pending {
			// Changed since the last look: wait one more interval for
			// the writer to finish, so a file caught halfway through
			// being written is never served.
			pending = now
			continue
		}
		stamp = now
		objs, err := Load(w.Path)
		if err != nil {
			if w.Log != nil {
				w.Log.WithError(err).Error("Manifest change rejected; still serving the last good manifest")
			}
			continue
		}
		if w.Log != nil {
			w.Log.WithField("path", w.Path).Info("Manifest changed; applying it")
		}
		w.logIgnored(objs)
		apply(objs)
	}
}

func (w *Watcher) logIgnored(objs *Objects) {
	if w.Log == nil {
		return
	}
	for _, doc := range objs.Ignored {
		w.Log.WithField("document", doc).Warn("Ignored a manifest document: only Services, EndpointSlices and Pods are read")
	}
}

// stamp summarises the files' names, sizes and modification times.
func (w *Watcher) stamp() (string, error) {
	files, err := Files(w.Path)
	if err != nil {
		return "", err
	}
	s := ""
	for _, f := range files {
		info, err := os.Stat(f)
		if err != nil {
			return "", err
		}
		s += fmt.Sprintf("%s %d %d\n", f, info.Size(), info.ModTime().UnixNano())
	}
	return s, nil
}
