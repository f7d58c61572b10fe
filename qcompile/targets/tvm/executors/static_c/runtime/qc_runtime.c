/*
 * qc_runtime.c - static replacement for the parts of the TVM runtime that compiled kernels call.
 *
 * No malloc: kernel workspaces (TVMBackendAllocWorkspace) come from one fixed buffer owned by
 * model.c, handed out LIFO by a bump allocator; errors are kept in a fixed string buffer.
 * Single-threaded unless built with -DQC_THREADS (hosted builds): then a parallel loop runs on a small pthread
 * pool (qc_set_num_threads) and each thread allocates from its own slice of the workspace.
 */
#include "qc_runtime.h"

#include <string.h>

#define QC_WS_ALIGN 64u
#define QC_WS_MAX_LIVE 64
#define QC_MAX_KERNEL_ARGS 64

#ifdef QC_THREADS
#define QC_WS_SLOTS 64 /* = QC_MAX_THREADS */
static _Thread_local int ws_slot; /* pool worker i uses slice i, the caller slice 0 */
#else
#define QC_WS_SLOTS 1
#define ws_slot 0
#endif

/* One LIFO bump allocator per thread, each over its own slice of the step's workspace: parallel tasks never
 * share a stack, and no lock is needed. */
typedef struct {
  uint32_t top, depth;
  uint32_t stack[QC_WS_MAX_LIVE];
  uint8_t freed[QC_WS_MAX_LIVE];
} qc_ws_state;

static uint8_t *ws_base;
static uint32_t ws_size, ws_peak;
static qc_ws_state ws[QC_WS_SLOTS];
static char err_buf[256];

static int qc_num_slices(void);

