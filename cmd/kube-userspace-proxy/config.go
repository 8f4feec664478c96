package main

import (
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/util/validation/field"
	proxyconfig "k8s.io/kube-proxy/config/v1alpha1"
	"sigs.k8s.io/yaml"
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
// set on the command line. It only maps fields to flags: the values are
// then checked as the flags' own are (options.config), and those messages
// name the flag; a field that cannot even be parsed is reported here, by
// its path in the file.
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
	var errs field.ErrorList
	// set applies a field that is set (not its zero value) unless the
	// flag was given.
	set := func(flag string, isSet bool, apply func()) {
		if isSet && !flags.Changed(flag) {
			apply()
		}
	}
	cc := c.ClientConnection
	set("kubeconfig", cc.Kubeconfig != "", func() { o.kubeconfig = cc.Kubeconfig })
	set("kube-api-qps", cc.QPS != 0, func() { o.apiQPS = cc.QPS })
	set("kube-api-burst", cc.Burst != 0, func() { o.apiBurst = cc.Burst })
	set("kube-api-content-type", cc.ContentType != "", func() { o.apiContentType = cc.ContentType })
	set("iptables-min-sync-period", c.IPTables.MinSyncPeriod.Duration != 0, func() { o.minSyncPeriod = c.IPTables.MinSyncPeriod.Duration })
	set("iptables-sync-period", c.IPTables.SyncPeriod.Duration != 0, func() { o.syncPeriod = c.IPTables.SyncPeriod.Duration })
	set("config-sync-period", c.ConfigSyncPeriod.Duration != 0, func() { o.configSync = c.ConfigSyncPeriod.Duration })
	set("hostname-override", c.HostnameOverride != "", func() { o.hostnameOverride = c.HostnameOverride })
	set("healthz-bind-address", c.HealthzBindAddress != "", func() { o.healthzAddr = c.HealthzBindAddress })
	set("metrics-bind-address", c.MetricsBindAddress != "", func() { o.metricsAddr = c.MetricsBindAddress })
	set("proxy-port-range", c.PortRange != "", func() { o.proxyPortRange = c.PortRange })
	if c.BindAddress != "" {
		if ip, err := netip.ParseAddr(c.BindAddress); err != nil {
			errs = append(errs, field.Invalid(field.NewPath(configKind, "bindAddress"), c.BindAddress, "must be an IP address: a node IPv4 address or 0.0.0.0"))
		} else {
			set("bind-address", true, func() { o.bindAddress = ip })
		}
	}
	cidrs := slices.DeleteFunc(slices.Clone(c.NodePortAddresses), func(a string) bool {
		if a == "primary" {
			log.Warn(`KubeProxyConfiguration.nodePortAddresses "primary" is not supported; NodePorts are served on all node addresses`)
		}
		return a == "primary"
	})
	set("nodeport-addresses", len(cidrs) > 0, func() { o.nodePortAddrs = cidrs })
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
		BindAddress:        o.bindAddress.String(),
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
