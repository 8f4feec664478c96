package main

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"reflect"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/util/validation/field"
	proxyconfig "k8s.io/kube-proxy/config/v1alpha1"
	"sigs.k8s.io/yaml"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy/portalloc"
)

// The configuration file is kube-proxy's own (--config): a
// KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1, exactly as kubeadm
// writes it into the kube-proxy ConfigMap. Fields that mean the same here
// are used; fields of kube-proxy's other modes (ipvs, nftables, conntrack,
// masquerading...) are accepted with one warning each, so a stock kubeadm
// file works unchanged. A flag given on the command line wins over the file.
const (
	configAPIVersion = "kubeproxy.config.k8s.io/v1alpha1"
	configKind       = "KubeProxyConfiguration"
)

// loadConfig reads path and applies it to the options whose flags were not
// set on the command line. Every invalid field is reported, by its path in
// the file.
func (o *options) loadConfig(path string, flags *pflag.FlagSet, log logrus.FieldLogger) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	var c proxyconfig.KubeProxyConfiguration
	// Strict: a misspelt field is an error, not a silently ignored line.
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return fmt.Errorf("--config %s: %w", path, err)
	}
	if c.APIVersion != configAPIVersion || c.Kind != configKind {
		return fmt.Errorf("--config %s: apiVersion %q, kind %q: want apiVersion %s, kind %s", path, c.APIVersion, c.Kind, configAPIVersion, configKind)
	}
	root := field.NewPath(configKind)
	var errs field.ErrorList
	set := func(flag string, apply func()) {
		if !flags.Changed(flag) {
			apply()
		}
	}
	if cc := c.ClientConnection; cc.Kubeconfig != "" {
		set("kubeconfig", func() { o.kubeconfig = cc.Kubeconfig })
	}
	if cc := c.ClientConnection; cc.QPS < 0 {
		errs = append(errs, field.Invalid(root.Child("clientConnection", "qps"), cc.QPS, "must be 0 (the default, 5) or more"))
	} else if cc.QPS > 0 {
		set("kube-api-qps", func() { o.apiQPS = cc.QPS })
	}
	if cc := c.ClientConnection; cc.Burst < 0 {
		errs = append(errs, field.Invalid(root.Child("clientConnection", "burst"), cc.Burst, "must be 0 (the default, 10) or more"))
	} else if cc.Burst > 0 {
		set("kube-api-burst", func() { o.apiBurst = cc.Burst })
	}
	switch ct := c.ClientConnection.ContentType; ct {
	case "":
	case "application/json", "application/vnd.kubernetes.protobuf":
		set("kube-api-content-type", func() { o.apiContentType = ct })
	default:
		errs = append(errs, field.NotSupported(root.Child("clientConnection", "contentType"), ct, []string{"application/json", "application/vnd.kubernetes.protobuf"}))
	}
	if d := c.IPTables.MinSyncPeriod.Duration; d != 0 {
		if d < 0 {
			errs = append(errs, field.Invalid(root.Child("iptables", "minSyncPeriod"), d.String(), "must be 0 or more"))
		} else {
			set("iptables-min-sync-period", func() { o.minSyncPeriod = d })
		}
	}
	if d := c.ConfigSyncPeriod.Duration; d != 0 {
		if d < 0 {
			errs = append(errs, field.Invalid(root.Child("configSyncPeriod"), d.String(), "must be greater than 0"))
		} else {
			set("config-sync-period", func() { o.configSync = d })
		}
	}
	if c.HostnameOverride != "" {
		set("hostname-override", func() { o.hostnameOverride = c.HostnameOverride })
	}
	if c.BindAddress != "" {
		if ip, err := netip.ParseAddr(c.BindAddress); err != nil || !ip.Is4() || ip.IsLoopback() {
			errs = append(errs, field.Invalid(root.Child("bindAddress"), c.BindAddress, "must be a node IPv4 address or 0.0.0.0, not loopback"))
		} else {
			set("bind-address", func() { o.bindAddress = c.BindAddress })
		}
	}
	for name, v := range map[string]*string{"healthzBindAddress": &c.HealthzBindAddress, "metricsBindAddress": &c.MetricsBindAddress} {
		if *v == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(*v); err != nil {
			errs = append(errs, field.Invalid(root.Child(name), *v, "must be host:port, such as 0.0.0.0:10256"))
			continue
		}
		if name == "healthzBindAddress" {
			set("healthz-bind-address", func() { o.healthzAddr = *v })
		} else {
			set("metrics-bind-address", func() { o.metricsAddr = *v })
		}
	}
	if c.PortRange != "" {
		if _, err := portalloc.Parse(c.PortRange); err != nil {
			errs = append(errs, field.Invalid(root.Child("portRange"), c.PortRange, "must be begin-end, begin+offset, a single port, or empty"))
		} else {
			set("proxy-port-range", func() { o.proxyPortRange = c.PortRange })
		}
	}
	if d := c.IPTables.SyncPeriod.Duration; d != 0 {
		if d < 0 {
			errs = append(errs, field.Invalid(root.Child("iptables", "syncPeriod"), d.String(), "must be greater than 0"))
		} else {
			set("iptables-sync-period", func() { o.syncPeriod = d })
		}
	}
	var cidrs []string
	for i, a := range c.NodePortAddresses {
		if a == "primary" {
			log.Warn(`KubeProxyConfiguration.nodePortAddresses "primary" is not supported; NodePorts are served on all node addresses`)
			continue
		}
		if p, err := netip.ParsePrefix(a); err != nil || !p.Addr().Is4() {
			errs = append(errs, field.Invalid(root.Child("nodePortAddresses").Index(i), a, "must be an IPv4 CIDR"))
			continue
		}
		cidrs = append(cidrs, a)
	}
	if len(cidrs) > 0 {
		set("nodeport-addresses", func() { o.nodePortAddrs = cidrs })
	}
	switch c.Mode {
	case "", "userspace":
	default:
		log.WithField("mode", c.Mode).Warn("KubeProxyConfiguration.mode is kube-proxy's; this proxy is the userspace one (see --mode for how traffic reaches it)")
	}
	if len(errs) > 0 {
		return fmt.Errorf("--config %s: %w", path, errs.ToAggregate())
	}
	warnIgnored(&c, log)
	return nil
}

