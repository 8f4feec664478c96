package main

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestREADMEFlagTable: the README's table of flags lists exactly the
// command's flags, with their defaults. A default written in backticks
// must be the flag's own (as --help prints it); one written in words
// ("from the open file limit", "off") stands for a flag whose default is
// its type's zero.
func TestREADMEFlagTable(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	flags := newCommand().Flags()
	names := regexp.MustCompile("`(--?[a-z0-9-]+)`")
	values := regexp.MustCompile("`([^`]*)`")
	documented := map[string]bool{}
	for _, line := range strings.Split(string(readme), "\n") {
		if !strings.HasPrefix(line, "| `-") {
			continue
		}
		cells := strings.Split(line, "|")
		if len(cells) < 4 {
			t.Errorf("README flag row %q: want | flags | default | meaning |", line)
			continue
		}
		var rowFlags []*pflag.Flag
		for _, m := range names.FindAllStringSubmatch(cells[1], -1) {
			name := strings.TrimLeft(m[1], "-")
			documented[name] = true
			f := flags.Lookup(name)
			if f == nil {
				t.Errorf("README lists %s, which the command does not have", m[1])
				continue
			}
			rowFlags = append(rowFlags, f)
		}
		defaults := values.FindAllStringSubmatch(cells[2], -1)
		for i, f := range rowFlags {
			switch {
			case len(defaults) == 0:
				if !slices.Contains([]string{"", "false", "0", "[]"}, f.DefValue) {
					t.Errorf("README gives --%s's default in words (%q); the flag's is %q: write it in backticks", f.Name, strings.TrimSpace(cells[2]), f.DefValue)
				}
			case i < len(defaults):
				if got := defaults[i][1]; got != f.DefValue {
					t.Errorf("README says --%s defaults to %q; the flag's default is %q", f.Name, got, f.DefValue)
				}
			default:
				t.Errorf("README row for --%s gives %d defaults for %d flags", f.Name, len(defaults), len(rowFlags))
			}
		}
	}
	flags.VisitAll(func(f *pflag.Flag) {
		if !documented[f.Name] && f.Name != "help" {
			t.Errorf("--%s is not in the README's table of flags", f.Name)
		}
	})
}
