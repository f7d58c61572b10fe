/* Reads (op, a, b) records from stdin and writes the helper's result bits (tests/test_tvm_hexagon.py compares them
 * with numpy). op: 0 __hexagon_muldf3(a, b) on doubles, 1 floor(a), 2 __hexagon_sqrtf((float)a bits),
 * 3 nearbyintf, 4 floorf. Records: uint32 op, uint32 pad, uint64 a bits, uint64 b bits. */
#include <stdint.h>
#include <string.h>

#include "hexrt.h"

double __hexagon_muldf3(double a, double b);
double floor(double x);
float __hexagon_sqrtf(float x);
float nearbyintf(float x);
float floorf(float x);

typedef struct { uint32_t op, pad; uint64_t a, b; } rec_t;
static rec_t recs[4096];
static uint64_t out[4096];

int main(int argc, char **argv) {
  long n = read_all(0, recs, sizeof recs) / (long)sizeof(rec_t), i;
  (void)argc; (void)argv;
  for (i = 0; i < n; ++i) {
    union { double d; uint64_t u; } a, b, r;
    union { float f; uint32_t u; } fa, fr;
    a.u = recs[i].a; b.u = recs[i].b; fa.u = (uint32_t)recs[i].a;
    r.u = 0;
    switch (recs[i].op) {
      case 0: r.d = __hexagon_muldf3(a.d, b.d); break;
      case 1: r.d = floor(a.d); break;
      case 2: fr.f = __hexagon_sqrtf(fa.f); r.u = fr.u; break;
      case 3: fr.f = nearbyintf(fa.f); r.u = fr.u; break;
      default: fr.f = floorf(fa.f); r.u = fr.u; break;
    }
    out[i] = r.u;
  }
  sys_write(1, out, (size_t)n * sizeof(uint64_t));
  return 0;
}
