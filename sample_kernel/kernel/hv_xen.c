/* hv_xen.c: the xen backend's hypervisor, modelled inside the kernel.
 *
 * State the guest shares with the hypervisor lives in the per-CPU vcpu_info
 * (percpu0: event mask, pending, cr2, cached cr3), reached by the inline
 * bodies through %gs. Everything else is a hypercall: a call into this file,
 * counted and recorded in xen_model. Delivering an event is `int VEC_EVENT`:
 * the upcall enters through event_entry (entry.S) into xen_do_event().
 */
#include "hv.h"
#include "percpu.h"
#include "raw.h"

struct xen_model xen_model;

static void hypercall(void)
{
	xen_model.hypercalls++;
}

void xen_model_init(void)
{
	/* A vcpu starts with event delivery masked, like the real one. */
	percpu0.xen_mask = 1;
	percpu0.xen_pending = 0;
	percpu0.xen_cr2 = 0;
	percpu0.xen_cr3 = raw_read_cr3();
}

/* An event arrives from the outside (a timer, a device). */
void xen_raise_event(void)
{
	percpu0.xen_pending = 1;
}

/* Xen reports a guest page fault's address in vcpu_info.arch.cr2. */
void xen_set_fault_address(unsigned long cr2)
{
	percpu0.xen_cr2 = cr2;
}

/* HYPERVISOR_xen_version(0): "deliver whatever is pending, now". The upcall
 * is injected only if the guest has events unmasked. */
static void xen_force_evtchn_callback(void)
{
	hypercall();
	xen_model.evtchn_callbacks++;
	if (!percpu0.xen_mask && percpu0.xen_pending)
		__asm__ __volatile__("int %0" : : "i"(VEC_EVENT) : "memory");
}

/* The upcall handler: consume the pending event. */
void xen_do_event(void)
{
	percpu0.xen_pending = 0;
	xen_model.events++;
}

void LINKFIX_CALLEE xen_irq_enable(void)
{
	percpu0.xen_mask = 0;
	barrier();	/* unmask, then check: an event may have arrived while masked */
	if (percpu0.xen_pending)
		xen_force_evtchn_callback();
}

/* MMUEXT_NEW_BASEPTR: the hypervisor installs the new root. */
void LINKFIX_CALLEE xen_write_cr3(unsigned long val)
{
	hypercall();
	xen_model.new_baseptr++;
	xen_model.last_cr3 = val;
	percpu0.xen_cr3 = val;
	raw_write_cr3(val);
}

/* HYPERVISOR_mmu_update: the hypervisor validates and writes the entry. */
void LINKFIX_CALLEE xen_set_pte(unsigned long *ptep, unsigned long val)
{
	hypercall();
	xen_model.mmu_updates++;
	xen_model.last_ptep = (unsigned long)ptep;
	xen_model.last_pteval = val;
	*(volatile unsigned long *)ptep = val;
}

/* MMUEXT_TLB_FLUSH_LOCAL */
void LINKFIX_CALLEE xen_flush_tlb(void)
{
	hypercall();
	xen_model.tlb_flushes++;
	raw_write_cr3(raw_read_cr3());
}

/* SCHEDOP_block: unmask events and sleep until one arrives. Nothing else
 * runs here, so the model's timer fires at once. */
void LINKFIX_CALLEE xen_safe_halt(void)
{
	hypercall();
	xen_model.blocks++;
	percpu0.xen_mask = 0;
	if (!percpu0.xen_pending)
		percpu0.xen_pending = 1;
	__asm__ __volatile__("int %0" : : "i"(VEC_EVENT) : "memory");
}

/* MMUEXT_PIN_L<level>_TABLE */
void xen_pin_table(unsigned long pfn, unsigned level)
{
	hypercall();
	xen_model.pins++;
	xen_model.last_pin_pfn = pfn;
	(void)level;
}
