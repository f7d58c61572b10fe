/* ---- opencl_host.c: the OpenCL calls behind the tables above (appended to the generated model.c) ---- */
static cl_context qc_ctx;
static cl_command_queue qc_queue;
static cl_program qc_program;
static cl_mem qc_arena;
static cl_mem qc_mem[QC_NUM_BUFFERS];
static cl_kernel qc_kernels[QC_NUM_OPS];
static int qc_ready;
static char qc_error[4096];

static int qc_fail(const char *what, cl_int err) {
  snprintf(qc_error, sizeof qc_error, "%s failed (OpenCL error %d)", what, (int)err);
  return -1;
}

const char *qc_model_last_error(void) { return qc_error; }
uint32_t qc_model_workspace_peak(void) { return 0; }

/* The QC_OPENCL_DEVICE-th device over all platforms; by default the first GPU, else the first device. */
static int qc_pick_device(cl_device_id *out) {
  cl_platform_id platforms[16];
  cl_device_id all[64];
  cl_uint np = 0, n = 0, i, k;
  const char *want = getenv("QC_OPENCL_DEVICE");
  cl_int err = clGetPlatformIDs(16, platforms, &np);
  if (err != CL_SUCCESS || np == 0) return qc_fail("clGetPlatformIDs (no OpenCL platform: is an ICD installed?)", err);
  for (i = 0; i < np && n < 64; ++i) {
    cl_uint got = 0;
    if (clGetDeviceIDs(platforms[i], CL_DEVICE_TYPE_ALL, 64 - n, all + n, &got) == CL_SUCCESS) n += got;
  }
  if (n == 0) return qc_fail("clGetDeviceIDs (no OpenCL device)", CL_DEVICE_NOT_FOUND);
  if (want != NULL && *want != '\0') {
    k = (cl_uint)atoi(want);
    if (k >= n) {
      snprintf(qc_error, sizeof qc_error, "QC_OPENCL_DEVICE=%s but only %u device(s)", want, (unsigned)n);
      return -1;
    }
    *out = all[k];
    return 0;
  }
  for (k = 0; k < n; ++k) {
    cl_device_type type = 0;
    clGetDeviceInfo(all[k], CL_DEVICE_TYPE, sizeof type, &type, NULL);
    if (type & CL_DEVICE_TYPE_GPU) {
      *out = all[k];
      return 0;
    }
  }
  *out = all[0];
  return 0;
}

static int qc_set_args(cl_kernel kernel, const qc_op_t *op) {
  int j;
  for (j = 0; j < op->nargs; ++j) {
    const qc_arg_t *a = &qc_args[op->first + j];
    cl_int err;
    cl_int i32 = (cl_int)a->i;
    cl_long i64 = (cl_long)a->i;
    cl_float f32 = (cl_float)a->f;
    cl_double f64 = a->f;
    switch (a->kind) {
      case 0: err = clSetKernelArg(kernel, j, sizeof(cl_mem), &qc_mem[a->buffer]); break;
      case 1: err = clSetKernelArg(kernel, j, sizeof i32, &i32); break;
      case 2: err = clSetKernelArg(kernel, j, sizeof i64, &i64); break;
      case 3: err = clSetKernelArg(kernel, j, sizeof f32, &f32); break;
      default: err = clSetKernelArg(kernel, j, sizeof f64, &f64); break;
    }
    if (err != CL_SUCCESS) {
      snprintf(qc_error, sizeof qc_error, "clSetKernelArg %d of %s (step %d) failed (OpenCL error %d)", j,
               qc_kernel_names[op->kernel], op->step, (int)err);
      return -1;
    }
  }
  return 0;
}

