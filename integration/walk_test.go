package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestLifeOfAConnectionDoc makes docs/life-of-a-connection.md again from a
// lab (kup-lab walk, as make docs does) and fails when it differs from the
// committed doc: its commands' output must be what the code does now. It
// also checks that every function the doc names is in the file it names.
func TestLifeOfAConnectionDoc(t *testing.T) {
	committed, err := os.ReadFile("../docs/life-of-a-connection.md")
	if err != nil {
		t.Fatal(err)
	}
	made := filepath.Join(t.TempDir(), "life-of-a-connection.md")
	if out, err := exec.Command(tools.Helper, "walk", "--proxy", tools.Proxy, "-o", made).CombinedOutput(); err != nil {
		t.Fatalf("kup-lab walk: %v\n%s", err, out)
	}
	got, err := os.ReadFile(made)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, committed) {
		gl, cl := strings.Split(string(got), "\n"), strings.Split(string(committed), "\n")
		for i := range max(len(gl), len(cl)) {
			g, c := line(gl, i), line(cl, i)
			if g != c {
				t.Errorf("docs/life-of-a-connection.md is not what the lab prints now (run make docs); first difference at line %d:\ncommitted: %s\nlab:       %s", i+1, c, g)
				break
			}
		}
	}
	// "Code: `file.go` `Type.Method`, `Func`; `other.go` ..."
	ref := regexp.MustCompile("`([a-z0-9/_]+\\.go)`((?: *,? *`[A-Za-z0-9_.]+`)+)")
	name := regexp.MustCompile("`([A-Za-z0-9_.]+)`")
	for _, l := range strings.Split(string(committed), "\n") {
		if !strings.HasPrefix(l, "Code: ") {
			continue
		}
		for _, m := range ref.FindAllStringSubmatch(l, -1) {
			src, err := os.ReadFile(filepath.Join("..", m[1]))
			if err != nil {
				t.Errorf("the doc names %s: %v", m[1], err)
				continue
			}
			for _, n := range name.FindAllStringSubmatch(m[2], -1) {
				typ, fn, method := strings.Cut(n[1], ".")
				decl := regexp.MustCompile(`func ` + regexp.QuoteMeta(typ) + `\(`)
				if method {
					decl = regexp.MustCompile(`func \(\w+ \*?` + regexp.QuoteMeta(typ) + `\) ` + regexp.QuoteMeta(fn) + `\(`)
				}
				if !decl.Match(src) {
					t.Errorf("the doc names %s in %s, which has no such function", n[1], m[1])
				}
			}
		}
	}
}

func line(lines []string, i int) string {
	if i < len(lines) {
		return lines[i]
	}
	return "(end of file)"
}
