"""`make bench` / `tierline bench`: the platform measured side by side on this machine.

`bench.harness` starts what each scenario needs (real tier processes, router,
nats-server, a LitServe peer), drives them with `bench.load` (one closed-loop load
generator for every target), and `bench.report` writes BENCHMARKS.md, the PNG
plots and bench/results.json. Raw engine speed stays in `tierline models bench`.
"""
