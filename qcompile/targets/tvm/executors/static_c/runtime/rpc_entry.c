/* qcompile static C executor: the model as a TVM FFI library function, for TVM's RPC server.
 *
 * Linked with model.c into one shared library that `tvm.runtime.load_module` (local or through an RPC session)
 * loads as a library module: `mod["qc_run"](in_0, ..., in_n, out_0, ..., out_m)` runs the model once on tensors
 * allocated on that device (every input, then every output, in model.h's order). It returns 0, or the model's
 * error code (1 + the failing step), or -1 for arguments that are not QC_NUM_INPUTS + QC_NUM_OUTPUTS tensors of
 * the built sizes, aligned to QC_ALIGN: an integer result rather than a raised error, so this file needs nothing
 * from the TVM FFI library but its header's types. QC_RPC_THREADS (default 1): the pool size set on first call.
 */
#include <stddef.h>
#include <stdint.h>
#include <tvm/ffi/c_api.h>

#include "model.h"

#ifndef QC_RPC_THREADS
#define QC_RPC_THREADS 1
#endif

#ifdef QC_THREADS
int qc_set_num_threads(int n);
#endif

static void *qc_tensor_data(const TVMFFIAny *a, uint32_t nbytes) {
  const DLTensor *t = NULL;
  if (a->type_index == kTVMFFIDLTensorPtr) {
    t = (const DLTensor *)a->v_ptr;
  } else if (a->type_index == kTVMFFITensor) {
    t = (const DLTensor *)((const char *)a->v_obj + sizeof(TVMFFIObject));
  }
  if (t == NULL || t->data == NULL) return NULL;
  int64_t n = (t->dtype.bits * t->dtype.lanes + 7) / 8;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  char *p = (char *)t->data + t->byte_offset;
  if (n != (int64_t)nbytes || ((uintptr_t)p % QC_ALIGN) != 0) return NULL;
  return p;
}

int __tvm_ffi_qc_run(void *self, const TVMFFIAny *args, int32_t num_args, TVMFFIAny *result) {
  static int ready = 0;
  const void *in[QC_NUM_INPUTS > 0 ? QC_NUM_INPUTS : 1];
  void *out[QC_NUM_OUTPUTS > 0 ? QC_NUM_OUTPUTS : 1];
  int64_t rc = 0;
  (void)self;
  if (!ready) {
#ifdef QC_THREADS
    if (qc_set_num_threads(QC_RPC_THREADS) != 0) rc = -2;
#endif
    ready = 1;
  }
  if (rc == 0 && num_args != QC_NUM_INPUTS + QC_NUM_OUTPUTS) rc = -1;
  for (int i = 0; rc == 0 && i < QC_NUM_INPUTS; ++i) {
    in[i] = qc_tensor_data(&args[i], qc_input_nbytes[i]);
    if (in[i] == NULL) rc = -1;
  }
  for (int i = 0; rc == 0 && i < QC_NUM_OUTPUTS; ++i) {
    out[i] = qc_tensor_data(&args[QC_NUM_INPUTS + i], qc_output_nbytes[i]);
    if (out[i] == NULL) rc = -1;
  }
  if (rc == 0) rc = qc_model_run(in, out);
  result->type_index = kTVMFFIInt;
  result->zero_padding = 0;
  result->v_int64 = rc;
  return 0;
}
