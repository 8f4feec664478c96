package kubenode

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The Service story on a real node, as its reader types it: the web
// Deployments, svc-test-1, a client pod, scaling, a second version and the
// selector moved to it. The steps are one table, run by the real-node test
// (with their checks) and by `kup-lab demo-node` (which prints them).
// Their manifests are docs/examples/node/*.yaml.

// Step is one command of the story.
type Step struct {
	// Say tells the reader what the step shows.
	Say string
	// Where the command runs: "kubectl" (kubectl as the admin), "node" (a
	// command in the node's network namespace) or "client" (kubectl exec
	// into the client pod).
	Where string
	// Args are the command's words; {clusterIP} stands for svc-test-1's
	// ClusterIP, once a step has read it.
	Args []string
	// Check says whether the output is what the story expects; nil: the
	// command's success is enough.
	Check func(s *Story, out string) error
	// Within: the command is run again until Check passes, for this long
	// after the previous step ended (0: once). The proxy applies changes
	// within its sync periods, not at once.
	Within time.Duration
}

// Story is a run of the story on a node: the steps and what they learned.
type Story struct {
	Node *Node
	// Dir holds the story's manifests (docs/examples/node).
	Dir       string
	ClusterIP netip.Addr
}

// Steps is the story.
func Steps() []Step {
	one := func(port string) func(*Story, string) error {
		return func(_ *Story, out string) error { return answers(out, 1, 1, port) }
	}
	return []Step{
		{Say: "A Deployment of one web pod (labels app=web-front-end, version=v1; container port web-port = 8080)",
			Where: "kubectl", Args: []string{"create", "-f", "deploy-test-1.yaml"}},
		{Where: "kubectl", Args: []string{"rollout", "status", "deployment/deploy-test-1", "--timeout=180s"}},
		{Say: "svc-test-1: port 80 of a ClusterIP, to every pod labelled app=web-front-end, at the port each calls web-port",
			Where: "kubectl", Args: []string{"create", "-f", "svc-test-1.yaml"}},
		{Say: "The ClusterIP the API server gave it",
			Where: "kubectl", Args: []string{"get", "service", "svc-test-1", "-o", "jsonpath={.spec.clusterIP}"},
			Check: func(s *Story, out string) error {
				ip, err := netip.ParseAddr(strings.TrimSpace(out))
				s.ClusterIP = ip
				return err
			}},
		{Say: "From the node: nat OUTPUT redirects the ClusterIP to our listener, which dials the pod",
			Where: "node", Args: []string{"curl", "-sS", "--max-time", "3", "http://{clusterIP}/"},
			Check: func(_ *Story, out string) error { return contains(out, "running on 8080!") }, Within: 10 * time.Second},
		{Say: "A client pod; kubelet writes its resolv.conf",
			Where: "kubectl", Args: []string{"create", "-f", "client.yaml"}},
		{Where: "kubectl", Args: []string{"wait", "--for=condition=Ready", "pod/client", "--timeout=180s"}},
		{Say: "From a pod: nat PREROUTING catches the packet on its way in from the pod's veth",
			Where: "client", Args: []string{"/kup-lab", "get", "http://{clusterIP}/"}, Check: one("8080"), Within: 10 * time.Second},
		{Say: "The pod's resolver: the cluster DNS address, where our DNS stub answers, and the search list of the cluster domain",
			Where: "client", Args: []string{"/kup-lab", "cat", "/etc/resolv.conf"},
			Check: func(s *Story, out string) error {
				return errors.Join(contains(out, "nameserver "+ClusterDNS.String()), contains(out, "search default.svc."+s.Node.opts.ClusterDomain))
			}},
		{Say: "nslookup svc-test-1: the search list makes it svc-test-1.default.svc.<domain>",
			Where: "client", Args: []string{"/kup-lab", "lookup", "svc-test-1"},
			Check: func(s *Story, out string) error {
				return errors.Join(contains(out, "svc-test-1.default.svc."+s.Node.opts.ClusterDomain+"."), contains(out, "Address:\t"+s.ClusterIP.String()))
			}, Within: 10 * time.Second},
		{Say: "curl http://svc-test-1 from the pod: by name",
			Where: "client", Args: []string{"/kup-lab", "get", "http://svc-test-1/"}, Check: one("8080"), Within: 10 * time.Second},
		{Say: "Three replicas", Where: "kubectl", Args: []string{"scale", "deployment/deploy-test-1", "--replicas=3"}},
		{Where: "kubectl", Args: []string{"rollout", "status", "deployment/deploy-test-1", "--timeout=180s"}},
		{Say: "30 new connections: round robin gives each pod 10",
			Where: "client", Args: []string{"/kup-lab", "get", "-n", "30", "http://svc-test-1/"},
			Check: func(_ *Story, out string) error { return answers(out, 3, 10, "8080") }, Within: 10 * time.Second},
		{Say: "A second version: web-port is 9090 there",
			Where: "kubectl", Args: []string{"create", "-f", "deploy-test-2.yaml"}},
		{Where: "kubectl", Args: []string{"scale", "deployment/deploy-test-2", "--replicas=3"}},
		{Where: "kubectl", Args: []string{"rollout", "status", "deployment/deploy-test-2", "--timeout=180s"}},
		{Say: "The selector app=web-front-end takes both versions: 6 pods, two target ports behind one Service port",
			Where: "client", Args: []string{"/kup-lab", "get", "-n", "60", "http://svc-test-1/"},
			Check: func(_ *Story, out string) error { return answers(out, 6, 10, "") }, Within: 10 * time.Second},
		{Say: "Move the Service to version v2 (the seed used kubectl edit)",
			Where: "kubectl", Args: []string{"patch", "service", "svc-test-1", "-p", `{"spec":{"selector":{"app":"web-front-end","version":"v2"}}}`}},
		{Say: "Within 2 seconds only the v2 pods, on 9090, answer",
			Where: "client", Args: []string{"/kup-lab", "get", "-n", "30", "http://svc-test-1/"},
			Check: func(_ *Story, out string) error { return answers(out, 3, 10, "9090") }, Within: 2 * time.Second},
	}
}

