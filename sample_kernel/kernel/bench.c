/* bench.c: the cost of every op, in instructions.
 *
 * Booted with `-icount shift=0,sleep=off`, QEMU's rdtsc counts retired
 * instructions exactly: each op runs BENCH_N times in a loop, and the cost of
 * the same loop with nothing in it is subtracted. safe_halt is not measured
 * (it waits for an interrupt).
 */
#include "hv.h"
#include "kernel.h"
#include "percpu.h"
#include "raw.h"

#define BENCH_N 1000

static unsigned long bench_pte;

#define BENCH(name, setup, stmt)						\
	static __noinline unsigned long bench_##name(void)			\
	{									\
		unsigned long i;						\
		uint64_t t0, t1;						\
		setup;								\
		t0 = rdtsc();							\
		for (i = 0; i < BENCH_N; i++) {					\
			stmt;							\
		}								\
		t1 = rdtsc();							\
		return (unsigned long)(t1 - t0);				\
	}

#define USE(x) __asm__ __volatile__("" : : "r"(x))

BENCH(empty, (void)0, __asm__ __volatile__("" : : : "memory"))
BENCH(irq_disable, (void)0, irq_disable())
BENCH(irq_enable, (void)0, irq_enable())
BENCH(save_fl, (void)0, USE(save_fl()))
BENCH(restore_fl, unsigned long f = save_fl(), restore_fl(f))
BENCH(read_cr2, (void)0, USE(read_cr2()))
BENCH(read_cr3, (void)0, USE(read_cr3()))
BENCH(write_cr3, unsigned long c = raw_read_cr3(), write_cr3(c))
BENCH(set_pte, unsigned long v = 0x1003, set_pte(&bench_pte, v))
BENCH(flush_tlb, (void)0, flush_tlb())
BENCH(io_delay, (void)0, io_delay())

/* A workload: what a page fault does around its paravirt ops. Per iteration:
 * an irq-save section (save_fl, irq_disable, restore_fl) that reads cr3 and
 * installs a page-table entry, then clearing the 4 KiB page with plain stores.
 * Five sites per iteration, among about 2000 (x86_64) or 4000 (i386)
 * instructions of ordinary work (4 per word stored). */
#define WORKLOAD_N 100
static unsigned long work_pt[512] __aligned(4096);
static unsigned long work_page[PAGE_SIZE / sizeof(unsigned long)] __aligned(4096);

static __noinline unsigned long bench_workload(void)
{
	unsigned long i, j;
	uint64_t t0, t1;

	t0 = rdtsc();
	for (i = 0; i < WORKLOAD_N; i++) {
		unsigned long flags = save_fl();
		unsigned long root;

		irq_disable();
		root = read_cr3();
		set_pte(&work_pt[i % 512], (root + (i << 12)) | 3);
		restore_fl(flags);
		for (j = 0; j < ARRAY_SIZE(work_page); j++)
			((volatile unsigned long *)work_page)[j] = 0;
	}
	t1 = rdtsc();
	return (unsigned long)(t1 - t0);
}

struct bench_op {
	const char *name;
	unsigned long (*fn)(void);
};

static const struct bench_op ops[] = {
	{ "irq_disable", bench_irq_disable },
	{ "irq_enable", bench_irq_enable },
	{ "save_fl", bench_save_fl },
	{ "restore_fl", bench_restore_fl },
	{ "read_cr2", bench_read_cr2 },
	{ "read_cr3", bench_read_cr3 },
	{ "write_cr3", bench_write_cr3 },
	{ "set_pte", bench_set_pte },
	{ "flush_tlb", bench_flush_tlb },
	{ "io_delay", bench_io_delay },
};

void bench(void)
{
	unsigned patched = linkfix_patched_target();
	unsigned long empty;
	unsigned i;

	raw_cli();
	bench_empty();		/* warm up: the first run pays for translation */
	empty = bench_empty();
	printk("bench: arch=%s backend=%s patched=%s paravirt=%s iterations=%u empty=%lu\n",
	       arch_name(), linkfix_backend_name(linkfix_current_backend),
	       patched ? linkfix_backend_name(patched) : boot_patched ? "boot" : "no",
	       paravirt_enabled ? "y" : "n", BENCH_N, empty);
	for (i = 0; i < ARRAY_SIZE(ops); i++) {
		unsigned long t, d;

		ops[i].fn();
		t = ops[i].fn();
		d = t > empty ? t - empty : 0;
		printk("bench %s: %lu.%02lu insns/op (%lu total)\n", ops[i].name,
		       d / BENCH_N, (d % BENCH_N) / (BENCH_N / 100), t);
		raw_cli();
		percpu0.xen_mask = 1;
		lguest_data.irq_enabled = 0;
	}
	bench_workload();
	printk("bench workload: %lu insns (%u iterations)\n", bench_workload(), WORKLOAD_N);
	raw_cli();
	percpu0.xen_mask = 1;
	lguest_data.irq_enabled = 0;
	printk("bench: done\n");
}
