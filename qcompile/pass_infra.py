"""Pass framework: typed contracts, PassResult(graph, modified), a manager with instrument hooks.

Modelled on onnx-ir's ``_pass_infra``: a pass is stateless (configuration fixed at construction, the graph never
kept on ``self``), declares its kind and whether it needs calibration, and may check ``requires``/``ensures``.
Cross-cutting checks (ONNX checker, numerics equivalence, timing, dumps) are instruments on the manager.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.errors import PassError
from qcompile.match import Declined
from qcompile.types import PassKind

logger = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a run provides to passes: the original model, sample inputs, calibration data and results."""

    model: onnx.ModelProto  # the current model header (opsets, IR version); graphs travel separately
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)  # calibration feeds, one dict per sample
    calibration: Any = None  # CalibrationTable once calibrated
    calibrator: Any = None  # callable(graph, ctx) -> CalibrationTable, set by the driver
    records: list[dict] = field(default_factory=list)  # one entry per pass run (filled by the manager)
    # Quantizer parameters decided by earlier passes (reparameterization, weight reconstruction) that the Q/DQ pass
    # must use as they are instead of deriving its own: activation tensor name -> QParams, and weight constant name
    # -> (integer values, QParams). A pass that renames or rewrites such a tensor afterwards must drop its hint.
    qparam_hints: dict[str, Any] = field(default_factory=dict)
    weight_hints: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    # Tensors whose values are already exact on an integer grid (log2 shift operands): the Q/DQ pass leaves them
    # as they are and still quantizes the other input of the node that reads them.
    exact_tensors: set[str] = field(default_factory=set)


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    declined: list[Declined] = field(default_factory=list)


class PassBase(ABC):
    """One graph rewrite. Subclasses set ``name`` and ``kind`` and implement ``call``."""

    name: ClassVar[str]
    kind: ClassVar[PassKind]
    needs_calibration: ClassVar[bool] = False

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PassError if the graph is not a valid input of this pass."""

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PassError if the pass broke its promise."""

    @abstractmethod
    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ...

    def __call__(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)
        result = self.call(graph, ctx)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name} returned {type(result).__name__}, not PassResult")
        self.ensures(result.graph, ctx)
        return result

    def config_dict(self) -> dict:
        cfg = getattr(self, "config", None)
        return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}


class Snapshot:
    """The model a graph stands for between two passes, each form built once on first use and shared: by every
    instrument after a pass, and as the next pass's ``before`` (the graph is unchanged between them). Serializing a
    135M-parameter model and opening an ONNX Runtime session on it take a second each; the instruments needed them
    up to five times a pass. ``freeze`` builds the model before the graph can change again. A pass that leaves the
    graph as it was (``modified`` False) gets the snapshot it started from as its ``after``, already checked
    (``checked``: the checker instrument passed it)."""

    def __init__(self, graph: gs.Graph, header: onnx.ModelProto) -> None:
        self._graph: gs.Graph | None = graph
        self._header = header
        self._model: onnx.ModelProto | None = None
        self._data: bytes | None = None
        self._session = None
        self.checked = False

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            from qcompile.ir import to_model  # local: keeps the import graph one-way at module load

            self._model = to_model(self._graph, self._header)
            self._graph = None
        return self._model

    @property
    def data(self) -> bytes:
        """The serialized model."""
        if self._data is None:
            self._data = self.model.SerializeToString()
        return self._data

    def session(self):
        """An ONNX Runtime session on the model, graph optimizations off (qcompile.numerics.session)."""
        if self._session is None:
            from qcompile import numerics

            self._session = numerics.session(self.data)
        return self._session

    def release(self) -> None:
        """Drops the serialized bytes and the ONNX Runtime session (each as large as the weights); keeps the model."""
        self._data = self._session = None

    @property
    def built(self) -> bool:
        return self._model is not None

    def freeze(self) -> Snapshot:
        self.model  # noqa: B018 - built now, from the graph as it is
        return self


class Instrument:
    """Hooks around every pass. Override what you need. ``before`` (given to instruments that set
    ``needs_before_model``, for equivalence and approximate passes) and ``after`` are the models around the pass."""

    def before_pass(self, p: PassBase, graph: gs.Graph, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: PassBase, before: Snapshot | None, after: Snapshot, result: PassResult,
                   ctx: PassContext, record: dict) -> None:
        pass

    needs_before_model: ClassVar[bool] = False


class PassManager:
    """Runs passes in order, calibrating lazily before the first pass that needs it.

    A pass that reports ``modified`` False hands on the snapshot it started from (when one was built): the instruments
    do not rebuild, re-check or re-run a model they already have. ``verify_unmodified`` (the environment variable
    ``QCOMPILE_VERIFY_UNMODIFIED=1``; the test suite sets it) holds every pass to that claim: the graph it returns is
    serialized and compared byte for byte with the snapshot, and a difference is that pass's error."""

    def __init__(self, passes: Sequence[PassBase], instruments: Sequence[Instrument] = (),
                 verify_unmodified: bool | None = None) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        if verify_unmodified is None:
            verify_unmodified = os.environ.get("QCOMPILE_VERIFY_UNMODIFIED", "") not in ("", "0")
        self.verify_unmodified = verify_unmodified
        self.last: Snapshot | None = None  # after run(): the final graph's snapshot, if one was built

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        last: Snapshot | None = None  # the previous pass's result, if an instrument built it
        for p in self.passes:
            calibrated = False
            if p.needs_calibration and ctx.calibration is None:
                if ctx.calibrator is None or not ctx.samples:
                    raise PassError(f"pass {p.name} needs calibration data; none was given")
                ctx.calibration = ctx.calibrator(graph, ctx)
                calibrated = True
            want_before = any(i.needs_before_model for i in self.instruments)
            before, last = None, (None if calibrated else last)  # calibration may annotate the graph
            if want_before and p.kind in (PassKind.EQUIVALENCE, PassKind.APPROXIMATE):
                before = last if last is not None else Snapshot(graph, ctx.model).freeze()
            prev, last = last, None  # the input's snapshot: kept through the pass only as a model (no session)
            if prev is not None and prev is not before:
                prev.release()
            for inst in self.instruments:
                inst.before_pass(p, graph, ctx)
            logger.info("pass %s", p.name)
            result = p(graph, ctx)
            graph = result.graph
            record = {"pass": p.name, "kind": p.kind.value, "modified": bool(result.modified),
                      "stats": result.stats, "declined": [d.as_dict() for d in result.declined],
                      "config": p.config_dict()}
            start = before if before is not None else prev
            if not result.modified and start is not None and start.built:
                after = start
                if self.verify_unmodified:
                    self._verify_unchanged(p, graph, ctx, start)
            else:
                after = Snapshot(graph, ctx.model)
            for inst in reversed(self.instruments):  # after-hooks unwind like context managers
                inst.after_pass(p, before, after, result, ctx, record)
            last = after if after.built else None  # an unbuilt one would see the next pass's edits
            ctx.records.append(record)
            if result.modified and not p.needs_calibration:
                ctx.calibration = None  # ranges describe the old graph: recalibrate before the next user
        self.last = last
        return graph

    @staticmethod
    def _verify_unchanged(p: PassBase, graph: gs.Graph, ctx: PassContext, start: Snapshot) -> None:
        fresh = Snapshot(graph, ctx.model).model
        if fresh.SerializeToString(deterministic=True) != start.model.SerializeToString(deterministic=True):
            raise PassError(f"pass {p.name} reported no modification but changed the graph")
