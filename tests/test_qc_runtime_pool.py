"""The static executor's thread pool (qc_runtime.c, hosted builds): every task of every launch runs exactly once,
with more tasks than threads claimed dynamically, per-thread workspace slices and inline nested launches; builds
whose kernels use TVM's parallel barrier get one task per thread, all running at once. A C harness, built here."""
import shutil
import subprocess
from pathlib import Path

import pytest

from qcompile.targets.tvm.executors.static_c import RUNTIME_DIR

HARNESS = Path(__file__).parent / "c" / "pool_stress.c"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.fail("gcc missing: tools/setup installs it")
    out = tmp_path_factory.mktemp("pool")

    def _build(tasks_per_thread: int | None) -> Path:
        exe = out / f"pool_{tasks_per_thread}"
        flags = [f"-DQC_TASKS_PER_THREAD={tasks_per_thread}"] if tasks_per_thread else []
        subprocess.run(["gcc", "-O2", "-pthread", "-DQC_THREADS", *flags, f"-I{RUNTIME_DIR}", str(HARNESS),
                        str(RUNTIME_DIR / "qc_runtime.c"), "-o", str(exe)], check=True)
        return exe
    return _build


@pytest.mark.parametrize("threads,launches", [(2, 20000), (3, 3000), (8, 500)])
def test_dynamic_tasks_each_run_once(build, threads, launches):
    """Default build: 8 tasks per thread, claimed from one counter (also with more threads than cores)."""
    res = subprocess.run([str(build(None)), str(threads), str(launches), "8", "0"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"ok {launches} launches of {8 * threads} tasks" in res.stdout


@pytest.mark.parametrize("threads", [2, 3])
def test_barrier_builds_run_every_task_at_once(build, threads):
    """QC_TASKS_PER_THREAD=1 (kernels calling TVMBackendParallelBarrier): a barrier inside every task completes,
    which needs all of them running at once; a worker started after the first launch began still joins it."""
    res = subprocess.run([str(build(1)), str(threads), "300", "1", "1"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
