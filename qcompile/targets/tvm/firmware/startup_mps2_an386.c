/*
 * startup_mps2_an386.c - reset handler, vector table and board helpers for QEMU mps2-an386 (Cortex-M4F).
 *
 * Reset: enable the FPU, copy .data from flash, zero .bss, paint the stack (for the high-water mark),
 * call main() and end the simulation through semihosting with main's return value.
 */
#include <stdint.h>

#include "board.h"
#include "semihost.h"

#define QC_STACK_PAINT 0xA5A5A5A5u
#define SCB_CPACR (*(volatile uint32_t *)0xE000ED88u)
#define TIMER0_CTRL (*(volatile uint32_t *)0x40000000u)
#define TIMER0_VALUE (*(volatile uint32_t *)0x40000004u)
#define TIMER0_RELOAD (*(volatile uint32_t *)0x40000008u)

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[];
extern uint32_t __stack_start[], __stack_end[];
int main(void);

void Reset_Handler(void) __attribute__((noreturn));
void Reset_Handler(void) {
  uint32_t *src, *dst, *sp;
  SCB_CPACR |= 0xFu << 20; /* CP10, CP11: full access to the FPU */
  __asm__ volatile("dsb\n\tisb" ::: "memory");
  for (src = __data_load, dst = __data_start; dst < __data_end;) *dst++ = *src++;
  for (dst = __bss_start; dst < __bss_end;) *dst++ = 0;
  __asm__ volatile("mov %0, sp" : "=r"(sp));
  for (dst = __stack_start; dst < sp - 32;) *dst++ = QC_STACK_PAINT;
  qc_sh_exit(main());
}

uint32_t qc_stack_used(void) {
  const uint32_t *p = __stack_start;
  while (p < __stack_end && *p == QC_STACK_PAINT) ++p;
  return (uint32_t)((uintptr_t)__stack_end - (uintptr_t)p);
}

uint32_t qc_stack_size(void) { return (uint32_t)((uintptr_t)__stack_end - (uintptr_t)__stack_start); }

void qc_ticks_start(void) {
  TIMER0_CTRL = 0;
  TIMER0_RELOAD = 0xFFFFFFFFu;
  TIMER0_VALUE = 0xFFFFFFFFu;
  TIMER0_CTRL = 1; /* enable, no interrupt */
}

uint32_t qc_ticks(void) { return 0xFFFFFFFFu - TIMER0_VALUE; }

static void put_hex(uint32_t v) {
  char buf[11] = "0x";
  int i;
  for (i = 0; i < 8; ++i) buf[2 + i] = "0123456789abcdef"[(v >> (28 - 4 * i)) & 0xFu];
  buf[10] = '\0';
  qc_sh_puts(buf);
}

/* Prints the fault, the stacked PC and the fault status registers, then ends QEMU with status 70. */
void qc_fault(const uint32_t *frame) __attribute__((used, noreturn));
void qc_fault(const uint32_t *frame) {
  qc_sh_puts("qc: fault: pc=");
  put_hex(frame[6]);
  qc_sh_puts(" lr=");
  put_hex(frame[5]);
  qc_sh_puts(" cfsr=");
  put_hex(*(volatile uint32_t *)0xE000ED28u);
  qc_sh_puts(" bfar=");
  put_hex(*(volatile uint32_t *)0xE000ED38u);
  qc_sh_puts("\n");
  qc_sh_exit(70);
}

/* Every exception handler: hand the stacked frame (MSP or PSP) to qc_fault. */
__attribute__((naked)) void Default_Handler(void) {
  __asm__ volatile("tst lr, #4\n\tite eq\n\tmrseq r0, msp\n\tmrsne r0, psp\n\tb qc_fault\n");
}

/* TVM's LLVM objects carry ARM EHABI unwind tables that name this personality routine; the firmware
 * never unwinds (C only, no exceptions), so a stub replaces libgcc's unwinder. */
void __aeabi_unwind_cpp_pr0(void) __attribute__((weak));
void __aeabi_unwind_cpp_pr0(void) { qc_sh_exit(71); }

typedef void (*qc_vector)(void);
__attribute__((section(".isr_vector"), used)) const qc_vector qc_vectors[16 + 32] = {
    (qc_vector)(uintptr_t)__stack_end,
    Reset_Handler,
    Default_Handler,    /* NMI */
    Default_Handler,    /* HardFault */
    Default_Handler,    /* MemManage */
    Default_Handler,    /* BusFault */
    Default_Handler,    /* UsageFault */
    0, 0, 0, 0,
    Default_Handler,    /* SVCall */
    Default_Handler,    /* DebugMonitor */
    0,
    Default_Handler,    /* PendSV */
    Default_Handler,    /* SysTick */
    [16 ... 47] = Default_Handler,
};
