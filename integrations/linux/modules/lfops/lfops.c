// SPDX-License-Identifier: GPL-2.0
/*
 * Exercises every op of the linkfix series from a module and checks each result
 * against the instruction itself, read with inline asm of the module's own. In a
 * linkfix kernel the module's sites stay calls to the exported dispatchers (nothing
 * patches a .ko), so this runs whichever backend vmlinux chose; in the baseline it
 * runs the native inline instructions. Loading fails if any check fails.
 */
#include <linux/init.h>
#include <linux/irqflags.h>
#include <linux/module.h>
#include <linux/printk.h>
#include <asm/processor-flags.h>
#include <asm/special_insns.h>

static int checks, failures;

static void lfops_check(bool ok, const char *what)
{
	checks++;
	if (!ok) {
		failures++;
		pr_err("lfops: FAIL %s\n", what);
	}
}

/* The truth, from the instructions themselves. */
static unsigned long raw_flags(void)
{
	unsigned long f;

	asm volatile("pushf; pop %0" : "=r" (f) : : "memory");
	return f;
}

static unsigned long raw_cr3(void)
{
	unsigned long v;

	asm volatile("mov %%cr3, %0" : "=r" (v));
	return v;
}

static unsigned long raw_cr2(void)
{
	unsigned long v;

	asm volatile("mov %%cr2, %0" : "=r" (v));
	return v;
}

static int __init lfops_init(void)
{
	unsigned long flags, cr3;

	lfops_check(raw_flags() & X86_EFLAGS_IF, "interrupts enabled at load");

	local_irq_disable();				/* irq_disable */
	lfops_check(!(raw_flags() & X86_EFLAGS_IF), "irq_disable clears IF");
	lfops_check(irqs_disabled(), "save_fl sees IF clear");	/* save_fl */
	local_irq_enable();				/* irq_enable */
	lfops_check(raw_flags() & X86_EFLAGS_IF, "irq_enable sets IF");
	lfops_check(!irqs_disabled(), "save_fl sees IF set");

	local_irq_save(flags);				/* save_fl + irq_disable */
	lfops_check(flags & X86_EFLAGS_IF, "local_irq_save returns IF set");
	lfops_check(!(raw_flags() & X86_EFLAGS_IF), "local_irq_save clears IF");
	cr3 = __read_cr3();				/* read_cr3 */
	lfops_check(cr3 == raw_cr3(), "read_cr3 returns CR3");
	lfops_check(read_cr2() == raw_cr2(), "read_cr2 returns CR2");	/* read_cr2 */
	write_cr3(cr3);					/* write_cr3 */
	lfops_check(raw_cr3() == cr3, "write_cr3 writes CR3");
	local_irq_restore(flags);			/* restore_fl */
	lfops_check(raw_flags() & X86_EFLAGS_IF, "restore_fl restores IF");

	local_irq_save(flags);
	local_irq_restore(flags & ~X86_EFLAGS_IF);	/* restore_fl of a clear IF */
	lfops_check(!(raw_flags() & X86_EFLAGS_IF), "restore_fl keeps IF clear");
	raw_safe_halt();				/* safe_halt: sti; hlt */
	lfops_check(raw_flags() & X86_EFLAGS_IF, "safe_halt returns with IF set");
	halt();						/* halt: the next tick wakes it */
	lfops_check(raw_flags() & X86_EFLAGS_IF, "halt returns");

	pr_info("lfops: %d of %d checks passed (linkfix %s)\n", checks - failures, checks,
		IS_ENABLED(CONFIG_LINKFIX) ? "on" : "off");
	return failures ? -EINVAL : 0;
}

static void __exit lfops_exit(void)
{
}

module_init(lfops_init);
module_exit(lfops_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("linkfix: every op of the series, called from a module");
