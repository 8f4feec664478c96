// Package kubenode brings up one real Kubernetes node for tests, the way
// ../shared/reference/realnode.md measured it on these machines: a network
// namespace of its own (an eth0 at NodeIP, the pods on a CNI bridge),
// a private mount namespace held open by a sleeping process, and in both
// the control plane (package kubetestenv, with the controllers workloads
// need), kube-scheduler, containerd v2 and a real kubelet. No registry is
// reachable, so every image, the pause image included, is built here and
// imported into containerd.
//
// Everything the node changes is undone by Close, also after a failure:
// its processes (found by the mount namespace they share, and the pods'
// cgroups), its cgroups, its network namespace and the sysctls kubelet
// sets. Only one node runs at a time on a machine: kubelet's sysctls are
// global.
package kubenode

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/kubetestenv"
	"github.com/kube-userspace-proxy/kube-userspace-proxy/internal/nsvisit"
)

// The node's addresses.
var (
	// NodeIP is the node's address, on its eth0.
	NodeIP = netip.MustParseAddr("10.200.0.2")
	// PodCIDR is where the CNI bridge plugin gives pods their addresses.
	PodCIDR = netip.MustParsePrefix("10.244.0.0/24")
	// ClusterDNS is kubelet's clusterDNS: the nameserver of every pod's
	// resolv.conf.
	ClusterDNS = netip.MustParseAddr("10.96.0.10")
)

// Options say how the node is made.
type Options struct {
	// Bin holds the binaries hack/kube-testenv/build.sh makes.
	Bin string
	// Dir is the node's work folder (certificates, configurations, logs,
	// containerd's images); the caller removes it.
	Dir string
	// ClusterDomain is kubelet's clusterDomain ("cluster.local" if empty).
	ClusterDomain string
	// SandboxImage is the pause image, the first thing in every pod; it
	// must be among Images.
	SandboxImage string
	// Images are docker-archives imported into containerd before kubelet
	// starts.
	Images []string
}

// Node is a running node.
type Node struct {
	Name  string // the Node object's name
	NetNS string // the network namespace, under /run/netns
	Env   *kubetestenv.Env
	opts  Options
	ns    netns.NsHandle
	// holder sleeps in the node's mount namespace and keeps it open.
	holder     *exec.Cmd
	mountNS    string // the holder's /proc/PID/ns/mnt link
	cgroupRoot string // kubelet's cgroupRoot, made in every hierarchy
	sysctls    map[string]string
}

// sysctls kubelet sets for itself (protectKernelDefaults unset): saved
// before it starts and written back by Close.
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// Start brings the node up and waits until its Node is Ready. On an error
// everything started so far is undone.
func Start(o Options) (n *Node, err error) {
	if o.ClusterDomain == "" {
		o.ClusterDomain = "cluster.local"
	}
	b := make([]byte, 4)
	rand.Read(b)
	id := hex.EncodeToString(b)
	n = &Node{Name: "kup-node", NetNS: "kupn" + id, opts: o, cgroupRoot: "kupnode-" + id, sysctls: map[string]string{}}
	defer func() {
		if err != nil && os.Getenv("KUBENODE_DEBUG") != "" {
			fmt.Println("DEBUG: holding the node for 300s", n.NetNS, n.opts.Dir)
			time.Sleep(300 * time.Second)
		}
		if err != nil {
			n.Close()
			n = nil
		}
	}()
	for _, dir := range []string{"logs", "cni", "pki", "containerd"} {
		if err := os.MkdirAll(n.path(dir), 0o755); err != nil {
			return n, err
		}
	}
	if err := n.network(); err != nil {
		return n, fmt.Errorf("node network: %w", err)
	}
	if err := n.mounts(); err != nil {
		return n, fmt.Errorf("node mount namespace: %w", err)
	}
	if err := n.cgroups(); err != nil {
		return n, fmt.Errorf("node cgroups: %w", err)
	}
	for _, s := range kubeletSysctls {
		v, err := os.ReadFile("/proc/sys/" + s)
		if err != nil {
			return n, err
		}
		n.sysctls[s] = string(v)
	}
	n.Env, err = kubetestenv.StartWith(o.Bin, n.path("control-plane"), kubetestenv.Options{
		Wrap:    n.wrap(),
		Address: NodeIP,
		Dial:    n.Dial,
		Controllers: []string{"daemonset-controller", "deployment-controller", "replicaset-controller",
			"root-ca-certificate-publisher-controller", "node-lifecycle-controller"},
		KubernetesEndpoints: true,
	})
	if err != nil {
		return n, err
	}
	if err := n.Env.Run("kube-scheduler", "--kubeconfig="+n.Env.Path("admin.kubeconfig"),
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259"); err != nil {
		return n, err
	}
	if err := n.containerd(); err != nil {
		return n, err
	}
	for _, img := range o.Images {
		if out, err := n.Ctr("images", "import", "--platform", "linux/amd64", img); err != nil {
			return n, fmt.Errorf("import %s: %w: %s", img, err, out)
		}
	}
	if err := n.kubelet(); err != nil {
		return n, err
	}
	return n, n.waitReady()
}

