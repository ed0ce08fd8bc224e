// Package procfs reads the "Key:   value kB" files of /proc, such as
// /proc/meminfo and /proc/PID/smaps_rollup.
package procfs

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// ReadKiB returns the number that starts the value of every "Key: N [kB]"
// line of the file at path, keyed by Key.
func ReadKiB(path string) (map[string]uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	vals, err := ParseKiB(f)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return vals, nil
}

// ParseKiB is ReadKiB on r. Lines without a colon or a number are skipped.
func ParseKiB(r io.Reader) (map[string]uint64, error) {
	vals := make(map[string]uint64)
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		if v, err := strconv.ParseUint(fields[0], 10, 64); err == nil {
			vals[key] = v
		}
	}
	return vals, sc.Err()
}
