"""MetaSchedule measuring on the devices behind a TVM RPC tracker (``--rpc HOST:PORT --key K``).

TVM's own engine does the work: :class:`ExportBuilder` builds each candidate here (in this process, as
:class:`.tune.InProcessBuilder` does) and exports it as a shared library, and MetaSchedule's ``RPCRunner`` sends
each one to a device the tracker hands out under key K, as many at once as the tracker lists devices for that
key (one runner worker per device), and times it there with ``time_evaluator``. A device lost mid-measurement
makes that candidate a failed trial; the following ones go to the devices that are left; every measured record is
already committed to the JSON database.

Integer arguments are all ones (:func:`alloc_measure_args`, which the in-process runner uses too): a random int64
index would make ``take`` read out of bounds and kill the remote server.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder

from qcompile.errors import TargetError
from qcompile.targets.tvm import rpc
from qcompile.targets.tvm.kernels.let_buffers import tir_pipeline

logger = logging.getLogger(__name__)

SESSION_TIMEOUT_S = 120  # one candidate's upload + measurement, waiting for a free device included


@derived_object
class ExportBuilder(PyBuilder):
    """Builds each candidate with ``tvm.compile`` in this process and exports it as a shared library (host
    compiler, or ``fcompile``) into ``folder``: the artifact an RPC server uploads and loads."""

    def __init__(self, folder: str, fcompile=None) -> None:
        super().__init__()
        self.folder = folder
        self.fcompile = fcompile

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        results = []
        for inp in build_inputs:
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                built = tvm.compile(mod, target=inp.target, tir_pipeline=tir_pipeline(inp.target))
                path = Path(tempfile.mkdtemp(prefix="cand-", dir=self.folder)) / "tvm_tmp_mod.so"
                kwargs = {"fcompile": self.fcompile} if self.fcompile is not None else {}
                built.export_library(str(path), **kwargs)
                results.append(BuilderResult(str(path), None))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to build is a failed trial
                results.append(BuilderResult(None, f"ExportBuilder: {type(exc).__name__}: {exc}"))
        return results


def alloc_measure_args(dev, args_json, fill=None) -> list:
    """A candidate's arguments on ``dev`` (local or an RPC session's) from ``ArgInfo.as_json()`` entries: random
    floats (``fill``, else numpy's), but integers all ones: an integer input may be an index (``take``: gathering
    with a random index reads out of bounds and kills the process measuring it) or a divisor; timing does not
    depend on the values."""
    import numpy as np

    rng = np.random.default_rng(0)
    args = []
    for kind, dtype, shape in args_json:
        if kind != "TENSOR":
            raise TargetError(f"cannot allocate a {kind} argument")
        shape = [int(x) for x in shape]
        arr = tvm.runtime.empty(shape=shape, dtype=dtype, device=dev)
        if dtype.startswith(("int", "uint", "bool")):
            arr.copyfrom(np.ones(shape, dtype=dtype))
        elif fill is not None:
            fill(arr)
        else:
            arr.copyfrom(rng.standard_normal(shape).astype(dtype))
        args.append(arr)
    return args


def alloc_ones_for_integers(session, device, args_info, alloc_repeat: int) -> list[list]:
    """RPCRunner's ``f_alloc_argument``: :func:`alloc_measure_args` on the device (integers all ones)."""
    return [alloc_measure_args(device, args_info) for _ in range(alloc_repeat)]


def rpc_runner(address: str, key: str, evaluator: ms.runner.EvaluatorConfig) -> ms.runner.Runner:
    """MetaSchedule's RPCRunner for the devices with ``key`` behind ``address``, one worker per device the
    tracker lists."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    host, port = rpc.parse_address(address)
    total = rpc.devices(address, key)[1]
    if not total:
        raise TargetError(f"the RPC tracker at {address} lists no device with key {key!r}")
    cfg = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=SESSION_TIMEOUT_S)
    runner = RPCRunner(rpc_config=cfg, evaluator_config=evaluator, f_alloc_argument=alloc_ones_for_integers,
                       max_workers=total)
    logger.info("tuning: measuring on %d device(s) with key %r via %s", total, key, address)
    return runner


def busy_text(address: str, key: str) -> str:
    """``devices busy b/n`` for the progress bar (empty when the tracker does not answer)."""
    try:
        free, total = rpc.devices(address, key)
    except Exception:  # noqa: BLE001 - progress only
        return ""
    return f"devices busy {total - free}/{total}"
