# make bench: the CPU benchmark suite (about 10 minutes on 2 cores) and docs/performance.md from its JSON.
# Accuracy sections read the leave-one-scene-out runs when present (they need ../shared/data and hours:
#   python benchmarks/loso.py; python benchmarks/refine_loso.py; python benchmarks/flight_loso.py ...).
PY ?= python
OUT ?= runs/bench

.PHONY: bench report test demo

bench:
	$(PY) benchmarks/bench_latency.py --out $(OUT) --work $(OUT)/work
	$(PY) benchmarks/bench_search.py --sizes 1000 10000 100000 1000000 --dims 704 128 --out runs/bench_search
	$(PY) benchmarks/bench_signing.py --out $(OUT)/signing.json
	$(PY) benchmarks/bench_limits.py --latency-json $(OUT)/latency.json --search-json runs/bench_search/results.json --out $(OUT)/limits.json
	$(MAKE) report

report:
	$(PY) benchmarks/perf_report.py --runs $(OUT) --out docs/performance.md

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh
