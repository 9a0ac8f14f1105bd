/* main.c: boot, backend selection, then the self-test or the benchmark. */
#include "hv.h"
#include "kernel.h"
#include "paging.h"

void arch_cpu_init(void);
const char *arch_cmdline(unsigned long magic, unsigned long info);
void kmain(unsigned long magic, unsigned long info);

#ifdef LINKFIX_NOPARAVIRT
int paravirt_enabled = 0;
#else
int paravirt_enabled = 1;
#endif

#ifndef LINKFIX_NOPARAVIRT
/* linkfix_boot_select's report of a linkfix= value naming no backend (the weak
 * default in linkfix_ops.c says nothing). */
void linkfix_unknown_backend(const char *value, unsigned long length)
{
	unsigned long i;

	printk("linkfix: warning: unknown backend '");
	for (i = 0; i < length; i++)
		console_putc(value[i]);
	printk("' on the command line; using the default\n");
}
#endif

void kmain(unsigned long magic, unsigned long info)
{
	const char *cmdline;

	arch_cpu_init();
	cmdline = arch_cmdline(magic, info);
	printk("linkfix sample kernel (%s), command line \"%s\"\n", arch_name(), cmdline);
	pic_init();
	paging_init();

	/* Patched image: its target. Generic image: linkfix=<backend>, else the
	 * spec's default backend. */
	linkfix_boot_select(cmdline);
	xen_model_init();
	lguest_model_init();

	/* A branch site: only xen pins the root page table, and the argument
	 * (a frame number) is computed only on this path. */
	if (linkfix_backend_is(xen))
		xen_pin_table(paging_root(0) >> 12, sizeof(long) == 8 ? 4 : 2);

	/* `fault`: touch an unmapped page; the #PF handler must report it and
	 * exit with EXIT_FAULT (checks the exception path itself). */
	if (cmdline_has(cmdline, "fault"))
		(void)*(volatile unsigned long *)(TEST_VA + 0x1ff000);

	if (cmdline_has(cmdline, "bench")) {
		bench();
		qemu_exit(EXIT_PASS);
	}
	qemu_exit(selftest() ? EXIT_FAIL : EXIT_PASS);
}
