package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

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
	var keep bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Tell the Service story in a network-namespace lab, with real output",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tools, err := labTools(proxyBin)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return demo(ctx, tools, manifestPath, keep)
		},
	}
	cmd.Flags().StringVar(&proxyBin, "proxy", "", "the kube-userspace-proxy binary (default: next to kup-lab)")
	cmd.Flags().StringVar(&manifestPath, "manifest", "docs/examples/lab.yaml", "the story's first manifest")
	cmd.Flags().BoolVar(&keep, "keep", false, "leave the lab running after the story (until Ctrl-C), to explore it")
	return cmd
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

// demo tells the story: the steps TestServiceStory checks (lab.Steps),
// narrated. With keep, the lab stays up after them, proxy and pods
// running, until a signal.
func demo(ctx context.Context, tools lab.Tools, manifestPath string, keep bool) (err error) {
	first, err := os.ReadFile(manifestPath)
	if err != nil {
		return fmt.Errorf("read the story's manifest: %w", err)
	}
	if string(first) != lab.FirstStory().Manifest() {
		return fmt.Errorf("%s is not the story's first step; regenerate it with kup-lab manifest", manifestPath)
	}
	say("Building the lab: a node, another host, pods, all as network namespaces; starting kube-userspace-proxy in the node")
	t, err := lab.NewTour(tools, "redirect", os.Stdout)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := t.Close(); cerr != nil && err == nil {
			err = cerr
		}
		say("Lab %s removed: namespaces, veths and processes are gone", t.Lab.ID)
	}()
	l := t.Lab
	show("node   %s  (%s; forwards between pods, runs the proxy)", l.Node.Name, lab.NodeIP)
	show("ext    %s  (%s; another host on the node's network)", l.Ext.Name, lab.ExtIP)
	show("client %s  (%s; a pod that uses the Service)", t.Client.Name, t.Client.IP)
	for _, w := range t.Story.Pods {
		show("%-6s %s  (%s; answers %q)", w.Name, l.ID+"-"+w.Name, w.IP, w.Greeting())
	}
	say("The manifest (%s): svc-test-1 selects app=web-front-end; targetPort is the name web-port", manifestPath)
	for line := range strings.Lines(string(first)) {
		if !strings.HasPrefix(line, "#") {
			fmt.Print("   | " + line)
		}
	}
	rules, err := l.OurRules(ctx)
	if err != nil {
		return err
	}
	say("Our iptables rules (iptables-save in the node). PREROUTING catches pods' packets, OUTPUT the node's own:")
	for line := range strings.Lines(rules) {
		show("%s", strings.TrimRight(line, "\n"))
	}
	steps := lab.Steps()
	if keep {
		steps = steps[:len(steps)-1] // the proxy keeps running
	}
	for _, step := range steps {
		say("%s", step.Title)
		if err := step.Run(ctx, t); err != nil {
			return err
		}
	}
	if !keep {
		return nil
	}
	say("The lab stays up (kup-lab pid %d) until you press Ctrl-C. In another terminal, try:", os.Getpid())
	for _, c := range []string{
		fmt.Sprintf("ip netns exec %s curl -s http://%s/", t.Client.Name, lab.ClusterIP),
		fmt.Sprintf("ip netns exec %s nslookup svc-test-1", t.Client.Name),
		fmt.Sprintf("ip netns exec %s %s explain default/svc-test-1", l.Node.Name, tools.Proxy),
		fmt.Sprintf("ip netns exec %s iptables-save -t nat", l.Node.Name),
		fmt.Sprintf("ip netns exec %s iptables -t nat -L KUP-PORTALS-CONTAINER -vn", l.Node.Name),
		fmt.Sprintf("ip netns exec %s conntrack -L", l.Node.Name),
		fmt.Sprintf("ip netns exec %s ss -tnp", l.Node.Name),
		fmt.Sprintf("ip netns exec %s curl -s http://127.0.0.1:10249/metrics", l.Node.Name),
		fmt.Sprintf("ip netns exec %s curl -s http://%s:%d/", l.Ext.Name, lab.NodeIP, lab.NodePort),
		fmt.Sprintf("vi %s    # the manifest the proxy reads: edit it and watch the proxy follow", t.Manifest),
	} {
		show("%s", c)
	}
	show("To remove the lab: Ctrl-C here, or kill %d", os.Getpid())
	<-ctx.Done()
	return nil
}
