/* hv_lguest.c: the lguest backend's host, modelled inside the kernel.
 *
 * The guest and the host share struct lguest_data: the guest flips
 * irq_enabled inline (no call), reads cr2/cr3 from it inline, and calls out
 * only when the host must act: an interrupt is pending when it enables, a new
 * page table, a changed entry, a halt. Those calls are the hypercalls, counted
 * and recorded in lguest_model.
 */
#include "hv.h"
#include "raw.h"

#define STR(x) #x
#define XSTR(x) STR(x)

#define LG_IRQ_ENABLED	0
#define LG_CR2		8
#ifdef __x86_64__
#define LG_CR3		16
#else
#define LG_CR3		12
#endif

struct lguest_data lguest_data __aligned(4096);
struct lguest_model lguest_model;

_Static_assert(offsetof(struct lguest_data, irq_enabled) == LG_IRQ_ENABLED, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, cr2) == LG_CR2, "lguest_data layout");
_Static_assert(offsetof(struct lguest_data, cr3) == LG_CR3, "lguest_data layout");

/* The names the spec's bodies use for the shared fields. */
__asm__(
	".globl lguest_irq_enabled, lguest_cr2, lguest_cr3\n"
	".set lguest_irq_enabled, lguest_data + " XSTR(LG_IRQ_ENABLED) "\n"
	".set lguest_cr2, lguest_data + " XSTR(LG_CR2) "\n"
	".set lguest_cr3, lguest_data + " XSTR(LG_CR3) "\n");

static void hcall(void)
{
	lguest_model.hypercalls++;
}

void lguest_model_init(void)
{
	lguest_data.irq_enabled = 0;
	lguest_data.irq_pending = 0;
	lguest_data.cr2 = 0;
	lguest_data.cr3 = raw_read_cr3();
}

void lguest_raise_interrupt(void)
{
	lguest_data.irq_pending = 1;
}

void lguest_set_fault_address(unsigned long cr2)
{
	lguest_data.cr2 = cr2;
}

/* LHCALL_SEND_INTERRUPTS: the host delivers what is pending. */
static void lguest_send_interrupts(void)
{
	hcall();
	lguest_model.send_interrupts++;
	if (lguest_data.irq_enabled && lguest_data.irq_pending)
		__asm__ __volatile__("int %0" : : "i"(VEC_EVENT) : "memory");
}

void lguest_do_interrupt(void)
{
	lguest_data.irq_pending = 0;
	lguest_model.interrupts++;
}

void LINKFIX_CALLEE lguest_irq_enable(void)
{
	lguest_data.irq_enabled = X86_EFLAGS_IF;
	barrier();
	if (lguest_data.irq_pending)
		lguest_send_interrupts();
}

void LINKFIX_CALLEE lguest_restore_fl(unsigned long flags)
{
	lguest_data.irq_enabled = flags & X86_EFLAGS_IF;
	barrier();
	if ((flags & X86_EFLAGS_IF) && lguest_data.irq_pending)
		lguest_send_interrupts();
}

/* LHCALL_NEW_PGTABLE */
void LINKFIX_CALLEE lguest_write_cr3(unsigned long val)
{
	hcall();
	lguest_model.new_pgtables++;
	lguest_model.last_cr3 = val;
	lguest_data.cr3 = val;
	raw_write_cr3(val);
}

/* LHCALL_SET_PTE: the guest already wrote the entry; the host reads it. */
void LINKFIX_CALLEE lguest_pte_update(unsigned long *ptep, unsigned long val)
{
	hcall();
	lguest_model.set_ptes++;
	lguest_model.last_ptep = (unsigned long)ptep;
	lguest_model.last_pteval = *(volatile unsigned long *)ptep;
	(void)val;
}

/* LHCALL_HALT: interrupts on, sleep until one comes (the host's timer). */
void LINKFIX_CALLEE lguest_safe_halt(void)
{
	hcall();
	lguest_model.halts++;
	lguest_data.irq_enabled = X86_EFLAGS_IF;
	if (!lguest_data.irq_pending)
		lguest_data.irq_pending = 1;
	__asm__ __volatile__("int %0" : : "i"(VEC_EVENT) : "memory");
}