func contains(out, want string) error {
	if !strings.Contains(out, want) {
		return fmt.Errorf("output lacks %q", want)
	}
	return nil
}

// answers checks the tally `kup-lab get` prints: want distinct answers,
// each given each times, all ending "running on PORT!" (any port if port
// is empty), and no failure.
func answers(out string, distinct, each int, port string) error {
	tally := map[string]int{}
	failures := -1
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		count, body, ok := strings.Cut(line, "\t")
		n, err := strconv.Atoi(count)
		if !ok || err != nil {
			continue
		}
		if body == "failures" {
			failures = n
			continue
		}
		tally[body] = n
	}
	if failures != 0 {
		return fmt.Errorf("%d requests failed", failures)
	}
	if len(tally) != distinct {
		return fmt.Errorf("%d distinct answers %v, want %d", len(tally), slices.Sorted(maps.Keys(tally)), distinct)
	}
	for body, n := range tally {
		if n != each {
			return fmt.Errorf("%q answered %d times, want %d each", body, n, each)
		}
		if port != "" && !strings.HasSuffix(body, "running on "+port+"!") {
			return fmt.Errorf("answer %q is not from a pod on %s", body, port)
		}
	}
	return nil
}

// Command is the command of step, as it runs and as the reader types it.
func (s *Story) Command(step Step) (*exec.Cmd, string) {
	args := make([]string, len(step.Args))
	for i, a := range step.Args {
		args[i] = strings.ReplaceAll(a, "{clusterIP}", s.ClusterIP.String())
	}
	var cmd *exec.Cmd
	var shown []string
	switch step.Where {
	case "kubectl":
		cmd, shown = s.Node.Kubectl(args...), append([]string{"kubectl"}, args...)
	case "client":
		words := append([]string{"exec", "client", "--"}, args...)
		cmd, shown = s.Node.Kubectl(words...), append([]string{"kubectl"}, words...)
	default:
		cmd = exec.Command("nsenter", append([]string{"--net=/run/netns/" + s.Node.NetNS, "--"}, args...)...)
		shown = append([]string{"ip", "netns", "exec", s.Node.NetNS}, args...)
	}
	cmd.Dir = s.Dir
	for i, w := range shown {
		if strings.ContainsAny(w, " {}\"!$") {
			shown[i] = "'" + w + "'"
		}
	}
	return cmd, strings.Join(shown, " ")
}

// Run runs step: once, or until its check passes within step.Within. It
// returns the last output and, when the step did not pass, why.
func (s *Story) Run(ctx context.Context, step Step) (string, error) {
	deadline := time.Now().Add(step.Within)
	for {
		cmd, shown := s.Command(step)
		out, err := cmd.CombinedOutput()
		if err == nil && step.Check != nil {
			err = step.Check(s, string(out))
		}
		if err == nil || !time.Now().Before(deadline) {
			if err != nil {
				err = fmt.Errorf("%s: %w\n%s", shown, err, out)
			}
			return string(out), err
		}
		select {
		case <-ctx.Done():
			return string(out), ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
