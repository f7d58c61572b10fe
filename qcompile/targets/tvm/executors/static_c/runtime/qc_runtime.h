/*
 * qc_runtime.h - the few TVM ABI definitions a qcompile static C model needs.
 *
 * Layout-compatible subset of dlpack.h (DLTensor) and tvm/ffi/c_api.h (TVMFFIAny, the
 * packed "safe call" signature) so that the generated model.c builds with any C99
 * compiler (aarch64-linux-gnu-gcc, arm-none-eabi-gcc) without TVM headers.
 */
#ifndef QC_RUNTIME_H_
#define QC_RUNTIME_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
  void *data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t *shape;
  int64_t *strides;
  uint64_t byte_offset;
} DLTensor;

typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union { int64_t v_int64; double v_float64; void *v_ptr; uint64_t v_uint64; };
} TVMFFIAny;

/* tvm/ffi/c_api.h: kTVMFFINone = 0, kTVMFFIDLTensorPtr = 7 */
#define QC_FFI_NONE 0
#define QC_FFI_DLTENSOR_PTR 7

/* TVMFFISafeCallType: what TVM's MakePackedAPI emits for every kernel (__tvm_ffi_<symbol>). */
typedef int (*qc_kernel_fn)(void *self, const TVMFFIAny *args, int32_t num_args, TVMFFIAny *result);

/* Call one packed kernel on `n` DLTensors; returns the kernel's status (0 = ok). */
int qc_call_kernel(qc_kernel_fn fn, DLTensor *const *tensors, int n);

/* Reset the workspace bump allocator (called at the start of every model run). */
void qc_workspace_reset(uint8_t *base, uint32_t size);
uint32_t qc_workspace_peak(void);
const char *qc_last_error(void);
void qc_set_error(const char *msg);

/* Runtime symbols the TVM LLVM kernels reference. */
void TVMFFIErrorSetRaisedFromCStr(const char *kind, const char *message);
void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t num_parts);
void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint);
int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr);

/* Threads for parallel loops: 0 on success; only 1 is accepted unless built with -DQC_THREADS. */
int qc_set_num_threads(int n);

/* tvm/runtime/c_backend_api.h: parallel loops. Run serially here (one task): the static executor is
 * single-threaded, and a kernel with a parallel loop (a tuned schedule) computes the same values. */
typedef struct { void *sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv *penv, void *cdata);
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void *cdata, int num_task);
int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv *penv);

/* Per-step timing for hosted builds compiled with -DQC_PROFILE (tools/tvm_bench.py): model.c brackets every
 * step with these; qc_model_profile_ns() returns the accumulated nanoseconds per step. Empty otherwise. */
#ifdef QC_PROFILE
#include <time.h>
static inline uint64_t qc_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#define QC_PROF_BEGIN() uint64_t qc_prof_t0 = qc_now_ns()
#define QC_PROF_END(i) (qc_profile_ns[i] += qc_now_ns() - qc_prof_t0)
#else
#define QC_PROF_BEGIN() ((void)0)
#define QC_PROF_END(i) ((void)0)
#endif

#ifdef __cplusplus
}
#endif
#endif /* QC_RUNTIME_H_ */
