/* paging.c (i386): two-level tables without PAE. The first GiB is
 * identity-mapped with 4 MiB pages (PSE); directory slot 256 (1 GiB,
 * TEST_VA) points to a 4 KiB page table of its own, in the boot directory
 * and in an alternate one. */
#include "kernel.h"
#include "paging.h"
#include "raw.h"

#define PDE_PS		0x80UL
#define CR4_PSE		0x10UL
#define CR0_PG		0x80000000UL
#define CR0_WP		0x00010000UL

static unsigned long boot_pd[1024] __aligned(4096), test_pt[1024] __aligned(4096);
static unsigned long alt_pd[1024] __aligned(4096), alt_pt[1024] __aligned(4096);

void paging_init(void)
{
	unsigned long cr;
	unsigned i;

	for (i = 0; i < 256; i++)
		boot_pd[i] = (i << 22) | PTE_PRESENT | PTE_WRITE | PDE_PS;
	for (i = 0; i < 256; i++)
		alt_pd[i] = boot_pd[i];
	boot_pd[TEST_VA >> 22] = make_pte((unsigned long)test_pt);
	alt_pd[TEST_VA >> 22] = make_pte((unsigned long)alt_pt);

	__asm__ __volatile__("mov %%cr4, %0" : "=r"(cr));
	__asm__ __volatile__("mov %0, %%cr4" : : "r"(cr | CR4_PSE));
	raw_write_cr3((unsigned long)boot_pd);
	__asm__ __volatile__("mov %%cr0, %0" : "=r"(cr));
	__asm__ __volatile__("mov %0, %%cr0" : : "r"(cr | CR0_PG | CR0_WP) : "memory");
}

unsigned long paging_root(int alt)
{
	return alt ? (unsigned long)alt_pd : (unsigned long)boot_pd;
}

unsigned long *paging_test_pte(int alt, unsigned idx)
{
	return alt ? &alt_pt[idx] : &test_pt[idx];
}
