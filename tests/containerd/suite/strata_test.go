// containerd's own snapshotter test suite (snapshots/testsuite, containerd 1.6) run against
// `strata serve` through containerd's proxy snapshotter client (snapshots/proxy): exactly
// the path containerd takes to a proxy plugin. Every case gets a fresh store and server.
//
// Built offline in GOPATH mode from Debian's golang-github-containerd-containerd-dev by
// cli/tests/containerd.rs, which runs it as
//
//	suite.test -test.root -strata PATH/TO/strata -backend overlay|native|btrfs
//
// with TMPDIR on a file system the backend can use.
package suite

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/containerd/continuity/fs/fstest"
	"google.golang.org/grpc"
)

var (
	strataBin = flag.String("strata", "", "the strata binary to serve each case's store")
	backend   = flag.String("backend", "overlay", "the strata backend to test")
)

// serve starts `strata serve` on a store under root and returns containerd's proxy client
// for it; the cleanup stops the server with SIGTERM and reports how it exited.
func serve(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	if *strataBin == "" {
		return nil, nil, fmt.Errorf("pass -strata PATH (the strata binary)")
	}
	sock := filepath.Join(root, "strata.sock")
	cmd := exec.Command(*strataBin, "--root", filepath.Join(root, "store"), "--backend", *backend,
		"serve", "--address", sock, "--log-level", "warn")
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", *strataBin, err)
	}
	stop := func() error {
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			return err
		}
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("strata serve exited badly after SIGTERM: %w", err)
		}
		if _, err := os.Stat(sock); err == nil {
			return fmt.Errorf("strata serve left its socket %s behind", sock)
		}
		return nil
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			stop()
			return nil, nil, fmt.Errorf("strata serve did not listen on %s within 20 s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.DialContext(ctx, "unix://"+sock, grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", strings.TrimPrefix(addr, "unix://"))
		}))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "strata")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}

// TestContainerdSuite is containerd's suite, all of it.
func TestContainerdSuite(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "strata-"+*backend, serve)
}

// TestRename runs the suite's Rename case, which containerd 1.6 skips on every snapshotter
// ("still fails on some kernels with overlay"): two layers that rename a directory, overwrite
// a file by a rename and rename a file, each checked through a fresh view. On overlay the
// directory rename is left out, as strata's own conformance suite does: overlayfs renames a
// lower directory only with redirect_dir, which neither containerd nor strata turns on.
func TestRename(t *testing.T) {
	testutil.RequiresRoot(t)
	ctx := namespaces.WithNamespace(context.Background(), "testsuite")
	tmp := t.TempDir()
	root := filepath.Join(tmp, "root")
	work := filepath.Join(tmp, "work")
	for _, d := range []string{root, work} {
		if err := os.MkdirAll(d, 0755); err != nil {
			t.Fatal(err)
		}
	}
	sn, cleanup, err := serve(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := cleanup(); err != nil {
			t.Error(err)
		}
	}()
	l1 := fstest.Apply(
		fstest.CreateDir("/dir1", 0700),
		fstest.CreateDir("/somefiles", 0700),
		fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0644),
		fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0644),
	)
	l2ops := []fstest.Applier{
		fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0644),
		fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
		fstest.Rename("/somefiles/f2", "/somefiles/f3"),
	}
	if *backend != "overlay" {
		l2ops = append(l2ops, fstest.Rename("/dir1", "/dir2"))
	}
	flat := filepath.Join(work, "flat")
	if err := os.MkdirAll(flat, 0755); err != nil {
		t.Fatal(err)
	}
	parent := ""
	for i, a := range []fstest.Applier{l1, fstest.Apply(l2ops...)} {
		key := fmt.Sprintf("rename-%d-active", i)
		name := fmt.Sprintf("rename-%d", i)
		if err := withMounted(ctx, work, func() ([]mount.Mount, error) {
			return sn.Prepare(ctx, key, parent)
		}, a.Apply); err != nil {
			t.Fatalf("layer %d: %v", i+1, err)
		}
		if err := sn.Commit(ctx, name, key); err != nil {
			t.Fatalf("commit layer %d: %v", i+1, err)
		}
		if err := a.Apply(flat); err != nil {
			t.Fatal(err)
		}
		view := fmt.Sprintf("rename-%d-view", i)
		if err := withMounted(ctx, work, func() ([]mount.Mount, error) {
			return sn.View(ctx, view, name)
		}, func(dir string) error {
			return fstest.CheckDirectoryEqual(flat, dir)
		}); err != nil {
			t.Fatalf("view of layer %d differs from the flat tree: %v", i+1, err)
		}
		if err := sn.Remove(ctx, view); err != nil {
			t.Fatal(err)
		}
		parent = name
	}
	// Leave an empty store: committed btrfs snapshots are read-only subvolumes that the
	// temporary directory's removal could not delete.
	for _, name := range []string{"rename-1", "rename-0"} {
		if err := sn.Remove(ctx, name); err != nil {
			t.Fatalf("remove %s: %v", name, err)
		}
	}
	if err := sn.(snapshots.Cleaner).Cleanup(ctx); err != nil {
		t.Fatalf("cleanup: %v", err)
	}
}

// withMounted mounts what get returns on a fresh directory under work, runs f on it and
// unmounts.
func withMounted(ctx context.Context, work string, get func() ([]mount.Mount, error), f func(string) error) error {
	mounts, err := get()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(work, "m")
	if err != nil {
		return err
	}
	if err := mount.All(mounts, dir); err != nil {
		return fmt.Errorf("mount %+v: %w", mounts, err)
	}
	ferr := f(dir)
	if err := mount.UnmountAll(dir, 0); err != nil && ferr == nil {
		ferr = err
	}
	return ferr
}
