/*
 * board.h - what main.c needs from the board support for QEMU mps2-an386 (Cortex-M4, 25 MHz).
 */
#ifndef QC_BOARD_H_
#define QC_BOARD_H_

#include <stdint.h>

/* Bytes of the stack touched since reset (stack painting: startup fills the stack with a pattern). */
uint32_t qc_stack_used(void);
/* Bytes reserved for the stack by the linker script. */
uint32_t qc_stack_size(void);
/* Free-running 32-bit tick counter (CMSDK APB timer 0 at the 25 MHz system clock; counts up).
 * Under `qemu-system-arm -icount shift=0` one tick is 40 guest instructions. */
void qc_ticks_start(void);
uint32_t qc_ticks(void);

#endif /* QC_BOARD_H_ */
