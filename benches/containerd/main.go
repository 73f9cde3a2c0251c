// ctrbench runs strata bench's workloads on containerd's own overlay snapshotter and archive
// package (containerd 1.6, from Debian's golang-github-containerd-containerd-dev), and prints
// the results in the JSON shape of `strata bench --json`. `strata bench --against` runs it
// alternately with strata and prints the ratios; scripts/compare-containerd builds it offline
// in GOPATH mode.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/archive"
	"github.com/containerd/containerd/archive/compression"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/sirupsen/logrus"
)

var (
	root        = flag.String("root", "", "directory for the snapshotter (made, and removed after)")
	workloads   = flag.String("workload", "empty-chain", "comma-separated workloads")
	layers      = flag.Int("layers", 500, "layers of empty-chain, empty-flat, small-files, concurrent")
	files       = flag.Int("files", 10, "small-files: files per layer")
	fileSize    = flag.Int("file-size", 4096, "small-files: bytes per file")
	rounds      = flag.Int("rounds", 2, "containerd-benchsuite: rounds of 16 layers")
	treeFiles   = flag.Int("tree-files", 10000, "diff/apply: small files")
	treeBig     = flag.Int("tree-big", 4, "diff/apply: large files")
	treeBigSize = flag.Int("tree-big-size", 64<<20, "diff/apply: bytes per large file")
	comp        = flag.String("compression", "none", "diff/apply: none, gzip or zstd")
	repeat      = flag.Int("repeat", 3, "diff/apply: runs")
	depth       = flag.Int("depth", 500, "deep: chain depth")
	threads     = flag.Int("threads", 4, "concurrent: goroutines")
)

type sample struct {
	total    time.Duration
	layers   int
	perOp    []time.Duration
	phases   map[string][]time.Duration
	order    []string
	bytes    int64
	entries  int64
	byDepth  []map[string]interface{}
	blobSize int64
}

func newSample() *sample { return &sample{phases: map[string][]time.Duration{}} }

func (s *sample) add(phase string, d time.Duration) {
	if _, ok := s.phases[phase]; !ok {
		s.order = append(s.order, phase)
	}
	s.phases[phase] = append(s.phases[phase], d)
}

func pct(v []time.Duration, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	w := append([]time.Duration(nil), v...)
	sort.Slice(w, func(i, j int) bool { return w[i] < w[j] })
	i := int(float64(len(w)-1)*p + 0.5)
	return float64(w[i]) / float64(time.Millisecond)
}

func (s *sample) row(workload string, params map[string]interface{}) map[string]interface{} {
	secs := s.total.Seconds()
	r := map[string]interface{}{
		"workload": workload, "params": params, "ops": len(s.perOp), "seconds": secs,
		"p50_ms": pct(s.perOp, 0.5), "p99_ms": pct(s.perOp, 0.99), "backend": "containerd-overlay",
	}
	if s.layers > 0 {
		r["layers"] = s.layers
		r["layers_per_s"] = float64(s.layers) / secs
	}
	if s.bytes > 0 {
		r["mb_per_s"] = float64(s.bytes) / 1e6 / secs
	}
	if s.entries > 0 {
		r["entries_per_s"] = float64(s.entries) / secs
	}
	if s.blobSize > 0 {
		r["blob_bytes"] = s.blobSize
	}
	for _, p := range s.order {
		r[p+"_p50_ms"] = pct(s.phases[p], 0.5)
		r[p+"_p99_ms"] = pct(s.phases[p], 0.99)
	}
	if s.byDepth != nil {
		r["by_depth"] = s.byDepth
	}
	return r
}

// rng is strata bench's xorshift64*, so both programs write the same bytes.
type rng uint64

func (r *rng) next() uint64 {
	x := uint64(*r)
	x ^= x >> 12
	x ^= x << 25
	x ^= x >> 27
	*r = rng(x)
	return x * 0x2545f4914f6cdd1d
}

func (r *rng) fill(b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := r.next()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
}

// failure is a workload's error: main reports it in that workload's row and goes on.
type failure struct{ err error }

func check(err error) {
	if err != nil {
		panic(failure{err})
	}
}

// run runs one workload; a failure becomes {"workload": w, "error": ...}.
func run(w string, f func() (*sample, map[string]interface{})) (row map[string]interface{}) {
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(failure)
			if !ok {
				panic(r)
			}
			row = map[string]interface{}{"workload": w, "error": f.err.Error(), "backend": "containerd-overlay"}
		}
	}()
	s, p := f()
	return s.row(w, p)
}