func (n *Node) path(name string) string { return filepath.Join(n.opts.Dir, name) }

// ClusterDomain is the cluster domain kubelet gives pods.
func (n *Node) ClusterDomain() string { return n.opts.ClusterDomain }

// KubectlCommand is how a person runs kubectl against this node, from
// the machine.
func (n *Node) KubectlCommand() string {
	return fmt.Sprintf("nsenter --net=/run/netns/%s %s --kubeconfig=%s", n.NetNS, filepath.Join(n.opts.Bin, "kubectl"), n.Env.Path("admin.kubeconfig"))
}

// wrap runs a command in the node's network and mount namespaces.
func (n *Node) wrap() []string {
	return []string{"nsenter", "-t", strconv.Itoa(n.holder.Process.Pid), "-m", "-n", "--"}
}

// network makes the node's network namespace: loopback, and eth0 at
// NodeIP with the default route, so that the node has an address kubelet
// reports and a route for Service IPs (the iptables OUTPUT rules act after
// routing). eth0 is a bridge with no port (these kernels have no dummy
// device): nothing sent to it leaves the namespace.
func (n *Node) network() error {
	steps := [][]string{
		{"netns", "add", n.NetNS},
		{"-n", n.NetNS, "link", "set", "lo", "up"},
		{"-n", n.NetNS, "link", "add", "eth0", "type", "bridge"},
		{"-n", n.NetNS, "addr", "add", NodeIP.String() + "/24", "dev", "eth0"},
		{"-n", n.NetNS, "link", "set", "eth0", "up"},
		{"-n", n.NetNS, "route", "add", "default", "via", "10.200.0.1"},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(s, " "), err, out)
		}
	}
	var err error
	n.ns, err = netns.GetFromName(n.NetNS)
	return err
}

// mounts starts the holder: a sleeping process in the node's network
// namespace and a new private mount namespace. Every daemon is then
// started with nsenter into both, so that they see each other's mounts
// (kubelet's volumes, containerd's snapshots), and not with ip netns exec,
// which gives each command a mount namespace of its own and remounts /sys
// (hiding the cgroup hierarchies). Inside, fresh tmpfs cover /var/lib,
// /var/log and /run, where kubelet, the CNI plugins and runc write paths
// of their own: none of it reaches the machine's.
func (n *Node) mounts() error {
	n.holder = exec.Command("nsenter", "--net=/run/netns/"+n.NetNS, "--",
		"unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity")
	if err := n.holder.Start(); err != nil {
		return err
	}
	n.mountNS = fmt.Sprintf("/proc/%d/ns/mnt", n.holder.Process.Pid)
	self, _ := os.Readlink("/proc/self/ns/mnt")
	// Wait until unshare has made the new namespace and exec'd sleep.
	err := wait.PollUntilContextTimeout(context.Background(), 10*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		mnt, err := os.Readlink(n.mountNS)
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", n.holder.Process.Pid))
		return err == nil && mnt != self && strings.TrimSpace(string(comm)) == "sleep", nil
	})
	if err != nil {
		return fmt.Errorf("the holder never entered its namespaces: %w", err)
	}
	for _, dir := range []string{"/var/lib", "/var/log", "/run"} {
		if out, err := n.In("mount", "-t", "tmpfs", "kupnode", dir).CombinedOutput(); err != nil {
			return fmt.Errorf("mount a tmpfs on %s: %w: %s", dir, err, out)
		}
	}
	return nil
}

// In is a command run in the node's network and mount namespaces.
func (n *Node) In(name string, args ...string) *exec.Cmd {
	argv := append(n.wrap(), name)
	return exec.Command(argv[0], append(argv[1:], args...)...)
}

// ContainerLogs is the end of every log file kubelet keeps for the
// containers of the pods in namespace whose names start with prefix,
// those of restarted containers included (kubectl logs shows the last
// two): for a test's failure.
func (n *Node) ContainerLogs(namespace, prefix string) string {
	out, _ := n.In("sh", "-c", fmt.Sprintf("for f in /var/log/pods/%s_%s*/*/*.log; do echo \"== $f\"; tail -n 40 \"$f\"; done", namespace, prefix)).CombinedOutput()
	return string(out)
}

