package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/bombsimon/logrusr/v4"
	"github.com/go-logr/logr"
	"github.com/sirupsen/logrus"
	"k8s.io/klog/v2"
)

// logger builds the logrus logger that every part receives. Levels follow
// Kubernetes' verbosity: 0-2 info, 3-4 debug, 5 and up trace.
func (o *options) logger() (*logrus.Logger, error) {
	l := logrus.New()
	l.Out = os.Stderr
	switch o.logFormat {
	case "text":
		l.Formatter = &logrus.TextFormatter{DisableColors: true, FullTimestamp: true, TimestampFormat: time.RFC3339Nano}
	case "json":
		l.Formatter = &logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano}
	default:
		return nil, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
	}
	switch {
	case o.verbosity < 0:
		return nil, fmt.Errorf("-v %d: must be 0 or more", o.verbosity)
	case o.verbosity >= 5:
		l.Level = logrus.TraceLevel
	case o.verbosity >= 3:
		l.Level = logrus.DebugLevel
	default:
		l.Level = logrus.InfoLevel
	}
	return l, nil
}

// routeKlog sends client-go's logging (klog) through l, so that every line
// has one format (with --log-format json, every line is JSON). klog keeps
// its own verbosity filter, set to ours, so -v 6 and up show client-go's
// requests; what passes is logged at the logrus level our -v gives that
// verbosity.
func routeKlog(l *logrus.Logger, verbosity int) {
	flags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(flags)
	flags.Set("v", strconv.Itoa(verbosity))
	klog.SetLogger(logr.New(klogSink{logrusr.New(l.WithField("source", "client-go")).GetSink()}))
}

// klogSink maps klog's verbosity to logr's levels as logrusr reads them
// (0 info, 1 debug, 2 trace), with the thresholds of our -v: klog's V(4)
// would otherwise land past logrus' last level and be dropped.
type klogSink struct{ logr.LogSink }

func klogLevel(v int) int {
	switch {
	case v >= 5:
		return 2
	case v >= 3:
		return 1
	default:
		return 0
	}
}

func (s klogSink) Enabled(level int) bool { return s.LogSink.Enabled(klogLevel(level)) }

func (s klogSink) Info(level int, msg string, kv ...any) {
	s.LogSink.Info(klogLevel(level), msg, kv...)
}

func (s klogSink) WithValues(kv ...any) logr.LogSink {
	return klogSink{s.LogSink.WithValues(kv...)}
}

func (s klogSink) WithName(name string) logr.LogSink { return klogSink{s.LogSink.WithName(name)} }
