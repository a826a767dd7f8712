package main

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pkg/config/schema/collections"
	"istio.io/istio/pkg/config/schema/resource"
	kubelib "istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/kube/controllers"
	"istio.io/istio/pkg/kube/kclient"
)

// document is one YAML document of an input, classified: Istio config (CRs that Istio's
// config store holds, Gateway API included) or a Kubernetes object (served by the fake
// Kubernetes client).
type document struct {
	text   string
	istio  bool
	kind   string
	name   string
	ns     string
	schema resource.Schema // Istio config only
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*(#.*)?$`)

// splitDocuments splits a YAML stream and classifies each document by apiVersion/kind.
func splitDocuments(text string) ([]document, error) {
	var docs []document
	for _, part := range docSeparator.Split(text, -1) {
		if strings.TrimSpace(stripComments(part)) == "" {
			continue
		}
		var head struct {
			metav1.TypeMeta `json:",inline"`
			Metadata        metav1.ObjectMeta `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(part), &head); err != nil {
			return nil, fmt.Errorf("not a YAML object: %v", err)
		}
		if head.Kind == "" || head.APIVersion == "" {
			return nil, errors.New("a document without apiVersion or kind")
		}
		if head.Metadata.Name == "" {
			return nil, fmt.Errorf("%s without metadata.name", head.Kind)
		}
		doc := document{text: part, kind: head.Kind, name: head.Metadata.Name, ns: head.Metadata.Namespace}
		gvk := head.GroupVersionKind()
		if s, ok := collections.PilotGatewayAPI().FindByGroupVersionAliasesKind(resource.FromKubernetesGVK(&gvk)); ok {
			doc.istio, doc.schema = true, s
			if doc.ns == "" && !s.IsClusterScoped() {
				doc.ns = "default" // as Istio's fake does for its ConfigString
			}
		}
		docs = append(docs, doc)
	}
	return docs, nil
}

func stripComments(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if t := strings.TrimSpace(line); t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return b.String()
}

// decodeKube turns a Kubernetes document into a typed object, and refuses kinds the
// control interface cannot write and namespaced objects without a namespace (the fake
// client would file them under "", which no Istio name can reach).
func decodeKube(doc document) (runtime.Object, error) {
	obj, _, err := kubelib.IstioCodec.UniversalDeserializer().Decode([]byte(doc.text), nil, nil)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %v", doc.kind, doc.name, err)
	}
	switch obj.(type) {
	case *corev1.Namespace, *corev1.Node:
	case *corev1.Service, *corev1.Pod, *discoveryv1.EndpointSlice, *corev1.Endpoints, *corev1.ConfigMap, *corev1.Secret:
		if doc.ns == "" {
			return nil, fmt.Errorf("%s %s: needs metadata.namespace", doc.kind, doc.name)
		}
	default:
		return nil, fmt.Errorf("%s %s: kind not supported (Istio CRs, Gateway API, Service, Pod, "+
			"EndpointSlice, Endpoints, Namespace, Node, ConfigMap, Secret)", doc.kind, doc.name)
	}
	return obj, nil
}

// writeKube creates or updates (apply) or deletes one Kubernetes object through the
// fake client, so the fake's informers and Istio's handlers see it as from a cluster.
func writeKube(c kubelib.Client, obj runtime.Object, del bool) (string, error) {
	switch o := obj.(type) {
	case *corev1.Namespace:
		return writeTyped(c, o, del)
	case *corev1.Node:
		return writeTyped(c, o, del)
	case *corev1.Service:
		return writeTyped(c, o, del)
	case *corev1.Pod:
		return writeTyped(c, o, del)
	case *discoveryv1.EndpointSlice:
		return writeTyped(c, o, del)
	case *corev1.Endpoints:
		return writeTyped(c, o, del)
	case *corev1.ConfigMap:
		return writeTyped(c, o, del)
	case *corev1.Secret:
		return writeTyped(c, o, del)
	}
	return "", fmt.Errorf("kind %T not supported", obj)
}

func writeTyped[T controllers.ComparableObject](c kubelib.Client, obj T, del bool) (string, error) {
	w := kclient.NewWriteClient[T](c)
	if del {
		if err := w.Delete(obj.GetName(), obj.GetNamespace()); err != nil {
			if kerrors.IsNotFound(err) {
				return "not found", nil
			}
			return "", err
		}
		return "deleted", nil
	}
	obj.SetResourceVersion("")
	if _, err := w.Create(obj); err == nil {
		return "created", nil
	} else if !kerrors.IsAlreadyExists(err) {
		return "", err
	}
	if _, err := w.Update(obj); err != nil {
		return "", err
	}
	return "updated", nil
}

// writeIstio creates or updates (apply) or deletes one Istio config in the fake's store.
func writeIstio(store model.ConfigStoreController, doc document, del bool) (string, error) {
	gvk := doc.schema.GroupVersionKind()
	existing := store.Get(gvk, doc.name, doc.ns)
	if del {
		if existing == nil {
			return "not found", nil
		}
		if err := store.Delete(gvk, doc.name, doc.ns, nil); err != nil {
			return "", err
		}
		return "deleted", nil
	}
	cfgs, _, err := crd.ParseInputs(doc.text)
	if err != nil {
		return "", err
	}
	if len(cfgs) != 1 {
		return "", fmt.Errorf("%s %s: expected one config, parsed %d", doc.kind, doc.name, len(cfgs))
	}
	cfg := cfgs[0]
	cfg.Namespace = doc.ns
	cfg.ResourceVersion = "" // overwrite whatever is there
	if existing == nil {
		if _, err := store.Create(cfg); err != nil {
			return "", err
		}
		return "created", nil
	}
	if cfg.CreationTimestamp.IsZero() {
		cfg.CreationTimestamp = existing.CreationTimestamp // Istio orders conflicting configs by it
	}
	if _, err := store.Update(cfg); err != nil {
		return "", err
	}
	return "updated", nil
}

// describe names a document in answers and errors.
func describe(doc document) string {
	if doc.ns == "" {
		return fmt.Sprintf("%s %s", doc.kind, doc.name)
	}
	return fmt.Sprintf("%s %s/%s", doc.kind, doc.ns, doc.name)
}
