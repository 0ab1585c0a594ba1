# Fanout — run `make help` for the targets.
SHELL := /bin/bash
CARGO ?= cargo
BIN := $(or $(CARGO_TARGET_DIR),target)/release/fanout

.PHONY: help deps build demo test test-cluster soak lint api-fuzz api-clients fmt clippy bench sim clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## install what is missing (redis-server, promtool) on a fresh machine
	@scripts/install-deps.sh

build: ## build the fanout binary (release)
	$(CARGO) build --release --locked -p fanout-cli

demo: build ## run a startup report and a 20-persona panel end to end on the simulator
	@scripts/install-deps.sh --demo
	$(BIN) demo

test: deps ## run every test (each test starts its own redis-server)
	$(CARGO) test --locked --workspace

# The integration tests that run again on a cluster (by target name; the whole workspace is
# selected so the build is the one `make test` made): queue and worker (fanout-queue), admission,
# learning and processes (fanout-ratelimit), aggregator and store (fanout-aggregator), api
# (fanout-producer), provider_faults (fanout-worker), and the whole-system scenarios.
CLUSTER_TESTS := --test queue --test worker --test admission --test learning --test processes \
	--test aggregator --test store --test api --test provider_faults \
	--test reports --test operate --test budget --test metrics --test failover --test batch_api

test-cluster: deps ## the queue, budget and aggregator crates and the whole-system scenarios again, on a local 3-master Redis Cluster per test
	FANOUT_TEST_REDIS=cluster $(CARGO) test --locked --workspace $(CLUSTER_TESTS)

soak: deps ## the fault and load suites at soak size (release build, under 30 min); writes the figures into docs/reliability.md
	CARGO=$(CARGO) scripts/soak.sh

lint: ## rustfmt check, clippy with warnings denied, cargo deny (deny.toml), and the deploy files' validators
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --all-targets --workspace -- -D warnings
	@scripts/install-deps.sh --lint
	scripts/cargo-deny.sh
	scripts/lint-deploy.sh

api-fuzz: ## property-based test of the HTTP API against its OpenAPI document (schemathesis)
	scripts/schemathesis.sh

api-clients: ## generate Python and TypeScript clients from the OpenAPI document, run them against a stack
	@scripts/install-deps.sh --clients
	scripts/generated-clients.sh

fmt: ## format the code
	$(CARGO) fmt --all

bench: build ## measure everything but BullMQ and rewrite BENCHMARKS.md (~45 min; BENCH="queue memory" for some)
	@scripts/install-deps.sh --demo
	CARGO="$(CARGO)" scripts/bench.sh $(BENCH)

.PHONY: bench-bullmq
bench-bullmq: ## the queue against BullMQ, 3 runs side by side on one redis-server, into BENCHMARKS.md (needs node, npm)
	@scripts/install-deps.sh --demo
	CARGO="$(CARGO)" bench/bullmq/run.sh 50000 64 3

sim: build ## run the simulated provider on 127.0.0.1:8089
	$(BIN) sim --listen 127.0.0.1:8089

clean: ## remove build output
	$(CARGO) clean
