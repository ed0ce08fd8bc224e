// Package vmlinux unpacks the uncompressed ELF kernel inside a bzImage, for
// hypervisors that boot only an ELF vmlinux (Firecracker on x86_64).
package vmlinux

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/warmpool/warmpool/internal/atomicfile"
)

// Extract writes the uncompressed ELF kernel inside the bzImage at
// bzImagePath to outPath. Firecracker on x86_64 boots only an ELF vmlinux,
// while distributions ship compressed bzImages. It reads the payload the
// bzImage header points at and, failing that, scans for a compressed stream
// the way the kernel's scripts/extract-vmlinux does. gzip and the legacy LZ4
// framing the kernel uses (Debian's choice) are understood.
func Extract(bzImagePath, outPath string) error {
	image, err := os.ReadFile(bzImagePath)
	if err != nil {
		return fmt.Errorf("extract vmlinux: %w", err)
	}
	if isELF(image) {
		return writeKernel(outPath, func(w io.Writer) error {
			_, err := w.Write(image)
			return err
		})
	}
	var tried []string
	for _, off := range payloadCandidates(image) {
		c := codecAt(image, off)
		if c == nil {
			continue
		}
		err := writeKernel(outPath, func(w io.Writer) error {
			return c.decompress(image[off:], w)
		})
		if err == nil {
			return nil
		}
		tried = append(tried, fmt.Sprintf("%s at offset %d: %v", c.name, off, err))
	}
	if len(tried) == 0 {
		return fmt.Errorf("extract vmlinux from %s: no gzip or lz4 kernel payload found (xz, zstd, bzip2, lzma and lzo kernels are not supported)", bzImagePath)
	}
	return fmt.Errorf("extract vmlinux from %s: no candidate payload decompressed to an ELF kernel: %s", bzImagePath, tried)
}

type codec struct {
	name       string
	magic      []byte
	decompress func(payload []byte, w io.Writer) error
}

var codecs = []codec{
	{name: "gzip", magic: []byte{0x1f, 0x8b, 0x08}, decompress: gunzip},
	{name: "lz4", magic: []byte{0x02, 0x21, 0x4c, 0x18}, decompress: unlz4Legacy},
}

func codecAt(image []byte, off int) *codec {
	for i := range codecs {
		if bytes.HasPrefix(image[off:], codecs[i].magic) {
			return &codecs[i]
		}
	}
	return nil
}

// payloadCandidates lists offsets that may start the compressed kernel: the
// one the x86 boot protocol header names first (boot protocol 2.08+), then
// every offset where a known magic appears.
func payloadCandidates(image []byte) []int {
	var offs []int
	seen := map[int]bool{}
	add := func(off int) {
		if off >= 0 && off < len(image) && !seen[off] {
			seen[off] = true
			offs = append(offs, off)
		}
	}
	const (
		setupSectsOff    = 0x1f1
		headerMagicOff   = 0x202
		payloadOffsetOff = 0x248
	)
	if len(image) > payloadOffsetOff+4 && string(image[headerMagicOff:headerMagicOff+4]) == "HdrS" {
		setupSects := int(image[setupSectsOff])
		if setupSects == 0 {
			setupSects = 4
		}
		protectedMode := (setupSects + 1) * 512
		add(protectedMode + int(binary.LittleEndian.Uint32(image[payloadOffsetOff:])))
	}
	for _, c := range codecs {
		for start := 0; ; {
			i := bytes.Index(image[start:], c.magic)
			if i < 0 {
				break
			}
			add(start + i)
			start += i + 1
		}
	}
	return offs
}

func gunzip(payload []byte, w io.Writer) error {
	zr, err := gzip.NewReader(bytes.NewReader(payload))
	if err != nil {
		return err
	}
	// The kernel appends its own trailer after the gzip member.
	zr.Multistream(false)
	_, err = io.Copy(w, zr)
	return err
}

