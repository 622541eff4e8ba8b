"""bench/README.md describes the benchmarks and knobs that exist, and only those."""
import re

from bench import BENCHMARKS
from tests.conftest import REPO

README = REPO / "bench" / "README.md"
MODULES = {path.stem for path in (REPO / "bench").glob("*.py")} - {"__init__", "__main__"}
HELPERS = {"bare_jobs", "docker_support", "environment"}  # used by the benchmarks, not benchmarks themselves


def test_the_table_has_a_row_for_every_benchmark_python_m_bench_runs_and_no_other():
    assert set(BENCHMARKS) == MODULES - HELPERS
    assert set(re.findall(r"^\| `(\w+)`", README.read_text(), re.M)) == set(BENCHMARKS)


def test_every_module_in_bench_is_named():
    readme = README.read_text()
    assert [module for module in sorted(MODULES) if f"`{module}" not in readme] == []


def test_the_knobs_are_the_variables_the_benchmarks_read():
    read = set()
    for path in (REPO / "bench").glob("*.py"):
        read |= set(re.findall(r"environ\.get\(\"(BENCH_[A-Z_]+)\"", path.read_text()))
    knobs = README.read_text().split("## Knobs", 1)[1]
    assert set(re.findall(r"`(BENCH_[A-Z_]+)`", knobs)) == read
