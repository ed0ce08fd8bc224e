// Package guest builds the guest image warmpool boots: Debian's cloud
// kernel, and an initramfs holding busybox, the kernel modules the VM's
// virtio devices need, and the guest agent (cmd/warmpool-agent) as /init.
//
// Build is deterministic and cached: the image's digest covers every input
// (kernel, modules, busybox, agent binary, init layout), and an image already
// in the cache under that digest is returned without rebuilding.
//
// What Build needs on the host: apt-cache, apt-get and dpkg-deb (to fetch the
// kernel package; network access the first time), busybox-static, the guest
// agent (prebuilt — the warmpool binary embeds one when built with `make
// build` — or compiled with a Go toolchain from this module's source, see
// BuildOptions), and zstd or xz only if the kernel's modules are compressed
// that way.
package guest

import (
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/warmpool/warmpool/internal/atomicfile"
)

// ErrNoAgent is returned (wrapped) by Build when it has no prebuilt agent,
// and neither this module's source nor a released version to compile one
// from.
var ErrNoAgent = errors.New("no guest agent to put in the image")

// ModulePath is this module's import path; the agent is built from its
// cmd/warmpool-agent.
const ModulePath = "github.com/warmpool/warmpool"

// KernelMetaPackage is the Debian metapackage whose current dependency is the
// kernel Build uses.
const KernelMetaPackage = "linux-image-cloud-amd64"

// DefaultCmdline is the kernel command line the image expects. Providers
// append their machine-specific parameters.
const DefaultCmdline = "console=ttyS0 panic=-1 quiet"

// layoutVersion changes whenever the image's layout changes in a way the
// other inputs do not capture, so that old cached images are not reused.
const layoutVersion = "warmpool-image-1"

// Modules loaded at boot (with their dependencies, found from each module's
// own depends list). Optional ones are skipped when the kernel lacks them.
var (
	requiredModules = []string{"virtio_mmio", "virtio_console", "virtio_balloon", "virtio_blk", "virtio_net"}
	// ext4 (built in to Debian's cloud kernel) and overlay mount an image's
	// root filesystem disk with the VM's writable layer over it.
	optionalModules = []string{"vmw_vsock_virtio_transport", "ext4", "overlay"}
)

// BuildOptions configures Build. Every field is optional.
type BuildOptions struct {
	// CacheDir holds downloaded kernels, agent builds and finished images;
	// DefaultCacheDir() when empty.
	CacheDir string
	// Progress, when set, is told about each step. total is -1 when unknown.
	Progress func(step string, done, total int64)

	// SourceDir is the root of this module's source (the directory with its
	// go.mod), used to compile the agent. When empty, Build looks for it
	// upwards from the working directory and then from the running
	// executable; failing both, and when the running binary was installed at
	// a released version, it runs `go install ModulePath/cmd/warmpool-agent@VERSION`.
	SourceDir string
	// AgentBinary is a prebuilt static warmpool-agent to use instead of
	// compiling one.
	AgentBinary string
	// Agent is a prebuilt static warmpool-agent's contents, used when
	// AgentBinary is empty: the agent a warmpool binary embeds, so that the
	// binary builds images outside the source tree with the agent of its
	// own version.
	Agent []byte
	// KernelPackage pins the Debian kernel package (e.g.
	// "linux-image-6.1.0-56-cloud-amd64") instead of resolving
	// KernelMetaPackage with apt-cache.
	KernelPackage string
	// Busybox is the static busybox to include; /bin/busybox when empty.
	Busybox string
}

// Image is a built guest image.
type Image struct {
	Dir     string `json:"dir"`
	Kernel  string `json:"kernel"` // bzImage
	Initrd  string `json:"initrd"` // gzip-compressed cpio newc
	Cmdline string `json:"cmdline"`
	// Digest is the hex SHA-256 over every input; images with equal digests
	// are identical.
	Digest        string   `json:"digest"`
	KernelPackage string   `json:"kernel_package,omitempty"`
	KernelRelease string   `json:"kernel_release,omitempty"`
	Modules       []string `json:"modules,omitempty"` // in load order
	// Source is what the image was built from (see package rootfs): empty
	// or "busybox" for the initramfs-only image Build makes.
	Source string `json:"source,omitempty"`
	// Rootfs is the image's read-only root filesystem disk; nil for the
	// busybox image, whose root is the initramfs.
	Rootfs *Rootfs `json:"rootfs,omitempty"`
}

// Rootfs describes an image's root filesystem disk. The kernel and the
// initramfs (agent and modules) are those of the busybox image it was built
// on (BaseDigest); the disk holds only the source's files.
type Rootfs struct {
	// Path is the disk image, set by Load from File.
	Path string `json:"-"`
	File string `json:"file"` // name inside the image directory
	// Format is the filesystem on the disk: "ext4".
	Format    string `json:"format"`
	SizeBytes int64  `json:"size_bytes"`
	// BaseDigest is the digest of the busybox image whose kernel and
	// initramfs this image boots with.
	BaseDigest string       `json:"base_digest"`
	Packages   []string     `json:"packages,omitempty"`
	Exec       ExecDefaults `json:"exec"`
}

