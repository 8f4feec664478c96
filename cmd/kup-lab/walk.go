package main

import (
	"bytes"
	"context"
	_ "embed"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"text/template"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

// walkTemplate is docs/life-of-a-connection.md before the lab fills in
// the commands' output: the prose lives here, the output comes from a real
// lab every time the doc is made (make docs), and a test makes it again
// and fails when the committed doc differs.
//
//go:embed walk.md.tmpl
var walkTemplate string

func walkCommand() *cobra.Command {
	var proxyBin, out string
	cmd := &cobra.Command{
		Use:   "walk",
		Short: "Write docs/life-of-a-connection.md from a lab: each step's command and its real output",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tools, err := labTools(proxyBin)
			if err != nil {
				return err
			}
			doc, err := walk(context.Background(), tools)
			if err != nil {
				return err
			}
			if out == "-" {
				_, err = os.Stdout.Write(doc)
				return err
			}
			return os.WriteFile(out, doc, 0o644)
		},
	}
	cmd.Flags().StringVar(&proxyBin, "proxy", "", "the kube-userspace-proxy binary (default: next to kup-lab)")
	cmd.Flags().StringVarP(&out, "out", "o", "-", "where to write the doc (- for standard output)")
	return cmd
}

// walker runs the template's commands in a lab and writes their output in
// a form that is the same on every run: the values that differ from run
// to run (the lab's name, ports the kernel chose, process IDs, timers)
// are replaced by names for them.
type walker struct {
	ctx     context.Context
	tour    *lab.Tour
	held    net.Conn
	replace []string          // old, new pairs, applied in order
	ports   map[string]string // port numbers of this run, and their names
}

func walk(ctx context.Context, tools lab.Tools) ([]byte, error) {
	t, err := lab.NewTour(tools, "redirect", io.Discard)
	if err != nil {
		return nil, err
	}
	defer t.Close()
	defer t.Proxy.Signal(syscall.SIGTERM)
	w := &walker{ctx: ctx, tour: t, ports: map[string]string{}}
	w.replace = append(w.replace, t.Lab.ID+"-", "lab-", tools.Proxy, "kube-userspace-proxy", tools.Helper, "kup-lab")
	for _, l := range []struct{ service, proto, name string }{
		{"default/svc-test-1:http", "TCP", "<http-listener>"},
		{"default/svc-test-1:echo", "UDP", "<echo-listener>"},
	} {
		port, err := w.listener(l.service, l.proto)
		if err != nil {
			return nil, err
		}
		w.ports[port] = l.name
	}
	dns, err := w.dnsListener()
	if err != nil {
		return nil, err
	}
	w.ports[dns] = "<dns-listener>"
	tmpl, err := template.New("walk").Funcs(template.FuncMap{
		"run":    func(ns string, args ...string) (string, error) { return w.run(false, ns, args...) },
		"sorted": func(ns string, args ...string) (string, error) { return w.run(true, ns, args...) },
		"hold":   w.hold,
		"line":   w.line,
		"port":   w.port,
	}).Parse(walkTemplate)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := tmpl.Execute(&b, nil); err != nil {
		return nil, err
	}
	if w.held != nil {
		w.held.Close()
	}
	return b.Bytes(), nil
}

// listener is our listener port of a service port, as the proxy logged it.
func (w *walker) listener(service, proto string) (string, error) {
	for _, line := range w.tour.Proxy.Lines(0) {
		if e := lab.LogEntry(line); e["msg"] == "Added service port" && e["service"] == service && e["protocol"] == proto {
			return fmt.Sprint(e["listener"]), nil
		}
	}
	return "", fmt.Errorf("the proxy logged no listener for %s %s", service, proto)
}

// dnsListener is the DNS stub's port, as the proxy logged it.
func (w *walker) dnsListener() (string, error) {
	for _, line := range w.tour.Proxy.Lines(0) {
		if e := lab.LogEntry(line); e["msg"] == "DNS stub answers the cluster domain" {
			ap, err := netip.ParseAddrPort(fmt.Sprint(e["listen"]))
			if err != nil {
				return "", err
			}
			return fmt.Sprint(ap.Port()), nil
		}
	}
	return "", fmt.Errorf("the proxy logged no DNS stub")
}

// namespace is the lab namespace a template names: node, ext, client, or
// a pod's name.
func (w *walker) namespace(name string) *lab.NS {
	switch name {
	case "node":
		return w.tour.Lab.Node
	case "ext":
		return w.tour.Lab.Ext
	case "client":
		return &w.tour.Client.NS
	default:
		return &lab.NS{Name: w.tour.Lab.ID + "-" + name}
	}
}

