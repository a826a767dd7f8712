// Command istiod-fake serves Istio's own xDS generation on a real TCP port, without
// Kubernetes: Istio's in-process test discovery server (istio.io/istio/pilot/test/xds)
// fed from YAML files, on a gRPC server with istiod's own server options and keepalive
// policy. xdsfast's interop tests run the stock pilot-agent and xdsfast against it.
//
// Usage:
//
//	istiod-fake [-xds 127.0.0.1:PORT] [-control 127.0.0.1:PORT] [-f FILE]... [-mesh FILE]
//
// It prints one line on stdout once it serves:
//
//	istiod-fake ready xds=127.0.0.1:P control=127.0.0.1:Q
//
// and its logs on stderr. The control port (HTTP, loopback only) answers:
//
//	GET  /healthz   {"ready": bool, "clients": n}
//	POST /apply     YAML body: create or update every object in it
//	POST /delete    YAML body: delete every object it names (kind, name, namespace)
//	POST /push      a forced full push to every connected proxy
//	GET  /debug/... istiod's own debug endpoints (adsz, syncz, configz, ndsz, ...)
//
// SIGTERM or SIGINT stops it (exit 0).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"istio.io/istio/pilot/pkg/features"
	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/keepalive"
	"istio.io/istio/pkg/log"
)

const maxBody = 16 << 20

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	os.Exit(run())
}

func usageError(format string, args ...any) int {
	fmt.Fprintf(os.Stderr, "istiod-fake: "+format+"\n", args...)
	return 2
}

func run() int {
	var files stringList
	xdsAddr := flag.String("xds", "127.0.0.1:0", "xDS gRPC listen address (loopback; port 0 picks one)")
	controlAddr := flag.String("control", "127.0.0.1:0", "control HTTP listen address (loopback; port 0 picks one)")
	flag.Var(&files, "f", "YAML file of Istio CRs and Kubernetes objects (repeatable)")
	meshFile := flag.String("mesh", "", "MeshConfig YAML applied over Istio's defaults (default: no telemetry providers)")
	debounce := flag.Duration("debounce", 100*time.Millisecond, "push debounce (istiod's default is 100ms)")
	istioFilters := flag.Bool("istio-proxy-filters", false,
		"keep the filters only Istio's Envoy build has (istio.alpn, metadata exchange); off for upstream Envoy")
	autoallocate := flag.Bool("ip-autoallocate", false,
		"PILOT_ENABLE_IP_AUTOALLOCATE: needs a controller this fake lacks; off means the in-proxy allocation "+
			"(node metadata DNS_CAPTURE and DNS_AUTO_ALLOCATE)")
	logOpts := log.DefaultOptions()
	logOpts.OutputPaths = []string{"stderr"} // stdout carries only the ready line
	logOpts.AttachFlags(
		func(p *[]string, name string, value []string, usage string) {
			*p = value
			flag.Func(name, usage, func(v string) error { *p = append(*p, v); return nil })
		},
		flag.StringVar, flag.IntVar, flag.BoolVar)
	flag.Parse()
	if flag.NArg() > 0 {
		return usageError("unexpected arguments: %v", flag.Args())
	}
	if err := log.Configure(logOpts); err != nil {
		return usageError("logging: %v", err)
	}
	for _, addr := range []string{*xdsAddr, *controlAddr} {
		if err := checkLoopback(addr); err != nil {
			return usageError("%v", err)
		}
	}

	// Istio's feature flags are read from the environment at package init; these
	// assignments happen before any config is generated, so they win over
	// PILOT_ENABLE_ALPN_FILTER, PILOT_ENABLE_METADATA_EXCHANGE and PILOT_ENABLE_IP_AUTOALLOCATE.
	if !*istioFilters {
		features.ALPNFilter = false
		features.MetadataExchange = false
	}
	features.EnableIPAutoallocate = *autoallocate

	meshCfg := mesh.DefaultMeshConfig()
	if *meshFile != "" {
		data, err := os.ReadFile(*meshFile)
		if err != nil {
			return usageError("%v", err)
		}
		if meshCfg, err = mesh.ApplyMeshConfigDefaults(string(data)); err != nil {
			return usageError("%s: %v", *meshFile, err)
		}
	}

	var istioDocs, kubeDocs []string
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			return usageError("%v", err)
		}
		docs, err := splitDocuments(string(data))
		if err != nil {
			return usageError("%s: %v", name, err)
		}
		for _, doc := range docs {
			if doc.istio {
				istioDocs = append(istioDocs, doc.text)
			} else if _, err := decodeKube(doc); err != nil {
				return usageError("%s: %v", name, err)
			} else {
				kubeDocs = append(kubeDocs, doc.text)
			}
		}
	}

	// Listen first: a taken port fails fast, before Istio's start-up.
	xdsListener, err := net.Listen("tcp", *xdsAddr)
	if err != nil {
		return usageError("xds listen: %v", err)
	}
	controlListener, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		return usageError("control listen: %v", err)
	}
	f := &processFailer{}
	ds := xds.NewFakeDiscoveryServer(f, xds.FakeOptions{
		ConfigString:           strings.Join(istioDocs, "\n---\n"),
		KubernetesObjectString: strings.Join(kubeDocs, "\n---\n"),
		DebounceTime:           *debounce,
		MeshConfig:             meshCfg,
	})

	// istiod's own server options: its keepalive enforcement admits the agent's 30 s pings.
	server := grpc.NewServer(istiogrpc.ServerOptions(keepalive.DefaultOption(), func(int64) {})...)
	ds.Discovery.Register(server)
	ctl := &control{ds: ds}
	httpServer := &http.Server{Handler: ctl.mux(), ReadHeaderTimeout: 5 * time.Second}

	failed := make(chan error, 2)
	go func() { failed <- server.Serve(xdsListener) }()
	go func() { failed <- httpServer.Serve(controlListener) }()
	fmt.Printf("istiod-fake ready xds=%s control=%s\n", xdsListener.Addr(), controlListener.Addr())

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	code := 0
	select {
	case sig := <-signals:
		log.Infof("istiod-fake: %v, stopping", sig)
	case err := <-failed:
		fmt.Fprintln(os.Stderr, "istiod-fake: serve:", err)
		code = 1
	}
	// Streams are long-lived: Stop (not GracefulStop) ends them; clients reconnect.
	server.Stop()
	_ = httpServer.Close()
	done := make(chan struct{})
	go func() { f.runCleanups(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		fmt.Fprintln(os.Stderr, "istiod-fake: cleanups still running after 5s, exiting anyway")
	}
	return code
}

