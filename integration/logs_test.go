package integration

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestJSONLogsOnly: with --log-format json every line the proxy writes is
// JSON, client-go's own (klog) included, and while the API server cannot
// be reached a line says that nothing is served yet, and why.
func TestJSONLogsOnly(t *testing.T) {
	l := newLab(t)
	proxy, err := l.Start(l.Node, tools.Proxy, "--log-format", "json", "-v", "6", "--kubeconfig", downKubeconfig(t), "--hostname-override", "node-logs")
	if err != nil {
		t.Fatal(err)
	}
	// client-go reports the failed list through klog.
	fromClientGo := func(s string) bool { return lab.LogEntry(s)["source"] == "client-go" }
	if _, err := proxy.WaitFor(0, 30*time.Second, fromClientGo); err != nil {
		t.Fatalf("no client-go line: %v", err)
	}
	waiting := func(s string) bool {
		e := lab.LogEntry(s)
		msg, _ := e["msg"].(string)
		errText, _ := e["error"].(string)
		return strings.HasPrefix(msg, "Still waiting for the first lists") && strings.Contains(errText, "connection refused")
	}
	if _, err := proxy.WaitFor(0, 30*time.Second, waiting); err != nil {
		t.Fatalf("no line saying why nothing is served yet: %v", err)
	}
	for i, line := range proxy.Lines(0) {
		var v map[string]any
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			t.Errorf("line %d is not JSON: %q", i+1, line)
		}
	}
}
