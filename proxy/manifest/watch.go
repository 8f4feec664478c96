package manifest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/sirupsen/logrus"
)

// Watcher reads a manifest path and reads it again whenever it changes.
//
// It watches the directory that holds the path (or the directory the path
// is) with inotify, through fsnotify, so that it sees every way a file is
// changed: written in place, renamed over, or swapped in by the "..data"
// symlink of a mounted ConfigMap, which renames a symlink and never writes
// the file we were given. Each burst of events is read once, Settle after
// its last event, and only when no process still has a file open for
// writing (see readWhole). A slow poll of the files' names, sizes, inodes
// and modification times backs inotify up where it misses events (network
// filesystems) or is unavailable.
type Watcher struct {
	// Path is a file or a directory of files (--manifests).
	Path string
	// Settle is how long after the last change event the files are read.
	// Zero means 50ms.
	Settle time.Duration
	// Interval is how often the files are polled. Zero means 2s.
	Interval time.Duration
	// Log receives the errors of bad edits. Nil discards them.
	Log logrus.FieldLogger
}

// retryWritten is how often a file that is being written is looked at
// again.
const retryWritten = 50 * time.Millisecond

// Run loads the manifest and calls apply with it, then again after every
// change that loads cleanly, until ctx is done. An error in the first load is
// returned, since there is nothing to serve; a later bad edit is logged and
// the last good objects keep serving. apply is called from Run's goroutine
// only, never concurrently.
func (w *Watcher) Run(ctx context.Context, apply func(*Objects)) error {
	log := w.Log
	if log == nil {
		l := logrus.New()
		l.SetLevel(logrus.PanicLevel)
		log = l
	}
	events, stop := w.notify(log)
	defer stop()

	// The first load waits out a writer, as every later one does.
	stamp, _ := w.stamp()
	objs, err := Load(w.Path)
	for errors.Is(err, ErrBeingWritten) {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(retryWritten):
		}
		stamp, _ = w.stamp()
		objs, err = Load(w.Path)
	}
	if err != nil {
		return err
	}
	w.logIgnored(log, objs)
	apply(objs)
	seen := stamp // the stamp of the last files read, applied or rejected

	settle := w.Settle
	if settle <= 0 {
		settle = 50 * time.Millisecond
	}
	interval := w.Interval
	if interval <= 0 {
		interval = 2 * time.Second
	}
	poll := time.NewTicker(interval)
	defer poll.Stop()
	check := time.NewTimer(time.Hour)
	check.Stop()
	waiting := false // a writer has a file open; said once
	evented := false // an event (or a writer) asked for this read
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-events:
			check.Reset(settle)
			continue
		case <-poll.C:
		case <-check.C:
			evented = true
		}
		// The poll reads only files whose stamp changed (files that cannot
		// be listed stamp as "": Load says why, once). After an event
		// they are read whatever their stamp: a rewrite of the same size
		// within one clock tick keeps the modification time.
		now, _ := w.stamp()
		if now == seen && !evented {
			continue
		}
		evented = false
		objs, err := Load(w.Path)
		switch {
		case errors.Is(err, ErrBeingWritten):
			if !waiting {
				log.WithError(err).Debug("Manifest is being written; waiting for the writer to finish")
			}
			waiting = true
			check.Reset(retryWritten)
			continue
		case err != nil:
			log.WithError(err).Error("Manifest change rejected; still serving the last good manifest")
		default:
			log.WithField("path", w.Path).Info("Manifest changed; applying it")
			w.logIgnored(log, objs)
			apply(objs)
		}
		seen, waiting = now, false
	}
}

// notify starts watching the directory of the manifest path with inotify.
// The channel receives a value for every event that may concern the
// manifest. Without inotify (no instances left, an odd filesystem), the
// channel never fires and the poll alone sees changes.
func (w *Watcher) notify(log logrus.FieldLogger) (<-chan struct{}, func()) {
	out := make(chan struct{}, 1)
	dir, only := w.Path, ""
	if info, err := os.Stat(w.Path); err != nil || !info.IsDir() {
		dir, only = filepath.Dir(w.Path), filepath.Base(w.Path)
	}
	fw, err := fsnotify.NewWatcher()
	if err == nil {
		err = fw.Add(dir)
	}
	if err != nil {
		if fw != nil {
			fw.Close()
		}
		log.WithError(err).WithField("dir", dir).Warn("Cannot watch the manifest directory; polling it only")
		return out, func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case e, ok := <-fw.Events:
				if !ok {
					return
				}
				// In file mode only the file itself matters, and the
				// dot-dot entries of a ConfigMap's atomic writer.
				name := filepath.Base(e.Name)
				if only != "" && name != only && !strings.HasPrefix(name, "..") {
					continue
				}
				select {
				case out <- struct{}{}:
				default:
				}
			case err, ok := <-fw.Errors:
				if !ok {
					return
				}
				log.WithError(err).Warn("Manifest directory watch: events may have been missed; the poll catches up")
			}
		}
	}()
	return out, func() {
		fw.Close()
		<-done
	}
}

func (w *Watcher) logIgnored(log logrus.FieldLogger, objs *Objects) {
	for _, doc := range objs.Ignored {
		log.WithField("document", doc).Warn("Ignored a manifest document: only Services, EndpointSlices and Pods are read")
	}
}

// stamp summarises the files' names, inodes, sizes and modification times,
// through symlinks: a ConfigMap's swap gives the same name a new inode.
func (w *Watcher) stamp() (string, error) {
	files, err := Files(w.Path)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, f := range files {
		info, err := os.Stat(f)
		if err != nil {
			return "", err
		}
		var ino uint64
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			ino = st.Ino
		}
		fmt.Fprintf(&b, "%s %d %d %d\n", f, ino, info.Size(), info.ModTime().UnixNano())
	}
	return b.String(), nil
}
