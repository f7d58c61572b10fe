/* hexmath.c - the libm functions and compiler helpers TVM's kernels call on a freestanding Hexagon v66 target (no
 * libc, no libm, no Hexagon compiler-rt in Debian): exactly those the zoo models link against, each exact in IEEE
 * round-to-nearest-even (tests/test_tvm_hexagon.py compares them with numpy). A model needing another one fails to
 * link with its name. */
#include <stdint.h>

static inline float f_abs(float x) { return x < 0.0f ? -x : x; }

/* x + 2^23 - 2^23 rounds to an integer in the current mode (nearest even); |x| >= 2^23 already is one. */
float nearbyintf(float x) {
  const float big = 8388608.0f;
  volatile float t;
  if (!(f_abs(x) < big)) return x; /* also NaN */
  t = f_abs(x) + big;
  t = t - big;
  return x < 0.0f ? -t : (t == 0.0f && x < 0.0f ? -0.0f : t);
}
/* ---- float64 / float32 helpers LLVM calls for Hexagon v66 (no double multiply, no sqrt instruction), exact
 * IEEE round-to-nearest-even (compiler-rt's fp_mul_impl for the multiply; a bitwise integer square root). ---- */
typedef union { double f; uint64_t u; } d_bits;
typedef union { float f; uint32_t u; } f_bits;

#define D_SIG 52
#define D_IMPLICIT (1ull << D_SIG)
#define D_SIG_MASK (D_IMPLICIT - 1ull)
#define D_SIGN (1ull << 63)
#define D_ABS (D_SIGN - 1ull)
#define D_INF (D_ABS ^ D_SIG_MASK)
#define D_QUIET (D_IMPLICIT >> 1)

static int clz64(uint64_t x) {
  int n = 0;
  if (!x) return 64;
  while (!(x & D_SIGN)) { x <<= 1; ++n; }
  return n;
}

static int d_normalize(uint64_t *sig) {
  int shift = clz64(*sig) - clz64(D_IMPLICIT);
  *sig <<= shift;
  return 1 - shift;
}

static void mul64(uint64_t a, uint64_t b, uint64_t *hi, uint64_t *lo) {
  uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
  uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
  *lo = (p00 & 0xffffffffu) | (mid << 32);
  *hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
}

double __hexagon_muldf3(double a, double b) {
  d_bits x = {a}, y = {b}, r;
  unsigned ae = (unsigned)(x.u >> D_SIG) & 0x7ffu, be = (unsigned)(y.u >> D_SIG) & 0x7ffu;
  uint64_t sign = (x.u ^ y.u) & D_SIGN, as = x.u & D_SIG_MASK, bs = y.u & D_SIG_MASK, hi, lo;
  int scale = 0, e;
  if (ae - 1u >= 0x7feu || be - 1u >= 0x7feu) {
    uint64_t aa = x.u & D_ABS, ba = y.u & D_ABS;
    if (aa > D_INF) { r.u = x.u | D_QUIET; return r.f; }
    if (ba > D_INF) { r.u = y.u | D_QUIET; return r.f; }
    if (aa == D_INF) { r.u = ba ? (aa | sign) : (D_INF | D_QUIET); return r.f; }
    if (ba == D_INF) { r.u = aa ? (ba | sign) : (D_INF | D_QUIET); return r.f; }
    if (!aa || !ba) { r.u = sign; return r.f; }
    if (aa < D_IMPLICIT) scale += d_normalize(&as);
    if (ba < D_IMPLICIT) scale += d_normalize(&bs);
  }
  as |= D_IMPLICIT;
  bs |= D_IMPLICIT;
  mul64(as, bs << 11, &hi, &lo);
  e = (int)ae + (int)be - 1023 + scale;
  if (hi & D_IMPLICIT) {
    ++e;
  } else {
    hi = hi << 1 | lo >> 63;
    lo <<= 1;
  }
  if (e >= 0x7ff) { r.u = D_INF | sign; return r.f; }
  if (e <= 0) { /* subnormal: shift right with sticky bits */
    unsigned shift = (unsigned)(1 - e);
    if (shift >= 64) { r.u = sign; return r.f; }
    lo = hi << (64 - shift) | lo >> shift | ((lo << (64 - shift)) != 0);
    hi >>= shift;
  } else {
    hi = (hi & D_SIG_MASK) | (uint64_t)e << D_SIG;
  }
  hi |= sign;
  if (lo > D_SIGN) hi++;
  else if (lo == D_SIGN) hi += hi & 1u;
  r.u = hi;
  return r.f;
}

double floor(double x) {
  d_bits v = {x};
  int e = (int)((v.u >> D_SIG) & 0x7ffu) - 1023;
  uint64_t m;
  if (e >= D_SIG) return x; /* integral, inf or NaN */
  if (e < 0) {
    if ((v.u << 1) == 0) return x;
    return (v.u >> 63) ? -1.0 : 0.0;
  }
  m = D_SIG_MASK >> e;
  if ((v.u & m) == 0) return x;
  if (v.u >> 63) v.u += m;
  v.u &= ~m;
  return v.f;
}

/* the specified float32 exp's k = floor(x log2 e + 1/2) (qcompile/floatspec.py) */
float floorf(float x) {
  f_bits v = {x};
  int e = (int)((v.u >> 23) & 0xffu) - 127;
  uint32_t m;
  if (e >= 23) return x; /* integral, inf or NaN */
  if (e < 0) {
    if ((v.u << 1) == 0) return x;
    return (v.u >> 31) ? -1.0f : 0.0f;
  }
  m = 0x7fffffu >> e;
  if ((v.u & m) == 0) return x;
  if (v.u >> 31) v.u += m;
  v.u &= ~m;
  return v.f;
}

float __hexagon_sqrtf(float x) {
  f_bits v = {x};
  int e = (int)((v.u >> 23) & 0xffu);
  uint64_t m = v.u & 0x7fffffu, n, res = 0, bit = 1ull << 62;
  if (x != x || x == 0.0f || v.u == 0x7f800000u) return x;
  if (v.u >> 31) { v.u = 0x7fc00000u; return v.f; }
  if (e == 0) { /* subnormal */
    e = 1;
    while (!(m & 0x800000u)) { m <<= 1; --e; }
  } else {
    m |= 0x800000u;
  }
  e -= 127; /* x = m * 2^(e - 23), m in [2^23, 2^24) */
  if (e & 1) m <<= 1;
  e >>= 1; /* floor(e / 2); x = m * 2^(2e - 23) */
  n = m << 23; /* sqrt(n) = sqrt(x) * 2^(23 - e) */
  while (bit > n) bit >>= 2;
  while (bit) {
    if (n >= res + bit) { n -= res + bit; res = (res >> 1) + bit; } else { res >>= 1; }
    bit >>= 2;
  }
  if (n > res) res++; /* remainder above q: the exact root is above q + 1/2 */
  if (res >> 24) { res >>= 1; ++e; }
  v.u = (uint32_t)(e + 127) << 23 | ((uint32_t)res & 0x7fffffu);
  return v.f;
}
float sqrtf(float x) { return __hexagon_sqrtf(x); }