// cgroupHierarchies lists the machine's cgroup hierarchies: each v1
// controller's and the unified one.
func cgroupHierarchies() ([]string, error) {
	entries, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, e := range entries {
		dir := filepath.Join("/sys/fs/cgroup", e.Name())
		if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err == nil && e.IsDir() {
			dirs = append(dirs, dir)
		}
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.procs"); err == nil {
		dirs = append(dirs, "/sys/fs/cgroup") // cgroup v2 alone
	}
	return dirs, nil
}

// cgroups makes kubelet's cgroupRoot in every hierarchy (kubelet refuses a
// root that is missing from one), so that every pod's cgroup lives under
// a name of this node's, removed by Close.
func (n *Node) cgroups() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		dir := filepath.Join(h, n.cgroupRoot)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return err
		}
		// A new v1 cpuset starts with no CPUs and no memory nodes: no
		// process could join it.
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if v, err := os.ReadFile(filepath.Join(h, f)); err == nil {
				if err := os.WriteFile(filepath.Join(dir, f), v, 0o644); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// containerd starts containerd v2 with the node's own root, state, socket
// and CNI configuration; restrict_oom_score_adj, because root here lacks
// CAP_SYS_RESOURCE and runc would fail every sandbox lowering its score.
func (n *Node) containerd() error {
	cni := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "kupnode", "plugins": [{
  "type": "bridge", "bridge": "cni0", "isGateway": true, "hairpinMode": true,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}
}]}
`, PodCIDR.String())
	if err := os.WriteFile(n.path("cni/10-kupnode.conflist"), []byte(cni), 0o644); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = "%[3]s.ttrpc"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[4]q
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = %[5]q
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "/usr/sbin/runc"
      Root = %[6]q
      SystemdCgroup = false
`, n.path("containerd/root"), n.path("containerd/state"), n.socket(), n.opts.SandboxImage, n.path("cni"), n.path("containerd/runc"))
	if err := os.WriteFile(n.path("containerd.toml"), []byte(cfg), 0o644); err != nil {
		return err
	}
	if err := n.Env.Run("containerd", "--config", n.path("containerd.toml")); err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, 60*time.Second, true, func(context.Context) (bool, error) {
		_, err := n.Ctr("version")
		return err == nil, nil
	})
}

func (n *Node) socket() string { return n.path("containerd.sock") }

// Ctr runs containerd's ctr on the node's containerd, in the namespace of
// kubelet's containers. It runs in the node's namespaces, as containerd
// does: ctr run hands containerd the paths of FIFOs it makes under /run.
func (n *Node) Ctr(args ...string) ([]byte, error) {
	argv := append([]string{"--address", n.socket(), "--namespace", "k8s.io"}, args...)
	return n.In(filepath.Join(n.opts.Bin, "ctr"), argv...).CombinedOutput()
}

// CgroupParent is the cgroup under which a container the test runs itself
// (ctr run) must live, so that Close removes it with the pods'.
func (n *Node) CgroupParent() string { return "/" + n.cgroupRoot }

