//go:build tools

// Package tools pins the controller-gen command so that go mod tidy keeps it.
package tools

import _ "sigs.k8s.io/controller-tools/cmd/controller-gen"
