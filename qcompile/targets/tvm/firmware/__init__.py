"""Cortex-M firmware: the C project (start-up code, linker script, semihosting I/O, Makefile: the files beside
this package), written, built and run in QEMU by :mod:`.project`; the boards in :mod:`.board`; quantized I/O in
:mod:`.quantized_io`."""