func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: %v", addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("address %q: only a loopback IP is allowed (no authentication here)", addr)
	}
	return nil
}

// control is the HTTP interface that lets tests change config while proxies are connected.
type control struct {
	ds *xds.FakeDiscoveryServer
	mu sync.Mutex // one writer at a time: create-or-update is a read then a write
}

func (c *control) mux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{
			"ready":   c.ds.Discovery.IsServerReady(),
			"clients": len(c.ds.Discovery.AllClients()),
		})
	})
	mux.HandleFunc("POST /apply", func(w http.ResponseWriter, r *http.Request) { c.write(w, r, false) })
	mux.HandleFunc("POST /delete", func(w http.ResponseWriter, r *http.Request) { c.write(w, r, true) })
	mux.HandleFunc("POST /push", func(w http.ResponseWriter, _ *http.Request) {
		c.ds.Discovery.ConfigUpdate(&model.PushRequest{
			Forced: true,
			Reason: model.NewReasonStats(model.DebugTrigger),
		})
		writeJSON(w, http.StatusOK, map[string]any{"pushed": true})
	})
	mux.Handle("/debug/", c.ds.DiscoveryDebug)
	return mux
}

// write applies (create or update) or deletes every object of a YAML body, in order,
// and answers what happened to each; the first failure stops it with a 400.
func (c *control) write(w http.ResponseWriter, r *http.Request, del bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]any{"error": err.Error()})
		return
	}
	docs, err := splitDocuments(string(body))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]any{"error": err.Error()})
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	results := []string{}
	for _, doc := range docs {
		var what string
		if doc.istio {
			what, err = writeIstio(c.ds.Store(), doc, del)
		} else {
			obj, derr := decodeKube(doc)
			if derr != nil {
				err = derr
			} else {
				what, err = writeKube(c.ds.KubeClient(), obj, del)
			}
		}
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]any{
				"error": fmt.Sprintf("%s: %v", describe(doc), err), "done": results,
			})
			return
		}
		results = append(results, describe(doc)+" "+what)
	}
	writeJSON(w, http.StatusOK, map[string]any{"done": results})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
