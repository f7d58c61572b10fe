"""Under CI=true a skipped test is a failure: a skip there hides a missing install step (the CI machine installs
everything the suite needs). Only tests marked ``@pytest.mark.hardware("...")`` -- hardware the CI machine may lack,
a GPU or an ISA extension -- may skip there. Collection-time skips (``pytest.importorskip`` at module level) count
too."""
from __future__ import annotations

import os

import pytest

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
# every pass that reports "not modified" is held to it (qcompile.pass_infra.PassManager): the manager then hands on
# the model it started from without re-checking it, so a false claim would let an edit through unchecked
os.environ.setdefault("QCOMPILE_VERIFY_UNMODIFIED", "1")
HINT = "skipped under CI=true, where a skip hides a missing install step (mark hardware-gated tests 'hardware')"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hardware(what): needs hardware the CI machine may lack (a GPU, an ISA "
                                       "extension); its skip is allowed under CI=true")


# The README's test command runs the files on two pytest-xdist workers (`-n 2 --dist loadfile
# --no-loadscope-reorder`): each file on one worker (its module and session fixtures built once), files handed out in
# the order collected. The files that take minutes go first, so that the many short ones fill in beside them rather
# than leave one worker alone with a long file at the end (`--durations`: BENCHMARKS.md, "Test suite"). Without
# xdist the order changes nothing.
HEAVY_FIRST = ("test_tvm_opencl", "test_tvm_cuda", "test_tvm_x86", "test_tvm_rpc", "test_zoo_e2e", "test_tvm_hexagon",
               "test_llm_zoo", "test_tvm_aarch64", "test_gpu_bench")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: every other file keeps its place


def _reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    rep = outcome.get_result()
    if CI and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("hardware") is None:
        rep.outcome = "failed"
        rep.longrepr = f"{HINT}: {_reason(rep.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    rep = outcome.get_result()
    if CI and rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = f"{HINT}: {_reason(rep.longrepr)}"


def _zoo_w8a8(make):
    """``get(name, target, max_samples)``: ``make(entry, target, max_samples)`` for the zoo model, once per key."""
    import qcompile_zoo as zoo

    cache: dict = {}

    def get(name: str, target: str, max_samples: int):
        key = (name, target, max_samples)
        if key not in cache:
            cache[key] = make(zoo.build(name), target, max_samples)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def zoo_compiled(tmp_path_factory):
    """``get(name, target, max_samples)``: the zoo model compiled w8a8 for ``target``, once per session."""
    from qcompile import driver

    return _zoo_w8a8(lambda e, target, n: driver.compile(
        str(e.model), calib=str(e.calib), recipe="w8a8", target=target,
        out_dir=tmp_path_factory.mktemp(f"{e.name}-{target}") / "out", max_samples=n, check_numerics=False,
        measure_latency=False))


@pytest.fixture(scope="session")
def zoo_quantized():
    """``get(name, target, max_samples)``: the zoo model's w8a8 QDQ model for ``target`` (the pass pipeline only, no
    build or report), once per session."""
    from qcompile import driver

    return _zoo_w8a8(lambda e, target, n: driver.quantize(str(e.model), calib=str(e.calib), recipe="w8a8",
                                                          target=target, max_samples=n, check_numerics=False))


@pytest.fixture(scope="session")
def opencl_zoo(zoo_compiled):
    """``get(name)``: the zoo model for tvm-opencl (tests/test_tvm_opencl.py runs it under POCL;
    tests/test_gpu_bench.py reads its host program)."""
    return lambda name: zoo_compiled(name, "tvm-opencl", 4)


@pytest.fixture(autouse=True)
def _fresh_rng(monkeypatch):
    """Every test draws ``helpers.rand`` & co. from a fresh seed: the shared generator's state otherwise depends on
    which tests the worker ran before (xdist hands files out by timing), and a test's weights with it."""
    import numpy as np

    import helpers

    monkeypatch.setattr(helpers, "RNG", np.random.default_rng(1234))