void qc_workspace_reset(uint8_t *base, uint32_t size) {
  int i, n = qc_num_slices();
  ws_base = base;
  ws_size = n > 1 ? (size / (uint32_t)n) & ~(QC_WS_ALIGN - 1u) : size;
  for (i = 0; i < n; ++i) ws[i].top = ws[i].depth = 0;
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
  qc_ws_state *w = &ws[ws_slot];
  uint8_t *base = ws_base + (uint32_t)ws_slot * ws_size;
  uint32_t start = (w->top + QC_WS_ALIGN - 1u) & ~(QC_WS_ALIGN - 1u);
  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;
  if (w->depth >= QC_WS_MAX_LIVE || start > ws_size || nbytes > (uint64_t)(ws_size - start)) {
    qc_set_error("TVMBackendAllocWorkspace: static workspace exhausted");
    return NULL;
  }
  w->stack[w->depth] = w->top;
  w->freed[w->depth++] = 0;
  w->top = start + (uint32_t)nbytes;
  if (w->top > ws_peak) ws_peak = w->top;
  return base + start;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {
  qc_ws_state *w = &ws[ws_slot];
  uint8_t *base = ws_base + (uint32_t)ws_slot * ws_size;
  uint32_t i;
  (void)device_type; (void)device_id;
  for (i = w->depth; i-- > 0;) { /* usually the last one; an earlier one is popped once all above it are freed */
    if (!w->freed[i] && base + ((w->stack[i] + QC_WS_ALIGN - 1u) & ~(QC_WS_ALIGN - 1u)) == (uint8_t *)ptr) {
      w->freed[i] = 1;
      while (w->depth > 0 && w->freed[w->depth - 1]) w->top = w->stack[--w->depth];
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

#ifndef QC_THREADS
int qc_set_num_threads(int n) { return n == 1 ? 0 : -1; }

static int qc_num_slices(void) { return 1; }

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
#else
/*
 * Hosted builds (-DQC_THREADS -pthread): a parallel loop runs as QC_TASKS_PER_THREAD * qc_threads tasks (TVM's
 * generated loop gives each task a contiguous chunk of its iterations, num_task taken from the environment) that
 * the caller and qc_threads - 1 pool threads claim one at a time from one counter. A statically split loop waits
 * for its slowest thread, and on a shared or virtual machine that is a thread whose core is busy elsewhere; with
 * more tasks than threads the others take over its share. Builds whose kernels call TVMBackendParallelBarrier
 * define QC_TASKS_PER_THREAD=1: every task must then run at once for the barrier to be reached.
 *
 * The counter holds the launch's generation in its high half, so a worker that wakes late can only claim a task
 * of the launch in progress, and the caller returns once every task has finished. Workers spin on the launch
 * counter for a while after each launch (a model launches its loops back to back), then sleep on a condition
 * variable. A loop inside a running task (nested parallelism) runs as one task.
 */
#include <pthread.h>
#include <stdatomic.h>

#define QC_MAX_THREADS 64
#define QC_SPIN 200000
#ifndef QC_TASKS_PER_THREAD
#define QC_TASKS_PER_THREAD 8
#endif

static int qc_threads = 1, qc_started = 1;

static int qc_num_slices(void) { return qc_threads; }
static pthread_t qc_pool[QC_MAX_THREADS];
static pthread_mutex_t qc_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qc_cv = PTHREAD_COND_INITIALIZER;
static struct { FTVMParallelLambda f; void *cdata; int num_task; } qc_job;
static atomic_uint qc_gen;                /* launches so far; workers wait for it to move */
static _Atomic unsigned long long qc_next; /* (generation << 32) | next task id of the launch in progress */
static atomic_int qc_done, qc_job_err, qc_bar_count;
static atomic_uint qc_bar_gen;
static _Thread_local int qc_in_task;

static inline void qc_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

/* Claim and run tasks of launch `gen` until none is left. */
static void qc_run_tasks(unsigned gen) {
  unsigned long long v = atomic_load_explicit(&qc_next, memory_order_acquire);
  for (;;) {
    TVMParallelGroupEnv env;
    int id, rc;
    if ((unsigned)(v >> 32) != gen || (int)(unsigned)v >= qc_job.num_task) return;
    if (!atomic_compare_exchange_weak_explicit(&qc_next, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
      continue;
    /* The claimed task keeps this launch in progress, so qc_job is this launch's until it is done. */
    id = (int)(unsigned)v;
    env.sync_handle = NULL;
    env.num_task = qc_job.num_task;
    qc_in_task = 1;
    rc = qc_job.f(id, &env, qc_job.cdata);
    qc_in_task = 0;
    if (rc != 0) atomic_store(&qc_job_err, rc);
    atomic_fetch_add_explicit(&qc_done, 1, memory_order_acq_rel);
    v = atomic_load_explicit(&qc_next, memory_order_acquire);
  }
}

static void *qc_worker(void *arg) {
  unsigned seen = 0; /* not the current generation: a worker started after a launch began joins it */
  ws_slot = (int)(intptr_t)arg;
  for (;;) {
    unsigned g;
    int spins = 0;
    while ((g = atomic_load_explicit(&qc_gen, memory_order_acquire)) == seen) {
      if (++spins < QC_SPIN) {
        qc_relax();
        continue;
      }
      pthread_mutex_lock(&qc_mu);
      while (atomic_load_explicit(&qc_gen, memory_order_acquire) == seen) pthread_cond_wait(&qc_cv, &qc_mu);
      pthread_mutex_unlock(&qc_mu);
      spins = 0;
    }
    seen = g;
    if (ws_slot < qc_threads) qc_run_tasks(g); /* a pool grown for more threads: only the first slices exist */
  }
  return NULL;
}

/* Threads for the parallel loops (1..QC_MAX_THREADS); the pool grows on demand and never shrinks. */
int qc_set_num_threads(int n) {
  if (n < 1 || n > QC_MAX_THREADS) return -1;
  pthread_mutex_lock(&qc_mu);
  while (qc_started < n) {
    if (pthread_create(&qc_pool[qc_started], NULL, qc_worker, (void *)(intptr_t)qc_started) != 0) {
      pthread_mutex_unlock(&qc_mu);
      return -1;
    }
    pthread_detach(qc_pool[qc_started]);
    qc_started++;
  }
  qc_threads = n;
  pthread_mutex_unlock(&qc_mu);
  return 0;
}

int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void *cdata, int num_task) {
  int n = qc_threads, tasks = n * QC_TASKS_PER_THREAD;
  unsigned gen;
  if (num_task > 0 && num_task < tasks) tasks = num_task;
  if (n <= 1 || tasks <= 1 || qc_in_task) {
    TVMParallelGroupEnv env;
    env.sync_handle = NULL;
    env.num_task = 1;
    return flambda(0, &env, cdata);
  }
  qc_job.f = flambda;
  qc_job.cdata = cdata;
  qc_job.num_task = tasks;
  atomic_store(&qc_job_err, 0);
  atomic_store_explicit(&qc_done, 0, memory_order_relaxed);
  gen = atomic_load_explicit(&qc_gen, memory_order_relaxed) + 1u;
  atomic_store_explicit(&qc_next, (unsigned long long)gen << 32, memory_order_release); /* publishes qc_job */
  pthread_mutex_lock(&qc_mu);
  atomic_store_explicit(&qc_gen, gen, memory_order_release);
  pthread_cond_broadcast(&qc_cv);
  pthread_mutex_unlock(&qc_mu);
  qc_run_tasks(gen);
  while (atomic_load_explicit(&qc_done, memory_order_acquire) < tasks) qc_relax();
  return atomic_load(&qc_job_err);
}

int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv *penv) {
  unsigned gen = atomic_load_explicit(&qc_bar_gen, memory_order_acquire);
  (void)task_id;
  if (penv->num_task <= 1) return 0;
  if (atomic_fetch_add_explicit(&qc_bar_count, 1, memory_order_acq_rel) == penv->num_task - 1) {
    atomic_store_explicit(&qc_bar_count, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&qc_bar_gen, 1u, memory_order_acq_rel);
  } else {
    while (atomic_load_explicit(&qc_bar_gen, memory_order_acquire) == gen) qc_relax();
  }
  return 0;
}
#endif

/*
 * TVM's LLVM codegen calls the workspace API through weak function-pointer variables
 * (`__TVMBackendAllocWorkspace`, `__TVMBackendFreeWorkspace`, defined NULL in kernels.o and
 * normally filled in by the DSO loader). These strong definitions replace them at static link.
 */
void *(*__TVMBackendAllocWorkspace)(int, int, uint64_t, int, int) = TVMBackendAllocWorkspace;
int (*__TVMBackendFreeWorkspace)(int, int, void *) = TVMBackendFreeWorkspace;
int (*__TVMBackendParallelLaunch)(FTVMParallelLambda, void *, int) = TVMBackendParallelLaunch;
int (*__TVMBackendParallelBarrier)(int, TVMParallelGroupEnv *) = TVMBackendParallelBarrier;
