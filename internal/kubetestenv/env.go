// Package kubetestenv runs a real Kubernetes control plane for tests: etcd,
// kube-apiserver and kube-controller-manager (controllers endpointslice,
// serviceaccount, garbagecollector, namespace) as child processes on
// loopback, built from the Go module proxy by hack/kube-testenv/build.sh.
// The test plays the kubelet and nothing else: it creates Nodes and Pods and
// patches Pod status, and the real EndpointSlice controller writes the
// slices the proxy reads. See ../shared/reference/apiserver.md for the
// recipe and its measurements.
//
// With Options the same control plane runs inside a real node's
// namespaces instead (package kubenode), with the controllers a kubelet's
// workloads need.
package kubetestenv

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Env is a running control plane.
type Env struct {
	Dir      string // work folder: certificates, kubeconfigs, logs, etcd data
	APIPort  int
	Admin    *kubernetes.Clientset // system:masters
	CA       []byte                // PEM of the CA that signed the API server's certificate
	ProxyTok string                // token of user system:kube-proxy (bound to system:node-proxier)
	adminTok string
	procs    map[string]*exec.Cmd
	order    []string // names in the order they started
	etcdPort int
	kcmPort  int
	bin      string
	opts     Options
}

// Options say where the control plane runs. The zero value is the API
// tests' control plane: on the machine's loopback, on free ports.
type Options struct {
	// Wrap goes before every command, e.g. nsenter into a node's
	// namespaces.
	Wrap []string
	// Address is where the API server listens and is reached, and the
	// address its certificate names; the components then use the
	// standard ports (2379, 2380, 6443, 10257), which must be free there.
	// Zero: 127.0.0.1 on free ports.
	Address netip.Addr
	// Dial reaches the control plane from this process (nil: the default
	// dialer), e.g. inside the node's network namespace.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Controllers are run by the controller manager beside the API tests'
	// endpointslice, serviceaccount, garbagecollector and namespace.
	Controllers []string
	// KubernetesEndpoints has the API server keep the kubernetes Service's
	// endpoints (its lease reconciler), so that pods reach it; off, the
	// Service has none.
	KubernetesEndpoints bool
}

func (o Options) address() netip.Addr {
	if o.Address.IsValid() {
		return o.Address
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

// BinDir is where the control plane binaries are: $KUBE_TESTENV_BIN.
func BinDir() (string, error) {
	dir := os.Getenv("KUBE_TESTENV_BIN")
	if dir == "" {
		return "", errors.New("KUBE_TESTENV_BIN is not set: build the control plane with hack/kube-testenv/build.sh (make test does)")
	}
	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Errorf("control plane binary missing: %w", err)
		}
	}
	return dir, nil
}

// Start starts etcd, the API server and the controller manager on
// loopback, and waits until the API server is ready and the controller
// manager healthy.
func Start(bin, dir string) (*Env, error) { return StartWith(bin, dir, Options{}) }

// StartWith is Start where and how o says.
func StartWith(bin, dir string, o Options) (*Env, error) {
	e := &Env{Dir: dir, bin: bin, procs: map[string]*exec.Cmd{}, opts: o}
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		return nil, err
	}
	if err := e.writeCredentials(); err != nil {
		return nil, err
	}
	ports := []int{2379, 2380, 6443, 10257}
	if !o.Address.IsValid() {
		var err error
		if ports, err = freePorts(4); err != nil {
			return nil, err
		}
	}
	e.etcdPort, e.APIPort = ports[0], ports[2]
	etcdPeer, kcmPort := ports[1], ports[3]
	if err := e.writeAdminKubeconfig(); err != nil {
		return nil, err
	}
	client, peer := fmt.Sprintf("http://127.0.0.1:%d", e.etcdPort), fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	if err := e.start("etcd", "--name", "test", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "test="+peer, "--unsafe-no-fsync", "--log-level=warn"); err != nil {
		return nil, err
	}
	if err := e.StartAPIServer(); err != nil {
		e.Stop()
		return nil, err
	}
	e.kcmPort = kcmPort
	if err := e.StartControllerManager(); err != nil {
		e.Stop()
		return nil, err
	}
	return e, nil
}

