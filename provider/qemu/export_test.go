package qemu

// SetBeforeHandOver lets tests act in the moment between a VM coming to
// exist and Create or Restore returning it.
func SetBeforeHandOver(p *Provider, f func(id string)) { p.beforeHandOver = f }
