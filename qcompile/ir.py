"""ONNX <-> onnx-graphsurgeon graph, opset handling, safe external data and atomic saves.

Every model enters through :func:`load_model`, which refuses what qcompile cannot handle safely (missing or
corrupt files, external-data paths escaping the model folder, opsets below 11 or beyond what ONNX knows) and
upgrades opsets 11-12 to 13 (the first opset with per-axis Quantize/DequantizeLinear).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from qcompile import upcast
from qcompile.errors import ModelError
from qcompile.protos import iter_graph_protos

logger = logging.getLogger(__name__)

MIN_OPSET = 11
TARGET_MIN_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    base = base.resolve()
    for tensor in _iter_all_initializers(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise ModelError(f"external data of tensor {tensor.name!r} points outside the model folder: {loc!r}")
        if not target.is_file():
            raise ModelError(f"external data file of tensor {tensor.name!r} is missing: {loc!r}")


def _iter_all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for g in iter_graph_protos(graph):
        yield from g.initializer
        for node in g.node:
            yield from (attr.t for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    raise ModelError("model has no default-domain opset import")


def used_domains(graph: onnx.GraphProto) -> set[str]:
    return {node.domain for g in iter_graph_protos(graph) for node in g.node}


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load, validate and normalize a model (external data inside its folder, opset >= 13, no unused imports)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"cannot parse {p} as an ONNX model: {type(exc).__name__}: {exc}") from None
    if not model.graph.node:
        raise ModelError(f"{p} holds no graph nodes (corrupt or not an ONNX model)")
    _check_external_data(model, p.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:
        raise ModelError(f"cannot load external data of {p}: {exc}") from None
    return normalize(model)


def dynamic_negative_dims(model: onnx.ModelProto) -> int:
    """Make every declared dimension ONNX Runtime reads as dynamic a symbolic one; returns how many changed.

    Exporters write ``dim_value: -1`` (or another negative value) for a dynamic axis; ONNX Runtime treats a negative
    dim as unknown, while ONNX's shape inference and our own readers would take it as a fixed size. Such a dim becomes
    ``dim_param: "unk__<i>"``: graph inputs, outputs and value_info, in every subgraph too."""
    n = 0
    for g in iter_graph_protos(model.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                continue
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.dim_param = f"unk__{n}"  # a oneof: clears dim_value
                    n += 1
    return n


def unique_node_names(model: onnx.ModelProto) -> int:
    """Name every node that has no name, or a name an earlier node took (in subgraphs too): ``<op>_<i>``, unused
    elsewhere. Passes and reports address nodes by name; hand-built graphs and some converters leave names empty,
    and two unnamed compute nodes were one node to the Q/DQ plan (a KeyError in insert_qdq). Returns how many."""
    graphs = list(iter_graph_protos(model.graph))
    taken = {n.name for g in graphs for n in g.node if n.name}
    seen: set[str] = set()
    renamed = 0
    for g in graphs:
        for i, n in enumerate(g.node):
            if n.name and n.name not in seen:
                seen.add(n.name)
                continue
            base, k = f"{n.op_type}_{i}", 0
            name = base
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            n.name = name
            taken.add(name)
            seen.add(name)
            renamed += 1
    return renamed


# ONNX ops defined by a function of simpler ops that the passes, the integer reference and TVM's importer do not read
# as such (opset 23: torch.onnx's dynamo exporter writes the first three for F.scaled_dot_product_attention, nn.RMSNorm
# and rotary embeddings when asked for opset 23, and at opset 20-22 the same computation in primitive ops; TVM 0.27
# imports none of them but RMSNormalization, nor Celu (nn.CELU, opset 12) or Swish (opset 24))
EXPANDED_OPS = ("Attention", "RMSNormalization", "RotaryEmbedding", "Celu", "Swish")
_EXPAND_DOMAIN = "qcompile.expanded"


def _expand_function_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every :data:`EXPANDED_OPS` node by its ONNX function body (the schema's context-dependent function,
    built for the node's attributes and input types, then inlined): one graph of primitive ops whatever opset the
    exporter chose, which every pass and target reads."""
    nodes = [n for g in iter_graph_protos(model.graph) for n in g.node
             if n.op_type in EXPANDED_OPS and n.domain in DEFAULT_DOMAINS]
    if not nodes:
        return model
    kinds = ", ".join(sorted({n.op_type for n in nodes}))
    opset = default_opset(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the input types below say what is missing
        inferred = model
    types = {v.name: v.type for g in iter_graph_protos(inferred.graph)
             for v in (*g.input, *g.value_info, *g.output)}
    for g in iter_graph_protos(model.graph):
        for t in g.initializer:
            types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    empty = onnx.TypeProto().SerializeToString()
    for i, node in enumerate(nodes):
        missing = [x for x in node.input if x and x not in types]
        if missing:
            raise ModelError(f"cannot expand {node.op_type} node {node.name!r} into primitive ops: the type of "
                             f"{missing[0]!r} is unknown")
        schema = onnx.defs.get_schema(node.op_type, opset, "")
        try:
            if schema.has_context_dependent_function:  # built for this node: its attributes are in the body
                body = onnx.FunctionProto.FromString(schema.get_context_dependent_function(
                    node.SerializeToString(), [types[x].SerializeToString() if x else empty for x in node.input]))
                del node.attribute[:]
            else:  # one body for every node: the node's attributes (or the schema's defaults) fill its references
                body = onnx.FunctionProto()
                body.CopyFrom(schema.function_body)
                given = {a.name for a in node.attribute}
                for name, attr in schema.attributes.items():
                    if name not in given and attr.default_value.type:
                        node.attribute.append(attr.default_value)
                body.attribute[:] = []
                body.attribute.extend(sorted(schema.attributes))
        except Exception as exc:  # noqa: BLE001 - onnx's own error, one line
            raise ModelError(f"cannot expand {node.op_type} node {node.name!r} into primitive ops: "
                             f"{str(exc).splitlines()[0]}") from None
        body.name, body.domain = f"{node.op_type}_{i}", _EXPAND_DOMAIN
        if not any(o.domain in DEFAULT_DOMAINS for o in body.opset_import):
            body.opset_import.append(onnx.helper.make_opsetid("", opset))
        node.op_type, node.domain = body.name, _EXPAND_DOMAIN
        model.functions.append(body)
    model.opset_import.append(onnx.helper.make_opsetid(_EXPAND_DOMAIN, 1))
    try:  # the inliner converting a body's opset needs the types of the values around the call
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the inliner then says what it lacks
        pass
    logger.info("expanded %d node(s) of %s into their ONNX function bodies", len(nodes), kinds)
    return model


def _inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its model-local functions inlined (onnx.inliner): a function call (TorchScript's
    ``export_modules_as_functions``, onnxscript) is opaque to the passes, and neither the integer reference nor TVM's
    importer runs one."""
    from onnx import inliner

    names = sorted({f"{f.domain}.{f.name}" if f.domain else f.name for f in model.functions})
    try:
        model = inliner.inline_local_functions(model, convert_version=True)
    except Exception as exc:  # noqa: BLE001 - onnx's own error, one line
        raise ModelError(f"cannot inline the model's local functions ({', '.join(names)}): "
                         f"{str(exc).splitlines()[0]}") from None
    logger.info("inlined the model's local functions: %s", ", ".join(names))
    return model


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline model-local functions, drop unused custom-domain imports, negative dims -> symbolic, name unnamed
    nodes, compute a half-precision model in float32 (:mod:`qcompile.upcast`), upgrade opsets 11-12 to 13, refuse
    unsupported opsets."""
    opset = default_opset(model)
    max_known = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise ModelError(f"unsupported opset {opset}: qcompile needs opset {MIN_OPSET} or newer (re-export the model)")
    if opset > max_known:
        raise ModelError(f"unsupported opset {opset}: this ONNX knows opsets up to {max_known}")
    model = _expand_function_ops(model)
    if model.functions:
        model = _inline_functions(model)
    used = used_domains(model.graph)
    keep = [imp for imp in model.opset_import if imp.domain in DEFAULT_DOMAINS or imp.domain in used]
    dropped = [imp.domain for imp in model.opset_import if imp not in keep]
    if dropped:
        logger.info("dropping unused opset imports: %s", ", ".join(dropped))
        del model.opset_import[:]
        model.opset_import.extend(keep)
    if dynamic_negative_dims(model):
        logger.info("negative declared dims read as dynamic (as ONNX Runtime reads them)")
    if unique_node_names(model):
        logger.info("named the model's unnamed (or twice-named) nodes")
    upcast.to_float32(model)
    if opset < TARGET_MIN_OPSET:
        logger.info("upgrading opset %d -> %d", opset, TARGET_MIN_OPSET)
        try:
            model = version_converter.convert_version(model, TARGET_MIN_OPSET)
        except Exception as exc:
            raise ModelError(f"cannot upgrade opset {opset} to {TARGET_MIN_OPSET}: {exc}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph; keep opset imports, IR version and metadata of `like` where given."""
    model = gs.export_onnx(graph, do_type_check=False)
    if like is not None:
        opsets = {imp.domain: imp.version for imp in like.opset_import}
        for imp in model.opset_import:
            opsets.setdefault(imp.domain, imp.version)
        if graph.opset and opsets.get("", 0) < graph.opset:
            opsets[""] = graph.opset
        del model.opset_import[:]
        for dom in sorted(opsets):
            model.opset_import.append(onnx.helper.make_opsetid(dom, opsets[dom]))
        model.ir_version = max(like.ir_version, model.ir_version)
        model.producer_name = "qcompile"
    return model


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                yield from iter_graphs(attr)
            elif isinstance(attr, (list, tuple)):
                for a in attr:
                    if isinstance(a, gs.Graph):
                        yield from iter_graphs(a)


def if_branches(graph: gs.Graph) -> Iterator[tuple[gs.Node, str, gs.Graph]]:
    """(If node, "then_branch"/"else_branch", branch graph) for every If reachable through If branches only."""
    for node in graph.nodes:
        if node.op != "If":
            continue
        for key in ("then_branch", "else_branch"):
            branch = node.attrs.get(key)
            if isinstance(branch, gs.Graph):
                yield node, key, branch
                yield from if_branches(branch)


def outer_inputs(branch: gs.Graph) -> list[gs.Tensor]:
    """Tensors a subgraph (and its nested subgraphs) reads from enclosing scopes, in first-use order."""
    produced = {t.name for g in iter_graphs(branch) for n in g.nodes for t in n.outputs}
    produced |= {t.name for g in iter_graphs(branch) for t in g.inputs}
    out: dict[str, gs.Tensor] = {}
    for g in iter_graphs(branch):
        for n in g.nodes:
            for t in n.inputs:
                if t.name and not isinstance(t, gs.Constant) and t.name not in produced:
                    out.setdefault(t.name, t)
        for t in g.outputs:
            if not isinstance(t, gs.Constant) and t.name not in produced:
                out.setdefault(t.name, t)
    return list(out.values())


def branch_as_model(branch: gs.Graph, header: onnx.ModelProto) -> onnx.ModelProto:
    """A standalone model computing `branch`, its outer-scope reads turned into graph inputs."""
    g = gs.Graph(nodes=list(branch.nodes), inputs=outer_inputs(branch), outputs=list(branch.outputs),
                 name=branch.name or "branch", opset=branch.opset)
    return to_model(g, header)


class NameScope:
    """Fresh tensor/node names, unique across a model and all its subgraphs (SSA holds across scopes)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.names = {t for g in iter_graphs(graph) for t in g.tensors()}
        self.names |= {n.name for g in iter_graphs(graph) for n in g.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name


def subgraph_node_count(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in iter_graphs(graph)) - len(graph.nodes)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object]) -> None:
    """``writer(tmp)`` writes a temp file in the same folder, which then replaces ``path`` (never a half-written
    file). The file gets the permissions a plain open() would give it under the user's umask (mkstemp makes 0600)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=p.suffix, dir=p.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save atomically. Models over 1.8 GB go to one external-data file beside the model."""
    p = Path(path)
    if model.ByteSize() < 1_800_000_000:
        atomic_write_bytes(p, model.SerializeToString(deterministic=True))
        return
    data_name = p.name + ".data"
    onnx.save_model(model, str(p) + ".tmp", save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name + ".tmp")
    os.replace(p.parent / (data_name + ".tmp"), p.parent / data_name)
    m = onnx.load(str(p) + ".tmp", load_external_data=False)
    for t in _iter_all_initializers(m.graph):
        for e in t.external_data:
            if e.key == "location":
                e.value = data_name
    os.unlink(str(p) + ".tmp")
    atomic_write_bytes(p, m.SerializeToString(deterministic=True))
