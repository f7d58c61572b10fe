/*
 * runner.c - batch runner for a qcompile static C model (hosted targets, e.g. AArch64 Linux).
 *
 * usage: runner [IN|-] [OUT|-]
 * Reads samples back to back: for each sample, every input's raw bytes in model order
 * (C-contiguous, little endian); writes every output's raw bytes in model order per sample.
 * Stops cleanly at end of input; one process handles the whole batch (one QEMU start).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static void *alloc_aligned(size_t n) {
  size_t rounded = (n + QC_ALIGN - 1) / QC_ALIGN * QC_ALIGN;
  void *p = aligned_alloc(QC_ALIGN, rounded ? rounded : QC_ALIGN);
  if (p == NULL) {
    fprintf(stderr, "runner: out of memory\n");
    exit(3);
  }
  return p;
}

int main(int argc, char **argv) {
  FILE *in = stdin, *out = stdout;
  void *inputs[QC_NUM_INPUTS > 0 ? QC_NUM_INPUTS : 1];
  void *outputs[QC_NUM_OUTPUTS];
  long samples = 0;
  int i, rc;
  if (argc > 1 && strcmp(argv[1], "-") != 0 && (in = fopen(argv[1], "rb")) == NULL) {
    perror(argv[1]);
    return 3;
  }
  if (argc > 2 && strcmp(argv[2], "-") != 0 && (out = fopen(argv[2], "wb")) == NULL) {
    perror(argv[2]);
    return 3;
  }
  for (i = 0; i < QC_NUM_INPUTS; ++i) inputs[i] = alloc_aligned(qc_input_nbytes[i]);
  for (i = 0; i < QC_NUM_OUTPUTS; ++i) outputs[i] = alloc_aligned(qc_output_nbytes[i]);
  for (;;) {
    for (i = 0; i < QC_NUM_INPUTS; ++i) {
      size_t got = fread(inputs[i], 1, qc_input_nbytes[i], in);
      if (got == 0 && i == 0 && feof(in)) goto done;
      if (got != qc_input_nbytes[i]) {
        fprintf(stderr, "runner: short read for input %s of sample %ld\n", qc_input_names[i], samples);
        return 4;
      }
    }
    rc = qc_model_run((const void *const *)inputs, outputs);
    if (rc != 0) {
      fprintf(stderr, "runner: qc_model_run failed (%d): %s\n", rc, qc_model_last_error());
      return 2;
    }
    for (i = 0; i < QC_NUM_OUTPUTS; ++i) {
      if (fwrite(outputs[i], 1, qc_output_nbytes[i], out) != qc_output_nbytes[i]) {
        perror("runner: write");
        return 3;
      }
    }
    samples++;
#if QC_NUM_INPUTS == 0
    break;
#endif
  }
done:
  fflush(out);
  fprintf(stderr, "runner: samples=%ld arena=%lu workspace_peak=%lu\n", samples,
          (unsigned long)QC_ARENA_BYTES, (unsigned long)qc_model_workspace_peak());
  return 0;
}
