"""Explicit name -> class tables for passes and observers (targets register in qcompile.targets)."""
from __future__ import annotations

from qcompile.observers import OBSERVERS  # noqa: F401  (re-exported: one place to look names up)
from qcompile.passes.awq import AWQConfig, AWQPass
from qcompile.passes.cle import CLEConfig, CrossLayerEqualizationPass
from qcompile.passes.einsum import EinsumToMatMulPass
from qcompile.passes.eliminate_identity import EliminateIdentityPass
from qcompile.passes.equalize import EqualizeConfig, EqualizePass
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from qcompile.passes.fold_constants import FoldConstantsPass
from qcompile.passes.fuse_bias import FuseConvBiasPass
from qcompile.passes.import_qdq import ImportQDQPass
from qcompile.passes.insert_dynamic import DynamicConfig, InsertDynamicPass
from qcompile.passes.insert_qdq import InsertQDQPass, QDQConfig
from qcompile.passes.log2_softmax import Log2SoftmaxConfig, Log2SoftmaxPass
from qcompile.passes.quantize_embedding import EmbeddingConfig, QuantizeEmbeddingPass
from qcompile.passes.reconstruct import ReconstructConfig, ReconstructWeightsPass
from qcompile.passes.reparam import ReparamConfig, ReparameterizePass
from qcompile.passes.rotate import RotateConfig, RotateResidualPass
from qcompile.passes.smooth import SmoothConfig, SmoothQuantPass
from qcompile.passes.untie import UntieWeightsPass

PASSES: dict[str, tuple[type, type | None]] = {
    EliminateIdentityPass.name: (EliminateIdentityPass, None),
    FoldConstantsPass.name: (FoldConstantsPass, None),
    EinsumToMatMulPass.name: (EinsumToMatMulPass, None),
    FoldBatchNormPass.name: (FoldBatchNormPass, None),
    FuseConvBiasPass.name: (FuseConvBiasPass, None),
    EqualizePass.name: (EqualizePass, EqualizeConfig),
    CrossLayerEqualizationPass.name: (CrossLayerEqualizationPass, CLEConfig),
    SmoothQuantPass.name: (SmoothQuantPass, SmoothConfig),
    RotateResidualPass.name: (RotateResidualPass, RotateConfig),
    ReparameterizePass.name: (ReparameterizePass, ReparamConfig),
    ReconstructWeightsPass.name: (ReconstructWeightsPass, ReconstructConfig),
    AWQPass.name: (AWQPass, AWQConfig),
    Log2SoftmaxPass.name: (Log2SoftmaxPass, Log2SoftmaxConfig),
    InsertQDQPass.name: (InsertQDQPass, QDQConfig),
    InsertDynamicPass.name: (InsertDynamicPass, DynamicConfig),
    QuantizeEmbeddingPass.name: (QuantizeEmbeddingPass, EmbeddingConfig),
    UntieWeightsPass.name: (UntieWeightsPass, None),
    ImportQDQPass.name: (ImportQDQPass, None),
}
