package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// benchModesCommand compares the proxy's modes in one lab and one run: the
// same client pod, the same pod behind the Service, wrk with keep-alive and
// with a new connection per request, straight to the pod (direct) and
// through the ClusterIP in redirect mode and in bind mode.
func benchModesCommand() *cobra.Command {
	var proxyBin string
	var duration time.Duration
	var repeat int
	cmd := &cobra.Command{
		Use:   "bench-modes",
		Short: "Measure redirect mode against bind mode (and a direct connection) in one lab",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tools, err := labTools(proxyBin)
			if err != nil {
				return err
			}
			return benchModes(tools, duration, repeat)
		},
	}
	cmd.Flags().StringVar(&proxyBin, "proxy", "", "the kube-userspace-proxy binary (default: next to kup-lab)")
	cmd.Flags().DurationVarP(&duration, "duration", "d", 5*time.Second, "length of one measurement")
	cmd.Flags().IntVarP(&repeat, "repeat", "r", 3, "measurements per cell; the table shows medians")
	return cmd
}

var wrkRate = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)

func benchModes(t lab.Tools, duration time.Duration, repeat int) (err error) {
	ctx := context.Background()
	l, err := lab.New()
	if err != nil {
		return err
	}
	defer func() {
		if cerr := l.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		return err
	}
	story := lab.FirstStory()
	for _, w := range story.Pods {
		if _, err := l.AddWeb(t, w); err != nil {
			return err
		}
	}
	// A connection per request uses a client port per request, and each
	// lingers in TIME_WAIT: widen the port range and let the client reuse
	// TIME_WAIT ports, on the client and on the node (which dials the
	// pod), as the shared harness does.
	for _, ns := range []*lab.NS{&client.NS, l.Node} {
		if _, err := ns.Run(ctx, "sh", "-c", "echo 1024 65535 > /proc/sys/net/ipv4/ip_local_port_range && echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"); err != nil {
			return err
		}
	}
	dir, err := os.MkdirTemp("", "kup-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	manifest := filepath.Join(dir, "lab.yaml")
	if err := story.Write(manifest); err != nil {
		return err
	}

	paths := []string{"direct", "redirect", "bind"}
	tests := []struct{ name, header string }{
		{"HTTP keep-alive req/s", ""},
		{"HTTP conn/request req/s", "Connection: close"},
	}
	results := map[string][]float64{} // test/path -> rates
	for _, path := range paths {
		url := fmt.Sprintf("http://%s/", lab.ClusterIP)
		var proxy *lab.Proc
		if path == "direct" {
			url = fmt.Sprintf("http://%s:%d/", story.Pods[0].IP, story.Pods[0].WebPort)
		} else if proxy, err = l.StartProxy(t, manifest, "--mode", path); err != nil {
			return err
		}
		for _, test := range tests {
			for range repeat {
				args := []string{"-t2", "-c32", "-d" + strconv.Itoa(int(duration.Seconds())) + "s", url}
				if test.header != "" {
					args = append([]string{"-H", test.header}, args...)
				}
				out, err := client.Run(ctx, "wrk", args...)
				if err != nil {
					return fmt.Errorf("wrk (install it: make bench-deps): %w", err)
				}
				m := wrkRate.FindSubmatch(out)
				if m == nil {
					return fmt.Errorf("no rate in wrk's output:\n%s", out)
				}
				rate, _ := strconv.ParseFloat(string(m[1]), 64)
				results[test.name+"/"+path] = append(results[test.name+"/"+path], rate)
				fmt.Fprintf(os.Stderr, "%s %s: %.0f\n", path, test.name, rate)
			}
		}
		if proxy != nil {
			if err := proxy.Signal(syscall.SIGTERM); err != nil {
				return err
			}
			if out, err := l.Node.Run(ctx, t.Proxy, "--cleanup"); err != nil {
				return fmt.Errorf("--cleanup: %w\n%s", err, out)
			}
		}
	}
	fmt.Printf("%-26s %-18s %-18s %-18s %s\n", fmt.Sprintf("median of %d", repeat), "direct", "redirect", "bind", "bind/redirect")
	for _, test := range tests {
		d := median(results[test.name+"/direct"])
		r := median(results[test.name+"/redirect"])
		b := median(results[test.name+"/bind"])
		fmt.Printf("%-26s %-18.0f %-18s %-18s %.2f\n", test.name, d,
			fmt.Sprintf("%.0f (%.2f)", r, r/d), fmt.Sprintf("%.0f (%.2f)", b, b/d), b/r)
	}
	return nil
}

func median(xs []float64) float64 {
	xs = slices.Clone(xs)
	slices.Sort(xs)
	if len(xs) == 0 {
		return 0
	}
	return xs[len(xs)/2]
}
