/* sites.c: what one paravirt site costs in user space, for each site shape of
 * the 2007 debate and for linkfix's sites, with three unprivileged bodies:
 *
 *   save_fl   `pushf; pop %rax`            (the native save_fl)
 *   flag_off  `movl $0, bench_flag`        (a store to a flag word: lguest's cli)
 *   c_func    a call to a C function       (a hypervisor's irq op written in C)
 *
 * Every variant is a loop of UNROLL sites; `run_<shape>_<op>(n)` runs n
 * iterations. Built for x86_64 (with -mno-red-zone: the sites call from inline
 * asm) and for i386 (where the 2007 shapes have their exact 10/11/12 bytes).
 *
 *   sites time N REPEATS [VARIANT...]  per repeat and variant: TSC ticks per op
 *   sites count N [VARIANT...]         run each variant once (under callgrind)
 *   sites list                         the variant names
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "linkfix.h"  /* gen-stubs output for ops_<arch>.toml: the linkfix sites */
#include "lf_model.h" /* the patched site, modelled: body + the same padding */

#define UNROLL 8

/* ---- the bodies' data and out-of-line functions ------------------------- */

volatile unsigned int bench_flag;
volatile unsigned int bench_lguest_flag;
volatile unsigned long bench_cfunc_calls;

/* The C function of the c_func op. noinline: it stands for code in another
 * file, reached by a call. */
__attribute__((noinline)) void LINKFIX_CALLEE bench_cfunc(void)
{
	bench_flag = 0;
	bench_cfunc_calls++;
}

/* The other backends of the spec: linked, never run here. */
unsigned long LINKFIX_CALLEE hv_save_fl(void) { return bench_flag << 9; }
void LINKFIX_CALLEE hv_flag_off(void) { bench_flag = 0; }
void LINKFIX_CALLEE hv_c_func(void) { bench_flag = 0; }

#ifdef __x86_64__
#define SYM(s) s "(%%rip)"
#define W "8"
#define AX "%%rax"
/* The caller-saved registers (x86-64 SysV) other than %rax. */
#define PUSH_NOAX "push %%rcx; push %%rdx; push %%rsi; push %%rdi; " \
		  "push %%r8; push %%r9; push %%r10; push %%r11\n\t"
#define POP_NOAX "pop %%r11; pop %%r10; pop %%r9; pop %%r8; " \
		 "pop %%rdi; pop %%rsi; pop %%rdx; pop %%rcx\n\t"
#define CLOB_NOAX "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"
#define ASM_SYM(s) s "(%rip)"
#define ASM_PUSH_NOAX "push %rcx; push %rdx; push %rsi; push %rdi; push %r8; push %r9; " \
		      "push %r10; push %r11\n\t"
#define ASM_POP_NOAX "pop %r11; pop %r10; pop %r9; pop %r8; pop %rdi; pop %rsi; pop %rdx; " \
		     "pop %rcx\n\t"
#define ASM_FLAGS_BODY "pushf; pop %rax\n\t"
#else
#define SYM(s) s
#define W "4"
#define AX "%%eax"
/* The caller-saved registers (i386) other than %eax. */
#define PUSH_NOAX "push %%ecx; push %%edx\n\t"
#define POP_NOAX "pop %%edx; pop %%ecx\n\t"
#define CLOB_NOAX "ecx", "edx"
#define ASM_SYM(s) s
#define ASM_PUSH_NOAX "push %ecx; push %edx\n\t"
#define ASM_POP_NOAX "pop %edx; pop %ecx\n\t"
#define ASM_FLAGS_BODY "pushf; pop %eax\n\t"
#endif
#define PUSH_ALL "push " AX "\n\t" PUSH_NOAX
#define POP_ALL POP_NOAX "pop " AX "\n\t"

/* Bodies as functions (body + ret): the targets of the call-based shapes.
 * They clobber nothing but what the body writes, like Linux's native_save_fl
 * and the 2007 native_* functions (which gcc compiled to the same bytes). */
__asm__(".text\n\t.balign 16\n\t.globl fn_save_fl\n"
	"fn_save_fl:\n\t" ASM_FLAGS_BODY "ret\n\t"
	".balign 16\n\t.globl fn_flag_off\n"
	"fn_flag_off:\n\tmovl $0, " ASM_SYM("bench_flag") "\n\tret\n\t"
	/* Linux's PV_CALLEE_SAVE_REGS_THUNK: a C function behind a site that
	 * may clobber only %rax. */
	".balign 16\n\t.globl cs_c_func\n"
	"cs_c_func:\n\t" ASM_PUSH_NOAX "call bench_cfunc\n\t" ASM_POP_NOAX "ret\n");
void fn_save_fl(void);
void fn_flag_off(void);
void cs_c_func(void);

