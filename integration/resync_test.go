package integration

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestRulesOnlyWhenNeeded: an endpoint change is applied without running
// iptables (the rules send traffic to our listener, not to pods, so they do
// not change), and the periodic pass rewrites the rules anyway, putting
// back what someone else flushed.
func TestRulesOnlyWhenNeeded(t *testing.T) {
	ctx := context.Background()
	l, client, manifest := firstStoryLab(t, "")
	story := lab.FirstStory() // what the manifest holds
	proxy, err := l.StartProxy(tools, manifest, "--iptables-sync-period", "2s")
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://%s/", lab.ClusterIP)
	synced := func(from int, rulesWritten bool) int {
		t.Helper()
		n, err := proxy.WaitFor(from, 10*time.Second, func(line string) bool {
			e := lab.LogEntry(line)
			return e["msg"] == "Synced" && e["rulesWritten"] == rulesWritten
		})
		if err != nil {
			t.Fatalf("no sync with rulesWritten=%v: %v", rulesWritten, err)
		}
		return n
	}

	t.Run("an endpoint change writes no rule", func(t *testing.T) {
		from := proxy.NumLines()
		w := lab.NewWebPod(2, "v1", 8080)
		if _, err := l.AddWeb(tools, w); err != nil {
			t.Fatal(err)
		}
		story.Pods = append(story.Pods, w)
		if err := story.Write(manifest); err != nil {
			t.Fatal(err)
		}
		// The sync that applied the change logs the change, then
		// "Synced": it must not have run iptables.
		updated, err := proxy.WaitFor(from, 5*time.Second, lab.LogMessage("Updated service port"))
		if err != nil {
			t.Fatal(err)
		}
		n, err := proxy.WaitFor(updated, 5*time.Second, lab.LogMessage("Synced"))
		if err != nil {
			t.Fatal(err)
		}
		if e := lab.LogEntry(proxy.Lines(n)[0]); e["rulesWritten"] != false {
			t.Errorf("the endpoint change's sync: %v; want rulesWritten false", e)
		}
		tally, failures, err := client.Tally(ctx, tools, url, 20)
		if err != nil || failures != 0 || len(tally) != 2 {
			t.Errorf("after the endpoint change: %v, %d failures, %v; want both pods", tally, failures, err)
		}
	})
	t.Run("the periodic pass puts back flushed rules", func(t *testing.T) {
		if _, err := l.Node.Run(ctx, "iptables", "-t", "nat", "-F", "KUP-PORTALS-CONTAINER"); err != nil {
			t.Fatal(err)
		}
		if out, err := client.Curl(ctx, url); err == nil {
			t.Fatalf("the ClusterIP answered with our rules flushed: %q", out)
		}
		synced(proxy.NumLines(), true)
		rules, err := l.OurRules(ctx)
		if err != nil || !strings.Contains(rules, lab.ClusterIP.String()) {
			t.Fatalf("after the periodic pass our rules are:\n%s\n%v", rules, err)
		}
		if out, err := client.Curl(ctx, url); err != nil || !strings.HasPrefix(out, "This is Web Server") {
			t.Errorf("after the periodic pass: %q, %v", out, err)
		}
	})
}
