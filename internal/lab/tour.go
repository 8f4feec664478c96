package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The cluster DNS IP of the tour: kubelet's clusterDNS, where the proxy's
// DNS stub answers.
var ClusterDNS = netip.MustParseAddr("10.96.0.10")

// Tour is the Service story told in a lab, one Step at a time. `kup-lab
// demo` narrates it and TestServiceStory checks it: both run Steps, so the
// story a reader sees is the one the tests prove.
type Tour struct {
	Lab    *Lab
	Tools  Tools
	Mode   string // the proxy's --mode: redirect or bind
	Client *Pod
	Proxy  *Proc
	Story  Story
	// Manifest is the file the proxy reads; each change of Story is
	// written there.
	Manifest string
	// Out receives the narration: each command as a reader would type it
	// in the lab, and its output.
	Out io.Writer

	webs map[string]*Proc
	dir  string
}

// NewTour builds the lab of the story's first step: the node, another host,
// a client pod with the resolv.conf kubelet would write, web-1, and the
// proxy serving the manifest in mode, with the DNS stub, logging a line per
// connection.
func NewTour(tools Tools, mode string, out io.Writer) (t *Tour, err error) {
	t = &Tour{Tools: tools, Mode: mode, Out: out, Story: FirstStory(), webs: map[string]*Proc{}}
	if t.Lab, err = New(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	if t.Client, err = t.Lab.AddPod("client", ClientPod); err != nil {
		return nil, err
	}
	for _, w := range t.Story.Pods {
		if t.webs[w.Name], err = t.Lab.AddWeb(tools, w); err != nil {
			return nil, err
		}
	}
	if t.dir, err = os.MkdirTemp("", "kup-tour-"); err != nil {
		return nil, err
	}
	t.Manifest = filepath.Join(t.dir, "lab.yaml")
	if err := t.Story.Write(t.Manifest); err != nil {
		return nil, err
	}
	// The client pod's resolv.conf, as kubelet writes it for a pod in
	// namespace default with clusterDNS 10.96.0.10.
	if err := t.Lab.SetResolvConf(&t.Client.NS, "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver "+ClusterDNS.String()+"\noptions ndots:5\n"); err != nil {
		return nil, err
	}
	t.Proxy, err = t.Lab.StartProxy(tools, t.Manifest, "--mode", mode, "-v", "5",
		"--cluster-dns", ClusterDNS.String(), "--dns-upstream", ExtIP.String())
	if err != nil {
		return nil, err
	}
	return t, nil
}

// Close removes the lab: its namespaces, veths and processes.
func (t *Tour) Close() error {
	if t.dir != "" {
		os.RemoveAll(t.dir)
	}
	return t.Lab.Close()
}

// Step is one step of the story: Run does it, narrates it to the tour's
// Out, and returns an error when what happened is not what the story says.
type Step struct {
	Title string
	Run   func(ctx context.Context, t *Tour) error
}

// Steps are the story, in order.
func Steps() []Step {
	return []Step{
		{"1 a pod curls the ClusterIP", stepCurl},
		{"2 the path of that connection, hop by hop", stepPath},
		{"3 the pod uses the name: DNS through the stub", stepDNS},
		{"4 the node reaches the ClusterIP over TCP and UDP", stepNode},
		{"5 scale to 3 pods: round robin splits 300 connections evenly", stepScale},
		{"6 metrics and health after those connections", stepMetrics},
		{"7 one of 3 backends dies: failover, no failed request", stepFailover},
		{"8 a v2 pod on 9090 joins: both versions answer", stepV2},
		{"9 the selector moves to version=v2: within 2s only 9090 answers", stepSelector},
		{"10 NodePort from another host", stepNodePort},
		{"11 explain: the whole path as the proxy sees it now", stepExplain},
		{"12 SIGTERM, then --cleanup leaves none of our chains or addresses", stepCleanup},
	}
}

func (t *Tour) show(format string, args ...any) {
	fmt.Fprintf(t.Out, "   "+format+"\n", args...)
}

// Probe runs a command in ns, printing it as a reader would type it and
// its output, and returns the output.
func (t *Tour) Probe(ctx context.Context, ns *NS, name string, args ...string) (string, error) {
	t.show("$ %s", Command(ns, name, args...))
	out, err := ns.Run(ctx, name, args...)
	for line := range strings.Lines(string(out)) {
		if line = strings.TrimRight(line, "\n"); line != "" {
			t.show("  %s", line)
		}
	}
	return string(out), err
}

// Command is the shell command that runs name with args in ns, quoted for
// a reader to paste.
func Command(ns *NS, name string, args ...string) string {
	words := []string{"ip", "netns", "exec", ns.Name, name}
	for _, a := range args {
		if strings.ContainsAny(a, " ()*'\"$;&|<>") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		words = append(words, a)
	}
	return strings.Join(words, " ")
}

// curl fetches url from ns and checks the answer ends as want does.
func (t *Tour) curl(ctx context.Context, ns *NS, url, want string) error {
	out, err := t.Probe(ctx, ns, "curl", "-sS", "--max-time", "5", url)
	if got := strings.TrimSpace(out); err != nil || !strings.HasSuffix(got, want) {
		return fmt.Errorf("curl %s from %s = %q, %v; want %q", url, ns.Name, got, err, want)
	}
	return nil
}

// tally makes n new connections from the client pod and returns how many
// each server answered.
func (t *Tour) tally(ctx context.Context, n int) (map[string]int, error) {
	url := fmt.Sprintf("http://%s/", ClusterIP)
	t.show("$ ip netns exec %s kup-lab get -n %d --parallel 4 %s", t.Client.Name, n, url)
	tally, failures, err := t.Client.Tally(ctx, t.Tools, url, n)
	if err != nil {
		return nil, err
	}
	for _, body := range slices.Sorted(maps.Keys(tally)) {
		t.show("  %4d  %s", tally[body], body)
	}
	t.show("  %4d  failures", failures)
	if failures > 0 {
		return tally, fmt.Errorf("%d of %d requests failed", failures, n)
	}
	return tally, nil
}

// apply writes the story's manifest and waits until the proxy has applied
// it, printing the proxy's own account; it returns when the file was
// written.
func (t *Tour) apply() (time.Time, error) {
	from := t.Proxy.NumLines()
	if err := t.Story.Write(t.Manifest); err != nil {
		return time.Time{}, err
	}
	written := time.Now()
	changed, err := t.Proxy.WaitFor(from, 10*time.Second, LogMessage("Manifest changed; applying it"))
	if err != nil {
		return written, err
	}
	synced, err := t.Proxy.WaitFor(changed, 10*time.Second, LogMessage("Synced"))
	if err != nil {
		return written, err
	}
	for _, line := range t.Proxy.Lines(changed)[:synced-changed] {
		if e := LogEntry(line); e["msg"] == "Updated service port" {
			t.show("proxy: %s %s now has %v endpoint(s); its listener port stays %v", e["service"], e["protocol"], e["endpoints"], e["listener"])
		}
	}
	return written, nil
}

func (t *Tour) addWeb(w WebPod) error {
	proc, err := t.Lab.AddWeb(t.Tools, w)
	if err != nil {
		return err
	}
	t.webs[w.Name] = proc
	t.Story.Pods = append(t.Story.Pods, w)
	t.show("%s: a pod at %s whose web-port is %d (labels app=web-front-end, version=%s)", w.Name, w.IP, w.WebPort, w.Version)
	return nil
}

// listenerPort is our listener port of the story's service port of proto,
// as the proxy logged it when it added the port.
func (t *Tour) listenerPort(proto string) string {
	for _, line := range t.Proxy.Lines(0) {
		if e := LogEntry(line); e["msg"] == "Added service port" && e["protocol"] == proto && e["service"] == "default/svc-test-1:"+map[string]string{"TCP": "http", "UDP": "echo"}[proto] {
			return fmt.Sprint(e["listener"])
		}
	}
	return ""
}

func stepCurl(ctx context.Context, t *Tour) error {
	for _, line := range t.Proxy.Lines(0) {
		if e := LogEntry(line); e["msg"] == "Added service port" {
			t.show("proxy: %s %s %s:%v -> our listener port %v (%v endpoint)", e["service"], e["protocol"], e["clusterIP"], e["port"], e["listener"], e["endpoints"])
		}
	}
	return t.curl(ctx, &t.Client.NS, fmt.Sprintf("http://%s/", ClusterIP), "This is Web Server 1 running on 8080!")
}

// stepPath holds one connection from the client pod open and shows each
// hop: the rule that caught it, the conntrack entry that rewrote it (or,
// in bind mode, the local address that took it), the two TCP connections
// in the node, the pod's view of its peer, and the proxy's own line.
func stepPath(ctx context.Context, t *Tour) error {
	conn, err := t.Client.Dial("tcp", netip.AddrPortFrom(ClusterIP, 80).String())
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := keepAliveRequest(conn); err != nil {
		return fmt.Errorf("request on the held connection: %w", err)
	}
	client := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	t.show("the client pod holds one connection open: %s -> %s:80", client, ClusterIP)
	listener := t.listenerPort("TCP")
	node := t.Lab.Node
	if t.Mode == "bind" {
		t.show("bind mode: the ClusterIP is an address of the node (label :kup), so the packet is simply delivered locally:")
		out, err := t.Probe(ctx, node, "ip", "-4", "addr", "show", "label", "*:kup*")
		if err != nil || !strings.Contains(out, ClusterIP.String()+"/32") {
			return fmt.Errorf("the ClusterIP is not among our addresses: %v\n%s", err, out)
		}
	} else {
		t.show("PREROUTING sends pods' packets through our chain; the rule for the ClusterIP has counted the connection:")
		out, err := t.Probe(ctx, node, "iptables", "-t", "nat", "-L", "KUP-PORTALS-CONTAINER", "-vn")
		if err != nil || !counted(out, "10.96.0.11", "tcp dpt:80") {
			return fmt.Errorf("the ClusterIP's PREROUTING rule counted no packet: %v\n%s", err, out)
		}
		t.show("REDIRECT rewrote the destination to our listener port %s; conntrack remembers, and rewrites the replies back:", listener)
		out, err = t.Probe(ctx, node, "conntrack", "-L", "-p", "tcp", "--orig-dst", ClusterIP.String(), "--orig-port-dst", "80", "--orig-port-src", strconv.Itoa(int(client.Port())))
		if err != nil || !strings.Contains(out, "ESTABLISHED") || !strings.Contains(out, "sport="+listener+" ") {
			return fmt.Errorf("no conntrack entry from the client to our listener port %s: %v\n%s", listener, err, out)
		}
	}
	t.show("in the node, two TCP connections: the client's, accepted by our listener, and ours to the pod:")
	out, err := t.Probe(ctx, node, "ss", "-tnp", "state", "established", "( sport = :"+listenerOr(listener, t.Mode)+" or dport = :8080 )")
	if err != nil || !strings.Contains(out, client.String()) || !strings.Contains(out, "10.244.1.2:8080") {
		return fmt.Errorf("ss in the node does not show both connections: %v\n%s", err, out)
	}
	t.show("the pod sees the node, not the client, as its peer (a userspace proxy opens a new connection):")
	web := &NS{Name: t.Lab.ID + "-web-1"}
	out, err = t.Probe(ctx, web, "ss", "-tn", "state", "established")
	if err != nil || !strings.Contains(out, "10.244.1.1") {
		return fmt.Errorf("the pod's peer is not the node (10.244.1.1): %v\n%s", err, out)
	}
	t.show("and the proxy's own line for it (-v 5), naming the endpoint round robin chose:")
	i, err := t.Proxy.WaitFor(0, 5*time.Second, func(s string) bool {
		e := LogEntry(s)
		return e["msg"] == "Connected: client to endpoint" && e["client"] == client.String()
	})
	if err != nil {
		return err
	}
	t.show("  %s", t.Proxy.Lines(i)[0])
	return nil
}

// listenerOr is the port ss should look for on the client's side: our
// listener port in redirect mode, the Service port in bind mode.
func listenerOr(listener, mode string) string {
	if mode == "bind" {
		return "80"
	}
	return listener
}

// keepAliveRequest makes one HTTP request on c and reads the answer, so
// the connection is known to reach a pod and stays open.
func keepAliveRequest(c net.Conn) error {
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: svc-test-1\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %s", resp.Status)
	}
	return nil
}

