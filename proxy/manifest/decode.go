// Package manifest is the proxy's source when there is no cluster: a file,
// or a directory of files, holding the same objects an API server would
// serve (core/v1 Services, discovery.k8s.io/v1 EndpointSlices, core/v1 Pods),
// as YAML or JSON, several documents per file. It is re-read when it changes;
// an edit that does not decode or validate is reported with its file, object
// and field, and the last good state keeps serving.
//
// Pods stand in for what a cluster's EndpointSlice controller would do: a
// ready Pod whose labels match a Service's selector becomes an endpoint of
// that Service (see pods.go).
package manifest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// Objects is everything a manifest holds that the proxy uses.
type Objects struct {
	Services       []*v1.Service
	EndpointSlices []*discovery.EndpointSlice
	Pods           []*v1.Pod
	// Ignored names the documents of other kinds, which are skipped.
	Ignored []string

	// source records where each object was read, for error messages.
	source map[any]string
}

// Source returns where obj was read: file and document number.
func (o *Objects) Source(obj any) string { return o.source[obj] }

func (o *Objects) record(obj any, where string) {
	if o.source == nil {
		o.source = make(map[any]string)
	}
	o.source[obj] = where
}

// decoder turns one document into a typed object. It is strict: a field the
// API type does not have (a typo such as "selectr") is an error, as
// `kubectl apply` would report it, instead of being silently dropped.
var decoder runtime.Decoder

func init() {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{v1.AddToScheme, discovery.AddToScheme} {
		if err := add(scheme); err != nil {
			panic(err) // the schemes are compiled in: this cannot fail at run time
		}
	}
	decoder = serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
}

// Files lists the manifest files at path: the file itself, or the .yaml,
// .yml and .json files directly inside a directory, sorted by name.
func Files(path string) ([]string, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !info.IsDir() {
		return []string{path}, nil
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		return nil, err
	}
	var files []string
	for _, e := range entries {
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".yaml", ".yml", ".json":
			if !e.IsDir() {
				files = append(files, filepath.Join(path, e.Name()))
			}
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("%s holds no .yaml, .yml or .json file", path)
	}
	return files, nil
}

// Load reads and validates every object at path. Any error fails the whole
// load, so a half-edited manifest is never served.
func Load(path string) (*Objects, error) {
	files, err := Files(path)
	if err != nil {
		return nil, fmt.Errorf("read manifests: %w", err)
	}
	objs := &Objects{}
	var errs []error
	for _, f := range files {
		data, err := readWhole(f)
		if errors.Is(err, ErrBeingWritten) {
			return nil, fmt.Errorf("read manifests: %s %w", f, err)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("read manifests: %w", err))
			continue
		}
		errs = append(errs, decodeFile(f, data, objs)...)
	}
	errs = append(errs, validateAll(objs)...)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return objs, nil
}

// decodeFile splits data into documents and decodes each into objs.
func decodeFile(file string, data []byte, objs *Objects) []error {
	var errs []error
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for doc := 1; ; doc++ {
		raw, err := r.Read()
		if err == io.EOF {
			return errs
		}
		if err != nil {
			return append(errs, fmt.Errorf("%s: document %d: %w", file, doc, err))
		}
		where := fmt.Sprintf("%s: document %d", file, doc)
		if err := decodeDoc(where, raw, objs); err != nil {
			errs = append(errs, err)
		}
	}
}

// decodeDoc decodes one YAML or JSON document, which may be a List.
func decodeDoc(where string, raw []byte, objs *Objects) error {
	if len(bytes.TrimSpace(stripComments(raw))) == 0 {
		return nil // an empty document, such as a trailing "---"
	}
	jsonData, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return fmt.Errorf("%s: not YAML or JSON: %w", where, err)
	}
	if string(jsonData) == "null" {
		return nil
	}
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(jsonData, &tm); err != nil {
		return fmt.Errorf("%s: %w", where, err)
	}
	switch {
	case tm.Kind == "":
		return fmt.Errorf("%s: kind: Required value: every object needs apiVersion and kind", where)
	case tm.Kind == "List" || strings.HasSuffix(tm.Kind, "List"):
		var list struct {
			Items []runtime.RawExtension `json:"items"`
		}
		if err := yaml.Unmarshal(jsonData, &list); err != nil {
			return fmt.Errorf("%s (%s): %w", where, tm.Kind, err)
		}
		var errs []error
		for i, item := range list.Items {
			if err := decodeDoc(fmt.Sprintf("%s: items[%d]", where, i), item.Raw, objs); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	known := map[string]bool{"v1/Service": true, "v1/Pod": true, "discovery.k8s.io/v1/EndpointSlice": true}
	if !known[tm.APIVersion+"/"+tm.Kind] {
		if tm.Kind == "Service" || tm.Kind == "Pod" || tm.Kind == "EndpointSlice" {
			return fmt.Errorf("%s (%s): apiVersion: Unsupported value: %q: use v1 for Service and Pod, discovery.k8s.io/v1 for EndpointSlice", where, tm.Kind, tm.APIVersion)
		}
		objs.Ignored = append(objs.Ignored, fmt.Sprintf("%s (%s %s)", where, tm.APIVersion, tm.Kind))
		return nil
	}
	obj, _, err := decoder.Decode(jsonData, nil, nil)
	if err != nil {
		return fmt.Errorf("%s (%s): %w", where, tm.Kind, err)
	}
	switch o := obj.(type) {
	case *v1.Service:
		defaultNamespace(&o.ObjectMeta)
		objs.Services = append(objs.Services, o)
	case *discovery.EndpointSlice:
		defaultNamespace(&o.ObjectMeta)
		objs.EndpointSlices = append(objs.EndpointSlices, o)
	case *v1.Pod:
		defaultNamespace(&o.ObjectMeta)
		objs.Pods = append(objs.Pods, o)
	}
	objs.record(obj, where)
	return nil
}

// defaultNamespace puts an object without a namespace in "default", as
// kubectl does.
func defaultNamespace(m *metav1.ObjectMeta) {
	if m.Namespace == "" {
		m.Namespace = metav1.NamespaceDefault
	}
}

func stripComments(raw []byte) []byte {
	var out [][]byte
	for _, line := range bytes.Split(raw, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out = append(out, line)
		}
	}
	return bytes.Join(out, []byte("\n"))
}
