package main

import (
	"io"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
)

// progress shows what a long operation is doing: a spinner or a byte bar on
// a terminal, nothing otherwise (so logs and pipes stay clean).
type progress struct {
	mu      sync.Mutex
	w       io.Writer
	enabled bool
	bar     *progressbar.ProgressBar
	step    string
	total   int64
}

func newProgress(w io.Writer) *progress {
	return &progress{w: w, enabled: isTerminal(w)}
}

// spin shows step with a spinner.
func (p *progress) spin(step string) { p.update(step, 0, -1) }

// update shows step; with total > 0 as a bar of done/total bytes.
func (p *progress) update(step string, done, total int64) {
	if !p.enabled {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar == nil || step != p.step || (total > 0) != (p.total > 0) {
		p.finishLocked()
		p.step, p.total = step, total
		opts := []progressbar.Option{
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionSetDescription(step),
			progressbar.OptionClearOnFinish(),
			progressbar.OptionThrottle(100_000_000), // 100ms
		}
		if total > 0 {
			opts = append(opts, progressbar.OptionShowBytes(true), progressbar.OptionSetWidth(30))
		} else {
			total = -1
			opts = append(opts, progressbar.OptionSpinnerType(14), progressbar.OptionShowElapsedTimeOnFinish())
		}
		p.bar = progressbar.NewOptions64(total, opts...)
	}
	if total > 0 {
		_ = p.bar.Set64(done) // only fails on a finished bar, which we replaced
	} else {
		_ = p.bar.Add(1)
	}
}

// done removes the progress display.
func (p *progress) done() {
	if !p.enabled {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.finishLocked()
}

func (p *progress) finishLocked() {
	if p.bar != nil {
		_ = p.bar.Finish()
		_ = p.bar.Clear()
		p.bar = nil
	}
}

// spinWhile shows step with a spinner that keeps turning until the returned
// stop is called; later update calls change the step.
func (p *progress) spinWhile(step string) (stop func()) {
	if !p.enabled {
		return func() {}
	}
	p.spin(step)
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				p.mu.Lock()
				if p.bar != nil && p.total <= 0 {
					_ = p.bar.Add(1)
				}
				p.mu.Unlock()
			}
		}
	})
	return func() {
		close(quit)
		wg.Wait()
		p.done()
	}
}
