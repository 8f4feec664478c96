package integration

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// TestExplain: `kube-userspace-proxy explain` shows a Service's path as it
// is now: the rule that caught a pod's connection with its counter, our
// listener, a ready endpoint holding the connection and the UDP session
// just made, a not-ready one left out, and the DNS names; by address too.
func TestExplain(t *testing.T) {
	ctx := context.Background()
	l := newLab(t)
	client, err := l.AddPod("client", lab.ClientPod)
	if err != nil {
		t.Fatal(err)
	}
	story := lab.FirstStory()
	if _, err := l.AddWeb(tools, story.Pods[0]); err != nil {
		t.Fatal(err)
	}
	gone := lab.NewWebPod(2, "v1", 8080)
	gone.Ready = false
	story.Pods = append(story.Pods, gone)
	manifest := filepath.Join(t.TempDir(), "lab.yaml")
	if err := story.Write(manifest); err != nil {
		t.Fatal(err)
	}
	if _, err := l.StartProxy(tools, manifest, "--udp-timeout", "5m", "--cluster-dns", "10.96.0.10", "--dns-upstream", lab.ExtIP.String()); err != nil {
		t.Fatal(err)
	}

	// One connection held open, proven to reach the pod by a request
	// answered on it; one UDP session.
	conn, err := client.Dial("tcp", netip.AddrPortFrom(lab.ClusterIP, 80).String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: svc-test-1\r\n\r\n")
	if resp, err := http.ReadResponse(bufio.NewReader(conn), nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("request on the held connection: %v, %v", resp, err)
	}
	if _, err := client.UDP(ctx, tools, netip.AddrPortFrom(lab.ClusterIP, lab.UDPPort), 16); err != nil {
		t.Fatal(err)
	}

	out, err := l.Node.Run(ctx, tools.Proxy, "explain", "default/svc-test-1")
	if err != nil {
		t.Fatalf("explain: %v\n%s", err, out)
	}
	text := string(out)
	t.Logf("explain default/svc-test-1:\n%s", text)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`default/svc-test-1:http TCP \(IPv4\), mode redirect`),
		regexp.MustCompile(`ClusterIP\s+10\.96\.0\.11:80`),
		regexp.MustCompile(`NodePort\s+every node address, port 30080`),
		regexp.MustCompile(`2\. our listener: 0\.0\.0\.0:\d+`),
		regexp.MustCompile(`10\.244\.1\.2:8080\s+ready,serving\s+chosen\s+1 connections, 0 UDP sessions`),
		regexp.MustCompile(`10\.244\.2\.2:8080\s+not ready\s+not used\s+0 connections`),
		regexp.MustCompile(`default/svc-test-1:echo UDP \(IPv4\)`),
		regexp.MustCompile(`10\.244\.1\.2:5353\s+ready,serving\s+chosen\s+0 connections, 1 UDP sessions`),
		regexp.MustCompile(`svc-test-1\.default\.svc\.cluster\.local\. A 10\.96\.0\.11`),
		regexp.MustCompile(`_http\._tcp\.svc-test-1\.default\.svc\.cluster\.local\. SRV 80`),
		regexp.MustCompile(`11\.0\.96\.10\.in-addr\.arpa\. PTR svc-test-1\.default\.svc\.cluster\.local\.`),
	} {
		if !want.MatchString(text) {
			t.Errorf("explain lacks %q", want)
		}
	}
	// The pod's connection came through PREROUTING: that rule's counter
	// has it.
	counter := regexp.MustCompile(`nat PREROUTING \(pods, other hosts\)\s+(\d+) packets\s+-A KUP-PORTALS-CONTAINER -d 10\.96\.0\.11/32 -p tcp`)
	m := counter.FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("no PREROUTING rule for the ClusterIP in:\n%s", text)
	}
	if n, _ := strconv.Atoi(m[1]); n < 1 {
		t.Errorf("the ClusterIP's PREROUTING rule counted %d packets; want the pod's connection", n)
	}

	byAddr, err := l.Node.Run(ctx, tools.Proxy, "explain", "10.96.0.11:5353")
	if err != nil || !strings.Contains(string(byAddr), "default/svc-test-1:echo UDP") || strings.Contains(string(byAddr), ":http TCP") {
		t.Errorf("explain 10.96.0.11:5353: %v\n%s\nwant the UDP port alone", err, byAddr)
	}
	_, err = l.Node.Run(ctx, tools.Proxy, "explain", "default/nope")
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(err.Error(), "no service port of this node matches default/nope") {
		t.Errorf("explain default/nope: %v; want exit 1 and a message", err)
	}
}
