/* hv.h: the in-kernel hypervisor models behind the xen and lguest backends.
 *
 * The models stand in for the hypervisor: a "hypercall" is a C call that is
 * counted and recorded, and delivering an event raises VEC_EVENT with `int`,
 * the way the real hypervisor would inject the upcall. The self-test reads
 * the records to check each backend's semantics.
 */
#ifndef HV_H
#define HV_H

#include "kernel.h"

struct xen_model {
	unsigned long hypercalls;	/* every hypercall */
	unsigned long evtchn_callbacks;	/* "deliver my pending event now" */
	unsigned long mmu_updates;	/* set_pte */
	unsigned long new_baseptr;	/* write_cr3 (MMUEXT_NEW_BASEPTR) */
	unsigned long tlb_flushes;	/* MMUEXT_TLB_FLUSH_LOCAL */
	unsigned long pins;		/* MMUEXT_PIN_L?_TABLE */
	unsigned long blocks;		/* SCHEDOP_block */
	unsigned long events;		/* events the guest handled */
	unsigned long last_ptep, last_pteval, last_cr3, last_pin_pfn;
};

struct lguest_model {
	unsigned long hypercalls;
	unsigned long send_interrupts;	/* LHCALL_SEND_INTERRUPTS */
	unsigned long set_ptes;		/* LHCALL_SET_PTE */
	unsigned long new_pgtables;	/* LHCALL_NEW_PGTABLE */
	unsigned long halts;		/* LHCALL_HALT */
	unsigned long interrupts;	/* interrupts the guest handled */
	unsigned long last_ptep, last_pteval, last_cr3;
};

/* The page shared with the lguest host (Linux: struct lguest_data). The inline
 * bodies name its fields as lguest_irq_enabled, lguest_cr2, lguest_cr3. */
struct lguest_data {
	volatile unsigned int irq_enabled;	/* X86_EFLAGS_IF or 0 */
	volatile unsigned int irq_pending;	/* the host has an interrupt for us */
	volatile unsigned long cr2;
	volatile unsigned long cr3;
};

extern struct xen_model xen_model;
extern struct lguest_model lguest_model;
extern struct lguest_data lguest_data;

void xen_model_init(void);
void xen_raise_event(void);		/* an event arrives (pending := 1) */
void xen_set_fault_address(unsigned long cr2);
void xen_pin_table(unsigned long pfn, unsigned level);
void xen_do_event(void);

void lguest_model_init(void);
void lguest_raise_interrupt(void);
void lguest_set_fault_address(unsigned long cr2);
void lguest_do_interrupt(void);

/* Bodies' call targets. linkfix.h declares the whole-call ones too; these
 * declarations match them (and the PARAVIRT=n build needs them). */
void LINKFIX_CALLEE xen_irq_enable(void);
void LINKFIX_CALLEE xen_write_cr3(unsigned long val);
void LINKFIX_CALLEE xen_set_pte(unsigned long *ptep, unsigned long val);
void LINKFIX_CALLEE xen_flush_tlb(void);
void LINKFIX_CALLEE xen_safe_halt(void);
void LINKFIX_CALLEE lguest_irq_enable(void);
void LINKFIX_CALLEE lguest_restore_fl(unsigned long flags);
void LINKFIX_CALLEE lguest_write_cr3(unsigned long val);
void LINKFIX_CALLEE lguest_pte_update(unsigned long *ptep, unsigned long val);
void LINKFIX_CALLEE lguest_safe_halt(void);

#endif