// counted reports whether a line of `iptables -L -vn` output mentions
// every one of match and has counted at least one packet.
func counted(out string, match ...string) bool {
	for line := range strings.Lines(out) {
		ok := true
		for _, m := range match {
			ok = ok && strings.Contains(line, m)
		}
		if f := strings.Fields(line); ok && len(f) > 0 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 0 {
				return true
			}
		}
	}
	return false
}

func stepDNS(ctx context.Context, t *Tour) error {
	t.show("the pod's resolv.conf (as kubelet writes it) sends queries to %s:", ClusterDNS)
	out, err := t.Probe(ctx, &t.Client.NS, "nslookup", "svc-test-1")
	if err != nil || !strings.Contains(out, "Address: "+ClusterIP.String()) {
		return fmt.Errorf("nslookup svc-test-1: %v\n%s", err, out)
	}
	if t.Mode == "bind" {
		t.show("bind mode: the stub's sockets are bound to %s:53 itself, an address of the node", ClusterDNS)
	} else {
		t.show("the query took the same road: a rule for %s:53 redirected it to the stub's port:", ClusterDNS)
		out, err = t.Probe(ctx, t.Lab.Node, "iptables", "-t", "nat", "-L", "KUP-PORTALS-CONTAINER", "-vn")
		if err != nil || !counted(out, ClusterDNS.String(), "udp dpt:53") {
			return fmt.Errorf("the DNS rule counted no packet: %v\n%s", err, out)
		}
		out, err = t.Probe(ctx, t.Lab.Node, "conntrack", "-L", "-p", "udp", "--orig-dst", ClusterDNS.String(), "--orig-port-dst", "53")
		if err != nil || !strings.Contains(out, "dst="+ClusterDNS.String()) {
			return fmt.Errorf("no conntrack entry for the DNS query: %v\n%s", err, out)
		}
	}
	return t.curl(ctx, &t.Client.NS, "http://svc-test-1/", "This is Web Server 1 running on 8080!")
}

