/*
 * qc_runtime.c - static replacement for the parts of the TVM runtime that compiled kernels call.
 *
 * No malloc: kernel workspaces (TVMBackendAllocWorkspace) come from one fixed buffer owned by
 * model.c, handed out LIFO by a bump allocator; errors are kept in a fixed string buffer.
 * Single-threaded by design: a parallel loop (hosted builds only) runs as one task.
 */
#include "qc_runtime.h"

#include <string.h>

#define QC_WS_ALIGN 64u
#define QC_WS_MAX_LIVE 64
#define QC_MAX_KERNEL_ARGS 64

static uint8_t *ws_base;
static uint32_t ws_size, ws_top, ws_peak;
static uint32_t ws_stack[QC_WS_MAX_LIVE];
static uint8_t ws_freed[QC_WS_MAX_LIVE];
static int ws_depth;
static char err_buf[256];

void qc_workspace_reset(uint8_t *base, uint32_t size) {
  ws_base = base;
  ws_size = size;
  ws_top = 0;
  ws_depth = 0;
}

uint32_t qc_workspace_peak(void) { return ws_peak; }

const char *qc_last_error(void) { return err_buf; }

static void err_append(const char *s) {
  size_t used = strlen(err_buf);
  if (s == NULL || used + 1 >= sizeof(err_buf)) return;
  strncat(err_buf, s, sizeof(err_buf) - used - 1);
}

void qc_set_error(const char *msg) {
  err_buf[0] = '\0';
  err_append(msg);
}

void TVMFFIErrorSetRaisedFromCStr(const char *kind, const char *message) {
  err_buf[0] = '\0';
  err_append(kind);
  err_append(": ");
  err_append(message);
}

void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t num_parts) {
  int32_t i;
  err_buf[0] = '\0';
  err_append(kind);
  err_append(": ");
  for (i = 0; i < num_parts; ++i) err_append(parts[i]);
}

void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  uint32_t start = (ws_top + QC_WS_ALIGN - 1u) & ~(QC_WS_ALIGN - 1u);
  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;
  if (ws_depth >= QC_WS_MAX_LIVE || nbytes > (uint64_t)(ws_size - (start < ws_size ? start : ws_size)) ||
      start > ws_size) {
    qc_set_error("TVMBackendAllocWorkspace: static workspace exhausted");
    return NULL;
  }
  ws_stack[ws_depth] = ws_top;
  ws_freed[ws_depth] = 0;
  ws_depth++;
  ws_top = start + (uint32_t)nbytes;
  if (ws_top > ws_peak) ws_peak = ws_top;
  return ws_base + start;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {
  int i;
  (void)device_type; (void)device_id;
  for (i = ws_depth - 1; i >= 0; --i) {
    uint32_t prev_top = ws_stack[i];
    uint32_t start = (prev_top + QC_WS_ALIGN - 1u) & ~(QC_WS_ALIGN - 1u);
    if (ws_base + start == (uint8_t *)ptr && !ws_freed[i]) {
      ws_freed[i] = 1;
      while (ws_depth > 0 && ws_freed[ws_depth - 1]) ws_top = ws_stack[--ws_depth];
      return 0;
    }
  }
  qc_set_error("TVMBackendFreeWorkspace: unknown pointer");
  return -1;
}

int qc_call_kernel(qc_kernel_fn fn, DLTensor *const *tensors, int n) {
  TVMFFIAny args[QC_MAX_KERNEL_ARGS];
  TVMFFIAny result;
  int i;
  if (n > QC_MAX_KERNEL_ARGS) {
    qc_set_error("qc_call_kernel: too many arguments");
    return -1;
  }
  for (i = 0; i < n; ++i) {
    memset(&args[i], 0, sizeof(args[i]));
    args[i].type_index = QC_FFI_DLTENSOR_PTR;
    args[i].v_ptr = tensors[i];
  }
  memset(&result, 0, sizeof(result));
  result.type_index = QC_FFI_NONE;
  return fn(NULL, args, n, &result);
}

int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void *cdata, int num_task) {
  TVMParallelGroupEnv env;
  (void)num_task;
  env.sync_handle = NULL;
  env.num_task = 1;
  return flambda(0, &env, cdata);
}

int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv *penv) {
  (void)task_id; (void)penv;
  return 0;
}

/*
 * TVM's LLVM codegen calls the workspace API through weak function-pointer variables
 * (`__TVMBackendAllocWorkspace`, `__TVMBackendFreeWorkspace`, defined NULL in kernels.o and
 * normally filled in by the DSO loader). These strong definitions replace them at static link.
 */
void *(*__TVMBackendAllocWorkspace)(int, int, uint64_t, int, int) = TVMBackendAllocWorkspace;
int (*__TVMBackendFreeWorkspace)(int, int, void *) = TVMBackendFreeWorkspace;
int (*__TVMBackendParallelLaunch)(FTVMParallelLambda, void *, int) = TVMBackendParallelLaunch;
int (*__TVMBackendParallelBarrier)(int, TVMParallelGroupEnv *) = TVMBackendParallelBarrier;
