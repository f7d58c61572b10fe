/*
 * semihost.h - ARM semihosting (BKPT 0xAB on Cortex-M) for file and console I/O on QEMU.
 *
 * Run QEMU with `-semihosting-config enable=on,target=native`: file names are relative to QEMU's
 * working directory. No newlib syscalls needed; on real hardware a debugger must serve the calls.
 */
#ifndef QC_SEMIHOST_H_
#define QC_SEMIHOST_H_

#include <stdint.h>

#define QC_SH_READ_BINARY 1
#define QC_SH_WRITE_BINARY 5

/* Returns a handle >= 0, or -1. mode: QC_SH_READ_BINARY or QC_SH_WRITE_BINARY. */
int qc_sh_open(const char *name, int mode);
int qc_sh_close(int handle);
/* Both return the number of bytes transferred. */
uint32_t qc_sh_read(int handle, void *buf, uint32_t len);
uint32_t qc_sh_write(int handle, const void *buf, uint32_t len);
/* Length of an open file in bytes, or -1. */
int32_t qc_sh_flen(int handle);
/* Writes a NUL-terminated string to the debug console (QEMU's stdout). */
void qc_sh_puts(const char *s);
/* Ends the simulation with `code` as QEMU's exit status (SYS_EXIT_EXTENDED). */
void qc_sh_exit(int code) __attribute__((noreturn));

#endif /* QC_SEMIHOST_H_ */
