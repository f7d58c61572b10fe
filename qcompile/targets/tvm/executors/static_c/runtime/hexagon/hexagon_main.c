/*
 * hexagon_main.c - batch runner of a qcompile static C model for freestanding Hexagon Linux (qemu-hexagon).
 *
 * The same protocol as runner.c, without libc: samples back to back on stdin (every input's raw bytes in model
 * order), every output's raw bytes per sample on stdout, one summary line on stderr; syscalls via hexrt.h.
 * Buffers are static and 128-byte aligned (HVX vector loads ignore the low address bits).
 */
#include <stdint.h>
#include <string.h> /* hexagon/string.h: the few functions hexrt.c defines */

#include "hexrt.h"
#include "model.h"

#define IO_ALIGN 128u
#define SLOT(n) ((((n) + IO_ALIGN - 1u) / IO_ALIGN) * IO_ALIGN)

static uint8_t in_buf[QC_INPUTS_TOTAL_BYTES + (QC_NUM_INPUTS + 1) * IO_ALIGN] __attribute__((aligned(128)));
static uint8_t out_buf[QC_OUTPUTS_TOTAL_BYTES + (QC_NUM_OUTPUTS + 1) * IO_ALIGN] __attribute__((aligned(128)));

static void err(const char *s) { sys_write(2, s, strlen(s)); }

static void err_num(long v) {
  char b[24];
  int i = 23;
  unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;
  b[i] = 0;
  do { b[--i] = (char)('0' + (int)(u % 10u)); u /= 10u; } while (u);
  if (v < 0) b[--i] = '-';
  err(b + i);
}

static int write_all(const void *p, uint32_t n) {
  const uint8_t *c = p;
  while (n) {
    long w = sys_write(1, c, n);
    if (w <= 0) return -1;
    c += w;
    n -= (uint32_t)w;
  }
  return 0;
}

int main(int argc, char **argv) {
  void *inputs[QC_NUM_INPUTS > 0 ? QC_NUM_INPUTS : 1];
  void *outputs[QC_NUM_OUTPUTS];
  uint32_t off = 0;
  long samples = 0;
  int i, rc;
  (void)argc; (void)argv;
  for (i = 0; i < QC_NUM_INPUTS; ++i) { inputs[i] = in_buf + off; off += SLOT(qc_input_nbytes[i]); }
  for (off = 0, i = 0; i < QC_NUM_OUTPUTS; ++i) { outputs[i] = out_buf + off; off += SLOT(qc_output_nbytes[i]); }
  for (;;) {
    for (i = 0; i < QC_NUM_INPUTS; ++i) {
      long got = read_all(0, inputs[i], qc_input_nbytes[i]);
      if (got == 0 && i == 0) goto done;
      if (got != (long)qc_input_nbytes[i]) {
        err("runner: short read for input ");
        err(qc_input_names[i]);
        err("\n");
        return 4;
      }
    }
    rc = qc_model_run((const void *const *)inputs, outputs);
    if (rc != 0) {
      err("runner: qc_model_run failed: ");
      err(qc_model_last_error());
      err("\n");
      return 2;
    }
    for (i = 0; i < QC_NUM_OUTPUTS; ++i)
      if (write_all(outputs[i], qc_output_nbytes[i]) != 0) return 3;
    samples++;
#if QC_NUM_INPUTS == 0
    break;
#endif
  }
done:
  err("runner: samples=");
  err_num(samples);
  err(" arena=");
  err_num((long)QC_ARENA_BYTES);
  err(" workspace_peak=");
  err_num((long)qc_model_workspace_peak());
  err("\n");
  return 0;
}
