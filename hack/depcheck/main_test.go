package main

import (
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, tt := range []struct {
		name string
		pkg  pkg
		want string // a part of the one problem expected; empty for none
	}{
		{"down the layers", pkg{path: module + "proxy", imports: []string{"proxy/userspace", "service"}}, ""},
		{"a part reaching up", pkg{path: module + "dnsstub", imports: []string{"proxy"}}, "dnsstub (layer 2) imports proxy (layer 3)"},
		{"two parts of one layer", pkg{path: module + "proxy/snapshot", imports: []string{"proxy/watch"}}, "must go to a lower layer"},
		{"a test helper in the product", pkg{path: module + "proxy/userspace", imports: []string{"internal/netnstest"}}, "for tests only"},
		{"a test helper in a test", pkg{path: module + "proxy/userspace", testImports: []string{"internal/netnstest", "proxy/userspace"}}, ""},
		{"a test reaching up", pkg{path: module + "service", testImports: []string{"proxy/snapshot"}}, "tests (layer 0) import proxy/snapshot"},
		{"a package not placed", pkg{path: module + "proxy/newpart"}, "not placed in a layer"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := check([]pkg{tt.pkg})
			switch {
			case tt.want == "" && len(got) != 0:
				t.Errorf("problems = %q; want none", got)
			case tt.want != "" && (len(got) != 1 || !strings.Contains(got[0], tt.want)):
				t.Errorf("problems = %q; want one with %q", got, tt.want)
			}
		})
	}
}
