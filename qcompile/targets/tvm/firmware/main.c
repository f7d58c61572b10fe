/*
 * main.c - example firmware for a qcompile model on QEMU mps2-an386 (replace with your application).
 *
 * Batch mode: if `inputs.bin` exists in QEMU's working directory (semihosting), it holds samples back to
 * back (every input's raw little-endian bytes in model order, see model.h); each sample is run once and
 * every output's bytes are appended to `outputs.bin`. Otherwise the model runs once on the example input
 * compiled into example_input.c and the first outputs are printed.
 * With QC_INT8_IO (model.h), the model takes and returns integer tensors: the example shows the whole path,
 * float sample -> qc_quantize_input0 -> qc_model_run_int8 -> qc_dequantize_output0 -> float values.
 * Either way, a last line reports: `qc: samples=N status=S ticks=T stack_used=B stack_size=B arena=B`.
 */
#include <stdint.h>
#include <string.h>

#include "board.h"
#include "model.h"
#include "semihost.h"

#define QC_ROUND(n) (((n) + QC_ALIGN - 1u) / QC_ALIGN * QC_ALIGN)
#define QC_IN_MEM (QC_INPUTS_TOTAL_BYTES > 0 ? QC_INPUTS_TOTAL_BYTES : 1)

extern const uint8_t qc_example_input[];
#if QC_INT8_IO
extern const float qc_example_input0_f32[];
static float out0_f32[QC_OUTPUT0_SIZE];
#endif

static uint8_t in_mem[QC_IN_MEM] __attribute__((aligned(QC_ALIGN)));
static uint8_t out_mem[QC_OUTPUTS_TOTAL_BYTES] __attribute__((aligned(QC_ALIGN)));

static void put_u32(uint32_t v) {
  char buf[11];
  int i = 10;
  buf[i] = '\0';
  do {
    buf[--i] = (char)('0' + v % 10u);
    v /= 10u;
  } while (v != 0u && i > 0);
  qc_sh_puts(buf + i);
}

static void put_i32(int32_t v) {
  if (v < 0) {
    qc_sh_puts("-");
    put_u32((uint32_t)(-(v + 1)) + 1u);
  } else {
    put_u32((uint32_t)v);
  }
}

static void put_f32(float v) { /* 4 decimals, no printf */
  uint32_t scaled, frac;
  char digits[5];
  int i;
  if (v != v) { qc_sh_puts("nan"); return; }
  if (v < 0.0f) { qc_sh_puts("-"); v = -v; }
  if (v > 4.0e9f) { qc_sh_puts("big"); return; }
  scaled = (uint32_t)(v * 10000.0f + 0.5f);
  put_u32(scaled / 10000u);
  frac = scaled % 10000u;
  for (i = 3; i >= 0; --i) { digits[i] = (char)('0' + frac % 10u); frac /= 10u; }
  digits[4] = '\0';
  qc_sh_puts(".");
  qc_sh_puts(digits);
}

static void print_floats(const char *name, const float *f, uint32_t n) {
  uint32_t i, best = 0, shown = n < 16u ? n : 16u;
  qc_sh_puts(name);
  qc_sh_puts(" =");
  for (i = 0; i < shown; ++i) { qc_sh_puts(" "); put_f32(f[i]); }
  for (i = 1; i < n; ++i) if (f[i] > f[best]) best = i;
  qc_sh_puts("\nargmax = ");
  put_u32(best);
  qc_sh_puts("\n");
}

#if !QC_INT8_IO
static void print_output0(const void *data) {
  uint32_t n = qc_output_nbytes[0], i, shown;
  const char *dt = qc_output_dtypes[0];
  if (strcmp(dt, "float32") == 0) {
    print_floats(qc_output_names[0], (const float *)data, n / 4u);
    return;
  }
  qc_sh_puts(qc_output_names[0]);
  qc_sh_puts(" =");
  if (strcmp(dt, "int8") == 0) {
    const int8_t *q = (const int8_t *)data;
    shown = n < 16u ? n : 16u;
    for (i = 0; i < shown; ++i) { qc_sh_puts(" "); put_i32(q[i]); }
  } else if (strcmp(dt, "int32") == 0) {
    const int32_t *q = (const int32_t *)data;
    shown = n / 4u < 16u ? n / 4u : 16u;
    for (i = 0; i < shown; ++i) { qc_sh_puts(" "); put_i32(q[i]); }
  } else {
    qc_sh_puts(" (");
    qc_sh_puts(dt);
    qc_sh_puts(")");
  }
  qc_sh_puts("\n");
}
#endif

