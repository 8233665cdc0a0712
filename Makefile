# Herald's two commands, and the few around them. See README.md.
.DEFAULT_GOAL := help
.PHONY: help run demo test test-faults bench stop status fmt lint

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

run: ## Install what is missing, start the local stack, migrate, create topics, run Herald
	@scripts/run.sh

demo: ## Publish the sample events to the stack of `make run` (run it first)
	@scripts/run.sh demo

test: ## The same provisioning on separate ports and dirs, then the whole test suite and the fault suite
	@scripts/test.sh

test-faults: ## The fault suite on its own stack: crashes, outages, hostile input; figures per scenario
	@scripts/faults.sh

bench: ## Benchmarks (release build) on the test stack; figures in bench/results/
	@scripts/bench.sh

stop: ## Stop every local stack (make run's, make test's, make bench's, make test-faults')
	@for profile in run test bench faults; do scripts/stack.sh down $$profile; done

status: ## Show which services of each stack are up
	@echo "make run stack:";  scripts/stack.sh status run
	@echo "make test stack:"; scripts/stack.sh status test

fmt: ## Format the code
	cargo fmt

lint: ## What CI-quality code must pass besides the tests
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --test faults -- -D warnings