func stepNode(ctx context.Context, t *Tour) error {
	t.show("the node's own packets take nat OUTPUT (KUP-PORTALS-HOST), not PREROUTING:")
	if err := t.curl(ctx, t.Lab.Node, fmt.Sprintf("http://%s/", ClusterIP), "This is Web Server 1 running on 8080!"); err != nil {
		return err
	}
	addr := netip.AddrPortFrom(ClusterIP, UDPPort)
	want := "This is Web Server 1 running on 8080!"
	for _, size := range []int{16, 9000} {
		for _, ns := range []*NS{t.Lab.Node, &t.Client.NS} {
			got, err := ns.UDP(ctx, t.Tools, addr, size)
			if err != nil || got != want {
				return fmt.Errorf("UDP %d bytes to %s from %s = %q, %v; want %q", size, addr, ns.Name, got, err, want)
			}
		}
		t.show("$ ip netns exec %s kup-lab udp %s --size %d    (and from the client pod): %s", t.Lab.Node.Name, addr, size, want)
	}
	return nil
}

func stepScale(ctx context.Context, t *Tour) error {
	for _, n := range []int{2, 3} {
		if err := t.addWeb(NewWebPod(n, "v1", 8080)); err != nil {
			return err
		}
	}
	if _, err := t.apply(); err != nil {
		return err
	}
	tally, err := t.tally(ctx, 300)
	if err != nil {
		return err
	}
	for n := 1; n <= 3; n++ {
		if got := tally[fmt.Sprintf("This is Web Server %d running on 8080!", n)]; got != 100 {
			return fmt.Errorf("server %d answered %d of 300; want 100 each: %v", n, got, tally)
		}
	}
	return nil
}

