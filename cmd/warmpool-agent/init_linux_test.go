package main

import "testing"

func TestModuleParamsFromKernelCommandLine(t *testing.T) {
	got := moduleParams("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 quiet panic=-1 x.y=1 ./a=b")
	if want := "device=4K@0xd0000000:5 device=4K@0xd0001000:6"; got["virtio_mmio"] != want {
		t.Errorf("virtio_mmio params = %q, want %q", got["virtio_mmio"], want)
	}
	if got["x"] != "y=1" {
		t.Errorf("x params = %q, want y=1", got["x"])
	}
	if len(got) != 2 {
		t.Errorf("params for modules %v, want only virtio_mmio and x", got)
	}
	if n := moduleName("kernel/drivers/virtio/virtio_mmio.ko"); n != "virtio_mmio" {
		t.Errorf("moduleName = %q", n)
	}
}
