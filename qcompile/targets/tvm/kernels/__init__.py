"""Kernels per ISA (TIR PrimFuncs, tensor intrinsics, the Relax rewrites that call them) and the ISA-independent
rebuilds of float regions (certified erf, row softmax, separable pooling)."""