func stepMetrics(ctx context.Context, t *Tour) error {
	out, err := t.Lab.Node.Curl(ctx, "http://127.0.0.1:10249/metrics")
	if err != nil {
		return err
	}
	t.show("$ ip netns exec %s curl -s http://127.0.0.1:10249/metrics | grep connections_total", t.Lab.Node.Name)
	ok := -1.0
	for line := range strings.Lines(out) {
		if strings.HasPrefix(line, "kube_userspace_proxy_connections_total") {
			t.show("  %s", strings.TrimSpace(line))
		}
		if name, value, found := strings.Cut(strings.TrimSpace(line), " "); found && name == `kube_userspace_proxy_connections_total{protocol="TCP",result="ok"}` {
			fmt.Sscan(value, &ok)
		}
	}
	if ok < 300 {
		return fmt.Errorf("connections_total ok = %v, want at least the 300 just made", ok)
	}
	for _, path := range []string{"healthz", "livez"} {
		body, err := t.Probe(ctx, t.Lab.Node, "curl", "-sS", "http://127.0.0.1:10256/"+path)
		if err != nil || !strings.Contains(body, `"lastUpdated"`) || (path == "healthz") != strings.Contains(body, `"nodeEligible":true`) {
			return fmt.Errorf("/%s = %q, %v", path, body, err)
		}
	}
	return nil
}

