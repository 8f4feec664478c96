// Command depcheck fails when an import runs against the architecture
// (make depcheck). Imports flow one way:
//
//	cmd -> proxy -> the parts -> the model (package service)
//
// Each of the project's packages has a layer below; a package may import
// only packages of lower layers, and its tests the same plus the test
// helpers. A package that is not in the table is an error too, so that a
// new package is placed on purpose.
//
//	go run ./hack/depcheck
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
)

const module = "github.com/kube-userspace-proxy/kube-userspace-proxy/"

// layers places every package, relative to the module.
var layers = map[string]int{
	// The model every part shares, and small helpers of no opinion.
	"service":              0,
	"internal/backoff":     0,
	"internal/logthrottle": 0,
	"internal/nsvisit":     0,
	// Parts with one job each, that need nothing but the model.
	"iptables":        1,
	"localaddr":       1,
	"conntrack":       1,
	"replyroute":      1,
	"proxy/balancer":  1,
	"proxy/portalloc": 1,
	"proxy/manifest":  1,
	"handoff":         1,
	// Parts built on those.
	"proxy/userspace": 2, // the balancer, the port range
	"proxy/snapshot":  2,
	"proxy/watch":     2,
	"dnsstub":         2,
	// The composition root.
	"proxy": 3,
	// Commands, the lab and the real node's harness.
	"cmd/kube-userspace-proxy": 4,
	"internal/lab":             4,
	"internal/kubetestenv":     4,
	"internal/kubenode":        5, // on kubetestenv
	"cmd/kup-lab":              6,
	// Whole-binary tests.
	"integration":      7,
	"integration/node": 7,
	// Tools.
	"hack/depcheck": 7,
}

// testOnly are packages only tests may import.
var testOnly = map[string]bool{
	"internal/netnstest": true,
}

type pkg struct {
	path                 string
	imports, testImports []string
}

func main() {
	pkgs, err := list()
	if err != nil {
		fmt.Fprintln(os.Stderr, "depcheck:", err)
		os.Exit(2)
	}
	problems := check(pkgs)
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, p)
	}
	if len(problems) > 0 {
		fmt.Fprintf(os.Stderr, "depcheck: %d import(s) against the architecture (cmd -> proxy -> parts -> service); see hack/depcheck/main.go\n", len(problems))
		os.Exit(1)
	}
	fmt.Printf("depcheck: %d packages, every import flows one way\n", len(pkgs))
}

// list asks the go command for every package's imports, its tests' too.
func list() ([]pkg, error) {
	out, err := exec.Command("go", "list", "-f",
		`{{.ImportPath}}|{{join .Imports ","}}|{{join .TestImports ","}},{{join .XTestImports ","}}`, "./...").Output()
	if err != nil {
		return nil, fmt.Errorf("go list: %w", err)
	}
	var pkgs []pkg
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Split(sc.Text(), "|")
		if len(f) != 3 {
			return nil, fmt.Errorf("go list printed %q", sc.Text())
		}
		pkgs = append(pkgs, pkg{path: f[0], imports: ours(f[1]), testImports: ours(f[2])})
	}
	return pkgs, sc.Err()
}

// ours keeps the project's own packages of a comma-separated import list,
// relative to the module.
func ours(list string) []string {
	var out []string
	for _, imp := range strings.Split(list, ",") {
		if rel, ok := strings.CutPrefix(imp, module); ok {
			out = append(out, rel)
		}
	}
	sort.Strings(out)
	return out
}

func check(pkgs []pkg) []string {
	var problems []string
	for _, p := range pkgs {
		from := strings.TrimPrefix(p.path, module)
		layer, placed := layers[from]
		if !placed && !testOnly[from] {
			problems = append(problems, fmt.Sprintf("%s: not placed in a layer: add it to hack/depcheck's table", from))
			continue
		}
		for _, imp := range p.imports {
			if testOnly[imp] {
				problems = append(problems, fmt.Sprintf("%s imports %s, which is for tests only", from, imp))
				continue
			}
			if to, ok := layers[imp]; !ok {
				problems = append(problems, fmt.Sprintf("%s imports %s, which is not placed in a layer", from, imp))
			} else if to >= layer {
				problems = append(problems, fmt.Sprintf("%s (layer %d) imports %s (layer %d): imports must go to a lower layer", from, layer, imp, to))
			}
		}
		for _, imp := range p.testImports {
			if testOnly[imp] || imp == from {
				continue
			}
			if to, ok := layers[imp]; !ok {
				problems = append(problems, fmt.Sprintf("%s's tests import %s, which is not placed in a layer", from, imp))
			} else if to > layer {
				problems = append(problems, fmt.Sprintf("%s's tests (layer %d) import %s (layer %d): tests may import their own layer and below", from, layer, imp, to))
			}
		}
	}
	return problems
}
