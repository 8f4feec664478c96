// Command image assembles the node agent's OCI image with no registry and
// no container engine: a Debian root filesystem made by mmdebstrap
// (rootfs.sh) as the first layer, our static binary as the second, and a
// config whose every field is fixed, so the same two inputs always give
// the same image digest.
//
// It writes the image twice: as an OCI image layout (a directory, for
// skopeo, crane or `ctr images import --oci`-style tools) and as a
// docker-archive tar, which `docker load`, `ctr images import` and
// `kind load image-archive` all take.
//
// The tests use it too, without --rootfs, for their own images of a
// single static Go program (the pause program, the pods' web server and
// client), since no registry can be pulled from here.
//
// It lives in a module of its own so that go-containerregistry never
// reaches the proxy's go.mod.
//
// Usage:
//
//	go run . --rootfs base.tar --binary kube-userspace-proxy \
//	  --tag kube-userspace-proxy:dev --layout out/oci --archive out/image.tar
//	go run . --binary kup-lab --path /kup-lab --entrypoint /kup-lab,pause \
//	  --tag kup/pause:test --archive pause.tar
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// proxyPath is where the proxy lives in its image: the DaemonSet's
// command names it.
const proxyPath = "/usr/local/bin/kube-userspace-proxy"

// epoch is every timestamp in the image: the binary's mtime in its layer
// and the config's creation time. A real time would change the digest on
// every build.
var epoch = time.Unix(0, 0).UTC()

func main() {
	var s spec
	flag.StringVar(&s.rootfs, "rootfs", "", "root filesystem tar (rootfs.sh makes it); none: the image holds the binary alone")
	flag.StringVar(&s.binary, "binary", "", "the static binary")
	flag.StringVar(&s.path, "path", proxyPath, "where the binary goes in the image")
	entrypoint := flag.String("entrypoint", "", "the image's entrypoint, comma-separated (default: the binary alone)")
	flag.StringVar(&s.version, "version", "", "the version, as the org.opencontainers.image.version label")
	tag := flag.String("tag", "kube-userspace-proxy:dev", "the image's name in the docker-archive and the layout's index")
	lay := flag.String("layout", "", "directory to write the OCI image layout to (replaced); none: no layout")
	archive := flag.String("archive", "", "file to write the docker-archive to (replaced)")
	flag.Parse()
	if *entrypoint != "" {
		s.entrypoint = strings.Split(*entrypoint, ",")
	}
	if err := run(s, *tag, *lay, *archive); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

// spec is what goes into an image.
type spec struct {
	rootfs     string   // a tar of the root filesystem, or "" for none
	binary     string   // the static binary, on the host
	path       string   // where it goes in the image
	entrypoint []string // nil: the binary alone
	version    string
}

func run(s spec, tag, lay, archive string) error {
	if s.binary == "" || archive == "" {
		return errors.New("--binary and --archive are required")
	}
	if s.path == "" || s.path[0] != '/' {
		return fmt.Errorf("--path %q: want an absolute path in the image", s.path)
	}
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("--tag %q: %w", tag, err)
	}
	img, err := build(s)
	if err != nil {
		return err
	}
	digest, err := write(img, ref, lay, archive)
	if err != nil {
		return err
	}
	fmt.Printf("%s %s\n", ref.Name(), digest)
	return nil
}

// build makes the image from its layers: the root filesystem, if any, and
// the binary.
func build(s spec) (v1.Image, error) {
	var adds []mutate.Addendum
	if s.rootfs != "" {
		base, err := tarball.LayerFromFile(s.rootfs, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, fmt.Errorf("root filesystem layer from %s: %w", s.rootfs, err)
		}
		adds = append(adds, mutate.Addendum{Layer: base, History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "rootfs.sh: Debian bookworm (mmdebstrap) with hack/image/packages"}})
	}
	bin, err := binaryLayer(s.binary, s.path)
	if err != nil {
		return nil, err
	}
	adds = append(adds, mutate.Addendum{Layer: bin, History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "the static binary at " + s.path}})
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, adds...)
	if err != nil {
		return nil, fmt.Errorf("appending the layers: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("reading the config back: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.Created = v1.Time{Time: epoch}
	cfg.OS = "linux"
	cfg.Architecture = "amd64"
	entrypoint := s.entrypoint
	if entrypoint == nil {
		entrypoint = []string{s.path}
	}
	cfg.Config = v1.Config{
		Entrypoint: entrypoint,
		Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		Labels: map[string]string{
			"org.opencontainers.image.title":  path.Base(s.path),
			"org.opencontainers.image.source": "https://github.com/kube-userspace-proxy/kube-userspace-proxy",
		},
	}
	if s.version != "" {
		cfg.Config.Labels["org.opencontainers.image.version"] = s.version
	}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return nil, fmt.Errorf("setting the config: %w", err)
	}
	return img, nil
}

// binaryLayer tars the binary alone at path, with the owner, mode and
// time fixed: only its bytes reach the digest, not when or by whom it was
// built. The directories above it come from the root filesystem (without
// one, the runtime makes them).
func binaryLayer(binary, path string) (v1.Layer, error) {
	data, err := os.ReadFile(binary)
	if err != nil {
		return nil, fmt.Errorf("the binary layer: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdr := &tar.Header{
		Typeflag: tar.TypeReg,
		Name:     path[1:],
		Mode:     0o755,
		Size:     int64(len(data)),
		ModTime:  epoch,
		Format:   tar.FormatPAX,
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, fmt.Errorf("the binary layer: %w", err)
	}
	if _, err := tw.Write(data); err != nil {
		return nil, fmt.Errorf("the binary layer: %w", err)
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("the binary layer: %w", err)
	}
	layerTar := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// write puts the image in an OCI layout at lay and a docker-archive at
// archive, each written beside its final name and renamed into place, so
// that an interrupted build never leaves a half image where a good one was.
func write(img v1.Image, ref name.Tag, lay, archive string) (v1.Hash, error) {
	digest, err := img.Digest()
	if err != nil {
		return v1.Hash{}, fmt.Errorf("image digest: %w", err)
	}
	if lay != "" {
		if err := writeLayout(img, ref, lay); err != nil {
			return v1.Hash{}, err
		}
	}
	tmpArchive := archive + ".tmp"
	if err := tarball.WriteToFile(tmpArchive, ref, img); err != nil {
		return v1.Hash{}, fmt.Errorf("docker-archive %s: %w", archive, err)
	}
	if err := os.Rename(tmpArchive, archive); err != nil {
		return v1.Hash{}, err
	}
	return digest, nil
}

// writeLayout writes img as the only image of an OCI layout at lay,
// beside it first and then renamed into place.
func writeLayout(img v1.Image, ref name.Tag, lay string) error {
	tmpLay := lay + ".tmp"
	if err := os.RemoveAll(tmpLay); err != nil {
		return err
	}
	p, err := layout.Write(tmpLay, empty.Index)
	if err != nil {
		return fmt.Errorf("OCI layout %s: %w", lay, err)
	}
	annotations := map[string]string{"org.opencontainers.image.ref.name": ref.Name()}
	if err := p.AppendImage(img, layout.WithAnnotations(annotations)); err != nil {
		return fmt.Errorf("OCI layout %s: %w", lay, err)
	}
	if err := os.RemoveAll(lay); err != nil {
		return err
	}
	return os.Rename(tmpLay, lay)
}
