"""Executors of a TVM build: the static C executor (no TVM runtime, one planned arena) and the Relax VM."""