func stepFailover(ctx context.Context, t *Tour) error {
	// The pod's server is killed but the manifest still lists it as
	// ready, as in the seconds before a kubelet notices: the proxy must
	// find out by dialing and move on to the next endpoint.
	t.show("web-3's server dies; the manifest still calls it ready (the kubelet has not noticed yet)")
	t.webs["web-3"].Signal(syscall.SIGKILL)
	tally, err := t.tally(ctx, 200)
	if err != nil {
		return err
	}
	if tally["This is Web Server 3 running on 8080!"] != 0 ||
		tally["This is Web Server 1 running on 8080!"]+tally["This is Web Server 2 running on 8080!"] != 200 {
		return fmt.Errorf("200 requests after web-3 died: %v; want all 200 from servers 1 and 2", tally)
	}
	t.show("each dial to web-3 was refused and moved on to the next endpoint; now web-3 leaves the Service")
	t.Story.Pods = t.Story.Pods[:2]
	_, err = t.apply()
	return err
}

func stepV2(ctx context.Context, t *Tour) error {
	if err := t.addWeb(NewWebPod(4, "v2", 9090)); err != nil {
		return err
	}
	if _, err := t.apply(); err != nil {
		return err
	}
	tally, err := t.tally(ctx, 30)
	if err != nil {
		return err
	}
	for _, want := range []string{"This is Web Server 1 running on 8080!", "This is Web Server 2 running on 8080!", "This is Web Server 4 running on 9090!"} {
		if tally[want] != 10 {
			return fmt.Errorf("30 requests: %v; want 10 each from servers 1, 2 and the v2 server", tally)
		}
	}
	return nil
}

func stepSelector(ctx context.Context, t *Tour) error {
	t.Story.Selector = map[string]string{"app": "web-front-end", "version": "v2"}
	written, err := t.apply()
	if err != nil {
		return err
	}
	if elapsed := time.Since(written); elapsed > 2*time.Second {
		return fmt.Errorf("the selector change took %s to apply; want under 2s", elapsed)
	}
	tally, err := t.tally(ctx, 20)
	if err != nil {
		return err
	}
	if v2 := "This is Web Server 4 running on 9090!"; tally[v2] != 20 {
		return fmt.Errorf("20 requests after the selector change: %v; want all from %q", tally, v2)
	}
	return nil
}

func stepNodePort(ctx context.Context, t *Tour) error {
	t.show("the NodePort %d is a port on every node address; a rule sends it to the same listener port %s as the ClusterIP", NodePort, t.listenerPort("TCP"))
	url := fmt.Sprintf("http://%s:%d/", NodeIP, NodePort)
	if err := t.curl(ctx, t.Lab.Ext, url, "running on 9090!"); err != nil {
		return err
	}
	return t.curl(ctx, t.Lab.Node, url, "running on 9090!")
}

func stepExplain(ctx context.Context, t *Tour) error {
	out, err := t.Probe(ctx, t.Lab.Node, t.Tools.Proxy, "explain", "default/svc-test-1")
	if err != nil || !strings.Contains(out, "default/svc-test-1:http TCP (IPv4), mode "+t.Mode) || !strings.Contains(out, "10.244.4.2:9090") {
		return fmt.Errorf("explain default/svc-test-1: %v\n%s", err, out)
	}
	return nil
}

func stepCleanup(ctx context.Context, t *Tour) error {
	if err := t.Proxy.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("proxy exit after SIGTERM: %w", err)
	}
	for range 2 { // twice: cleaning a clean node is fine
		if out, err := t.Probe(ctx, t.Lab.Node, t.Tools.Proxy, "--cleanup"); err != nil {
			return fmt.Errorf("--cleanup: %w\n%s", err, out)
		}
	}
	var errs []error
	for _, save := range []string{"iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"} {
		out, err := t.Lab.Node.Run(ctx, save)
		if err != nil {
			errs = append(errs, err)
		} else if strings.Contains(string(out), "KUP-") {
			errs = append(errs, fmt.Errorf("%s after --cleanup still shows our chains:\n%s", save, out))
		}
	}
	out, err := t.Lab.Node.Run(ctx, "ip", "-4", "-o", "addr", "show")
	if err != nil || strings.Contains(string(out), ":kup") {
		errs = append(errs, fmt.Errorf("our Service addresses survived --cleanup: %v\n%s", err, out))
	}
	if len(errs) == 0 {
		t.show("iptables-save (legacy and nft, IPv4 and IPv6) shows none of our chains, and none of our addresses is left")
	}
	return errors.Join(errs...)
}
