// SPDX-License-Identifier: GPL-2.0
/*
 * The harness's own test module: proves that a module builds against the tree,
 * loads, unwinds (dump_stack() goes through ORC or frame pointers, and must
 * name lfhello_init) and unloads. The linkfix ops module comes later.
 */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>

static noinline void lfhello_trace(void)
{
	dump_stack();
}

static int __init lfhello_init(void)
{
	pr_info("lfhello: loaded\n");
	lfhello_trace();
	return 0;
}

static void __exit lfhello_exit(void)
{
	pr_info("lfhello: unloaded\n");
}

module_init(lfhello_init);
module_exit(lfhello_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("linkfix Linux harness test module");
