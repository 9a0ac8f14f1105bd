/* kernel.h: the sample kernel's common definitions. */
#ifndef KERNEL_H
#define KERNEL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "linkfix.h"

#define X86_EFLAGS_IF	0x200UL
#define PAGE_SIZE	4096UL

#define __noinline	__attribute__((noinline))
#define __aligned(n)	__attribute__((aligned(n)))
#define barrier()	__asm__ __volatile__("" ::: "memory")
#define ARRAY_SIZE(a)	(sizeof(a) / sizeof((a)[0]))

/* isa-debug-exit (iobase 0xf4): QEMU exits with status (code << 1) | 1 */
#define EXIT_PASS	0x10	/* status 33: every self-test line said ok */
#define EXIT_FAIL	0x11	/* status 35: at least one op failed */
#define EXIT_FAULT	0x12	/* status 37: unexpected CPU exception */

/* Interrupt vectors */
#define VEC_TIMER	0x20	/* PIT (IRQ0, PIC remapped to 0x20) */
#define VEC_EVENT	0x81	/* the hypervisor models deliver events here */

/* console.c */
void console_putc(char c);
int printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vsnprintk(char *buf, size_t size, const char *fmt, va_list ap);
int snprintk(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void __attribute__((noreturn)) qemu_exit(unsigned code);

/* lib.c */
void *memset(void *s, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int cmdline_has(const char *cmdline, const char *word);
extern int boot_patched;

/* irq.c */
extern volatile unsigned long timer_irqs;	/* PIT interrupts taken */
extern volatile unsigned long events_taken;	/* VEC_EVENT entries */
void pic_init(void);
void pic_unmask_timer(int on);
int pic_timer_pending(void);
void pit_oneshot(unsigned count);
void do_irq(unsigned long vector);
void do_fault(unsigned long vector, unsigned long error, unsigned long ip);

/* selftest.c, bench.c */
int selftest(void);
void bench(void);
const char *arch_name(void);

/* main.c */
extern int paravirt_enabled;

#endif
