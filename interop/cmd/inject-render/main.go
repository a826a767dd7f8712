// Renders Istio's sidecar injection for one pod with the chart's own templates
// and values plus extra IstioOperator files, with Istio's injector code.
package main

import (
	"fmt"
	"os"

	meshconfig "istio.io/api/mesh/v1alpha1"
	"istio.io/istio/operator/pkg/render"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/kube/inject"
	"sigs.k8s.io/yaml"
)

func main() {
	if len(os.Args) < 5 {
		fmt.Fprintln(os.Stderr, "usage: inject MANIFESTS_DIR POD.yaml OUT.yaml IOP.yaml...")
		os.Exit(2)
	}
	manifestsDir, podFile, outFile, iops := os.Args[1], os.Args[2], os.Args[3], os.Args[4:]
	sets := []string{
		"installPackagePath=" + manifestsDir,
		"profile=empty",
		"components.pilot.enabled=true",
	}
	rendered, _, err := render.GenerateManifest(iops, sets, false, nil, nil)
	if err != nil {
		fail("generate manifests: %v", err)
	}
	var cfg *inject.Config
	var values inject.ValuesConfig
	var meshCfg *meshconfig.MeshConfig
	for _, set := range rendered {
		for _, o := range set.Manifests {
			if o.GetKind() != "ConfigMap" {
				continue
			}
			data, _ := o.Object["data"].(map[string]any)
			switch o.GetName() {
			case "istio-sidecar-injector":
				c, err := inject.UnmarshalConfig([]byte(data["config"].(string)))
				if err != nil {
					fail("injector config: %v", err)
				}
				cfg = &c
				values, err = inject.NewValuesConfig(data["values"].(string))
				if err != nil {
					fail("injector values: %v", err)
				}
			case "istio":
				m, err := mesh.ApplyMeshConfig(data["mesh"].(string), mesh.DefaultMeshConfig())
				if err != nil {
					fail("mesh config: %v", err)
				}
				meshCfg = m
			}
		}
	}
	if cfg == nil || meshCfg == nil {
		fail("no injector or mesh ConfigMap rendered")
	}
	templates, err := inject.ParseTemplates(cfg.RawTemplates)
	if err != nil {
		fail("templates: %v", err)
	}
	raw, err := os.ReadFile(podFile)
	if err != nil {
		fail("%v", err)
	}
	in, err := inject.FromRawToObject(raw)
	if err != nil {
		fail("pod: %v", err)
	}
	warn := func(w string) { fmt.Fprintln(os.Stderr, "warning:", w) }
	out, err := inject.IntoObject(nil, templates, values, "", meshCfg, in, warn)
	if err != nil {
		fail("inject: %v", err)
	}
	text, err := yaml.Marshal(out)
	if err != nil {
		fail("%v", err)
	}
	if err := os.WriteFile(outFile, text, 0o644); err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "inject: "+format+"\n", args...)
	os.Exit(1)
}