func chain(ctx context.Context, sn snapshots.Snapshotter, n int, tag string, parented bool) *sample {
	s := newSample()
	s.layers = n
	parent := ""
	start := time.Now()
	for i := 0; i < n; i++ {
		key := fmt.Sprintf("%s/active/%d", tag, i)
		name := fmt.Sprintf("%s/layer/%d", tag, i)
		t0 := time.Now()
		_, err := sn.Prepare(ctx, key, parent)
		check(err)
		t1 := time.Now()
		check(sn.Commit(ctx, name, key))
		t2 := time.Now()
		s.add("prepare", t1.Sub(t0))
		s.add("commit", t2.Sub(t1))
		s.perOp = append(s.perOp, t2.Sub(t0))
		if parented {
			parent = name
		}
	}
	s.total = time.Since(start)
	return s
}

func smallFiles(ctx context.Context, sn snapshots.Snapshotter, tag string) *sample {
	s := newSample()
	s.layers = *layers
	data := make([]byte, *fileSize)
	for i := range data {
		data[i] = 0x5a
	}
	parent := ""
	start := time.Now()
	for i := 0; i < *layers; i++ {
		key := fmt.Sprintf("%s/active/%d", tag, i)
		name := fmt.Sprintf("%s/layer/%d", tag, i)
		t0 := time.Now()
		mounts, err := sn.Prepare(ctx, key, parent)
		check(err)
		t1 := time.Now()
		check(mount.WithTempMount(ctx, mounts, func(dir string) error {
			d := filepath.Join(dir, fmt.Sprintf("l%d", i))
			if err := os.Mkdir(d, 0755); err != nil {
				return err
			}
			for f := 0; f < *files; f++ {
				if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%d", f)), data, 0644); err != nil {
					return err
				}
			}
			return nil
		}))
		t2 := time.Now()
		check(sn.Commit(ctx, name, key))
		t3 := time.Now()
		s.add("prepare", t1.Sub(t0))
		s.add("write", t2.Sub(t1))
		s.add("commit", t3.Sub(t2))
		s.perOp = append(s.perOp, t3.Sub(t0))
		s.bytes += int64(*fileSize * *files)
		parent = name
	}
	s.total = time.Since(start)
	return s
}

// benchsuite is containerd's snapshots/benchsuite schedule, as strata bench runs it.
func benchsuite(ctx context.Context, sn snapshots.Snapshotter, tag string) *sample {
	const file = 1 << 20
	s := newSample()
	s.layers = 16 * *rounds
	r := rng(0x5eed)
	data := make([]byte, file)
	parent := ""
	start := time.Now()
	for round := 0; round < *rounds; round++ {
		for l := 1; l <= 16; l++ {
			var ops []string
			switch {
			case l%3 == 0:
				ops = strings.Split("ua ub cc ud cf ue rg ch ui cj", " ")
			case l%2 == 0:
				ops = strings.Split("ua cb rc cd ue rf cg uh ci uj", " ")
			default:
				ops = strings.Split("ca cb cc cd ce cf cg ch ci cj", " ")
			}
			key := fmt.Sprintf("%s/prepare-%d-%d", tag, round, l)
			name := fmt.Sprintf("%s/committed-%d-%d", tag, round, l)
			t0 := time.Now()
			mounts, err := sn.Prepare(ctx, key, parent)
			check(err)
			t1 := time.Now()
			check(mount.WithTempMount(ctx, mounts, func(dir string) error {
				for _, op := range ops {
					p := filepath.Join(dir, op[1:])
					switch op[0] {
					case 'c':
						r.fill(data)
						if err := os.WriteFile(p, data, 0777); err != nil {
							return err
						}
					case 'u':
						f, err := os.OpenFile(p, os.O_WRONLY, 0600)
						if err != nil {
							return err
						}
						st, err := f.Stat()
						if err == nil {
							b := make([]byte, 4)
							r.fill(b)
							_, err = f.WriteAt(b, st.Size()/2)
						}
						f.Close()
						if err != nil {
							return err
						}
					case 'r':
						if err := os.RemoveAll(p); err != nil {
							return err
						}
					}
				}
				return nil
			}))
			t2 := time.Now()
			check(sn.Commit(ctx, name, key))
			t3 := time.Now()
			s.add("prepare", t1.Sub(t0))
			s.add("write", t2.Sub(t1))
			s.add("commit", t3.Sub(t2))
			s.perOp = append(s.perOp, t3.Sub(t0))
			s.bytes += 10 * file
			parent = name
		}
	}
	s.total = time.Since(start)
	return s
}

