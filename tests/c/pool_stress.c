/* Stress test of qc_runtime.c's thread pool (tests/test_qc_runtime_pool.py builds and runs it).
 * argv: threads launches expect_tasks_per_thread use_barrier
 * Every launch: each task id in 0..num_task-1 runs exactly once, num_task is the same for every task, workspace
 * allocations of concurrently running tasks never overlap, and nested launches run inline. Exit 0 on success. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qc_runtime.h"

int qc_set_num_threads(int n);
void qc_workspace_reset(uint8_t *base, uint32_t size);

#define MAX_TASKS 1024
static atomic_int hits[MAX_TASKS];
static atomic_int seen_num_task, bad, running_nested;
static int use_barrier;
static uint8_t arena[1 << 20];

static int nested(int task_id, TVMParallelGroupEnv *penv, void *cdata) {
  (void)cdata;
  if (task_id != 0 || penv->num_task != 1) atomic_store(&bad, 1); /* a loop inside a task runs as one task */
  atomic_fetch_add(&running_nested, 1);
  return 0;
}

static int body(int task_id, TVMParallelGroupEnv *penv, void *cdata) {
  volatile uint8_t *p;
  int expect = atomic_load(&seen_num_task), i;
  (void)cdata;
  if (expect == 0) atomic_compare_exchange_strong(&seen_num_task, &expect, penv->num_task);
  else if (expect != penv->num_task) atomic_store(&bad, 2);
  if (task_id < 0 || task_id >= MAX_TASKS || task_id >= penv->num_task) { atomic_store(&bad, 3); return 0; }
  atomic_fetch_add(&hits[task_id], 1);
  p = TVMBackendAllocWorkspace(1, 0, 4096, 0, 8); /* each thread's own slice: no other task writes it meanwhile */
  if (p == NULL) { atomic_store(&bad, 4); return 0; }
  for (i = 0; i < 4096; ++i) p[i] = (uint8_t)task_id;
  if (use_barrier) TVMBackendParallelBarrier(task_id, penv);
  for (i = 0; i < 4096; ++i)
    if (p[i] != (uint8_t)task_id) { atomic_store(&bad, 5); break; }
  TVMBackendFreeWorkspace(1, 0, (void *)p);
  return TVMBackendParallelLaunch(nested, NULL, 0);
}

int main(int argc, char **argv) {
  int threads = atoi(argv[1]), launches = atoi(argv[2]), per_thread = atoi(argv[3]), l, i;
  use_barrier = atoi(argv[4]);
  if (qc_set_num_threads(threads) != 0) { puts("qc_set_num_threads failed"); return 1; }
  qc_workspace_reset(arena, sizeof(arena));
  for (l = 0; l < launches; ++l) {
    int n;
    memset(hits, 0, sizeof(hits));
    atomic_store(&seen_num_task, 0);
    atomic_store(&running_nested, 0);
    if (TVMBackendParallelLaunch(body, NULL, 0) != 0) { printf("launch %d failed\n", l); return 1; }
    n = atomic_load(&seen_num_task);
    if (n != threads * per_thread) { printf("launch %d: num_task %d, expected %d\n", l, n, threads * per_thread); return 1; }
    for (i = 0; i < n; ++i)
      if (atomic_load(&hits[i]) != 1) { printf("launch %d: task %d ran %d times\n", l, i, atomic_load(&hits[i])); return 1; }
    if (atomic_load(&running_nested) != n) { printf("launch %d: %d nested launches\n", l, atomic_load(&running_nested)); return 1; }
    if (atomic_load(&bad)) { printf("launch %d: check %d failed\n", l, atomic_load(&bad)); return 1; }
  }
  printf("ok %d launches of %d tasks on %d threads\n", launches, threads * per_thread, threads);
  return 0;
}
