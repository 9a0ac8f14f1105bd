/* linkfix.lds.h: linkfix's output sections as a macro for a linker script that
 * goes through cpp, in the style of Linux's include/asm-generic/vmlinux.lds.h.
 *
 *	#include "linkfix.lds.h"
 *	...
 *	LINKFIX_TABLES
 *
 * inside SECTIONS { }. Each output section is loaded at ADDR - LOAD_OFFSET
 * (LOAD_OFFSET: 0 unless the script defines it first). The tables are read
 * only at boot (linkfix_boot_select copies the state record, linkfix_boot_patch
 * reads the rest) and by `linkfix patch` after the link, so a kernel places
 * LINKFIX_TABLES between __init_begin and __init_end, next to .altinstructions,
 * and frees them with init memory. The section names and the
 * __linkfix_<table>_start/_end symbols are those of linkfix.lds.
 * docs/FORMAT.md describes the contents.
 */
#ifndef LINKFIX_LDS_H
#define LINKFIX_LDS_H

#ifndef LOAD_OFFSET
#define LOAD_OFFSET 0
#endif

#define LINKFIX_TABLES							\
	. = ALIGN(8);							\
	.linkfix.meta : AT(ADDR(.linkfix.meta) - LOAD_OFFSET) {		\
		__linkfix_meta_start = .;				\
		KEEP(*(.linkfix.meta))					\
		__linkfix_meta_end = .;					\
	}								\
	. = ALIGN(8);							\
	.linkfix.sites : AT(ADDR(.linkfix.sites) - LOAD_OFFSET) {	\
		__linkfix_sites_start = .;				\
		KEEP(*(.linkfix.sites))					\
		__linkfix_sites_end = .;				\
	}								\
	. = ALIGN(8);							\
	.linkfix.branches : AT(ADDR(.linkfix.branches) - LOAD_OFFSET) {	\
		__linkfix_branches_start = .;				\
		KEEP(*(.linkfix.branches))				\
		__linkfix_branches_end = .;				\
	}								\
	. = ALIGN(8);							\
	.linkfix.repl : AT(ADDR(.linkfix.repl) - LOAD_OFFSET) {		\
		__linkfix_repl_start = .;				\
		KEEP(*(.linkfix.repl))					\
		__linkfix_repl_end = .;					\
	}

#endif /* LINKFIX_LDS_H */
