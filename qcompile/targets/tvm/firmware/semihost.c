/* semihost.c - ARM semihosting calls (see semihost.h). */
#include "semihost.h"

#include <string.h>

#define SYS_OPEN 0x01
#define SYS_CLOSE 0x02
#define SYS_WRITE0 0x04
#define SYS_WRITE 0x05
#define SYS_READ 0x06
#define SYS_FLEN 0x0C
#define SYS_EXIT_EXTENDED 0x20
#define ADP_STOPPED_APPLICATION_EXIT 0x20026

static int32_t sh_call(int32_t op, const void *arg) {
  register int32_t r0 __asm__("r0") = op;
  register const void *r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

int qc_sh_open(const char *name, int mode) {
  uint32_t block[3] = {(uint32_t)name, (uint32_t)mode, (uint32_t)strlen(name)};
  return sh_call(SYS_OPEN, block);
}

int qc_sh_close(int handle) {
  uint32_t block[1] = {(uint32_t)handle};
  return sh_call(SYS_CLOSE, block);
}

uint32_t qc_sh_read(int handle, void *buf, uint32_t len) {
  uint32_t block[3] = {(uint32_t)handle, (uint32_t)buf, len};
  return len - (uint32_t)sh_call(SYS_READ, block); /* the call returns the bytes NOT read */
}

uint32_t qc_sh_write(int handle, const void *buf, uint32_t len) {
  uint32_t block[3] = {(uint32_t)handle, (uint32_t)buf, len};
  return len - (uint32_t)sh_call(SYS_WRITE, block);
}

int32_t qc_sh_flen(int handle) {
  uint32_t block[1] = {(uint32_t)handle};
  return sh_call(SYS_FLEN, block);
}

void qc_sh_puts(const char *s) { sh_call(SYS_WRITE0, s); }

void qc_sh_exit(int code) {
  uint32_t block[2] = {ADP_STOPPED_APPLICATION_EXIT, (uint32_t)code};
  for (;;) sh_call(SYS_EXIT_EXTENDED, block);
}