// run runs a command in a lab namespace and gives it, with its output, as
// a code block. With sorted, the output's lines after the first (a
// header) are sorted: ss and conntrack list sockets and flows in hash
// order.
func (w *walker) run(sorted bool, ns string, args ...string) (string, error) {
	n := w.namespace(ns)
	name := args[0]
	switch name {
	case "kube-userspace-proxy":
		name = w.tour.Tools.Proxy
	case "kup-lab":
		name = w.tour.Tools.Helper
	}
	out, err := n.Run(w.ctx, name, args[1:]...)
	if err != nil {
		return "", err
	}
	text := string(out)
	if sorted {
		lines := strings.Split(strings.TrimRight(text, "\n"), "\n")
		if len(lines) > 1 {
			slices.Sort(lines[1:])
		}
		text = strings.Join(lines, "\n")
	}
	return w.block(lab.Command(n, name, args[1:]...), text), nil
}

// port is a port number of this run, by the name the doc gives it:
// "http" (our listener for svc-test-1:http) or "client" (the held
// connection's port on the client pod).
func (w *walker) port(name string) (string, error) {
	for n, named := range w.ports {
		if named == "<"+name+"-listener>" || named == "<"+name+"-port>" {
			return n, nil
		}
	}
	return "", fmt.Errorf("no port called %s yet", name)
}

// hold opens a connection from the client pod to the ClusterIP, makes one
// request on it and keeps it open, so that its sockets can be looked at;
// the ports it uses join the names to replace.
func (w *walker) hold() (string, error) {
	c, err := w.tour.Client.Dial("tcp", netip.AddrPortFrom(lab.ClusterIP, 80).String())
	if err != nil {
		return "", err
	}
	w.held = c
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: svc-test-1\r\n\r\n")
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); err != nil {
		return "", fmt.Errorf("the held connection's request: %w", err)
	}
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	w.ports[fmt.Sprint(client.Port())] = "<client-port>"
	// Our socket to the pod, from the proxy's line for the connection.
	i, err := w.tour.Proxy.WaitFor(0, 5*time.Second, func(s string) bool {
		e := lab.LogEntry(s)
		return e["msg"] == "Connected: client to endpoint" && e["client"] == client.String()
	})
	if err != nil {
		return "", err
	}
	from, err := netip.ParseAddrPort(fmt.Sprint(lab.LogEntry(w.tour.Proxy.Lines(i)[0])["from"]))
	if err != nil {
		return "", err
	}
	w.ports[fmt.Sprint(from.Port())] = "<our-port>"
	// The connections before it (the curl's) must be over, so that
	// what the doc shows next is this one alone: wait until the proxy
	// counts exactly one.
	err = wait.PollUntilContextTimeout(w.ctx, 20*time.Millisecond, 10*time.Second, true, func(ctx context.Context) (bool, error) {
		metrics, err := w.tour.Lab.Node.Curl(ctx, "http://127.0.0.1:10249/metrics")
		return err == nil && strings.Contains(metrics, "\n"+`kube_userspace_proxy_active_connections{protocol="TCP"} 1`+"\n"), nil
	})
	if err != nil {
		return "", fmt.Errorf("the proxy did not come down to the held connection alone: %w", err)
	}
	return "", nil
}

// line gives the proxy's log line with message msg about the held
// connection.
func (w *walker) line(msg string) (string, error) {
	client := w.held.LocalAddr().String()
	for _, l := range w.tour.Proxy.Lines(0) {
		if e := lab.LogEntry(l); e["msg"] == msg && e["client"] == client {
			return w.block("", l), nil
		}
	}
	return "", fmt.Errorf("the proxy logged no %q for %s", msg, client)
}

var (
	// What differs from run to run, whatever the command.
	spaces   = regexp.MustCompile(`[ \t]{2,}`)
	pids     = regexp.MustCompile(`pid=\d+,fd=\d+`)
	ctTimers = regexp.MustCompile(`^(tcp|udp) (\d+) \d+ `)
	times    = regexp.MustCompile(`"time":"[^"]*"`)
	numbers  = regexp.MustCompile(`\d+`)
)

// block is a code block of a command and its output, made the same on
// every run: columns squeezed to one space, and the run's own values
// replaced by names.
func (w *walker) block(command, out string) string {
	var b strings.Builder
	b.WriteString("```\n")
	if command != "" {
		out = "$ " + command + "\n" + out
	}
	for line := range strings.Lines(out) {
		// Squeeze the columns, but keep the indentation that shows
		// structure.
		body := strings.TrimLeft(line, " \t")
		indent := line[:len(line)-len(body)]
		line = indent + strings.TrimRight(spaces.ReplaceAllString(body, " "), " \n")
		line = pids.ReplaceAllString(line, "pid=<pid>,fd=<fd>")
		line = ctTimers.ReplaceAllString(line, "$1 $2 <timeout> ")
		line = times.ReplaceAllString(line, `"time":"<time>"`)
		for i := 0; i+1 < len(w.replace); i += 2 {
			line = strings.ReplaceAll(line, w.replace[i], w.replace[i+1])
		}
		line = numbers.ReplaceAllStringFunc(line, func(n string) string {
			if name, ok := w.ports[n]; ok {
				return name
			}
			return n
		}) + "\n"
		if strings.TrimSpace(line) != "" {
			b.WriteString(line)
		}
	}
	b.WriteString("```")
	return b.String()
}