static int qc_init(void) {
  cl_device_id dev;
  cl_int err;
  cl_uint align_bits = 0;
  cl_device_fp_config fp = 0;
  const char *src = qc_source;
  size_t len = sizeof qc_source - 1;
  int i;
  if (qc_pick_device(&dev) != 0) return -1;
  clGetDeviceInfo(dev, CL_DEVICE_MEM_BASE_ADDR_ALIGN, sizeof align_bits, &align_bits, NULL);
  if (align_bits / 8 > QC_DEVICE_ALIGN) {
    snprintf(qc_error, sizeof qc_error, "the device aligns sub-buffers to %u bytes; the arena was planned for %u",
             align_bits / 8, QC_DEVICE_ALIGN);
    return -1;
  }
  qc_ctx = clCreateContext(NULL, 1, &dev, NULL, NULL, &err);
  if (err != CL_SUCCESS) return qc_fail("clCreateContext", err);
  qc_queue = clCreateCommandQueue(qc_ctx, dev, 0, &err);
  if (err != CL_SUCCESS) return qc_fail("clCreateCommandQueue", err);
  qc_program = clCreateProgramWithSource(qc_ctx, 1, &src, &len, &err);
  if (err != CL_SUCCESS) return qc_fail("clCreateProgramWithSource", err);
  /* IEEE division and square root where offered (the reference's arithmetic); never relaxed math */
  clGetDeviceInfo(dev, CL_DEVICE_SINGLE_FP_CONFIG, sizeof fp, &fp, NULL);
  err = clBuildProgram(qc_program, 1, &dev,
                       (fp & CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT) ? "-cl-fp32-correctly-rounded-divide-sqrt" : "",
                       NULL, NULL);
  if (err != CL_SUCCESS) {
    size_t used;
    int n = snprintf(qc_error, sizeof qc_error, "clBuildProgram failed (OpenCL error %d): ", (int)err);
    clGetProgramBuildInfo(qc_program, dev, CL_PROGRAM_BUILD_LOG, sizeof qc_error - n - 1, qc_error + n, &used);
    qc_error[sizeof qc_error - 1] = '\0';
    return -1;
  }
  qc_arena = clCreateBuffer(qc_ctx, CL_MEM_READ_WRITE, QC_ARENA_BYTES > 0 ? QC_ARENA_BYTES : 1, NULL, &err);
  if (err != CL_SUCCESS) return qc_fail("clCreateBuffer (arena)", err);
  for (i = 0; i < QC_NUM_BUFFERS; ++i) {
    const qc_buffer_t *b = &qc_buffers[i];
    if (b->kind == 0) {
      cl_buffer_region region = {b->offset, b->size};
      qc_mem[i] = clCreateSubBuffer(qc_arena, CL_MEM_READ_WRITE, CL_BUFFER_CREATE_TYPE_REGION, &region, &err);
    } else if (b->kind == 1) {
      qc_mem[i] = clCreateBuffer(qc_ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, b->size, (void *)b->data, &err);
    } else {
      qc_mem[i] = clCreateBuffer(qc_ctx, CL_MEM_READ_WRITE, b->size, NULL, &err);
    }
    if (err != CL_SUCCESS) return qc_fail("clCreateBuffer / clCreateSubBuffer", err);
  }
  for (i = 0; i < QC_NUM_OPS; ++i) {
    if (qc_ops[i].kind != 0) continue;
    qc_kernels[i] = clCreateKernel(qc_program, qc_kernel_names[qc_ops[i].kernel], &err);
    if (err != CL_SUCCESS) return qc_fail("clCreateKernel", err);
    if (qc_set_args(qc_kernels[i], &qc_ops[i]) != 0) return -1;
  }
  return 0;
}

int qc_model_run(const void *const *inputs, void *const *outputs) {
  cl_int err;
  int i;
  if (!qc_ready) {
    if (qc_init() != 0) return -1;
    qc_ready = 1;
  }
  for (i = 0; i < QC_NUM_INPUTS; ++i) {
    err = clEnqueueWriteBuffer(qc_queue, qc_mem[qc_input_buffer[i]], CL_FALSE, 0, qc_input_nbytes[i], inputs[i], 0,
                               NULL, NULL);
    if (err != CL_SUCCESS) return qc_fail("clEnqueueWriteBuffer", err);
  }
  for (i = 0; i < QC_NUM_OPS; ++i) {
    const qc_op_t *op = &qc_ops[i];
    if (op->kind == 0)
      err = clEnqueueNDRangeKernel(qc_queue, qc_kernels[i], 3, NULL, op->global, op->local, 0, NULL, NULL);
    else
      err = clEnqueueCopyBuffer(qc_queue, qc_mem[op->src], qc_mem[op->dst], 0, 0, op->nbytes, 0, NULL, NULL);
    if (err != CL_SUCCESS) {
      snprintf(qc_error, sizeof qc_error, "step %d (%s) failed to enqueue (OpenCL error %d)", op->step,
               op->kind == 0 ? qc_kernel_names[op->kernel] : "copy", (int)err);
      return op->step + 1;
    }
  }
  for (i = 0; i < QC_NUM_OUTPUTS; ++i) {
    err = clEnqueueReadBuffer(qc_queue, qc_mem[qc_output_buffer[i]], CL_FALSE, 0, qc_output_nbytes[i], outputs[i], 0,
                              NULL, NULL);
    if (err != CL_SUCCESS) return qc_fail("clEnqueueReadBuffer", err);
  }
  err = clFinish(qc_queue);
  if (err != CL_SUCCESS) return qc_fail("clFinish (a kernel failed on the device)", err);
  return 0;
}
