package main

import (
	"fmt"
	"os"
	"sync"

	"istio.io/istio/pkg/log"
	"istio.io/istio/pkg/test"
)

// processFailer is the test.Failer that Istio's fake discovery server needs, for a
// long-running process instead of a Go test: a failure ends the process with one line
// on stderr, and cleanups run at shutdown.
type processFailer struct {
	mu       sync.Mutex
	cleanups []func()
}

var _ test.Failer = (*processFailer)(nil)

func (f *processFailer) Fail()    { f.Fatal("failed") }
func (f *processFailer) FailNow() { f.Fatal("failed") }

// Fatal may be called from any goroutine (Istio's retry helpers and serve loops do), so
// it exits the process rather than unwinding a goroutine that the caller may not own.
func (f *processFailer) Fatal(args ...any) {
	fmt.Fprintln(os.Stderr, "istiod-fake: fatal:", fmt.Sprint(args...))
	os.Exit(1)
}

func (f *processFailer) Fatalf(format string, args ...any) { f.Fatal(fmt.Sprintf(format, args...)) }
func (f *processFailer) Log(args ...any)                   { log.Info(fmt.Sprint(args...)) }
func (f *processFailer) Logf(format string, args ...any)   { log.Infof(format, args...) }
func (f *processFailer) Helper()                           {}
func (f *processFailer) Skip(args ...any)                  { f.Fatal(append([]any{"skipped: "}, args...)...) }

func (f *processFailer) TempDir() string {
	dir, err := os.MkdirTemp("", "istiod-fake")
	if err != nil {
		f.Fatalf("temp dir: %v", err)
	}
	f.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (f *processFailer) Cleanup(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups = append(f.cleanups, fn)
}

// runCleanups runs the registered cleanups last-in first-out, as testing.T does.
func (f *processFailer) runCleanups() {
	f.mu.Lock()
	fns := f.cleanups
	f.cleanups = nil
	f.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}
