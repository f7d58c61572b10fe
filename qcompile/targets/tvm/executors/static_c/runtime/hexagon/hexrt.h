/* hexrt.h - freestanding Hexagon Linux (qemu-hexagon) runtime: syscalls + tiny I/O helpers. */
#ifndef HEXRT_H_
#define HEXRT_H_
#include <stddef.h>
#include <stdint.h>

/* asm-generic syscall numbers (Hexagon Linux uses the generic table; QEMU linux-user implements it). */
#define SYS_openat 56
#define SYS_close 57
#define SYS_read 63
#define SYS_write 64
#define SYS_exit 93
#define SYS_exit_group 94
#define AT_FDCWD (-100)
#define O_RDONLY 0

/* ABI: number in r6, arguments in r0..r5, result (or -errno) in r0; `trap0(#0)` (QEMU ignores the immediate;
 * musl uses #1). */
static inline long hex_syscall(long n, long a, long b, long c, long d) {
  register long r0 __asm__("r0") = a;
  register long r1 __asm__("r1") = b;
  register long r2 __asm__("r2") = c;
  register long r3 __asm__("r3") = d;
  register long r6 __asm__("r6") = n;
  __asm__ volatile("trap0(#0)" : "+r"(r0) : "r"(r1), "r"(r2), "r"(r3), "r"(r6) : "memory");
  return r0;
}

static inline long sys_write(int fd, const void *buf, size_t n) { return hex_syscall(SYS_write, fd, (long)buf, (long)n, 0); }
static inline long sys_read(int fd, void *buf, size_t n) { return hex_syscall(SYS_read, fd, (long)buf, (long)n, 0); }
static inline long sys_open(const char *path, int flags) { return hex_syscall(SYS_openat, AT_FDCWD, (long)path, flags, 0); }
static inline long sys_close(int fd) { return hex_syscall(SYS_close, fd, 0, 0, 0); }
__attribute__((noreturn)) void sys_exit(int code);

/* helpers (hexrt.c) */
void put_str(const char *s);                    /* stdout */
void put_int(long long v);                      /* stdout, decimal */
void put_hex(uint32_t v);
long read_all(int fd, void *buf, size_t cap);   /* loops until EOF or cap; returns bytes or -errno */
long read_file(const char *path, void *buf, size_t cap);
#endif