// ExecDefaults are what an exec in the image runs with unless the request
// overrides them: an OCI image config's Env, WorkingDir, User,
// Entrypoint and Cmd, or Debian's defaults.
type ExecDefaults struct {
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
}

// ManifestName is the file in an image directory that describes it.
const ManifestName = "image.json"

// DefaultCacheDir is $XDG_CACHE_HOME/warmpool (~/.cache/warmpool).
func DefaultCacheDir() string {
	dir, err := os.UserCacheDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "warmpool-cache")
	}
	return filepath.Join(dir, "warmpool")
}

// Load reads the image whose files are in dir.
func Load(dir string) (Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return Image{}, fmt.Errorf("load guest image from %s: %w", dir, err)
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return Image{}, fmt.Errorf("load guest image from %s: %w", dir, err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Image{}, err
	}
	img.Dir = abs
	img.Kernel = filepath.Join(abs, "vmlinuz")
	img.Initrd = filepath.Join(abs, "initrd.img")
	files := []string{img.Kernel, img.Initrd}
	if img.Rootfs != nil {
		if img.Rootfs.File == "" || filepath.Base(img.Rootfs.File) != img.Rootfs.File {
			return Image{}, fmt.Errorf("load guest image from %s: bad root filesystem file name %q", dir, img.Rootfs.File)
		}
		img.Rootfs.Path = filepath.Join(abs, img.Rootfs.File)
		files = append(files, img.Rootfs.Path)
	}
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			return Image{}, fmt.Errorf("load guest image from %s: %w", dir, err)
		}
	}
	return img, nil
}

// SetSource rewrites the source recorded in the manifest of the image in
// dir, leaving every other field as written: the same content built again
// from another source (a tree copied elsewhere, an archive renamed) says
// what it was last built from.
func SetSource(dir, source string) error {
	path := filepath.Join(dir, ManifestName)
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("image manifest: %w", err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return fmt.Errorf("image manifest %s: %w", path, err)
	}
	if fields["source"], err = json.Marshal(source); err != nil {
		return err
	}
	out, err := json.MarshalIndent(fields, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteBytes(path, 0o644, append(out, '\n')); err != nil {
		return fmt.Errorf("image manifest: %w", err)
	}
	return nil
}

// Build returns the guest image for the current inputs, building it into
// the cache if it is not there yet. Concurrent builds (in this or other
// processes) sharing a cache directory wait for each other.
func Build(ctx context.Context, opts BuildOptions) (Image, error) {
	b := &builder{opts: opts}
	b.cache = cmp.Or(opts.CacheDir, DefaultCacheDir())
	if err := os.MkdirAll(b.cache, 0o755); err != nil {
		return Image{}, fmt.Errorf("guest image cache: %w", err)
	}
	unlock, err := lockDir(ctx, b.cache)
	if err != nil {
		return Image{}, err
	}
	defer unlock()
	return b.build(ctx)
}

type builder struct {
	opts  BuildOptions
	cache string
}

func (b *builder) progress(step string, done, total int64) {
	if b.opts.Progress != nil {
		b.opts.Progress(step, done, total)
	}
}

func (b *builder) build(ctx context.Context) (Image, error) {
	const steps = 5
	b.progress("resolve kernel package", 0, steps)
	pkg, err := b.kernelPackage(ctx)
	if err != nil {
		return Image{}, err
	}
	b.progress("fetch kernel "+pkg, 1, steps)
	kern, err := b.fetchKernel(ctx, pkg)
	if err != nil {
		return Image{}, err
	}
	mods, err := kern.resolveModules(ctx, requiredModules, optionalModules)
	if err != nil {
		return Image{}, err
	}
	b.progress("check busybox", 2, steps)
	busyboxPath := cmp.Or(b.opts.Busybox, "/bin/busybox")
	busybox, applets, err := readBusybox(ctx, busyboxPath)
	if err != nil {
		return Image{}, err
	}
	b.progress("build guest agent", 3, steps)
	agentBin, err := b.agentBinary(ctx)
	if err != nil {
		return Image{}, err
	}
	kernelBytes, err := os.ReadFile(kern.vmlinuz)
	if err != nil {
		return Image{}, fmt.Errorf("read kernel of %s: %w", pkg, err)
	}

	h := sha256.New()
	field := func(name string, data []byte) {
		sum := sha256.Sum256(data)
		fmt.Fprintf(h, "%s %s %x\n", name, layoutVersion, sum)
	}
	field("layout", []byte(layoutVersion+"\n"+DefaultCmdline+"\n"+initFiles()))
	field("kernel", kernelBytes)
	for _, m := range mods {
		field("module "+m.name, m.data)
	}
	field("busybox", busybox)
	field("applets", []byte(strings.Join(applets, "\n")))
	field("agent", agentBin)
	digest := hex.EncodeToString(h.Sum(nil))

	dir := filepath.Join(b.cache, "images", digest[:16])
	if img, err := Load(dir); err == nil && img.Digest == digest {
		b.progress("image up to date", steps, steps)
		return img, nil
	}
	b.progress("write initramfs", 4, steps)
	entries := initramfsEntries(agentBin, busybox, applets, mods)
	var cpio bytes.Buffer
	if err := writeCPIO(&cpio, entries); err != nil {
		return Image{}, err
	}
	var initrd bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&initrd, gzip.BestCompression)
	// Header left at its zero value: no name and no mtime, so output is stable.
	if _, err := zw.Write(cpio.Bytes()); err != nil {
		return Image{}, err
	}
	if err := zw.Close(); err != nil {
		return Image{}, err
	}
	img := Image{
		Cmdline:       DefaultCmdline,
		Digest:        digest,
		KernelPackage: pkg,
		KernelRelease: kern.release,
	}
	for _, m := range mods {
		img.Modules = append(img.Modules, m.name)
	}
	manifest, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return Image{}, err
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return Image{}, err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".build-")
	if err != nil {
		return Image{}, fmt.Errorf("guest image: %w", err)
	}
	defer os.RemoveAll(tmp)
	for name, data := range map[string][]byte{"vmlinuz": kernelBytes, "initrd.img": initrd.Bytes(), ManifestName: append(manifest, '\n')} {
		if err := os.WriteFile(filepath.Join(tmp, name), data, 0o644); err != nil {
			return Image{}, fmt.Errorf("write guest image: %w", err)
		}
	}
	_ = os.Chmod(tmp, 0o755)
	_ = os.RemoveAll(dir) // an incomplete image from an interrupted build
	if err := os.Rename(tmp, dir); err != nil {
		return Image{}, fmt.Errorf("install guest image in %s: %w", dir, err)
	}
	b.progress("image built", steps, steps)
	return Load(dir)
}