/* Call tables. bench_ops: plain functions (the 2007 tables of C functions).
 * bench_callee_ops: callee-save entries (Linux's pv_ops for these ops). */
void *bench_ops[3] = { (void *)fn_save_fl, (void *)fn_flag_off, (void *)bench_cfunc };
void *bench_callee_ops[3] = { (void *)fn_save_fl, (void *)fn_flag_off, (void *)cs_c_func };

/* ---- the site shapes ------------------------------------------------------ */
/* Each SITE_<shape>_<op> is one site; save_fl sites add their result to acc. */

/* The hand-written inline instruction (c_func: a plain C call, the compiler
 * knowing exactly what the callee may clobber). */
#define SITE_inline_save_fl { unsigned long r; \
	__asm__ __volatile__("pushf; pop %0" : "=r"(r) : : "memory"); acc += r; }
/* The same instruction with its result in the op's register (%rax/%eax), as
 * the linkfix site has it: separates the cost of the padding from that of a
 * fixed result register. */
#define SITE_inlinea_save_fl { unsigned long r; \
	__asm__ __volatile__("pushf; pop %0" : "=a"(r) : : "memory"); acc += r; }
#define SITE_inline_flag_off \
	__asm__ __volatile__("movl $0, " SYM("bench_flag") : : : "memory");
#define SITE_inline_c_func bench_cfunc();

/* linkfix as linked (generic): call __lf_dispatch_<op> + padding, gen-stubs
 * output. In the image written by `linkfix patch --target native` these same
 * loops hold the native bodies: the "linkfix patched" rows. */
#define SITE_lfgen_save_fl acc += save_fl();
#define SITE_lfgen_flag_off flag_off();
#define SITE_lfgen_c_func c_func();

/* linkfix patched, modelled at compile time (lf_model.h): the native body +
 * one long NOP, with the op's clobbers. */
#define SITE_lfmodel_save_fl acc += LFM_save_fl();
#define SITE_lfmodel_flag_off LFM_flag_off();
#define SITE_lfmodel_c_func LFM_c_func();

/* Linux today: `call *pv_ops+off(%rip)` (6 bytes; i386: 6 too), clobbering
 * %rax (PVOP_CALLEE*), targets callee-save. */
#define SITE_linux6_save_fl { unsigned long r; __asm__ __volatile__( \
	"call *" SYM("bench_callee_ops+0") : "=a"(r) : : "memory", "cc"); acc += r; }
#define SITE_linux6_flag_off { unsigned long r; __asm__ __volatile__( \
	"call *" SYM("bench_callee_ops+" W) : "=a"(r) : : "memory", "cc"); (void)r; }
#define SITE_linux6_c_func { unsigned long r; __asm__ __volatile__( \
	"call *" SYM("bench_callee_ops+2*" W) : "=a"(r) : : "memory", "cc"); (void)r; }

/* 2007, 10 bytes on i386: push %ecx; push %edx; call *paravirt_ops+off;
 * pop %edx; pop %ecx. %eax clobbered, targets plain C functions. x86-64
 * analogue: every caller-saved register but %rax pushed around the call. */
#define SITE_s10_save_fl { unsigned long r; __asm__ __volatile__(PUSH_NOAX \
	"call *" SYM("bench_ops+0") "\n\t" POP_NOAX : "=a"(r) : : "memory", "cc"); acc += r; }
#define SITE_s10_flag_off { unsigned long r; __asm__ __volatile__(PUSH_NOAX \
	"call *" SYM("bench_ops+" W) "\n\t" POP_NOAX : "=a"(r) : : "memory", "cc"); (void)r; }
#define SITE_s10_c_func { unsigned long r; __asm__ __volatile__(PUSH_NOAX \
	"call *" SYM("bench_ops+2*" W) "\n\t" POP_NOAX : "=a"(r) : : "memory", "cc"); (void)r; }

/* 11 bytes on i386: push %eax/%ecx/%edx + direct `call fn` + pops, no
 * clobbers (a value-returning op keeps %eax as its output). */
#define SITE_s11_save_fl { unsigned long r; __asm__ __volatile__(PUSH_NOAX \
	"call fn_save_fl\n\t" POP_NOAX : "=a"(r) : : "memory", "cc"); acc += r; }
#define SITE_s11_flag_off __asm__ __volatile__(PUSH_ALL \
	"call fn_flag_off\n\t" POP_ALL : : : "memory", "cc");
#define SITE_s11_c_func __asm__ __volatile__(PUSH_ALL \
	"call bench_cfunc\n\t" POP_ALL : : : "memory", "cc");

/* 12 bytes on i386: push %eax/%ecx/%edx + `call *paravirt_ops+off` + pops,
 * no clobbers. */
#define SITE_s12_save_fl { unsigned long r; __asm__ __volatile__(PUSH_NOAX \
	"call *" SYM("bench_ops+0") "\n\t" POP_NOAX : "=a"(r) : : "memory", "cc"); acc += r; }
