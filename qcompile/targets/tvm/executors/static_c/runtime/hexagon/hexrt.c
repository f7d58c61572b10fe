/* hexrt.c - _start, exit, mini libc and compiler helpers for freestanding Hexagon ELFs under qemu-hexagon. */
#include "hexrt.h"
#include <string.h>

int main(int argc, char **argv);

/* Entry: QEMU sets r29 (sp) to the initial stack: [argc, argv[0..], NULL, envp.., NULL, auxv]. Same as musl's
 * crt_arch.h: align sp, pass it to C. */
__asm__(".text\n"
        ".globl _start\n"
        ".type _start,@function\n"
        "_start:\n"
        "  r29 = and(r29, #-16)\n"
        "  r0 = r29\n"
        "  call _start_c\n"
        "  trap0(#0)\n"   /* not reached */
        ".size _start, .-_start\n");

__attribute__((noreturn, used)) void _start_c(long *sp) {
  int argc = (int)sp[0];
  char **argv = (char **)(sp + 1);
  sys_exit(main(argc, argv));
}

__attribute__((noreturn)) void sys_exit(int code) {
  for (;;) hex_syscall(SYS_exit_group, code, 0, 0, 0);
}

/* ---- mini libc. LLVM may call memcpy/memset/memmove even in freestanding code (struct copies, zeroing loops:
 * a TVM kernel's accumulator init becomes memset); 8-byte chunks when aligned. LoopIdiomRecognize never turns
 * the body of a function named memset/memcpy into a call to itself, and -fno-builtin keeps it off elsewhere. ---- */
void *memcpy(void *d, const void *s, size_t n) {
  unsigned char *dp = d; const unsigned char *sp = s;
  if ((((uintptr_t)dp | (uintptr_t)sp) & 7) == 0) {
    for (; n >= 8; n -= 8, dp += 8, sp += 8) *(uint64_t *)dp = *(const uint64_t *)sp;
  }
  while (n--) *dp++ = *sp++;
  return d;
}
void *memmove(void *d, const void *s, size_t n) {
  unsigned char *dp = d; const unsigned char *sp = s;
  if (dp <= sp || dp >= sp + n) return memcpy(d, s, n);
  dp += n; sp += n;
  while (n--) *--dp = *--sp;
  return d;
}
void *memset(void *d, int c, size_t n) {
  unsigned char *dp = d;
  if (((uintptr_t)dp & 7) == 0) {
    uint64_t v = (unsigned char)c * 0x0101010101010101ull;
    for (; n >= 8; n -= 8, dp += 8) *(uint64_t *)dp = v;
  }
  while (n--) *dp++ = (unsigned char)c;
  return d;
}
/* LLVM's Hexagon backend calls this for memcpy of a known size that is a multiple of 8 and >= 32 with 8-aligned
 * operands (compiler-rt: hexagon/memcpy_likely_aligned.S). */
void *__hexagon_memcpy_likely_aligned_min32bytes_mult8bytes(void *d, const void *s, size_t n) {
  uint64_t *dp = d; const uint64_t *sp = s;
  for (n >>= 3; n; --n) *dp++ = *sp++;
  return d;
}
int memcmp(const void *a, const void *b, size_t n) {
  const unsigned char *x = a, *y = b;
  for (; n; --n, ++x, ++y) if (*x != *y) return *x - *y;
  return 0;
}
size_t strlen(const char *s) { size_t n = 0; while (s[n]) ++n; return n; }
char *strncat(char *d, const char *s, size_t n) {
  char *p = d + strlen(d);
  while (n-- && *s) *p++ = *s++;
  *p = 0;
  return d;
}
int strcmp(const char *a, const char *b) {
  while (*a && *a == *b) ++a, ++b;
  return (unsigned char)*a - (unsigned char)*b;
}

/* ---- Hexagon has no integer divide: LLVM calls these compiler-rt helpers (Debian ships no hexagon
 * compiler-rt). Plain shift-subtract, standard calling convention. ---- */
