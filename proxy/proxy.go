// Package proxy puts the parts together: a source of Services (a manifest
// for now), the listeners that carry their traffic (package userspace) and
// the iptables rules that send ClusterIP traffic to those listeners (package
// iptables). It owns the one loop that applies each new Snapshot, and the
// order in which a change is applied:
//
//	open before you point: new listeners are opened before any rule sends
//	traffic to them;
//	unpoint before you close: a listener is closed only after the rules no
//	longer send traffic to it.
//
// docs/architecture.md draws the whole picture.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sync/errgroup"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/iptables"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/manifest"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/service"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/snapshot"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/userspace"
)

// Config is everything Run needs. Zero fields take the defaults their
// comments give.
type Config struct {
	// Manifests is the file or directory of Services, EndpointSlices and
	// Pods to serve (--manifests).
	Manifests string
	// Listeners configures the listeners: bind address, port range,
	// timeouts.
	Listeners userspace.Config
	// Backend is the iptables backend to write to; empty means detect it.
	Backend iptables.Backend
	// NodeName is this node's name, for internalTrafficPolicy Local.
	NodeName string
	// SyncPeriod is how often everything is applied again even without a
	// change, which puts back rules that someone else deleted and forgets
	// stale affinity pins. Zero means 30s (kube-proxy's
	// --iptables-sync-period).
	SyncPeriod time.Duration
	// Log is where the proxy logs. Nil means logrus' standard logger.
	Log logrus.FieldLogger
}

func (c *Config) syncPeriod() time.Duration {
	if c.SyncPeriod > 0 {
		return c.SyncPeriod
	}
	return 30 * time.Second
}

func (c *Config) log() logrus.FieldLogger {
	if c.Log != nil {
		return c.Log
	}
	return logrus.StandardLogger()
}

// Run serves the Services of cfg.Manifests until ctx is done. It returns an
// error only for what stops the proxy from starting: a bad flag value, a
// manifest that does not load, no iptables. Later failures are logged and
// retried on the next change or sync.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.log()
	if cfg.Manifests == "" {
		return errors.New("no source of Services: give --manifests PATH")
	}
	backend := cfg.Backend
	if backend == "" {
		var err error
		if backend, err = iptables.DetectBackend(); err != nil {
			return err
		}
	}
	table, err := iptables.New(backend, cfg.Listeners.BindAddress)
	if err != nil {
		return err
	}
	listeners, err := userspace.New(cfg.Listeners)
	if err != nil {
		return err
	}
	defer listeners.Close()
	log.WithFields(logrus.Fields{
		"iptablesBackend": backend,
		"bindAddress":     bindString(cfg.Listeners.BindAddress),
		"proxyPortRange":  cfg.Listeners.Ports.String(),
		"manifests":       cfg.Manifests,
	}).Info("Starting kube-userspace-proxy")

	p := &proxier{log: log, listeners: listeners, table: table}
	snaps := make(chan service.Snapshot, 1)
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		w := &manifest.Watcher{Path: cfg.Manifests, Log: log}
		err := w.Run(ctx, func(objs *manifest.Objects) {
			offer(snaps, p.build(objs, cfg.NodeName))
		})
		if err != nil {
			return fmt.Errorf("manifest %s: %w", cfg.Manifests, err)
		}
		return nil
	})
	g.Go(func() error {
		p.loop(ctx, snaps, cfg.syncPeriod())
		return nil
	})
	err = g.Wait()
	log.Info("Stopped; the rules stay in place until the next start or --cleanup")
	return err
}

// offer hands s to the apply loop, replacing a snapshot the loop has not
// taken yet: only the newest state matters. There is one sender.
func offer(ch chan service.Snapshot, s service.Snapshot) {
	select {
	case <-ch:
	default:
	}
	ch <- s
}

// Cleanup removes our rules and chains from every iptables backend the node
// has (--cleanup), so that a node is clean whichever backend we last used.
func Cleanup(log logrus.FieldLogger) error {
	var errs []error
	for _, b := range iptables.Available() {
		t, err := iptables.New(b, netip.Addr{})
		if err == nil {
			err = t.Cleanup()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("iptables %s: %w", b, err))
			continue
		}
		log.WithField("iptablesBackend", b).Info("Removed our iptables chains and jumps")
	}
	return errors.Join(errs...)
}

func bindString(a netip.Addr) string {
	if !a.IsValid() {
		return "0.0.0.0"
	}
	return a.String()
}

// proxier applies snapshots. Only its loop goroutine touches it.
type proxier struct {
	log       logrus.FieldLogger
	listeners *userspace.Listeners
	table     *iptables.Table
	current   service.Snapshot
	ports     map[service.Key]int
}

// build makes the Snapshot for a manifest's objects: Pods become
// EndpointSlices as a cluster's controller would make them, then everything
// goes through the same conversion as a cluster's objects.
func (p *proxier) build(objs *manifest.Objects, nodeName string) service.Snapshot {
	all := append(slices.Clone(objs.EndpointSlices), manifest.PodSlices(objs.Services, objs.Pods)...)
	s, warnings := snapshot.Build(objs.Services, all, nodeName)
	for _, w := range warnings {
		p.log.WithError(w).Warn("Service port not proxied")
	}
	return s
}

