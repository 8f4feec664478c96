package main

import (
	"archive/tar"
	"bufio"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// TestSameInputsSameDigest builds the image twice from the same root
// filesystem and binary, with the files' times changed in between (as a
// rebuild on another day would), and wants one digest, in the printed
// digest, the OCI layout and the docker-archive alike; then a binary that
// differs by one byte, which must change it.
func TestSameInputsSameDigest(t *testing.T) {
	dir := t.TempDir()
	rootfs := filepath.Join(dir, "rootfs.tar")
	writeTar(t, rootfs, map[string]string{"etc/os-release": "ID=debian\n", "usr/sbin/iptables": "#!/bin/sh\n"})
	binary := filepath.Join(dir, "kube-userspace-proxy")
	if err := os.WriteFile(binary, []byte("\x7fELF pretend binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	s := spec{rootfs: rootfs, binary: binary, path: proxyPath, version: "v1.2.3"}
	ref, _ := name.NewTag("kube-userspace-proxy:dev")
	build1 := func(out string) string {
		t.Helper()
		img, err := build(s)
		if err != nil {
			t.Fatal(err)
		}
		d, err := write(img, ref, filepath.Join(dir, out, "oci"), filepath.Join(dir, out, "image.tar"))
		if err != nil {
			t.Fatal(err)
		}
		// What was written reads back with the same digest.
		p, err := layout.FromPath(filepath.Join(dir, out, "oci"))
		if err != nil {
			t.Fatal(err)
		}
		idx, _ := p.ImageIndex()
		m, err := idx.IndexManifest()
		if err != nil || len(m.Manifests) != 1 || m.Manifests[0].Digest != d {
			t.Fatalf("OCI layout of %s: %+v, %v; want the one image %s", out, m, err, d)
		}
		fromArchive, err := tarball.ImageFromPath(filepath.Join(dir, out, "image.tar"), &ref)
		if err != nil {
			t.Fatal(err)
		}
		if ad, _ := fromArchive.ConfigName(); ad.String() == "" {
			t.Fatalf("docker-archive of %s has no config", out)
		}
		return d.String()
	}
	for _, o := range []string{"a", "b"} {
		os.MkdirAll(filepath.Join(dir, o), 0o755)
	}
	first := build1("a")
	later := time.Now().Add(48 * time.Hour)
	os.Chtimes(rootfs, later, later)
	os.Chtimes(binary, later, later)
	if again := build1("b"); again != first {
		t.Fatalf("same inputs, two digests: %s, then %s", first, again)
	}
	a, _ := os.ReadFile(filepath.Join(dir, "a", "image.tar"))
	b, _ := os.ReadFile(filepath.Join(dir, "b", "image.tar"))
	if string(a) != string(b) {
		t.Error("same inputs, two different docker-archives")
	}
	os.WriteFile(binary, []byte("\x7fELF pretend binarY"), 0o755)
	os.MkdirAll(filepath.Join(dir, "c"), 0o755)
	if other := build1("c"); other == first {
		t.Fatalf("a different binary kept the digest %s", first)
	}
}

// TestDockerfileInstallsThePackageList: the Dockerfile, for users with
// registries, installs exactly the packages of ./packages, the list make
// image gives mmdebstrap.
func TestDockerfileInstallsThePackageList(t *testing.T) {
	want, err := packageList("packages")
	if err != nil {
		t.Fatal(err)
	}
	if len(want) == 0 {
		t.Fatal("packages lists no package")
	}
	df, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	// The install command may span lines joined by backslashes.
	text := strings.ReplaceAll(string(df), "\\\n", " ")
	m := regexp.MustCompile(`apt-get install -y --no-install-recommends ([^&\n]+)`).FindStringSubmatch(text)
	if m == nil {
		t.Fatal("the Dockerfile has no apt-get install -y --no-install-recommends line")
	}
	got := strings.Fields(m[1])
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("the Dockerfile installs %v; hack/image/packages lists %v: change both together", got, want)
	}
}

func packageList(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var pkgs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !strings.HasPrefix(line, "#") {
			pkgs = append(pkgs, line)
		}
	}
	return pkgs, sc.Err()
}

func writeTar(t *testing.T, path string, files map[string]string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, n := range slices.Sorted(maps.Keys(files)) {
		tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(files[n])), ModTime: time.Unix(0, 0)})
		tw.Write([]byte(files[n]))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
}
