/*
 * bare_main.c - smoke entry point for bare-metal builds (Cortex-M, newlib, no OS).
 *
 * Runs the model once on zero inputs held in static, aligned buffers and returns the status.
 * A real firmware (QEMU mps2-an386 semihosting / UART I/O) replaces this file.
 */
#include <stdint.h>

#include "model.h"

#define QC_IN_TOTAL (QC_INPUTS_TOTAL_BYTES > 0 ? QC_INPUTS_TOTAL_BYTES : 1)
static uint8_t qc_in_mem[QC_IN_TOTAL] __attribute__((aligned(QC_ALIGN)));
static uint8_t qc_out_mem[QC_OUTPUTS_TOTAL_BYTES] __attribute__((aligned(QC_ALIGN)));

int main(void) {
  const void *inputs[QC_NUM_INPUTS > 0 ? QC_NUM_INPUTS : 1];
  void *outputs[QC_NUM_OUTPUTS];
  uint32_t off = 0;
  int i;
  for (i = 0; i < QC_NUM_INPUTS; ++i) {
    inputs[i] = qc_in_mem + off;
    off += (qc_input_nbytes[i] + QC_ALIGN - 1) / QC_ALIGN * QC_ALIGN;
  }
  off = 0;
  for (i = 0; i < QC_NUM_OUTPUTS; ++i) {
    outputs[i] = qc_out_mem + off;
    off += (qc_output_nbytes[i] + QC_ALIGN - 1) / QC_ALIGN * QC_ALIGN;
  }
  return qc_model_run(inputs, outputs);
}
