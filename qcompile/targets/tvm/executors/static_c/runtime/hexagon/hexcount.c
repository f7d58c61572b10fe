/* hexcount.c - minimal QEMU TCG plugin (plugin API version 1 = QEMU 7.2) counting executed Hexagon
 * packets (QEMU's "instructions" for Hexagon are whole packets) and instruction words (packet bytes / 4,
 * constant extenders included). Counting is inline (one add per translation block), so it is cheap.
 * Self-contained declarations (Debian ships no qemu-plugin.h); no glib.
 * Build: cc -O2 -shared -fPIC hexcount.c -o libhexcount.so
 * Use:   qemu-hexagon -plugin ./libhexcount.so[,outfile=path] -d plugin prog.elf   (prints to stderr/log) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct qemu_info_t qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb *));
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr, uint64_t imm);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, void *), void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
void qemu_plugin_outs(const char *string);

static uint64_t packets, words, tbs;
static char outfile[512];

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  size_t n = qemu_plugin_tb_n_insns(tb), i, bytes = 0;
  (void)id;
  for (i = 0; i < n; ++i) bytes += qemu_plugin_insn_size(qemu_plugin_tb_get_insn(tb, i));
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &packets, n);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &words, bytes / 4);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &tbs, 1);
}

static void at_exit(qemu_plugin_id_t id, void *p) {
  char line[160];
  (void)id; (void)p;
  snprintf(line, sizeof line, "hexcount: packets %llu words %llu tbs %llu\n", (unsigned long long)packets,
           (unsigned long long)words, (unsigned long long)tbs);
  if (outfile[0]) {
    FILE *f = fopen(outfile, "w");
    if (f) { fputs(line, f); fclose(f); }
  } else {
    qemu_plugin_outs(line);
  }
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  int i;
  (void)info;
  for (i = 0; i < argc; ++i)
    if (strncmp(argv[i], "outfile=", 8) == 0) snprintf(outfile, sizeof outfile, "%s", argv[i] + 8);
  qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
  qemu_plugin_register_atexit_cb(id, at_exit, NULL);
  return 0;
}
