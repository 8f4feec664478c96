package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
)

// The commands in this file run inside the real node's pods (package
// kubenode): the pods' images hold kup-lab alone, no shell and no curl,
// so it is the pause process, the client and the load.

// pauseCommand is the pod sandbox's process (the "pause" image), and a
// client pod's main process: it sleeps until told to stop.
func pauseCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "pause",
		Short: "Sleep until SIGTERM or SIGINT (a pod sandbox's process)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			<-ctx.Done()
			return nil
		},
	}
}

// lookupCommand resolves a name as a program in a pod does: Go's resolver
// reads the resolv.conf kubelet wrote (the cluster DNS address, the search
// list and ndots:5), so "svc-test-1" becomes svc-test-1.default.svc.<domain>.
func lookupCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "lookup NAME",
		Short: "Resolve NAME through the pod's resolv.conf, as nslookup would",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			cname, _ := net.DefaultResolver.LookupCNAME(ctx, args[0])
			addrs, err := net.DefaultResolver.LookupHost(ctx, args[0])
			if err != nil {
				return err
			}
			fmt.Printf("Name:\t%s\n", cname)
			for _, a := range addrs {
				fmt.Printf("Address:\t%s\n", a)
			}
			return nil
		},
	}
}

// catCommand prints files: the pods' image has no cat.
func catCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "cat FILE...",
		Short: "Print files (the pods' image has no cat)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			for _, name := range args {
				data, err := os.ReadFile(name)
				if err != nil {
					return err
				}
				os.Stdout.Write(data)
			}
			return nil
		},
	}
}

// pattern is byte i of a /bytes download: a sequence that a lost,
// repeated or reordered chunk cannot keep.
func pattern(i int64) byte { return byte(i*7 + i/251) }

// serveBytes answers /bytes?n=N&rate=R with N bytes of pattern, paced at
// about R bytes a second (0: as fast as the network takes them): a long
// download that outlives a proxy's restart.
func serveBytes(w http.ResponseWriter, r *http.Request) {
	n, err1 := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
	rate, err2 := strconv.ParseInt(r.URL.Query().Get("rate"), 10, 64)
	if err1 != nil || err2 != nil || n < 0 || rate < 0 {
		http.Error(w, "want /bytes?n=BYTES&rate=BYTES_PER_SECOND", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	buf := make([]byte, 16<<10)
	start := time.Now()
	for sent := int64(0); sent < n; {
		chunk := buf[:min(int64(len(buf)), n-sent)]
		for i := range chunk {
			chunk[i] = pattern(sent + int64(i))
		}
		if _, err := w.Write(chunk); err != nil {
			return
		}
		sent += int64(len(chunk))
		if rate > 0 {
			time.Sleep(time.Until(start.Add(time.Duration(sent * int64(time.Second) / rate))))
		}
	}
}

// downloadCommand fetches URL (a /bytes download) and checks every byte
// and the length: "ok N bytes" or an error naming the first wrong byte.
func downloadCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "download URL",
		Short: "Fetch a /bytes download and check it byte for byte",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			resp, err := http.Get(args[0])
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("status %s", resp.Status)
			}
			br := bufio.NewReader(resp.Body)
			var got int64
			for {
				b, err := br.ReadByte()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					return fmt.Errorf("after %d bytes: %w", got, err)
				}
				if b != pattern(got) {
					return fmt.Errorf("byte %d is %d, want %d", got, b, pattern(got))
				}
				got++
			}
			if got != resp.ContentLength {
				return fmt.Errorf("%d bytes, want %d", got, resp.ContentLength)
			}
			fmt.Printf("ok %d bytes\n", got)
			return nil
		},
	}
}

// loadCommand sends RATE requests a second to URL for DURATION, each on a
// new connection, and prints one line when done: how many were sent and
// how many failed, and the first failures. It exits 0 either way; the
// counts are the result.
func loadCommand() *cobra.Command {
	var rate int
	var duration, timeout time.Duration
	cmd := &cobra.Command{
		Use:   "load URL",
		Short: "Send RATE requests a second on new connections for DURATION and count the failures",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			if rate <= 0 {
				return fmt.Errorf("--rate %d: want 1 or more", rate)
			}
			client := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
			var mu sync.Mutex
			var sent, failed int
			var firsts []string
			var wg sync.WaitGroup
			tick := time.NewTicker(time.Second / time.Duration(rate))
			defer tick.Stop()
			end := time.Now().Add(duration)
			for now := range tick.C {
				if now.After(end) {
					break
				}
				sent++
				wg.Go(func() {
					_, err := get(client, args[0])
					if err != nil {
						mu.Lock()
						failed++
						if len(firsts) < 5 {
							firsts = append(firsts, time.Now().Format("15:04:05.000")+" "+err.Error())
						}
						mu.Unlock()
					}
				})
			}
			wg.Wait()
			fmt.Printf("sent %d failed %d\n", sent, failed)
			for _, f := range firsts {
				fmt.Fprintln(os.Stdout, "failure:", f)
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&rate, "rate", 50, "requests a second")
	cmd.Flags().DurationVar(&duration, "duration", 10*time.Second, "how long to send")
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "timeout of one request")
	return cmd
}
