# standin — build, test, bench, demo. Run as root on Debian 12 (FUSE, loop devices).
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN     := bin/standin

.PHONY: build test test-unit test-fuse test-integration bench demo lint fuzz fuzz-short clean deps

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/standin

# deps installs the Debian packages the tests and demo use (idempotent).
deps:
	bash .ci/deps.sh

# make test: everything CI runs. Needs root and /dev/fuse (fails, not skips, with CI=true).
test: build lint test-unit fuzz-short test-integration

test-unit:
	$(GO) test -race -count=1 -timeout 10m ./internal/... ./tracker/... ./shipper/... ./applier/... ./dedup/...
	$(GO) test -count=1 -timeout 10m ./fusefs/...
	GOMAXPROCS=1 $(GO) test -count=1 -timeout 10m ./fusefs/...

test-integration: build
	STANDIN_BIN=$(CURDIR)/$(BIN) $(GO) test -p 1 -count=1 -timeout 25m ./integration/...

# make soak: the power-cut campaigns long (TestPowerCut*: the primary and the replica store
# on fusefs/lazyfs, STANDIN_POWERCUTS cuts per store, default 30; ~15 min).
.PHONY: soak
soak: build
	STANDIN_POWERCUTS=$${STANDIN_POWERCUTS:-30} STANDIN_BIN=$(CURDIR)/$(BIN) $(GO) test -p 1 -count=1 -v -timeout 60m -run 'TestPowerCut' ./integration/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); if [ -n "$$out" ]; then echo "gofmt: $$out"; exit 1; fi
	$(GO) vet ./...
	bash .ci/depcheck.sh

# fuzz-short: every fuzz target (decoders of files and request bodies) for a
# few seconds each (scripts/fuzz.sh, ~3 min); make fuzz: 60 s each (~25 min).
# Their seed corpora and any crasher kept in testdata/fuzz also run in test-unit.
fuzz-short:
	FUZZTIME=$${FUZZTIME:-4s} bash scripts/fuzz.sh

fuzz:
	FUZZTIME=$${FUZZTIME:-60s} bash scripts/fuzz.sh

# make bench: data path, tracker and staging (bench/run.sh, ~15 min), then replication
# (bench/repl.sh, ~10 min), then seed export vs borg/restic/casync/tar (bench/seed.sh,
# ~25 min; needs a dataset of five cloned VM images, DS=DIR with vm1..vm5.img). BENCH_QUICK=1 for a smoke run of all.
bench: build
	bash bench/run.sh
	bash bench/repl.sh
	bash bench/seed.sh
	bash bench/failover.sh

# make bench-seed: only the seed benchmark (bench/seed.sh; DS=, BENCH_REPS=, BENCH_TOOLS= there).
.PHONY: bench-seed
bench-seed: build
	bash bench/seed.sh

# make bench-failover: test/planned/unplanned failover and failback on a 4 GiB image with
# 100 MiB changed (bench/failover.sh, ~5 min; uses the dataset's vm1.img when present).
.PHONY: bench-failover
bench-failover: build
	bash bench/failover.sh

demo: build
	bash scripts/demo.sh

clean:
	rm -rf bin
