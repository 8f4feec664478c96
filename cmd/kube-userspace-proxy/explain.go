package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/proxy"
)

// explainCommand asks a running proxy, over its metrics address, for one
// Service's path through the node and prints it: the question "why doesn't
// my Service answer?" answered hop by hop.
func explainCommand() *cobra.Command {
	var addr string
	cmd := &cobra.Command{
		Use:   "explain NAMESPACE/SERVICE | IP:PORT",
		Short: "Show a Service's path through this node: addresses, rules and their counters, listener, endpoints",
		Long: `explain asks the proxy running on this node (over --metrics-bind-address) for a
Service's path as it is now: each address clients use and the iptables rule that
catches it, with its packet counter; our listener; every endpoint with its
ready/serving/terminating conditions, and the connections, UDP sessions and
ClientIP pins it has; and the DNS names that answer with the Service.`,
		Args:          cobra.ExactArgs(1),
		SilenceErrors: true,
		SilenceUsage:  true,
		RunE: func(cmd *cobra.Command, args []string) error {
			q := url.Values{}
			if strings.Contains(args[0], "/") {
				q.Set("service", args[0])
			} else {
				q.Set("address", args[0])
			}
			ex, err := fetchExplanation(addr, q)
			if err != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "Error: %v\n", err)
				return err
			}
			printExplanation(cmd.OutOrStdout(), ex)
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "metrics-bind-address", "127.0.0.1:10249", "the running proxy's --metrics-bind-address")
	return cmd
}

func fetchExplanation(addr string, q url.Values) (proxy.Explanation, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + "/explain?" + q.Encode())
	if err != nil {
		return proxy.Explanation{}, fmt.Errorf("ask the proxy at %s (its --metrics-bind-address): %w", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return proxy.Explanation{}, fmt.Errorf("read the proxy's answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return proxy.Explanation{}, fmt.Errorf("the proxy at %s says: %s", addr, strings.TrimSpace(string(body)))
	}
	var ex proxy.Explanation
	if err := json.Unmarshal(body, &ex); err != nil {
		return proxy.Explanation{}, fmt.Errorf("the proxy's answer: %w", err)
	}
	return ex, nil
}

// printExplanation writes ex in the order a packet meets each part.
func printExplanation(w io.Writer, ex proxy.Explanation) {
	for i, p := range ex.Ports {
		if i > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "%s %s (%s), mode %s\n", p.Name, p.Protocol, p.Family, ex.Mode)
		fmt.Fprintln(w, "  1. the addresses clients use, and what catches them:")
		for _, f := range p.Frontends {
			fmt.Fprintf(w, "     %-14s %s\n", f.Kind, f.Address)
			for _, r := range f.Rules {
				fmt.Fprintf(w, "       %-34s %6d packets  %s\n", r.Hook, r.Packets, r.Rule)
			}
			if f.Note != "" {
				fmt.Fprintf(w, "       %s\n", f.Note)
			}
		}
		fmt.Fprintf(w, "  2. our listener: %s (affinity %s)\n", strings.Join(p.Listener, ", "), p.Affinity)
		if len(p.Listener) == 0 {
			fmt.Fprintln(w, "     none: the proxy could not open it, or (bind mode) the port has no endpoints and the kernel refuses its clients")
		}
		fmt.Fprintln(w, "  3. endpoints (new connections go to the chosen ones, round robin):")
		if len(p.Endpoints) == 0 {
			fmt.Fprintln(w, "     none: connections are refused")
		}
		for _, e := range p.Endpoints {
			state := conditions(e)
			chosen := "chosen"
			if !e.Chosen {
				chosen = "not used"
			}
			fmt.Fprintf(w, "     %-22s %-28s %-8s %d connections, %d UDP sessions, %d pins", e.Address, state, chosen, e.Connections, e.Sessions, e.Pins)
			if e.Node != "" {
				fmt.Fprintf(w, ", node %s", e.Node)
			}
			fmt.Fprintln(w)
		}
		if p.Dialing > 0 {
			fmt.Fprintf(w, "     %d connections still dialing their endpoint\n", p.Dialing)
		}
		if len(p.DNS) > 0 {
			fmt.Fprintln(w, "  4. names the DNS stub answers with it:")
			for _, n := range p.DNS {
				fmt.Fprintf(w, "     %s\n", n)
			}
		}
	}
}

func conditions(e proxy.EndpointReport) string {
	var cs []string
	for _, c := range []struct {
		on   bool
		name string
	}{{e.Ready, "ready"}, {e.Serving, "serving"}, {e.Terminating, "terminating"}} {
		if c.on {
			cs = append(cs, c.name)
		}
	}
	if len(cs) == 0 {
		return "not ready"
	}
	return strings.Join(cs, ",")
}
