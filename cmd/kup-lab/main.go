// Command kup-lab is the lab's helper: the pods' web server, the clients the
// tests run inside pod namespaces, and `kup-lab demo`, the Service story
// told by its own output (make demo).
package main

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"github.com/spf13/cobra"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/lab"
)

func main() {
	root := &cobra.Command{Use: "kup-lab", Short: "Network-namespace lab for kube-userspace-proxy", SilenceUsage: true}
	root.AddCommand(webCommand(), getCommand(), udpCommand(), manifestCommand(), demoCommand(), walkCommand(), benchModesCommand(), dnsCommand(), dnsStubCommand(),
		pauseCommand(), lookupCommand(), downloadCommand(), loadCommand(), catCommand(), demoNodeCommand())
	if err := root.Execute(); err != nil {
		os.Exit(1)
	}
}

// webCommand is a pod's server: HTTP on one port, UDP echo on another, both
// answering with the pod's greeting so a client can tell pods apart.
func webCommand() *cobra.Command {
	var listen, text string
	var port, udpPort int
	var logPeers, proxyProtocol bool
	cmd := &cobra.Command{
		Use:   "web",
		Short: "Serve a greeting over HTTP and echo UDP with it (a pod's server)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ln, err := net.Listen("tcp", net.JoinHostPort(listen, fmt.Sprint(port)))
			if err != nil {
				return err
			}
			if proxyProtocol {
				// Every connection must start with a PROXY header; its
				// addresses become the connection's.
				ln = &proxyproto.Listener{Listener: ln, ConnPolicy: func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) { return proxyproto.REQUIRE, nil }}
			}
			pc, err := net.ListenPacket("udp", net.JoinHostPort(listen, fmt.Sprint(udpPort)))
			if err != nil {
				return err
			}
			go func() {
				buf := make([]byte, 65536)
				for {
					n, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					if logPeers {
						fmt.Printf("peer udp %s\n", from)
					}
					pc.WriteTo(append([]byte(text+"\n"), buf[:n]...), from)
				}
			}()
			fmt.Printf("serving %q on %s tcp/%d udp/%d\n", text, listen, port, udpPort)
			return http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/bytes" {
					serveBytes(w, r)
					return
				}
				// Echo a request body back after the greeting, so tests can
				// push bytes through the proxy and check them. The body is
				// read whole first: once a reply is under way, Go's server
				// may stop reading the request of a kept-alive connection.
				if logPeers {
					fmt.Printf("peer tcp %s\n", r.RemoteAddr)
					if proxyProtocol {
						fmt.Printf("dst tcp %s\n", r.Context().Value(http.LocalAddrContextKey))
					}
				}
				body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
				if err != nil {
					http.Error(w, err.Error(), http.StatusBadRequest)
					return
				}
				fmt.Fprintln(w, text)
				w.Write(body)
			}))
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "0.0.0.0", "address to listen on")
	cmd.Flags().IntVar(&port, "port", 8080, "HTTP port")
	cmd.Flags().IntVar(&udpPort, "udp-port", 5353, "UDP echo port")
	cmd.Flags().StringVar(&text, "text", "hello", "greeting")
	cmd.Flags().BoolVar(&proxyProtocol, "proxy-protocol", false, "require a PROXY protocol header on every TCP connection, and take the client from it")
	cmd.Flags().BoolVar(&logPeers, "log-peers", false, "print the address each request and datagram came from (\"peer tcp ADDR\", \"peer udp ADDR\")")
	return cmd
}

// getCommand makes n HTTP requests, each on a new connection, and prints how
// many times each distinct answer came back, then the number of failures.
func getCommand() *cobra.Command {
	var n, parallel int
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "get URL",
		Short: "Make N requests on new connections and tally the answers",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
			var mu sync.Mutex
			tally := map[string]int{}
			failures := 0
			var firstErr error
			work := make(chan struct{})
			var wg sync.WaitGroup
			for range max(parallel, 1) {
				wg.Go(func() {
					for range work {
						body, err := get(client, args[0])
						mu.Lock()
						if err != nil {
							failures++
							firstErr = firstOf(firstErr, err)
						} else {
							tally[body]++
						}
						mu.Unlock()
					}
				})
			}
			for range n {
				work <- struct{}{}
			}
			close(work)
			wg.Wait()
			for _, body := range slices.Sorted(maps.Keys(tally)) {
				fmt.Printf("%d\t%s\n", tally[body], body)
			}
			fmt.Printf("%d\tfailures\n", failures)
			if firstErr != nil {
				fmt.Fprintf(os.Stderr, "first failure: %v\n", firstErr)
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&n, "requests", "n", 1, "number of requests")
	cmd.Flags().IntVar(&parallel, "parallel", 1, "requests in flight at once")
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "timeout of one request")
	return cmd
}

func firstOf(first, err error) error {
	if first != nil {
		return first
	}
	return err
}

func get(client *http.Client, url string) (string, error) {
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// udpCommand sends datagrams to ADDR from one socket and prints the first
// line of each reply, with the reply's size.
func udpCommand() *cobra.Command {
	var n, size int
	var timeout, retryFor time.Duration
	cmd := &cobra.Command{
		Use:   "udp ADDR",
		Short: "Send N datagrams of SIZE bytes and print what comes back",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := net.Dial("udp", args[0])
			if err != nil {
				return err
			}
			defer c.Close()
			buf := make([]byte, 65536)
			payload := []byte(strings.Repeat("u", size))
			giveUp := time.Now().Add(retryFor)
			for range n {
				if _, err := c.Write(payload); err != nil {
					return err
				}
				deadline := time.Now().Add(timeout)
				c.SetReadDeadline(deadline)
				m, err := c.Read(buf)
				// With --retry-for, an unanswered datagram is sent
				// again from the same socket, as a resolver does, once
				// per timeout (an ICMP error ends a read at once).
				for err != nil && time.Now().Before(giveUp) {
					time.Sleep(time.Until(deadline))
					c.Write(payload)
					deadline = time.Now().Add(timeout)
					c.SetReadDeadline(deadline)
					m, err = c.Read(buf)
				}
				if err != nil {
					return fmt.Errorf("no reply: %w", err)
				}
				first, rest, _ := strings.Cut(string(buf[:m]), "\n")
				if rest != string(payload) {
					return errors.New("reply does not carry the datagram back intact")
				}
				fmt.Printf("%s\t%d bytes echoed\n", first, len(rest))
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&n, "count", "n", 1, "datagrams to send")
	cmd.Flags().IntVar(&size, "size", 16, "payload size in bytes")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Second, "how long to wait for each reply")
	cmd.Flags().DurationVar(&retryFor, "retry-for", 0, "keep sending an unanswered datagram again, from the same socket, for this long")
	return cmd
}

// labTools names the binaries the lab runs: kup-lab itself, and the proxy,
// by default next to it.
func labTools(proxyBin string) (lab.Tools, error) {
	self, err := os.Executable()
	if err != nil {
		return lab.Tools{}, err
	}
	if proxyBin == "" {
		proxyBin = filepath.Join(filepath.Dir(self), "kube-userspace-proxy")
	}
	return lab.Tools{Proxy: proxyBin, Helper: self}, nil
}

// listenBoth opens UDP and TCP on one address, as a DNS server needs.
func listenBoth(addr string) (net.PacketConn, net.Listener, error) {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, nil, err
	}
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		return nil, nil, err
	}
	return pc, ln, nil
}