#define SITE_s12_flag_off __asm__ __volatile__(PUSH_ALL \
	"call *" SYM("bench_ops+" W) "\n\t" POP_ALL : : : "memory", "cc");
#define SITE_s12_c_func __asm__ __volatile__(PUSH_ALL \
	"call *" SYM("bench_ops+2*" W) "\n\t" POP_ALL : : : "memory", "cc");

/* The loop alone: what every variant's per-op time includes besides its site. */
#define SITE_empty_none __asm__ __volatile__("" : : : "memory");

#define REPEAT(x) x x x x x x x x

#define LOOP(shape, op) \
__attribute__((noinline, aligned(64))) unsigned long run_##shape##_##op(long n) \
{ \
	unsigned long acc = 0; \
	for (long i = 0; i < n; i++) { \
		REPEAT(SITE_##shape##_##op) \
	} \
	return acc; \
}

#define SHAPE(shape) LOOP(shape, save_fl) LOOP(shape, flag_off) LOOP(shape, c_func)

LOOP(empty, none)
SHAPE(inline)
LOOP(inlinea, save_fl)
SHAPE(lfgen)
SHAPE(lfmodel)
SHAPE(linux6)
SHAPE(s10)
SHAPE(s11)
SHAPE(s12)

struct variant {
	const char *name;
	unsigned long (*run)(long);
};

#define V(shape, op) { #shape "_" #op, run_##shape##_##op },
#define VSHAPE(shape) V(shape, save_fl) V(shape, flag_off) V(shape, c_func)

static const struct variant variants[] = {
	V(empty, none)
	VSHAPE(inline)
	V(inlinea, save_fl)
	VSHAPE(lfgen)
	VSHAPE(lfmodel)
	VSHAPE(linux6)
	VSHAPE(s10)
	VSHAPE(s11)
	VSHAPE(s12)
};
#define N_VARIANTS (sizeof(variants) / sizeof(variants[0]))

/* ---- timing ---------------------------------------------------------------- */

static inline uint64_t ticks(void)
{
	uint32_t lo, hi;

	/* lfence: rdtsc must not start before the timed loop has finished. */
	__asm__ __volatile__("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* TSC ticks per second, against CLOCK_MONOTONIC over 100 ms. */
static double tsc_hz(void)
{
	double t0 = now_s(), t1;
	uint64_t c0 = ticks(), c1;

	do
		t1 = now_s();
	while (t1 - t0 < 0.1);
	c1 = ticks();
	return (c1 - c0) / (t1 - t0);
}

static int selected(const char *name, int argc, char **argv)
{
	if (argc == 0)
		return 1;
	for (int i = 0; i < argc; i++)
		if (strcmp(argv[i], name) == 0)
			return 1;
	return 0;
}

volatile unsigned long sink;

int main(int argc, char **argv)
{
	long n, repeats;

	if (linkfix_select_backend(LINKFIX_BACKEND_NATIVE) != 0) {
		fprintf(stderr, "sites: cannot select the native backend\n");
		return 1;
	}
	if (argc >= 2 && strcmp(argv[1], "list") == 0) {
		for (size_t v = 0; v < N_VARIANTS; v++)
			printf("%s\n", variants[v].name);
		return 0;
	}
	if (argc >= 3 && strcmp(argv[1], "count") == 0) {
		n = atol(argv[2]);
		for (size_t v = 0; v < N_VARIANTS; v++)
			if (selected(variants[v].name, argc - 3, argv + 3))
				sink += variants[v].run(n);
		return 0;
	}
	if (argc < 4 || strcmp(argv[1], "time") != 0) {
		fprintf(stderr, "usage: sites time N REPEATS [VARIANT...] | count N [VARIANT...] | list\n");
		return 2;
	}
	n = atol(argv[2]);
	repeats = atol(argv[3]);
	printf("tsc_hz %.0f\n", tsc_hz());
	printf("patched_target %u\n", linkfix_patched_target());
	/* Warm every loop once, then interleave the variants in each repeat so
	 * that frequency drift and noise spread evenly over all of them. */
	for (size_t v = 0; v < N_VARIANTS; v++)
		if (selected(variants[v].name, argc - 4, argv + 4))
			sink += variants[v].run(n / 10 + 1);
	for (long r = 0; r < repeats; r++) {
		for (size_t v = 0; v < N_VARIANTS; v++) {
			uint64_t t0, t1;

			if (!selected(variants[v].name, argc - 4, argv + 4))
				continue;
			t0 = ticks();
			sink += variants[v].run(n);
			t1 = ticks();
			printf("%s %ld %.4f\n", variants[v].name, r,
			       (double)(t1 - t0) / ((double)n * UNROLL));
		}
	}
	return 0;
}