// unlz4Legacy decodes the LZ4 "legacy" frame format (lz4 -l) the kernel build
// uses: a magic number, then blocks of at most 8 MiB, each preceded by its
// compressed size. The stream has no end marker; the kernel appends the
// uncompressed size, which reads as an impossible block size.
func unlz4Legacy(payload []byte, w io.Writer) error {
	const (
		magic        = 0x184C2102
		maxBlockOut  = 8 << 20
		maxBlockSize = maxBlockOut + maxBlockOut/255 + 16 // LZ4_compressBound
	)
	if len(payload) < 4 || binary.LittleEndian.Uint32(payload) != magic {
		return errors.New("not an lz4 legacy stream")
	}
	p := payload[4:]
	out := make([]byte, 0, maxBlockOut)
	blocks := 0
	for len(p) >= 4 {
		size := binary.LittleEndian.Uint32(p)
		if size == magic { // concatenated streams
			p = p[4:]
			continue
		}
		if size == 0 || size > maxBlockSize || int(size) > len(p)-4 {
			break
		}
		var err error
		out, err = lz4Block(p[4:4+size], out[:0], maxBlockOut)
		if err != nil {
			return fmt.Errorf("lz4 block %d: %w", blocks, err)
		}
		if _, err := w.Write(out); err != nil {
			return err
		}
		blocks++
		p = p[4+size:]
	}
	if blocks == 0 {
		return errors.New("lz4 stream has no blocks")
	}
	return nil
}

// lz4Block decompresses one raw LZ4 block, appending to dst.
func lz4Block(src, dst []byte, limit int) ([]byte, error) {
	corrupt := errors.New("corrupt lz4 block")
	readLen := func(i *int, n int) (int, error) {
		if n != 15 {
			return n, nil
		}
		for {
			if *i >= len(src) {
				return 0, corrupt
			}
			b := src[*i]
			*i++
			n += int(b)
			if b != 255 {
				return n, nil
			}
		}
	}
	for i := 0; i < len(src); {
		token := src[i]
		i++
		litLen, err := readLen(&i, int(token>>4))
		if err != nil {
			return nil, err
		}
		if litLen > len(src)-i || len(dst)+litLen > limit {
			return nil, corrupt
		}
		dst = append(dst, src[i:i+litLen]...)
		i += litLen
		if i == len(src) { // the last sequence has literals only
			break
		}
		if i+2 > len(src) {
			return nil, corrupt
		}
		offset := int(src[i]) | int(src[i+1])<<8
		i += 2
		matchLen, err := readLen(&i, int(token&15))
		if err != nil {
			return nil, err
		}
		matchLen += 4
		if offset == 0 || offset > len(dst) || len(dst)+matchLen > limit {
			return nil, corrupt
		}
		start := len(dst) - offset
		if offset >= matchLen {
			dst = append(dst, dst[start:start+matchLen]...)
			continue
		}
		for k := 0; k < matchLen; k++ { // byte by byte: the match overlaps its own output
			dst = append(dst, dst[start+k])
		}
	}
	return dst, nil
}

func isELF(b []byte) bool { return bytes.HasPrefix(b, []byte(elf.ELFMAG)) }

// writeKernel replaces path with what write produces once it checks out
// as an ELF executable, so a failed attempt never leaves a truncated kernel
// behind.
func writeKernel(path string, write func(io.Writer) error) error {
	return atomicfile.Write(path, 0o644, write, func(f *os.File) error { return checkELFKernel(f) })
}

func checkELFKernel(r io.ReaderAt) error {
	f, err := elf.NewFile(r)
	if err != nil {
		return fmt.Errorf("output is not an ELF file: %w", err)
	}
	if f.Type != elf.ET_EXEC {
		return fmt.Errorf("output is an ELF %s, not an executable kernel", f.Type)
	}
	loads := 0
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD {
			loads++
		}
	}
	if loads == 0 {
		return errors.New("output ELF has no loadable segments")
	}
	return nil
}