static unsigned long long udivmod64(unsigned long long n, unsigned long long d, unsigned long long *rem) {
  unsigned long long q = 0, r = 0;
  int i;
  if (d == 0) { if (rem) *rem = n; return ~0ull; }
  for (i = 63; i >= 0; --i) {
    r = (r << 1) | ((n >> i) & 1);
    if (r >= d) { r -= d; q |= 1ull << i; }
  }
  if (rem) *rem = r;
  return q;
}
static unsigned udivmod32(unsigned n, unsigned d, unsigned *rem) {
  unsigned q = 0, r = 0;
  int i;
  if (d == 0) { if (rem) *rem = n; return ~0u; }
  for (i = 31; i >= 0; --i) {
    r = (r << 1) | ((n >> i) & 1);
    if (r >= d) { r -= d; q |= 1u << i; }
  }
  if (rem) *rem = r;
  return q;
}
unsigned __hexagon_udivsi3(unsigned n, unsigned d) { return udivmod32(n, d, 0); }
unsigned __hexagon_umodsi3(unsigned n, unsigned d) { unsigned r; udivmod32(n, d, &r); return r; }
int __hexagon_divsi3(int n, int d) {
  unsigned q = udivmod32(n < 0 ? -(unsigned)n : (unsigned)n, d < 0 ? -(unsigned)d : (unsigned)d, 0);
  return ((n < 0) ^ (d < 0)) ? -(int)q : (int)q;
}
int __hexagon_modsi3(int n, int d) {
  unsigned r;
  udivmod32(n < 0 ? -(unsigned)n : (unsigned)n, d < 0 ? -(unsigned)d : (unsigned)d, &r);
  return n < 0 ? -(int)r : (int)r;
}
unsigned long long __hexagon_udivdi3(unsigned long long n, unsigned long long d) { return udivmod64(n, d, 0); }
unsigned long long __hexagon_umoddi3(unsigned long long n, unsigned long long d) {
  unsigned long long r; udivmod64(n, d, &r); return r;
}
long long __hexagon_divdi3(long long n, long long d) {
  unsigned long long q = udivmod64(n < 0 ? -(unsigned long long)n : (unsigned long long)n,
                                   d < 0 ? -(unsigned long long)d : (unsigned long long)d, 0);
  return ((n < 0) ^ (d < 0)) ? -(long long)q : (long long)q;
}
long long __hexagon_moddi3(long long n, long long d) {
  unsigned long long r;
  udivmod64(n < 0 ? -(unsigned long long)n : (unsigned long long)n,
            d < 0 ? -(unsigned long long)d : (unsigned long long)d, &r);
  return n < 0 ? -(long long)r : (long long)r;
}

/* ---- I/O helpers ---- */
void put_str(const char *s) { sys_write(1, s, strlen(s)); }
void put_int(long long v) {
  char b[24]; int i = 23; unsigned long long u = v < 0 ? -(unsigned long long)v : (unsigned long long)v;
  b[i] = 0;
  do { unsigned long long r; u = udivmod64(u, 10, &r); b[--i] = (char)('0' + (int)r); } while (u);
  if (v < 0) b[--i] = '-';
  put_str(b + i);
}
void put_hex(uint32_t v) {
  char b[11]; int i;
  b[0] = '0'; b[1] = 'x'; b[10] = 0;
  for (i = 0; i < 8; ++i) b[2 + i] = "0123456789abcdef"[(v >> (28 - 4 * i)) & 15];
  put_str(b);
}
long read_all(int fd, void *buf, size_t cap) {
  size_t got = 0;
  while (got < cap) {
    long r = sys_read(fd, (char *)buf + got, cap - got);
    if (r < 0) return r;
    if (r == 0) break;
    got += (size_t)r;
  }
  return (long)got;
}
long read_file(const char *path, void *buf, size_t cap) {
  long fd = sys_open(path, O_RDONLY), n;
  if (fd < 0) return fd;
  n = read_all((int)fd, buf, cap);
  sys_close((int)fd);
  return n;
}