// initFiles are the small text files of the image.
func initFiles() string {
	return "root:x:0:0:root:/root:/bin/sh\n|root:x:0:\n|127.0.0.1 localhost\n::1 localhost\n"
}

func initramfsEntries(agentBin, busybox []byte, applets []string, mods []kernelModule) []cpioEntry {
	dirs := []string{"bin", "dev", "etc", "lib", "lib/modules", "proc", "root", "run", "sbin", "sys", "usr", "usr/bin", "usr/sbin", "var"}
	var es []cpioEntry
	for _, d := range dirs {
		es = append(es, cpioEntry{path: d, mode: cpioDir | 0o755})
	}
	es = append(es,
		cpioEntry{path: "tmp", mode: cpioDir | 0o1777},
		cpioEntry{path: "var/tmp", mode: cpioDir | 0o1777},
		// The kernel opens /dev/console for init's stdio before devtmpfs is
		// mounted, so the node must be in the archive.
		cpioEntry{path: "dev/console", mode: cpioCharDev | 0o600, devMajor: 5, devMinor: 1},
		cpioEntry{path: "dev/null", mode: cpioCharDev | 0o666, devMajor: 1, devMinor: 3},
		cpioEntry{path: "init", mode: cpioFile | 0o755, data: agentBin},
		cpioEntry{path: "sbin/warmpool-agent", mode: cpioSymlink | 0o777, data: []byte("/init")},
		cpioEntry{path: "bin/busybox", mode: cpioFile | 0o755, data: busybox},
	)
	files := strings.Split(initFiles(), "|")
	for i, name := range []string{"etc/passwd", "etc/group", "etc/hosts"} {
		es = append(es, cpioEntry{path: name, mode: cpioFile | 0o644, data: []byte(files[i])})
	}
	have := map[string]bool{}
	for _, e := range es {
		have[e.path] = true
	}
	for _, a := range applets {
		if !have[a] {
			have[a] = true
			es = append(es, cpioEntry{path: a, mode: cpioSymlink | 0o777, data: []byte("/bin/busybox")})
		}
	}
	var order strings.Builder
	for _, m := range mods {
		es = append(es, cpioEntry{path: "lib/modules/" + m.name + ".ko", mode: cpioFile | 0o644, data: m.data})
		order.WriteString(m.name + ".ko\n")
	}
	es = append(es, cpioEntry{path: "lib/modules/warmpool.order", mode: cpioFile | 0o644, data: []byte(order.String())})
	return es
}

