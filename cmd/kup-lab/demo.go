package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

func manifestCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "manifest",
		Short: "Print the Service story's first manifest (docs/examples/lab.yaml)",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Print(lab.FirstStory().Manifest())
		},
	}
}

func demoCommand() *cobra.Command {
	var proxyBin, manifestPath string
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Tell the Service story in a network-namespace lab, with real output",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tools, err := labTools(proxyBin)
			if err != nil {
				return err
			}
			d := &demo{tools: tools, manifest: manifestPath}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return d.run(ctx)
		},
	}
	cmd.Flags().StringVar(&proxyBin, "proxy", "", "the kube-userspace-proxy binary (default: next to kup-lab)")
	cmd.Flags().StringVar(&manifestPath, "manifest", "docs/examples/lab.yaml", "the story's first manifest")
	return cmd
}

// demo walks through the Service story, printing what it does and what
// comes back.
type demo struct {
	tools    lab.Tools
	manifest string
	lab      *lab.Lab
	proxy    *lab.Proc
	live     string // the manifest the proxy reads
	story    lab.Story
}

// bold is on when the output is a terminal.
var bold = func() bool {
	fi, err := os.Stdout.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}()

func say(format string, args ...any) {
	if bold {
		format = "\033[1m== " + format + "\033[0m"
	} else {
		format = "== " + format
	}
	fmt.Printf("\n"+format+"\n", args...)
}

func show(format string, args ...any) {
	fmt.Printf("   "+format+"\n", args...)
}

func (d *demo) run(ctx context.Context) (err error) {
	first, err := os.ReadFile(d.manifest)
	if err != nil {
		return fmt.Errorf("read the story's manifest: %w", err)
	}
	if string(first) != lab.FirstStory().Manifest() {
		return fmt.Errorf("%s is not the story's first step; regenerate it with kup-lab manifest", d.manifest)
	}
	say("Building the lab: a node, another host, pods, all as network namespaces")
	if d.lab, err = lab.New(); err != nil {
		return err
	}
	defer func() {
		if cerr := d.lab.Close(); cerr != nil && err == nil {
			err = cerr
		}
		say("Lab %s removed: namespaces, veths and processes are gone", d.lab.ID)
	}()
	client, err := d.lab.AddPod("client", lab.ClientPod)
	if err != nil {
		return err
	}
	show("node   %s  (%s; forwards between pods, runs the proxy)", d.lab.Node.Name, lab.NodeIP)
	show("ext    %s  (%s; another host on the node's network)", d.lab.Ext.Name, lab.ExtIP)
	show("client %s  (%s; a pod that uses the Service)", client.Name, client.IP)

	d.story = lab.FirstStory()
	for _, w := range d.story.Pods {
		if _, err := d.lab.AddWeb(d.tools, w); err != nil {
			return err
		}
		show("%-6s %s  (%s; answers %q)", w.Name, d.lab.ID+"-"+w.Name, w.IP, w.Greeting())
	}

	dir, err := os.MkdirTemp("", "kup-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	d.live = filepath.Join(dir, "lab.yaml")
	if err := d.story.Write(d.live); err != nil {
		return err
	}
	say("The manifest (%s): svc-test-1 selects app=web-front-end; targetPort is the name web-port", d.manifest)
	for line := range strings.Lines(string(first)) {
		if !strings.HasPrefix(line, "#") {
			fmt.Print("   | " + line)
		}
	}

	// The client pod's resolv.conf, as kubelet writes it for a pod in
	// namespace default with clusterDNS 10.96.0.10.
	if err := d.lab.SetResolvConf(&client.NS, "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"); err != nil {
		return err
	}
	say("Starting kube-userspace-proxy in the node: one listener per service port, iptables rules to them, and a DNS stub on 10.96.0.10")
	if d.proxy, err = d.lab.StartProxy(d.tools, d.live, "--cluster-dns", "10.96.0.10", "--dns-upstream", lab.ExtIP.String()); err != nil {
		return err
	}
	for _, line := range d.proxy.Lines(0) {
		e := lab.LogEntry(line)
		if e["msg"] == "Added service port" {
			show("%s %s %s:%v -> listener on node port %v (%v endpoint)", e["service"], e["protocol"], e["clusterIP"], e["port"], e["listener"], e["endpoints"])
		}
	}
	rules, err := d.lab.OurRules(ctx)
	if err != nil {
		return err
	}
	say("Our iptables rules (iptables-save in the node). PREROUTING catches pods' packets, OUTPUT the node's own:")
	for line := range strings.Lines(rules) {
		show("%s", strings.TrimRight(line, "\n"))
	}

	url := fmt.Sprintf("http://%s/", lab.ClusterIP)
	say("A pod curls the ClusterIP: curl %s", url)
	if err := d.curl(ctx, &client.NS, url); err != nil {
		return err
	}
	say("The pod uses the name instead: its resolv.conf sends queries to 10.96.0.10, answered by the node's stub")
	out, err := client.Run(ctx, "nslookup", "svc-test-1")
	if err != nil {
		return fmt.Errorf("nslookup: %w\n%s", err, out)
	}
	for line := range strings.Lines(string(out)) {
		if strings.TrimSpace(line) != "" {
			show("%s", strings.TrimRight(line, "\n"))
		}
	}
	say("curl http://svc-test-1")
	if err := d.curl(ctx, &client.NS, "http://svc-test-1/"); err != nil {
		return err
	}

	say("The node itself curls the ClusterIP (its packets take the OUTPUT path)")
	if err := d.curl(ctx, d.lab.Node, url); err != nil {
		return err
	}
	say("And UDP from the node: a 9000-byte datagram to %s:%d, echoed back whole", lab.ClusterIP, lab.UDPPort)
	greeting, err := d.lab.Node.UDP(ctx, d.tools, netipPort(lab.UDPPort), 9000)
	if err != nil {
		return err
	}
	show("reply from: %s", greeting)

	say("Scaling to 3 pods: the manifest gains web-2 and web-3; the proxy re-reads it")
	var web3 *lab.Proc
	for _, n := range []int{2, 3} {
		w := lab.NewWebPod(n, "v1", 8080)
		if web3, err = d.lab.AddWeb(d.tools, w); err != nil {
			return err
		}
		d.story.Pods = append(d.story.Pods, w)
	}
	if err := d.apply(); err != nil {
		return err
	}
	say("300 new connections from the client pod, round robin:")
	if err := d.tally(ctx, &client.NS, url, 300); err != nil {
		return err
	}

	say("web-3's server dies; the manifest still calls it ready (the kubelet has not noticed yet)")
	web3.Signal(syscall.SIGKILL)
	show("the proxy's dial to web-3 is refused, so each such connection moves on to another endpoint (the live ones share its part):")
	if err := d.tally(ctx, &client.NS, url, 30); err != nil {
		return err
	}
	show("then the pod is marked not ready and leaves the Service")
	d.story.Pods[2].Ready = false
	if err := d.apply(); err != nil {
		return err
	}

	say("Rolling out v2: a pod labelled version=v2 whose web-port is 9090 (the Service did not change)")
	v2 := lab.NewWebPod(4, "v2", 9090)
	if _, err := d.lab.AddWeb(d.tools, v2); err != nil {
		return err
	}
	d.story.Pods = append(d.story.Pods, v2)
	if err := d.apply(); err != nil {
		return err
	}
	if err := d.tally(ctx, &client.NS, url, 40); err != nil {
		return err
	}

	say("Migrating: the selector becomes app=web-front-end,version=v2")
	d.story.Selector = map[string]string{"app": "web-front-end", "version": "v2"}
	if err := d.apply(); err != nil {
		return err
	}
	if err := d.tally(ctx, &client.NS, url, 20); err != nil {
		return err
	}

	nodePortURL := fmt.Sprintf("http://%s:%d/", lab.NodeIP, lab.NodePort)
	say("From another host, through the NodePort: curl %s", nodePortURL)
	if err := d.curl(ctx, d.lab.Ext, nodePortURL); err != nil {
		return err
	}

	say("Stopping the proxy (SIGTERM) and cleaning up (kube-userspace-proxy --cleanup)")
	if err := d.proxy.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("proxy exit: %w", err)
	}
	out, err = d.lab.Node.Run(ctx, d.tools.Proxy, "--cleanup")
	if err != nil {
		return fmt.Errorf("--cleanup: %w\n%s", err, out)
	}
	rules, err = d.lab.OurRules(ctx)
	if err != nil {
		return err
	}
	if rules != "" {
		return fmt.Errorf("rules left after --cleanup:\n%s", rules)
	}
	show("iptables-save in the node shows none of our chains")
	return nil
}