// StartAPIServer starts kube-apiserver (again, after StopAPIServer) and
// waits until /readyz answers.
func (e *Env) StartAPIServer() error {
	reconciler := "none"
	if e.opts.KubernetesEndpoints {
		reconciler = "lease"
	}
	addr := e.opts.address().String()
	if err := e.start("kube-apiserver",
		"--etcd-servers="+fmt.Sprintf("http://127.0.0.1:%d", e.etcdPort),
		"--bind-address="+addr, "--advertise-address="+addr, "--secure-port="+strconv.Itoa(e.APIPort),
		"--tls-cert-file="+e.path("apiserver.crt"), "--tls-private-key-file="+e.path("apiserver.key"),
		"--service-cluster-ip-range=10.96.0.0/16,fd00:96::/108", "--endpoint-reconciler-type="+reconciler, // dual-stack Services
		"--token-auth-file="+e.path("tokens.csv"), "--client-ca-file="+e.path("ca.crt"),
		"--authorization-mode=RBAC", "--anonymous-auth=false",
		"--kubelet-preferred-address-types=InternalIP", // exec and logs reach a kubelet by address, never by a name to look up
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+e.path("sa.key"), "--service-account-signing-key-file="+e.path("sa.key")); err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(e.CA)
	hc := &http.Client{Transport: &bearer{tok: e.adminTok, rt: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DialContext: e.opts.Dial}}, Timeout: time.Second}
	if err := e.waitFor("kube-apiserver", e.APIURL()+"/readyz", hc); err != nil {
		return err
	}
	if e.Admin == nil {
		c, err := kubernetes.NewForConfig(e.RestConfig(e.adminTok))
		if err != nil {
			return err
		}
		e.Admin = c
	}
	return nil
}

// StartControllerManager starts kube-controller-manager (again, after
// StopControllerManager) and waits until it is healthy.
func (e *Env) StartControllerManager() error {
	controllers := append([]string{"endpointslice", "serviceaccount", "garbagecollector", "namespace"}, e.opts.Controllers...)
	if err := e.start("kube-controller-manager", "--kubeconfig="+e.path("admin.kubeconfig"),
		"--controllers="+strings.Join(controllers, ","), "--root-ca-file="+e.path("ca.crt"),
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(e.kcmPort),
		"--authentication-kubeconfig="+e.path("admin.kubeconfig"), "--authorization-kubeconfig="+e.path("admin.kubeconfig"),
		"--authentication-skip-lookup", "--v=2"); err != nil {
		return err
	}
	// The health port is on the wrapped command's loopback: reached
	// through Dial's namespace, at 127.0.0.1.
	insecure := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DialContext: e.opts.Dial}, Timeout: time.Second}
	return e.waitFor("kube-controller-manager", fmt.Sprintf("https://127.0.0.1:%d/healthz", e.kcmPort), insecure)
}

// StopControllerManager stops kube-controller-manager only.
func (e *Env) StopControllerManager() { e.stop("kube-controller-manager") }

// StopAPIServer stops kube-apiserver only: an API outage.
func (e *Env) StopAPIServer() { e.stop("kube-apiserver") }

// APIURL is the API server's address, as its clients reach it.
func (e *Env) APIURL() string {
	return "https://" + net.JoinHostPort(e.opts.address().String(), strconv.Itoa(e.APIPort))
}

// RestConfig is a client configuration for the user with token tok.
func (e *Env) RestConfig(tok string) *rest.Config {
	return &rest.Config{
		Host:            e.APIURL(),
		BearerToken:     tok,
		TLSClientConfig: rest.TLSClientConfig{CAData: e.CA},
		QPS:             100, Burst: 200,
		Dial: e.opts.Dial,
	}
}

// Path is the path of a file in the work folder: "ca.crt",
// "admin.kubeconfig".
func (e *Env) Path(name string) string { return e.path(name) }

