/* paging.h: the page tables the self-test plays with (arch/<arch>/paging.c).
 *
 * Both arches identity-map the first GiB. TEST_VA (1 GiB) is mapped with
 * 4 KiB pages through a page table of its own, empty at boot, in two roots:
 * the boot root and an alternate root (for the write_cr3 test).
 */
#ifndef PAGING_H
#define PAGING_H

#define TEST_VA		0x40000000UL
#define PTE_PRESENT	0x1UL
#define PTE_WRITE	0x2UL

void paging_init(void);
unsigned long paging_root(int alt);		/* physical address of root 0 or 1 */
unsigned long *paging_test_pte(int alt, unsigned idx);	/* PTE of TEST_VA + idx pages */

static inline unsigned long make_pte(unsigned long phys)
{
	return phys | PTE_PRESENT | PTE_WRITE;
}

#endif