// warnIgnored logs one warning for each field that is set but means nothing
// to a userspace proxy (or is not supported yet).
func warnIgnored(c *proxyconfig.KubeProxyConfiguration, log logrus.FieldLogger) {
	ignored := map[string]any{
		"featureGates":                c.FeatureGates,
		"ipvs":                        c.IPVS,
		"nftables":                    c.NFTables,
		"winkernel":                   c.Winkernel,
		"conntrack":                   c.Conntrack,
		"iptables.masqueradeAll":      c.IPTables.MasqueradeAll,
		"iptables.masqueradeBit":      c.IPTables.MasqueradeBit,
		"iptables.localhostNodePorts": c.IPTables.LocalhostNodePorts,
		"clusterCIDR":                 c.ClusterCIDR,
		"detectLocalMode":             c.DetectLocalMode,
		"detectLocal":                 c.DetectLocal,
		"oomScoreAdj":                 c.OOMScoreAdj,
		"bindAddressHardFail":         c.BindAddressHardFail,
		"enableProfiling":             c.EnableProfiling,
		"showHiddenMetricsForVersion": c.ShowHiddenMetricsForVersion,
	}
	for name, v := range ignored {
		if rv := reflect.ValueOf(v); rv.IsValid() && !rv.IsZero() {
			log.WithField("field", configKind+"."+name).Warn("Configuration field ignored: it applies to kube-proxy's other modes, or is not supported yet")
		}
	}
}

// writeConfig writes the effective settings as a KubeProxyConfiguration
// (--write-config-to), which --config reads back.
func (o *options) writeConfig(path string) error {
	c := proxyconfig.KubeProxyConfiguration{
		HostnameOverride:   o.hostnameOverride,
		BindAddress:        o.bindAddress,
		HealthzBindAddress: o.healthzAddr,
		MetricsBindAddress: o.metricsAddr,
		PortRange:          o.proxyPortRange,
		NodePortAddresses:  o.nodePortAddrs,
	}
	c.APIVersion, c.Kind = configAPIVersion, configKind
	c.IPTables.SyncPeriod.Duration = o.syncPeriod
	c.IPTables.MinSyncPeriod.Duration = o.minSyncPeriod
	c.ConfigSyncPeriod.Duration = o.configSync
	c.ClientConnection.Kubeconfig = o.kubeconfig
	c.ClientConnection.QPS, c.ClientConnection.Burst, c.ClientConnection.ContentType = o.apiQPS, o.apiBurst, o.apiContentType
	data, err := yaml.Marshal(&c)
	if err != nil {
		return err
	}
	header := fmt.Sprintf("# Written by kube-userspace-proxy %s on %s.\n", version, time.Now().UTC().Format(time.RFC3339))
	return os.WriteFile(path, append([]byte(header), data...), 0o644)
}
