// Package rootfs builds guest images with a real root filesystem: from a
// directory, a tarball, an OCI or docker archive, or a Debian suite
// (debootstrap). The files become a read-only ext4 disk image, made with
// mkfs.ext4 -d (no loop mount, no root needed for the disk itself), next to
// the kernel and the initramfs (agent and modules) of warmpool's busybox
// image, which it boots with.
//
// Images are content-addressed like the busybox image: the digest covers
// the base image's digest, the source's content (the archive's bytes, the
// tree's files, or the Debian packages' exact versions), the packages asked
// for, the disk size and the layout, and an image already in the cache under
// that digest is reused. A failed build leaves nothing in the cache.
package rootfs

import (
	"bufio"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// Source kinds, as written before the colon of --from.
const (
	KindBusybox       = "busybox"
	KindDir           = "dir"
	KindTar           = "tar"
	KindOCIArchive    = "oci-archive"
	KindDockerArchive = "docker-archive"
	KindDebian        = "debian"
)

// Source is what an image is built from.
type Source struct {
	Kind string
	// Arg is the path (dir, tar, oci-archive, docker-archive) or the suite
	// (debian); empty for busybox.
	Arg string
}

func (s Source) String() string {
	if s.Arg == "" {
		return s.Kind
	}
	return s.Kind + ":" + s.Arg
}

var suiteName = regexp.MustCompile(`^[a-z][a-z0-9.-]{0,40}$`)

// ParseSource parses --from: busybox, dir:PATH, tar:PATH, oci-archive:PATH,
// docker-archive:PATH or debian:SUITE.
func ParseSource(s string) (Source, error) {
	if s == "" || s == KindBusybox {
		return Source{Kind: KindBusybox}, nil
	}
	kind, arg, ok := strings.Cut(s, ":")
	if !ok || arg == "" {
		return Source{}, fmt.Errorf("image source %q: want busybox, dir:PATH, tar:PATH, oci-archive:PATH, docker-archive:PATH or debian:SUITE", s)
	}
	switch kind {
	case KindDir, KindTar, KindOCIArchive, KindDockerArchive:
		abs, err := filepath.Abs(arg)
		if err != nil {
			return Source{}, fmt.Errorf("image source %q: %w", s, err)
		}
		return Source{Kind: kind, Arg: abs}, nil
	case KindDebian:
		if !suiteName.MatchString(arg) {
			return Source{}, fmt.Errorf("image source %q: %q is not a Debian suite name", s, arg)
		}
		return Source{Kind: kind, Arg: arg}, nil
	}
	return Source{}, fmt.Errorf("image source %q: unknown kind %q; want busybox, dir, tar, oci-archive, docker-archive or debian", s, kind)
}

// HostDebianMirror returns the archive the host's apt uses for Debian: the
// first "deb" source with the main component and a release suite (not
// only -security, -updates or -backports), from /etc/apt/sources.list and sources.list.d (one-line
// and deb822 formats). root is "/" except in tests.
func HostDebianMirror(root string) (string, error) {
	var files []string
	files = append(files, filepath.Join(root, "etc/apt/sources.list"))
	more, _ := filepath.Glob(filepath.Join(root, "etc/apt/sources.list.d/*"))
	slices.Sort(more)
	files = append(files, more...)
	for _, f := range files {
		var entries []aptSource
		switch {
		case strings.HasSuffix(f, ".sources"):
			entries = parseDeb822(f)
		case strings.HasSuffix(f, ".list"):
			entries = parseOneLine(f)
		}
		for _, e := range entries {
			if u := e.mirror(); u != "" {
				return u, nil
			}
		}
	}
	return "", fmt.Errorf("no Debian archive in the host's apt sources (%s, %s): debootstrap uses the same archive as apt", files[0], filepath.Join(root, "etc/apt/sources.list.d"))
}

type aptSource struct {
	types, uris, suites, components []string
}

func (a aptSource) mirror() string {
	if !slices.Contains(a.types, "deb") || !slices.Contains(a.components, "main") {
		return ""
	}
	release := false
	for _, s := range a.suites {
		if !strings.HasSuffix(s, "-security") && !strings.HasSuffix(s, "-updates") && !strings.HasSuffix(s, "-backports") {
			release = true
		}
	}
	if !release {
		return ""
	}
	for _, u := range a.uris {
		if p, err := url.Parse(u); err == nil && (p.Scheme == "http" || p.Scheme == "https") && !strings.Contains(p.Path, "security") {
			return u
		}
	}
	return ""
}

func parseDeb822(path string) []aptSource {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []aptSource
	for stanza := range strings.SplitSeq(string(data), "\n\n") {
		var a aptSource
		for line := range strings.SplitSeq(stanza, "\n") {
			if strings.HasPrefix(line, "#") {
				continue
			}
			key, val, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			fields := strings.Fields(val)
			switch strings.ToLower(strings.TrimSpace(key)) {
			case "types":
				a.types = fields
			case "uris":
				a.uris = fields
			case "suites":
				a.suites = fields
			case "components":
				a.components = fields
			case "enabled":
				if strings.EqualFold(strings.TrimSpace(val), "no") {
					a.types = nil
				}
			}
		}
		out = append(out, a)
	}
	return out
}

func parseOneLine(path string) []aptSource {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []aptSource
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		fields := strings.Fields(line)
		if len(fields) > 1 && strings.HasPrefix(fields[1], "[") { // options
			i := 1
			for i < len(fields) && !strings.HasSuffix(fields[i], "]") {
				i++
			}
			fields = append(fields[:1], fields[min(i+1, len(fields)):]...)
		}
		if len(fields) < 4 {
			continue
		}
		out = append(out, aptSource{types: fields[:1], uris: fields[1:2], suites: fields[2:3], components: fields[3:]})
	}
	return out
}
