/* main.c: boot, backend selection, then the self-test or the benchmark. */
#include "hv.h"
#include "kernel.h"
#include "paging.h"
#include "raw.h"

void arch_cpu_init(void);
const char *arch_cmdline(unsigned long magic, unsigned long info);
void kmain(unsigned long magic, unsigned long info);

#ifdef LINKFIX_NOPARAVIRT
int paravirt_enabled = 0;
#else
int paravirt_enabled = 1;
#endif
int boot_patched;	/* the generic image patched its own sites at boot */

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

/* The boot patcher's hooks. Text is writable here (one RWX segment, identity
 * mapped), so a plain copy writes it; a real kernel would use its own routine
 * (Linux: text_poke_early). One CPU, nothing has run the sites yet: a
 * serialising instruction after the writes is all the synchronisation needed. */
static void text_write(void *dst, const void *src, unsigned long n)
{
	memcpy(dst, src, n);
}

static void text_sync(void)
{
	unsigned int a = 0, b, c = 0, d;

	__asm__ __volatile__("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
}

static void boot_report(unsigned long site, unsigned op, int why)
{
	printk("linkfix: site %lx (op %u) left generic (reason %d)\n", site, op, why);
}

static const struct linkfix_boot_hooks boot_hooks = { text_write, text_sync, boot_report };

extern const unsigned char __linkfix_meta_start[], __linkfix_repl_end[];
extern const unsigned char __linkfix_sites_start[], __linkfix_sites_end[];
extern const unsigned char __linkfix_branches_start[], __linkfix_branches_end[];

/* `sitedump`: every site's bytes, for the test that compares them with what
 * `linkfix patch` writes. Record order: op sites, then branch sites. */
static void dump_table(const unsigned char *p, const unsigned char *end, unsigned size)
{
	for (; p + size <= end; p += size) {
		const unsigned char *site = p + *(const int *)p;
		unsigned len = size == LINKFIX_SITE_REC_SIZE ? p[6] : 5, i;

		printk("LFSITE %lx ", (unsigned long)site);
		for (i = 0; i < len; i++)
			printk("%02x", site[i]);
		printk("\n");
	}
}

/* The linkfix tables are needed only until the sites are patched: like init
 * memory, they are "freed" here (overwritten with INT3s) after boot, which
 * shows that nothing reads them afterwards. */
static void free_linkfix_tables(void)
{
	memset((void *)__linkfix_meta_start, 0xcc,
	       (unsigned long)(__linkfix_repl_end - __linkfix_meta_start));
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
#ifndef LINKFIX_NOPARAVIRT
	/* `bootpatch`: a generic image applies the selected backend to its sites
	 * now, before interrupts are enabled, with the bytes linkfix patch writes. */
	if (!linkfix_image_patched() && cmdline_has(cmdline, "bootpatch")) {
		uint64_t t0 = rdtsc();	/* under -icount: instructions */
		int n = linkfix_boot_patch(linkfix_current_backend, &boot_hooks);
		uint64_t t1 = rdtsc();

		boot_patched = n >= 0;
		printk("linkfix: boot-patched %d sites for %s in %lu cycles\n", n,
		       linkfix_backend_name(linkfix_current_backend), (unsigned long)(t1 - t0));
	}
	if (cmdline_has(cmdline, "sitedump")) {
		dump_table(__linkfix_sites_start, __linkfix_sites_end, LINKFIX_SITE_REC_SIZE);
		dump_table(__linkfix_branches_start, __linkfix_branches_end,
			   LINKFIX_BRANCH_REC_SIZE);
	}
	free_linkfix_tables();
#endif
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
