"""ComfyHub's benchmarks: `python -m bench` (or `make bench`) runs them all; see bench/README.md.

Each benchmark is a module with `NAME`, `TARGET` and `main()`, run in a process of its own (Django can be set up
only once per process, and each benchmark builds a private environment before Django is imported).
"""

BENCHMARKS = (
    "roundtrip", "pages", "start_latency", "dashboard_instances", "reconcile", "hashing", "incremental_verify",
    "verify_memory", "preflight", "workflow_copy", "snapshot", "migration", "proxy", "model_cache", "nodes",
)
