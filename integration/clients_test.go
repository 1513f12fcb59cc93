package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// mountedDaemon starts a daemon on a fresh store and returns store and mount.
func mountedDaemon(t *testing.T) (store, mnt string, d *Daemon) {
	t.Helper()
	base := testDir(t)
	store, mnt = filepath.Join(base, "store"), filepath.Join(base, "mnt")
	d = startDaemon(t, store, mnt)
	return store, mnt, d
}

// qemuIO runs qemu-io and fails on a non-zero exit or a reported failure
// (older qemu-io versions exit 0 after a failed command).
func qemuIO(t *testing.T, args ...string) string {
	t.Helper()
	r := execCmd(cmdTimeout, nil, "qemu-io", args...)
	out := r.Stdout + r.Stderr
	if r.Code != 0 || strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
		t.Fatalf("qemu-io failed: %s", r)
	}
	return out
}

func TestQemuImg(t *testing.T) {
	requireRoot(t)
	requireTools(t, "qemu-img")
	store, mnt, _ := mountedDaemon(t)

	raw := filepath.Join(mnt, "raw.img")
	mustRun(t, cmdTimeout, "qemu-img", "create", "-f", "raw", raw, "64M")
	if fi, err := os.Stat(raw); err != nil || fi.Size() != 64<<20 {
		t.Fatalf("raw image: %v size %v", err, fi)
	}
	qc := filepath.Join(mnt, "q.qcow2")
	mustRun(t, cmdTimeout, "qemu-img", "create", "-f", "qcow2", qc, "1G")
	out := mustRun(t, cmdTimeout, "qemu-img", "info", "--output=json", qc)
	var info struct {
		Format      string `json:"format"`
		VirtualSize int64  `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	if info.Format != "qcow2" || info.VirtualSize != 1<<30 {
		t.Errorf("qemu-img info: %+v", info)
	}
	mustRun(t, cmdTimeout, "qemu-img", "check", qc)

	st := getStatus(t, store, false)
	for _, n := range []string{"raw.img", "q.qcow2"} {
		im := mustImage(t, st, n)
		if im.Writes == 0 {
			t.Errorf("%s: tracker saw no writes from qemu-img create", n)
		}
		if hb, hm := b3File(t, filepath.Join(store, "images", n)), b3File(t, filepath.Join(mnt, n)); hb != hm {
			t.Errorf("%s: backing %s != mount %s", n, hb, hm)
		}
	}
	if im := mustImage(t, st, "raw.img"); im.Size != 64<<20 {
		t.Errorf("raw.img: status size %d, want %d", im.Size, 64<<20)
	}
}

func TestQemuIO(t *testing.T) {
	requireRoot(t)
	requireTools(t, "qemu-img", "qemu-io")
	store, mnt, _ := mountedDaemon(t)

	t.Run("raw", func(t *testing.T) {
		img := filepath.Join(mnt, "io.img")
		mustRun(t, cmdTimeout, "qemu-img", "create", "-f", "raw", img, "4M")
		qemuIO(t, "-f", "raw", "-t", "none", "-c", "write -P 0xab 0 4M", "-c", "flush", img)
		qemuIO(t, "-f", "raw", "-t", "none", "-d", "unmap", "-c", "discard 1M 1M", "-c", "flush", img)
		qemuIO(t, "-f", "raw", "-t", "none", "-c", "write -z 2M 1M", "-c", "flush", img)
		qemuIO(t, "-f", "raw", "-t", "none", "-d", "unmap", "-c", "write -z -u 3M 1M", "-c", "flush", img)
		qemuIO(t, "-f", "raw", "-t", "none", "-c", "read -P 0xab 0 1M", "-c", "read -P 0 1M 3M", img)

		want := append(bytes.Repeat([]byte{0xab}, 1<<20), make([]byte, 3<<20)...)
		back := filepath.Join(store, "images", "io.img")
		got, err := os.ReadFile(back)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("backing file content wrong after write/discard/write-zeroes (len %d)", len(got))
		}
		// The discard and write -z -u punched holes in the backing file.
		if a := allocatedBytes(t, back); a > 3<<20 {
			t.Errorf("backing file allocates %d bytes; discard/unmap did not punch", a)
		}
		im := mustImage(t, getStatus(t, store, true), "io.img")
		dirty := dirtySet(t, im)
		for b := int64(0); b < 1024; b++ {
			if !dirty[b] {
				t.Errorf("block %d written/discarded/zeroed by qemu-io is not dirty", b)
				break
			}
		}
	})

	t.Run("qcow2", func(t *testing.T) {
		img := filepath.Join(mnt, "io.qcow2")
		mustRun(t, cmdTimeout, "qemu-img", "create", "-f", "qcow2", img, "256M")
		qemuIO(t, "-f", "qcow2", "-t", "none", "-c", "write -P 0x5a 0 2M", "-c", "write -P 0x33 100M 1M", "-c", "flush", img)
		qemuIO(t, "-f", "qcow2", "-t", "none", "-d", "unmap", "-c", "discard 1M 1M", "-c", "write -z 100M 512k", "-c", "flush", img)
		qemuIO(t, "-f", "qcow2", "-t", "none", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 1M",
			"-c", "read -P 0 100M 512k", "-c", "read -P 0x33 100.5M 512k", img)
		mustRun(t, cmdTimeout, "qemu-img", "check", img)
		// The same image read from the backing file directly.
		qemuIO(t, "-f", "qcow2", "-r", "-U", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x33 100.5M 512k",
			filepath.Join(store, "images", "io.qcow2"))
	})
}

// TestLoopExt4 puts ext4 on a loop device (direct I/O) backed by an image on
// the mount, writes a file tree and requires fsck to find it clean.
func TestLoopExt4(t *testing.T) {
	requireRoot(t)
	requireTools(t, "losetup", "mkfs.ext4", "fsck.ext4")
	base := testDir(t)
	store, mnt := filepath.Join(base, "store"), filepath.Join(base, "mnt")
	startDaemon(t, store, mnt)
	extMnt := filepath.Join(base, "ext4")
	if err := os.Mkdir(extMnt, 0o755); err != nil {
		t.Fatal(err)
	}

	img := filepath.Join(mnt, "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(256 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()

	dev := strings.TrimSpace(mustRun(t, 30*time.Second, "losetup", "--direct-io=on", "-f", "--show", img))
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("losetup printed %q", dev)
	}
	// Registered after the daemon's cleanup, so it runs before it.
	t.Cleanup(func() {
		if isMounted(extMnt) {
			if err := unmountTimeout(extMnt, 0, 30*time.Second); err != nil {
				t.Errorf("umount ext4: %v", err)
				teardownMount(extMnt)
			}
		}
		execCmd(20*time.Second, nil, "losetup", "-d", dev)
	})
	if out := mustRun(t, 10*time.Second, "losetup", "--list", "--noheadings", "--output", "DIO", dev); strings.TrimSpace(out) != "1" {
		t.Logf("loop device direct I/O not in effect (DIO=%q); continuing with buffered loop I/O", strings.TrimSpace(out))
	}
	mustRun(t, cmdTimeout, "mkfs.ext4", "-q", dev)
	mustRun(t, 30*time.Second, "mount", dev, extMnt)

	sums := writeTree(t, extMnt, 300)
	mustRun(t, time.Minute, "sync")
	if err := unmountTimeout(extMnt, 0, time.Minute); err != nil {
		t.Fatalf("umount ext4: %v", err)
	}
	out := mustRun(t, cmdTimeout, "fsck.ext4", "-n", "-f", dev)
	t.Logf("fsck: %s", lastLine(out))

	// Read the tree back through a fresh read-only mount.
	mustRun(t, 30*time.Second, "mount", "-o", "ro", dev, extMnt)
	for rel, want := range sums {
		if got := b3File(t, filepath.Join(extMnt, rel)); got != want {
			t.Errorf("%s: content changed after remount", rel)
		}
	}
	if err := unmountTimeout(extMnt, 0, time.Minute); err != nil {
		t.Fatalf("umount ext4: %v", err)
	}
	mustRun(t, 30*time.Second, "losetup", "-d", dev)

	im := mustImage(t, getStatus(t, store, false), "disk.img")
	t.Logf("disk.img: writes=%d dirty_bytes=%d", im.Writes, im.DirtyBytes)
	if im.Writes == 0 || im.DirtyBytes == 0 {
		t.Errorf("ext4 on the loop device left no tracked writes: %+v", im)
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// writeTree writes n files of mixed sizes (0 B to 2 MiB) in nested
// directories and returns their BLAKE3 by relative path.
func writeTree(t *testing.T, root string, n int) map[string]string {
	t.Helper()
	rng := rand.New(rand.NewPCG(42, 43))
	sums := map[string]string{}
	sizes := []int{0, 1, 100, 4095, 4096, 4097, 65536, 300000, 2 << 20}
	for i := 0; i < n; i++ {
		rel := filepath.Join(fmt.Sprintf("d%02d", i%17), fmt.Sprintf("s%d", i%5), fmt.Sprintf("f%03d", i))
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		size := sizes[rng.IntN(len(sizes))]
		if i%10 == 0 {
			size = rng.IntN(1 << 20)
		}
		data := make([]byte, size)
		fillPattern(data, int64(i)<<32, uint64(i))
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[rel] = b3Bytes(data)
	}
	var files int
	filepath.WalkDir(root, func(_ string, d fs.DirEntry, _ error) error {
		if d != nil && d.Type().IsRegular() {
			files++
		}
		return nil
	})
	if files < n {
		t.Fatalf("wrote %d files, found %d", n, files)
	}
	return sums
}

func TestFio(t *testing.T) {
	requireRoot(t)
	requireTools(t, "fio")
	store, mnt, _ := mountedDaemon(t)
	jobs := []struct {
		name string
		args []string
	}{
		{"randwrite-4k-direct", []string{"--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=16", "--size=128M"}},
		{"seqwrite-1m-buffered", []string{"--rw=write", "--bs=1M", "--direct=0", "--ioengine=psync", "--size=128M", "--end_fsync=1"}},
	}
	for _, j := range jobs {
		t.Run(j.name, func(t *testing.T) {
			file := filepath.Join(mnt, j.name+".img")
			args := append([]string{"--name=" + j.name, "--filename=" + file, "--verify=crc32c",
				"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=0", "--output-format=terse"}, j.args...)
			start := time.Now()
			r := execCmd(5*time.Minute, nil, "fio", args...)
			if r.Code != 0 {
				t.Fatalf("fio failed: %s", r)
			}
			t.Logf("fio %s: %v", j.name, time.Since(start).Round(time.Millisecond))
			im := mustImage(t, getStatus(t, store, false), j.name+".img")
			if im.DirtyBytes < 64<<20 || im.Writes == 0 {
				t.Errorf("fio wrote 128 MiB but status shows dirty_bytes=%d writes=%d", im.DirtyBytes, im.Writes)
			}
		})
	}
}
