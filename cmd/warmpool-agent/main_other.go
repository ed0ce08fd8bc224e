//go:build !linux

package main

import (
	"fmt"
	"os"
	"runtime"
)

func main() {
	fmt.Fprintf(os.Stderr, "warmpool-agent runs inside Linux guests only, not on %s\n", runtime.GOOS)
	os.Exit(1)
}