// readBusybox returns the busybox binary and the paths of its applets
// ("bin/sh", "sbin/insmod"), checking that it is statically linked.
func readBusybox(ctx context.Context, path string) ([]byte, []string, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, fmt.Errorf("guest image needs a static busybox at %s: install Debian's busybox-static package", path)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read busybox: %w", err)
	}
	if !isStaticELF(data) {
		return nil, nil, fmt.Errorf("busybox at %s is dynamically linked and cannot run in the guest: install Debian's busybox-static package", path)
	}
	out, err := exec.CommandContext(ctx, path, "--list-full").Output()
	if err != nil {
		return nil, nil, fmt.Errorf("list busybox applets: %s --list-full: %w", path, err)
	}
	var applets []string
	for _, line := range strings.Fields(string(out)) {
		line = strings.TrimPrefix(line, "/")
		// linuxrc and init would shadow the agent's /init behaviour.
		if line == "" || line == "linuxrc" || strings.Contains(line, "..") || line == "sbin/init" {
			continue
		}
		applets = append(applets, line)
	}
	slices.Sort(applets)
	return data, applets, nil
}

// agentBinary returns the static guest agent, compiled from source unless a
// prebuilt one was given.
func (b *builder) agentBinary(ctx context.Context) ([]byte, error) {
	if b.opts.AgentBinary == "" && len(b.opts.Agent) > 0 {
		if !isStaticELF(b.opts.Agent) {
			return nil, errors.New("the prebuilt guest agent given is not a static binary")
		}
		return b.opts.Agent, nil
	}
	if b.opts.AgentBinary != "" {
		data, err := os.ReadFile(b.opts.AgentBinary)
		if err != nil {
			return nil, fmt.Errorf("read prebuilt guest agent: %w", err)
		}
		if !isStaticELF(data) {
			return nil, fmt.Errorf("guest agent %s is not a static binary: build it with CGO_ENABLED=0", b.opts.AgentBinary)
		}
		return data, nil
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		return nil, fmt.Errorf("%w: compiling one needs the Go toolchain (go not in PATH)", ErrNoAgent)
	}
	outDir := filepath.Join(b.cache, "agent")
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, err
	}
	out := filepath.Join(outDir, "warmpool-agent")
	env := append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	src, srcErr := findSourceDir(b.opts.SourceDir)
	var cmd *exec.Cmd
	switch {
	case srcErr == nil:
		cmd = exec.CommandContext(ctx, goTool, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", out, "./cmd/warmpool-agent")
		cmd.Dir = src
	case releasedVersion() != "":
		gobin, err := os.MkdirTemp(outDir, "install-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(gobin)
		cmd = exec.CommandContext(ctx, goTool, "install", "-trimpath", "-ldflags=-s -w", ModulePath+"/cmd/warmpool-agent@"+releasedVersion())
		env = append(env, "GOBIN="+gobin)
		out = filepath.Join(gobin, "warmpool-agent")
	default:
		return nil, fmt.Errorf("%w: %w, and this binary was not installed at a released version to compile it from", ErrNoAgent, srcErr)
	}
	cmd.Env = env
	if msg, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build guest agent: %s: %w\n%s", strings.Join(cmd.Args, " "), err, msg)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return nil, fmt.Errorf("read guest agent: %w", err)
	}
	return data, nil
}

// findSourceDir returns the directory of this module's go.mod: explicit, or
// found upwards from the working directory or the running executable.
func findSourceDir(explicit string) (string, error) {
	if explicit != "" {
		if !isModuleRoot(explicit) {
			return "", fmt.Errorf("%s has no go.mod for module %s", explicit, ModulePath)
		}
		return explicit, nil
	}
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	for _, dir := range starts {
		for {
			if isModuleRoot(dir) {
				return dir, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", fmt.Errorf("source of module %s not found above the working directory or the executable", ModulePath)
}

var moduleLine = regexp.MustCompile(`(?m)^module\s+"?([^\s"]+)"?\s*$`)

func isModuleRoot(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	m := moduleLine.FindSubmatch(b)
	return m != nil && string(m[1]) == ModulePath
}

// releasedVersion is the module version the running binary was built at,
// or "" for development builds.
func releasedVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok || bi.Main.Path != ModulePath || bi.Main.Version == "" || bi.Main.Version == "(devel)" {
		return ""
	}
	return bi.Main.Version
}

// LockCache takes the cache directory's lock, which Build, Prune and
// package rootfs hold while they change the cache; the returned function
// releases it.
func LockCache(ctx context.Context, cacheDir string) (func(), error) {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("guest image cache: %w", err)
	}
	return lockDir(ctx, cacheDir)
}

// lockDir takes an exclusive lock on dir's lock file, waiting while ctx lasts.
func lockDir(ctx context.Context, dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock guest image cache %s: %w", dir, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() {
				_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock guest image cache %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for another build using %s: %w", dir, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