func (p *proxier) loop(ctx context.Context, snaps <-chan service.Snapshot, period time.Duration) {
	tick := time.NewTicker(period)
	defer tick.Stop()
	synced := false
	for {
		select {
		case <-ctx.Done():
			return
		case s := <-snaps:
			p.apply(s)
			synced = true
		case <-tick.C:
			if synced {
				p.apply(p.current)
			}
		}
	}
}

// apply makes the node serve s.
func (p *proxier) apply(s service.Snapshot) {
	start := time.Now()
	// 1. Open listeners for new service ports, and give every listener its
	// current endpoints. Old listeners keep serving meanwhile.
	ports, err := p.listeners.Sync(s)
	if err != nil {
		p.log.WithError(err).Error("Some service ports have no listener and are not served")
	}
	// 2. Point the Service addresses at the listeners.
	redirects, conflicts := redirects(s, ports)
	for _, c := range conflicts {
		p.log.WithError(c).Error("Service address not served")
	}
	if err := p.table.Sync(redirects); err != nil {
		// Keep every listener open: the rules still in the kernel may
		// point at any of them. The next change or sync tries again.
		p.log.WithError(err).Error("Could not write iptables rules; will retry")
		return
	}
	// 3. Nothing points at the listeners of removed ports any more.
	p.listeners.CloseUnused(s)
	p.logChanges(s, ports)
	p.current, p.ports = s, ports
	p.log.WithFields(logrus.Fields{"servicePorts": len(s.Ports), "rules": len(redirects), "duration": time.Since(start).Round(time.Microsecond)}).Debug("Synced")
}

// redirects lists the rules for s. An address:port that two service ports
// claim is given to the first in key order; the other is reported.
func redirects(s service.Snapshot, ports map[service.Key]int) ([]iptables.Redirect, []error) {
	var rs []iptables.Redirect
	var errs []error
	owner := map[string]service.Key{}
	add := func(p *service.Port, kind iptables.Kind, ip netip.Addr, port uint16, listener int) {
		proto := strings.ToLower(string(p.Protocol))
		claim := fmt.Sprintf("%s:%d/%s", ip, port, proto)
		if kind == iptables.NodePort {
			claim = fmt.Sprintf("nodePort %d/%s", port, proto)
		}
		if other, ok := owner[claim]; ok && other != p.Key() {
			errs = append(errs, fmt.Errorf("%s of %s is already served for %s", claim, p.Name, other.Name))
			return
		}
		owner[claim] = p.Key()
		rs = append(rs, iptables.Redirect{Kind: kind, IP: ip, Port: port, Protocol: proto, ToPort: uint16(listener), Comment: p.Name.String()})
	}
	for i := range s.Ports {
		p := &s.Ports[i]
		listener, ok := ports[p.Key()]
		if !ok {
			continue
		}
		add(p, iptables.ClusterIP, p.ClusterIP, p.Port, listener)
		for _, ip := range p.ExternalIPs {
			add(p, iptables.ExternalIP, ip, p.Port, listener)
		}
		for _, ip := range p.LoadBalancerIPs {
			add(p, iptables.LoadBalancerIP, ip, p.Port, listener)
		}
		if p.NodePort != 0 {
			add(p, iptables.NodePort, netip.Addr{}, p.NodePort, listener)
		}
	}
	return rs, errs
}

// logChanges logs one line per service port added, changed or removed.
func (p *proxier) logChanges(s service.Snapshot, ports map[service.Key]int) {
	for i := range s.Ports {
		n := &s.Ports[i]
		fields := logrus.Fields{
			"service":   n.Name.String(),
			"protocol":  n.Protocol,
			"clusterIP": n.ClusterIP.String(),
			"port":      n.Port,
			"listener":  ports[n.Key()],
			"endpoints": len(n.Endpoints),
		}
		if n.NodePort != 0 {
			fields["nodePort"] = n.NodePort
		}
		old, ok := p.current.Lookup(n.Key())
		switch {
		case !ok:
			p.log.WithFields(fields).Info("Added service port")
		case !service.SameFrontends(old, n) || old.Affinity != n.Affinity || !slices.Equal(old.Endpoints, n.Endpoints) || p.ports[n.Key()] != ports[n.Key()]:
			p.log.WithFields(fields).Info("Updated service port")
		}
	}
	for i := range p.current.Ports {
		o := &p.current.Ports[i]
		if _, ok := s.Lookup(o.Key()); !ok {
			p.log.WithFields(logrus.Fields{"service": o.Name.String(), "protocol": o.Protocol, "clusterIP": o.ClusterIP.String(), "port": o.Port, "listener": p.ports[o.Key()]}).Info("Removed service port")
		}
	}
}