/* One inference on the example input; prints the first output. */
static int run_example(const void *const *inputs, void *const *outputs, uint32_t *ticks) {
  uint32_t t0;
  int status;
  memcpy(in_mem, qc_example_input, QC_INPUTS_TOTAL_BYTES);
#if QC_INT8_IO
  /* The int8 API: quantize the float sample with the model.h helper (bit-identical to qcompile's reference),
   * run on the integer tensors, dequantize the first output. */
  qc_quantize_input0(qc_example_input0_f32, (qc_input0_t *)inputs[0]);
  t0 = qc_ticks();
#if QC_NUM_INPUTS == 1 && QC_NUM_OUTPUTS == 1
  status = qc_model_run_int8((const qc_input0_t *)inputs[0], (qc_output0_t *)outputs[0]);
#else
  status = qc_model_run(inputs, outputs);
#endif
  *ticks = qc_ticks() - t0;
  if (status == 0) {
    qc_dequantize_output0((const qc_output0_t *)outputs[0], out0_f32);
    print_floats(QC_OUTPUT0_NAME, out0_f32, QC_OUTPUT0_SIZE);
  }
#else
  t0 = qc_ticks();
  status = qc_model_run(inputs, outputs);
  *ticks = qc_ticks() - t0;
  if (status == 0) print_output0(outputs[0]);
#endif
  return status;
}

int main(void) {
  const void *inputs[QC_NUM_INPUTS > 0 ? QC_NUM_INPUTS : 1];
  void *outputs[QC_NUM_OUTPUTS];
  uint32_t off = 0, samples = 0, ticks = 0, t0;
  int i, status = 0, fin, fout = -1;
  for (i = 0; i < QC_NUM_INPUTS; ++i) {
    inputs[i] = in_mem + off;
    off += QC_ROUND(qc_input_nbytes[i]);
  }
  off = 0;
  for (i = 0; i < QC_NUM_OUTPUTS; ++i) {
    outputs[i] = out_mem + off;
    off += QC_ROUND(qc_output_nbytes[i]);
  }
  qc_ticks_start();
  fin = qc_sh_open("inputs.bin", QC_SH_READ_BINARY);
  if (fin < 0) { /* example mode */
    status = run_example(inputs, outputs, &ticks);
    samples = 1;
  } else {
    fout = qc_sh_open("outputs.bin", QC_SH_WRITE_BINARY);
    if (fout < 0) {
      qc_sh_puts("qc: cannot open outputs.bin\n");
      return 3;
    }
    for (;;) {
      for (i = 0; i < QC_NUM_INPUTS; ++i) {
        uint32_t got = qc_sh_read(fin, (void *)inputs[i], qc_input_nbytes[i]);
        if (got == 0u && i == 0) goto done;
        if (got != qc_input_nbytes[i]) {
          qc_sh_puts("qc: short read in inputs.bin\n");
          return 4;
        }
      }
      t0 = qc_ticks();
      status = qc_model_run(inputs, outputs);
      ticks += qc_ticks() - t0;
      if (status != 0) break;
      for (i = 0; i < QC_NUM_OUTPUTS; ++i) {
        if (qc_sh_write(fout, outputs[i], qc_output_nbytes[i]) != qc_output_nbytes[i]) {
          qc_sh_puts("qc: cannot write outputs.bin\n");
          return 3;
        }
      }
      samples++;
      if (QC_NUM_INPUTS == 0) break;
    }
  done:
    qc_sh_close(fin);
    qc_sh_close(fout);
  }
  if (status != 0) {
    qc_sh_puts("qc: qc_model_run failed: ");
    qc_sh_puts(qc_model_last_error());
    qc_sh_puts("\n");
  }
  qc_sh_puts("qc: samples=");
  put_u32(samples);
  qc_sh_puts(" status=");
  put_i32(status);
  qc_sh_puts(" ticks=");
  put_u32(ticks);
  qc_sh_puts(" stack_used=");
  put_u32(qc_stack_used());
  qc_sh_puts(" stack_size=");
  put_u32(qc_stack_size());
  qc_sh_puts(" arena=");
  put_u32(QC_ARENA_BYTES);
  qc_sh_puts(" workspace_peak=");
  put_u32(qc_model_workspace_peak());
  qc_sh_puts("\n");
  return status == 0 ? 0 : 2;
}
