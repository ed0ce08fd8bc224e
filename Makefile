# warmpool: see README.md. `make test` is what CI runs.
GO        ?= go
BIN       := bin
STATE     ?= $(CURDIR)/.state
STATICCHECK := $(shell command -v staticcheck 2>/dev/null || echo $(shell $(GO) env GOPATH)/bin/staticcheck)

.PHONY: all build deps test unit lint run clean

all: build

deps:
	./scripts/deps.sh

# The agent is built first and embedded into warmpool (cmd/warmpool/agent_embed.go),
# so that the binary builds guest images anywhere.
build:
	$(GO) generate ./cmd/warmpool
	$(GO) build -o $(BIN)/ ./cmd/...

lint:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

# The summary prints every failed test's output, every skipped test with its
# reason and "N passed, N failed, N skipped" last; it fails when a test does.
unit:
	$(GO) run ./internal/testsummary $(GO) test -race -count=1 -timeout 25m -json ./...

test: deps lint unit
	$(GO) run ./cmd/warmpool bench --provider fake --quick --check -o json >/dev/null

run: deps build
	./scripts/run.sh

clean:
	rm -rf $(BIN)
