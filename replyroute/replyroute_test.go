package replyroute

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/netnstest"
)

func show(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %v: %v: %s", args, err, out)
	}
	return string(out)
}

// TestEnsureAndCleanup, in a namespace of its own: the rule and the local
// route appear once however often Ensure runs, in both families, and
// Cleanup removes them.
func TestEnsureAndCleanup(t *testing.T) {
	netnstest.Run(t, func() {
		for range 2 {
			if err := Default.Ensure(); err != nil {
				t.Fatal(err)
			}
		}
		for _, family := range []string{"-4", "-6"} {
			rules := show(t, family, "rule")
			if n := strings.Count(rules, "fwmark 0x1000000/0x1000000 lookup 27509"); n != 1 {
				t.Errorf("ip %s rule has our rule %d times, want once:\n%s", family, n, rules)
			}
			if routes := show(t, family, "route", "show", "table", "27509"); !strings.Contains(routes, "local default dev lo") {
				t.Errorf("ip %s route show table 27509 = %q, want the local default route", family, routes)
			}
		}
		if err := Default.Cleanup(); err != nil {
			t.Fatal(err)
		}
		for _, family := range []string{"-4", "-6"} {
			if rules := show(t, family, "rule"); strings.Contains(rules, "27509") {
				t.Errorf("after Cleanup, ip %s rule still has ours:\n%s", family, rules)
			}
			if routes := show(t, family, "route", "show", "table", "27509"); strings.TrimSpace(routes) != "" {
				t.Errorf("after Cleanup, table 27509 holds %q", routes)
			}
		}
	})
}
