"""TVM targets (issue 7): integer lowering to Relax, x86 and AArch64 builds. The only place that imports tvm."""
