/* paging.c (x86_64): 4-level tables. boot.S identity-maps the first GiB with
 * 2 MiB pages (boot_pml4 -> boot_pdpt -> boot_pd); here PDPT slot 1 (1 GiB,
 * TEST_VA) gets a page directory and a 4 KiB page table of its own, in the
 * boot root and in an alternate root that shares the identity map. */
#include "kernel.h"
#include "paging.h"
#include "raw.h"

extern unsigned long boot_pml4[512], boot_pdpt[512];

static unsigned long test_pd[512] __aligned(4096), test_pt[512] __aligned(4096);
static unsigned long alt_pml4[512] __aligned(4096), alt_pdpt[512] __aligned(4096);
static unsigned long alt_pd[512] __aligned(4096), alt_pt[512] __aligned(4096);

void paging_init(void)
{
	boot_pdpt[1] = make_pte((unsigned long)test_pd);
	test_pd[0] = make_pte((unsigned long)test_pt);

	alt_pml4[0] = make_pte((unsigned long)alt_pdpt);
	alt_pdpt[0] = boot_pdpt[0];
	alt_pdpt[1] = make_pte((unsigned long)alt_pd);
	alt_pd[0] = make_pte((unsigned long)alt_pt);
	raw_write_cr3(raw_read_cr3());
}

unsigned long paging_root(int alt)
{
	return alt ? (unsigned long)alt_pml4 : (unsigned long)boot_pml4;
}

unsigned long *paging_test_pte(int alt, unsigned idx)
{
	return alt ? &alt_pt[idx] : &test_pt[idx];
}