// tree writes strata bench's generated tree (same names, sizes and bytes).
func tree(dir string) (bytes, entries int64) {
	r := rng(0x7a115eed)
	buf := make([]byte, 16<<10)
	for d := 0; d < 50; d++ {
		check(os.MkdirAll(filepath.Join(dir, fmt.Sprintf("d%02d", d)), 0755))
		entries++
	}
	for f := 0; f < *treeFiles; f++ {
		n := 100 + int(r.next()%uint64(16<<10-100+1))
		r.fill(buf[:n])
		check(os.WriteFile(filepath.Join(dir, fmt.Sprintf("d%02d/f%05d", f%50, f)), buf[:n], 0644))
		bytes += int64(n)
		entries++
	}
	chunk := make([]byte, 1<<20)
	for b := 0; b < *treeBig; b++ {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("big%d", b)))
		check(err)
		for left := *treeBigSize; left > 0; {
			n := left
			if n > len(chunk) {
				n = len(chunk)
			}
			r.fill(chunk[:n])
			_, err := f.Write(chunk[:n])
			check(err)
			left -= n
		}
		check(f.Close())
		bytes += int64(*treeBigSize)
		entries++
	}
	return
}

type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// diffTo writes the committed snapshot `name` as a layer to w the way containerd's walking
// differ does: a view of it mounted, compared with an empty directory.
func diffTo(ctx context.Context, sn snapshots.Snapshotter, name, key string, w io.Writer) {
	mounts, err := sn.View(ctx, key, name)
	check(err)
	empty, err := os.MkdirTemp(*root, "empty")
	check(err)
	var cw io.WriteCloser = nopCloser{w}
	if *comp != "none" {
		c := compression.Gzip
		if *comp == "zstd" {
			c = compression.Zstd
		}
		cw, err = compression.CompressStream(w, c)
		check(err)
	}
	check(mount.WithReadonlyTempMount(ctx, mounts, func(dir string) error {
		return archive.WriteDiff(ctx, cw, empty, dir)
	}))
	check(cw.Close())
	check(sn.Remove(ctx, key))
	os.Remove(empty)
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

func treeLayer(ctx context.Context, sn snapshots.Snapshotter, tag string) (string, int64, int64) {
	key := tag + "/tree-active"
	name := tag + "/tree"
	mounts, err := sn.Prepare(ctx, key, "")
	check(err)
	var bytes, entries int64
	check(mount.WithTempMount(ctx, mounts, func(dir string) error {
		bytes, entries = tree(dir)
		return nil
	}))
	check(sn.Commit(ctx, name, key))
	return name, bytes, entries
}

func diff(ctx context.Context, sn snapshots.Snapshotter, name string, bytes, entries int64, tag string) *sample {
	s := newSample()
	start := time.Now()
	for i := 0; i < *repeat; i++ {
		c := &counter{}
		// containerd's walking differ writes the blob to a content writer, which digests it:
		// hash it too, and count it, but keep nothing (as strata bench does).
		h := sha256.New()
		t0 := time.Now()
		diffTo(ctx, sn, name, fmt.Sprintf("%s/diff-view-%d", tag, i), io.MultiWriter(c, h))
		_ = h.Sum(nil)
		s.perOp = append(s.perOp, time.Since(t0))
		s.bytes += bytes
		s.entries += entries
		s.blobSize = c.n
	}
	s.total = time.Since(start)
	return s
}

// apply applies the layer into fresh snapshots as containerd's applier does (into the mounted
// snapshot; a parentless one is a bind mount).
func apply(ctx context.Context, sn snapshots.Snapshotter, name string, bytes, entries int64, tag string) *sample {
	blob := filepath.Join(*root, "layer.blob")
	f, err := os.Create(blob)
	check(err)
	diffTo(ctx, sn, name, tag+"/apply-src", f)
	check(f.Close())
	s := newSample()
	if st, err := os.Stat(blob); err == nil {
		s.blobSize = st.Size()
	}
	for i := 0; i < *repeat; i++ {
		key := fmt.Sprintf("%s/apply-%d", tag, i)
		t0 := time.Now()
		mounts, err := sn.Prepare(ctx, key, "")
		check(err)
		in, err := os.Open(blob)
		check(err)
		ds, err := compression.DecompressStream(in)
		check(err)
		check(mount.WithTempMount(ctx, mounts, func(dir string) error {
			_, err := archive.Apply(ctx, dir, ds)
			return err
		}))
		ds.Close()
		in.Close()
		s.perOp = append(s.perOp, time.Since(t0))
		s.bytes += bytes
		s.entries += entries
		check(sn.Remove(ctx, key))
	}
	for _, d := range s.perOp {
		s.total += d
	}
	os.Remove(blob)
	return s
}

func deep(ctx context.Context, sn snapshots.Snapshotter, tag string) *sample {
	s := newSample()
	s.layers = *depth
	at, err := os.MkdirTemp(*root, "deep")
	check(err)
	parent := ""
	var prep, mnt []time.Duration
	start := time.Now()
	for i := 0; i < *depth; i++ {
		key := fmt.Sprintf("%s/active/%d", tag, i)
		name := fmt.Sprintf("%s/layer/%d", tag, i)
		t0 := time.Now()
		mounts, err := sn.Prepare(ctx, key, parent)
		check(err)
		t1 := time.Now()
		check(mount.All(mounts, at))
		t2 := time.Now()
		werr := os.WriteFile(filepath.Join(at, fmt.Sprintf("f%d", i)), []byte("layer\n"), 0644)
		check(mount.UnmountAll(at, 0))
		check(werr)
		check(sn.Commit(ctx, name, key))
		t3 := time.Now()
		prep = append(prep, t1.Sub(t0))
		mnt = append(mnt, t2.Sub(t1))
		s.perOp = append(s.perOp, t3.Sub(t0))
		parent = name
	}
	s.total = time.Since(start)
	cps := []int{1, *depth / 4, *depth / 2, *depth}
	seen := map[int]bool{}
	for _, d := range cps {
		if d < 1 || seen[d] {
			continue
		}
		seen[d] = true
		lo, hi := d-6, d+5
		if lo < 0 {
			lo = 0
		}
		if hi > *depth {
			hi = *depth
		}
		s.byDepth = append(s.byDepth, map[string]interface{}{
			"depth": d, "prepare_p50_ms": pct(prep[lo:hi], 0.5), "mount_p50_ms": pct(mnt[lo:hi], 0.5),
		})
	}
	for _, d := range prep {
		s.add("prepare", d)
	}
	for _, d := range mnt {
		s.add("mount", d)
	}
	return s
}

func concurrent(ctx context.Context, sn snapshots.Snapshotter, tag string) *sample {
	per := *layers / *threads
	out := make([]*sample, *threads)
	var wg sync.WaitGroup
	start := time.Now()
	for t := 0; t < *threads; t++ {
		wg.Add(1)
		go func(t int) {
			defer wg.Done()
			out[t] = chain(ctx, sn, per, fmt.Sprintf("%s/t%d", tag, t), true)
		}(t)
	}
	wg.Wait()
	s := newSample()
	s.total = time.Since(start)
	s.layers = per * *threads
	for _, o := range out {
		s.perOp = append(s.perOp, o.perOp...)
		for _, p := range o.order {
			for _, d := range o.phases[p] {
				s.add(p, d)
			}
		}
	}
	return s
}

func main() {
	flag.Parse()
	logrus.SetLevel(logrus.ErrorLevel)
	if *root == "" {
		fmt.Fprintln(os.Stderr, "ctrbench: pass -root DIR")
		os.Exit(2)
	}
	if err := os.MkdirAll(*root, 0700); err != nil {
		fmt.Fprintln(os.Stderr, "ctrbench:", err)
		os.Exit(1)
	}
	defer os.RemoveAll(*root)
	ctx := context.Background()
	sn, err := overlay.NewSnapshotter(filepath.Join(*root, "overlay"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "ctrbench:", err)
		os.Exit(1)
	}
	defer sn.Close()
	var rows []map[string]interface{}
	treeName := ""
	var tb, te int64
	for n, w := range strings.Split(*workloads, ",") {
		tag := fmt.Sprintf("bench-%d", n)
		rows = append(rows, run(w, func() (*sample, map[string]interface{}) {
			p := map[string]interface{}{"layers": *layers}
			switch w {
			case "empty-chain":
				return chain(ctx, sn, *layers, tag, true), p
			case "empty-flat":
				return chain(ctx, sn, *layers, tag, false), p
			case "small-files":
				p["files"], p["file_size"] = *files, *fileSize
				return smallFiles(ctx, sn, tag), p
			case "containerd-benchsuite":
				return benchsuite(ctx, sn, tag), map[string]interface{}{"rounds": *rounds}
			case "diff", "apply":
				if treeName == "" {
					treeName, tb, te = treeLayer(ctx, sn, tag)
				}
				p = map[string]interface{}{"compression": *comp, "bytes": tb, "entries": te}
				if w == "diff" {
					return diff(ctx, sn, treeName, tb, te, tag), p
				}
				return apply(ctx, sn, treeName, tb, te, tag), p
			case "deep":
				return deep(ctx, sn, tag), map[string]interface{}{"depth": *depth}
			case "concurrent":
				p["threads"] = *threads
				return concurrent(ctx, sn, tag), p
			}
			check(fmt.Errorf("unknown workload %q", w))
			return nil, nil
		}))
	}
	if err := json.NewEncoder(os.Stdout).Encode(map[string]interface{}{"results": rows}); err != nil {
		fmt.Fprintln(os.Stderr, "ctrbench:", err)
		os.Exit(1)
	}
}