// AdminConfig is a client configuration for the admin (system:masters).
func (e *Env) AdminConfig() *rest.Config { return e.RestConfig(e.adminTok) }

// Kubeconfig writes a kubeconfig for user system:kube-proxy that reaches
// the API server at server (an https URL), and returns its path.
func (e *Env) Kubeconfig(name, server string) (string, error) {
	path := e.path(name)
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: kube-proxy
  user:
    token: %s
contexts:
- name: test
  context: {cluster: test, user: kube-proxy}
current-context: test
`, server, e.path("ca.crt"), e.ProxyTok)
	return path, os.WriteFile(path, []byte(content), 0o600)
}

// Stop stops every process this Env started, by the PIDs it started, in
// the reverse of their start: the controller manager, the API server,
// then etcd (and before them what Run added).
func (e *Env) Stop() {
	for _, name := range slices.Backward(e.order) {
		e.stop(name)
	}
	e.order = nil
}

// Run starts another binary of the control plane's folder (kube-scheduler,
// kubelet, containerd) the way the control plane's own are started:
// wrapped, logging to logs/NAME.log, stopped by Stop.
func (e *Env) Run(name string, args ...string) error { return e.start(name, args...) }

func (e *Env) stop(name string) {
	cmd, ok := e.procs[name]
	if !ok {
		return
	}
	delete(e.procs, name)
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func (e *Env) path(name string) string { return filepath.Join(e.Dir, name) }

func (e *Env) start(name string, args ...string) error {
	logf, err := os.Create(e.path(filepath.Join("logs", name+".log")))
	if err != nil {
		return err
	}
	argv := append(append(slices.Clone(e.opts.Wrap), filepath.Join(e.bin, name)), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	e.procs[name] = cmd
	e.order = append(slices.DeleteFunc(e.order, func(n string) bool { return n == name }), name)
	return nil
}

func (e *Env) waitFor(name, url string, hc *http.Client) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := hc.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if p := e.procs[name]; p != nil && p.ProcessState != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	log, _ := os.ReadFile(e.path(filepath.Join("logs", name+".log")))
	if len(log) > 4000 {
		log = log[len(log)-4000:]
	}
	return fmt.Errorf("%s did not become ready at %s; its log ends:\n%s", name, url, log)
}

type bearer struct {
	tok string
	rt  http.RoundTripper
}

func (b *bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.tok)
	return b.rt.RoundTrip(r)
}

// writeCredentials makes a throwaway CA, the API server's serving
// certificate (for 127.0.0.1), the ServiceAccount signing key and the
// static tokens of two users: admin (system:masters) and system:kube-proxy,
// which the API server's bootstrap RBAC binds to system:node-proxier, the
// exact rights kube-proxy has in a kubeadm cluster.
func (e *Env) writeCredentials() error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kubetestenv-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	srvTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), e.opts.address().AsSlice(), net.IPv4(10, 96, 0, 1)},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	e.CA = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	e.adminTok, e.ProxyTok = token(), token()
	files := map[string][]byte{
		"ca.crt":        e.CA,
		"apiserver.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		"apiserver.key": ecPEM(srvKey),
		"sa.key":        ecPEM(saKey),
		"tokens.csv":    []byte(fmt.Sprintf("%s,admin,admin,\"system:masters\"\n%s,system:kube-proxy,kube-proxy\n", e.adminTok, e.ProxyTok)),
	}
	for name, data := range files {
		if err := os.WriteFile(e.path(name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// writeAdminKubeconfig writes the admin's kubeconfig, for the controller
// manager, once the API server's port is known.
func (e *Env) writeAdminKubeconfig() error {
	return os.WriteFile(e.path("admin.kubeconfig"), []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "%s", certificate-authority: %s}
users:
- name: admin
  user: {token: %s}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, e.APIURL(), e.path("ca.crt"), e.adminTok)), 0o600)
}

func ecPEM(k *ecdsa.PrivateKey) []byte {
	der, _ := x509.MarshalECPrivateKey(k)
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

func token() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
