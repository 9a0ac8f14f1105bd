/* main.c: harness of the register-pressure benchmark (see hungry.c).
 *
 *   hungry time N REPEATS   per repeat: TSC ticks per loop iteration of hungry()
 *   hungry count N          one call of hungry() over N elements (callgrind)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

volatile unsigned int pressure_flag;
volatile unsigned int pressure_lguest_flag;
volatile unsigned long pressure_calls;

/* The C function of the c_func op (a hypervisor's op written in C). */
__attribute__((noinline)) void pressure_cfunc(void)
{
	pressure_flag = 0;
	pressure_calls++;
}

/* The spec's other backends: linked, never run. */
unsigned long hv_save_fl(void) { return pressure_flag << 9; }
void hv_restore_fl(void) { pressure_flag = 1; }
void hv_flag_off(void) { pressure_flag = 0; }
void hv_c_func(void) { pressure_flag = 0; }

/* For the 2007 model: a C function behind a site that clobbers only %rax. */
#ifdef __x86_64__
__asm__(".text\n\t.globl cs_c_func\n\t.balign 16\ncs_c_func:\n\t"
	"push %rcx; push %rdx; push %rsi; push %rdi; push %r8; push %r9; push %r10; push %r11\n\t"
	"call pressure_cfunc\n\t"
	"pop %r11; pop %r10; pop %r9; pop %r8; pop %rdi; pop %rsi; pop %rdx; pop %rcx\n\t"
	"ret\n");
#else
__asm__(".text\n\t.globl cs_c_func\n\t.balign 16\ncs_c_func:\n\t"
	"push %ecx; push %edx\n\tcall pressure_cfunc\n\tpop %edx; pop %ecx\n\tret\n");
#endif

unsigned long hungry(const unsigned long *a, long n);

static inline uint64_t ticks(void)
{
	uint32_t lo, hi;

	__asm__ __volatile__("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

#define ELEMS 2048

volatile unsigned long sink;

int main(int argc, char **argv)
{
	static unsigned long a[ELEMS];
	long n, repeats;

	for (long i = 0; i < ELEMS; i++)
		a[i] = (unsigned long)i * 2654435761u;
	if (argc == 3 && strcmp(argv[1], "count") == 0) {
		n = atol(argv[2]);
		sink = hungry(a, n < ELEMS ? n : ELEMS);
		return 0;
	}
	if (argc != 4 || strcmp(argv[1], "time") != 0) {
		fprintf(stderr, "usage: hungry time N REPEATS | count N\n");
		return 2;
	}
	n = atol(argv[2]);
	repeats = atol(argv[3]);
	sink = hungry(a, ELEMS); /* warm up */
	for (long r = 0; r < repeats; r++) {
		uint64_t t0 = ticks();

		for (long k = 0; k < n / ELEMS; k++)
			sink += hungry(a, ELEMS);
		printf("%.4f\n", (double)(ticks() - t0) / (double)(n / ELEMS * ELEMS));
	}
	return 0;
}
