/* ---- cuda_host.cu: the CUDA runtime calls around the generated launches (inserted into model.cu) ---- */
/* A device pointer that converts to whatever pointer type the kernel parameter has. */
struct qc_any_ptr {
  void *p;
  template <typename T>
  operator T *() const { return static_cast<T *>(p); }
};

static cudaStream_t qc_stream;
static void *qc_arena;
static void *qc_ptr[QC_NUM_BUFFERS];
static int qc_ready;
static char qc_error[1024];
/* While qc_model_profile runs: QC_NUM_STEPS + 1 events, one recorded before the first step and one after each
   step on the stream (QC_MARK), so the GPU time of step i is the time between events i and i + 1. */
static cudaEvent_t *qc_events;
#define QC_MARK(i) \
  if (qc_events != NULL) cudaEventRecord(qc_events[(i)], qc_stream)

extern "C" const char *qc_model_last_error(void) { return qc_error; }
extern "C" uint32_t qc_model_workspace_peak(void) { return 0; }

static int qc_fail(const char *what, cudaError_t err) {
  snprintf(qc_error, sizeof qc_error, "%s failed: %s", what, cudaGetErrorString(err));
  return -1;
}

static int qc_step_failed(int step, const char *what, cudaError_t err) {
  snprintf(qc_error, sizeof qc_error, "step %d (%s) failed: %s", step, what, cudaGetErrorString(err));
  return step + 1;
}

static int qc_init(void) {
  int count = 0, dev = 0, i;
  const char *want = getenv("QC_CUDA_DEVICE");
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    snprintf(qc_error, sizeof qc_error, "no CUDA device (%s)",
             err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount() = 0");
    return -1;
  }
  if (want != NULL && *want != '\0') dev = atoi(want);
  if (dev < 0 || dev >= count) {
    snprintf(qc_error, sizeof qc_error, "QC_CUDA_DEVICE=%s but only %d device(s)", want, count);
    return -1;
  }
  if ((err = cudaSetDevice(dev)) != cudaSuccess) return qc_fail("cudaSetDevice", err);
  if ((err = cudaStreamCreateWithFlags(&qc_stream, cudaStreamNonBlocking)) != cudaSuccess)
    return qc_fail("cudaStreamCreate", err);
  if ((err = cudaMalloc(&qc_arena, QC_ARENA_BYTES > 0 ? QC_ARENA_BYTES : 1)) != cudaSuccess)
    return qc_fail("cudaMalloc (arena)", err);
  for (i = 0; i < QC_NUM_BUFFERS; ++i) {
    const qc_buffer_t *b = &qc_buffers[i];
    if (b->kind == 0) {
      qc_ptr[i] = (char *)qc_arena + b->offset;
      continue;
    }
    if ((err = cudaMalloc(&qc_ptr[i], b->size)) != cudaSuccess) return qc_fail("cudaMalloc", err);
    if (b->kind == 1 && (err = cudaMemcpy(qc_ptr[i], qc_weights + b->offset, b->size, cudaMemcpyHostToDevice)) !=
                            cudaSuccess)
      return qc_fail("cudaMemcpy (weights)", err);
  }
  return 0;
}

static int qc_enqueue(void);

/* The device, stream, arena and weights, once (at the first run or profile). */
static int qc_start(void) {
  if (!qc_ready) {
    if (qc_init() != 0) return -1;
    qc_ready = 1;
  }
  return 0;
}

/* The outputs copied back after the queued launches, then the wait for all of it. */
static int qc_outputs_back(void *const *outputs) {
  cudaError_t err;
  int i;
  for (i = 0; i < QC_NUM_OUTPUTS; ++i) {
    err = cudaMemcpyAsync(outputs[i], qc_ptr[qc_output_buffer[i]], qc_output_nbytes[i], cudaMemcpyDeviceToHost,
                          qc_stream);
    if (err != cudaSuccess) return qc_fail("cudaMemcpyAsync (output)", err);
  }
  if ((err = cudaStreamSynchronize(qc_stream)) != cudaSuccess)
    return qc_fail("cudaStreamSynchronize (a kernel failed on the device)", err);
  return 0;
}

extern "C" int qc_model_run(const void *const *inputs, void *const *outputs) {
  cudaError_t err;
  int i, rc;
  if (qc_start() != 0) return -1;
  for (i = 0; i < QC_NUM_INPUTS; ++i) {
    err = cudaMemcpyAsync(qc_ptr[qc_input_buffer[i]], inputs[i], qc_input_nbytes[i], cudaMemcpyHostToDevice,
                          qc_stream);
    if (err != cudaSuccess) return qc_fail("cudaMemcpyAsync (input)", err);
  }
  if ((rc = qc_enqueue()) != 0) return rc;
  return qc_outputs_back(outputs);
}

extern "C" int qc_model_num_steps(void) { return QC_NUM_STEPS; }

/* Holds the stream for a while (clock64 cycles), so that every launch queued behind it starts back to back. */
__global__ void qc_spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

/* qc_model_run with every step timed on the GPU by CUDA events: step_ms[i] (QC_NUM_STEPS floats) is the device
   time of step i (its launches, or its copy). The launches are queued behind a spin kernel of spin_ms first (it
   must outlast queuing them), so a step's time is the GPU's, not the host's launch overhead. */
extern "C" int qc_model_profile(const void *const *inputs, void *const *outputs, float *step_ms, double spin_ms) {
  static cudaEvent_t events[QC_NUM_STEPS + 1];
  cudaError_t err;
  int i, rc, khz = 0, dev = 0;
  if (qc_start() != 0) return -1;
  for (i = 0; i <= QC_NUM_STEPS; ++i)
    if (events[i] == NULL && (err = cudaEventCreate(&events[i])) != cudaSuccess) return qc_fail("cudaEventCreate", err);
  if ((err = cudaGetDevice(&dev)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev)) != cudaSuccess)
    return qc_fail("cudaDeviceGetAttribute (clock rate)", err);
  for (i = 0; i < QC_NUM_INPUTS; ++i) {
    err = cudaMemcpy(qc_ptr[qc_input_buffer[i]], inputs[i], qc_input_nbytes[i], cudaMemcpyHostToDevice);
    if (err != cudaSuccess) return qc_fail("cudaMemcpy (input)", err);
  }
  qc_spin<<<1, 1, 0, qc_stream>>>((long long)(spin_ms * khz));
  if ((err = cudaGetLastError()) != cudaSuccess) return qc_fail("qc_spin", err);
  qc_events = events;
  rc = qc_enqueue();
  qc_events = NULL;
  if (rc != 0 || (rc = qc_outputs_back(outputs)) != 0) return rc;
  for (i = 0; i < QC_NUM_STEPS; ++i)
    if ((err = cudaEventElapsedTime(&step_ms[i], events[i], events[i + 1])) != cudaSuccess)
      return qc_fail("cudaEventElapsedTime", err);
  return 0;
}
