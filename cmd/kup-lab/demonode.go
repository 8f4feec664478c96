package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/kubenode"
)

// demoNodeCommand tells the Service story on a real node (make demo-node):
// kubelet and containerd run the proxy's DaemonSet from deploy/, and the
// story is typed with kubectl, each command printed with its real output.
func demoNodeCommand() *cobra.Command {
	var bin, proxyImage, images, examples, deploy, domain string
	var keep bool
	cmd := &cobra.Command{
		Use:   "demo-node",
		Short: "Tell the Service story with kubectl on a real node (kubelet, containerd, the DaemonSet)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			dir, err := os.MkdirTemp("", "kup-node-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(dir)
			say("Bringing up a node: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd and kubelet, in namespaces of their own")
			n, err := kubenode.Start(kubenode.Options{
				Bin: bin, Dir: dir, ClusterDomain: domain, SandboxImage: "docker.io/kup/pause:test",
				Images: []string{filepath.Join(images, "pause.tar"), filepath.Join(images, "lab.tar"), proxyImage},
			})
			if err != nil {
				return err
			}
			defer n.Close()
			return demoNode(ctx, n, deploy, examples, keep)
		},
	}
	cmd.Flags().StringVar(&bin, "bin", os.Getenv("KUBE_TESTENV_BIN"), "the node's binaries (make kube-testenv)")
	cmd.Flags().StringVar(&proxyImage, "proxy-image", "out/image/kube-userspace-proxy.tar", "the proxy's image (make image)")
	cmd.Flags().StringVar(&images, "images", "out/node-images", "the pause and pod images (make node-images)")
	cmd.Flags().StringVar(&examples, "examples", "docs/examples/node", "the story's manifests")
	cmd.Flags().StringVar(&deploy, "deploy", "deploy/kube-userspace-proxy.yaml", "the proxy's DaemonSet")
	cmd.Flags().StringVar(&domain, "cluster-domain", "k8s.cluster.local", "the cluster domain kubelet gives pods")
	cmd.Flags().BoolVar(&keep, "keep", false, "leave the node running after the story (until Ctrl-C), to explore it")
	return cmd
}

func demoNode(ctx context.Context, n *kubenode.Node, deploy, examples string, keep bool) error {
	kubectl := func(args ...string) error {
		fmt.Printf("$ kubectl %s\n", strings.Join(args, " "))
		out, err := n.Kubectl(args...).CombinedOutput()
		fmt.Print(indent(string(out)))
		return err
	}
	manifest, err := kubenode.DeployManifest(deploy, n.ClusterDomain())
	if err != nil {
		return err
	}
	path := filepath.Join(n.Env.Dir, "kube-userspace-proxy.yaml")
	if err := os.WriteFile(path, []byte(manifest), 0o644); err != nil {
		return err
	}
	say("The proxy's DaemonSet, from %s (the API server's address and the DNS stub's flags set for this node)", deploy)
	if err := errors.Join(kubectl("apply", "-f", path),
		kubectl("-n", "kube-system", "rollout", "status", "daemonset/kube-userspace-proxy", "--timeout=180s"),
		kubectl("get", "nodes,pods", "-A", "-o", "wide")); err != nil {
		return err
	}
	s := &kubenode.Story{Node: n, Dir: examples}
	for _, step := range kubenode.Steps() {
		if step.Say != "" {
			say("%s", step.Say)
		}
		_, shown := s.Command(step)
		fmt.Printf("$ %s\n", shown)
		out, err := s.Run(ctx, step)
		fmt.Print(indent(out))
		if err != nil {
			return err
		}
	}
	say("The proxy's view of svc-test-1 (kube-userspace-proxy explain, in its pod)")
	pods, _ := n.Kubectl("-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-userspace-proxy", "-o", "name").Output()
	if pod := strings.TrimSpace(string(pods)); pod != "" {
		kubectl("-n", "kube-system", "exec", pod, "--", "kube-userspace-proxy", "explain", "default/svc-test-1")
	}
	if keep {
		say("The node stays up until Ctrl-C. From another shell:")
		fmt.Printf("  %s get pods -A\n", n.KubectlCommand())
		fmt.Printf("  ip netns exec %s iptables -t nat -S\n", n.NetNS)
		<-ctx.Done()
	}
	return nil
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ") + "\n"
}