func netipPort(port int) netip.AddrPort { return netip.AddrPortFrom(lab.ClusterIP, uint16(port)) }

func (d *demo) curl(ctx context.Context, ns *lab.NS, url string) error {
	body, err := ns.Curl(ctx, url)
	if err != nil {
		return err
	}
	show("%s", body)
	return nil
}

// apply writes the story's manifest and waits until the proxy has applied
// it, printing the proxy's own account of the change.
func (d *demo) apply() error {
	from := d.proxy.NumLines()
	if err := d.story.Write(d.live); err != nil {
		return err
	}
	changed, err := d.proxy.WaitFor(from, 10*time.Second, lab.LogMessage("Manifest changed; applying it"))
	if err != nil {
		return err
	}
	synced, err := d.proxy.WaitFor(changed, 10*time.Second, lab.LogMessage("Synced"))
	if err != nil {
		return err
	}
	for _, line := range d.proxy.Lines(changed)[:synced-changed] {
		e := lab.LogEntry(line)
		if e["msg"] == "Updated service port" {
			show("proxy: %s now has %v endpoint(s); its listener stays on port %v", e["service"], e["endpoints"], e["listener"])
		}
	}
	return nil
}

func (d *demo) tally(ctx context.Context, ns *lab.NS, url string, n int) error {
	tally, failures, err := ns.Tally(ctx, d.tools, url, n)
	if err != nil {
		return err
	}
	for _, body := range slices.Sorted(maps.Keys(tally)) {
		show("%4d  %s", tally[body], body)
	}
	show("%4d  failures", failures)
	if failures > 0 {
		return errors.New("requests failed")
	}
	return nil
}