// kubelet starts kubelet with the admin's credentials (this node trusts
// the test), cgroupfs under the node's cgroupRoot, the cluster DNS
// settings every pod's resolv.conf gets, and failCgroupV1 off: these
// machines have cgroup v1 hierarchies.
func (n *Node) kubelet() error {
	if err := os.WriteFile(n.path("resolv.conf"), []byte("nameserver 10.200.0.1\n"), 0o644); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: /%s
containerRuntimeEndpoint: unix://%s
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
clusterDNS: [%s]
clusterDomain: %s
resolvConf: %s
readOnlyPort: 0
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`, n.cgroupRoot, n.socket(), ClusterDNS, n.opts.ClusterDomain, n.path("resolv.conf"))
	if err := os.WriteFile(n.path("kubelet.yaml"), []byte(cfg), 0o644); err != nil {
		return err
	}
	return n.Env.Run("kubelet", "--config="+n.path("kubelet.yaml"), "--kubeconfig="+n.Env.Path("admin.kubeconfig"),
		"--hostname-override="+n.Name, "--node-ip="+NodeIP.String(), "--cert-dir="+n.path("pki"), "--v=2")
}

// waitReady waits for the Node to be Ready.
func (n *Node) waitReady() error {
	var last string
	err := wait.PollUntilContextTimeout(context.Background(), 250*time.Millisecond, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		node, err := n.Env.Admin.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady {
				last = fmt.Sprintf("Ready %s: %s", c.Status, c.Message)
				return c.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("node %s not Ready (%s); kubelet's log: %s", n.Name, last, n.Env.Path("logs/kubelet.log"))
	}
	return nil
}

// Dial connects from inside the node's network namespace: the socket is
// made on a thread that has entered it, and stays there.
func (n *Node) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := nsvisit.Do(n.NetNS, func() (err error) {
		c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Kubectl is the command line of kubectl as the node's admin, run in the
// node's network namespace (the API server is at NodeIP).
func (n *Node) Kubectl(args ...string) *exec.Cmd {
	argv := append([]string{"--net=/run/netns/" + n.NetNS, "--", filepath.Join(n.opts.Bin, "kubectl"),
		"--kubeconfig=" + n.Env.Path("admin.kubeconfig")}, args...)
	return exec.Command("nsenter", argv...)
}

// Close stops the node and undoes everything it changed: the daemons, in
// the reverse of their start; every process left in the pods' cgroups or
// in the node's mount namespace (containerd's shims outlive containerd by
// design); the cgroups; the network namespace; kubelet's sysctls.
func (n *Node) Close() error {
	var errs []error
	if n.Env != nil {
		n.Env.Stop()
	}
	hs, _ := cgroupHierarchies()
	// The pods' processes, then everything else in the mount namespace,
	// until none is left (a shim may start a process while we look).
	for range 50 {
		pids := n.leftovers(hs)
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n.holder != nil {
		n.holder.Process.Kill()
		n.holder.Wait()
	}
	for _, h := range hs {
		if err := removeCgroupTree(filepath.Join(h, n.cgroupRoot)); err != nil {
			errs = append(errs, err)
		}
	}
	if n.ns.IsOpen() {
		n.ns.Close()
	}
	if out, err := exec.Command("ip", "netns", "del", n.NetNS).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such file") {
		errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", n.NetNS, err, out))
	}
	for s, v := range n.sysctls {
		if err := os.WriteFile("/proc/sys/"+s, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", s, err))
		}
	}
	return errors.Join(errs...)
}

// leftovers are the processes this node started that still run: those in
// its cgroups and those in its mount namespace, but the holder, which
// keeps the namespace to be recognized.
func (n *Node) leftovers(hs []string) []int {
	var pids []int
	for _, h := range hs {
		filepath.WalkDir(filepath.Join(h, n.cgroupRoot), func(path string, d os.DirEntry, err error) error {
			if err == nil && d.Name() == "cgroup.procs" {
				data, _ := os.ReadFile(path)
				for _, f := range strings.Fields(string(data)) {
					if pid, err := strconv.Atoi(f); err == nil {
						pids = append(pids, pid)
					}
				}
			}
			return nil
		})
	}
	if n.holder != nil {
		mine, err := os.Readlink(n.mountNS)
		procs, _ := os.ReadDir("/proc")
		for _, p := range procs {
			pid, perr := strconv.Atoi(p.Name())
			if err != nil || perr != nil || pid == n.holder.Process.Pid {
				continue
			}
			if mnt, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); mnt == mine {
				pids = append(pids, pid)
			}
		}
	}
	slices.Sort(pids)
	return slices.Compact(pids)
}

// removeCgroupTree removes a cgroup and those below it, deepest first.
func removeCgroupTree(root string) error {
	var dirs []string
	filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	var errs []error
	for _, d := range slices.Backward(dirs) {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// DeployManifest is deploy/'s manifest as this node needs it: the API
// server's real address in place of kind's control-plane name, and the
// DNS stub's flags (kubelet's clusterDNS and the cluster domain), since
// nothing else answers DNS here. Each edit must find its place.
func DeployManifest(path, clusterDomain string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	s := string(data)
	edits := []struct{ old, new string }{
		{"value: kind-control-plane", fmt.Sprintf("value: %q", NodeIP.String())},
		{"        - --handoff-socket=/run/kube-userspace-proxy/handoff.sock\n",
			"        - --handoff-socket=/run/kube-userspace-proxy/handoff.sock\n" +
				"        - --cluster-dns=" + ClusterDNS.String() + "\n" +
				"        - --cluster-domain=" + clusterDomain + "\n"},
	}
	for _, e := range edits {
		if strings.Count(s, e.old) != 1 {
			return "", fmt.Errorf("%s: %q is not there once: change package kubenode with the manifest", path, e.old)
		}
		s = strings.Replace(s, e.old, e.new, 1)
	}
	return s, nil
}
