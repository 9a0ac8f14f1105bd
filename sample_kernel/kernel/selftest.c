/* selftest.c: run every op on the selected backend and check its semantics.
 *
 * Each op runs twice: from its C site (pass 0) and from an assembler site
 * (pass 1, regcheck_<op> in entry.S), which also checks that the site changed
 * no register the op does not declare. One line per op:
 *
 *     op <name>: ok (<what was observed>)   or   op <name>: FAIL (<what was wrong>)
 *
 * The observations are the same for a generic image running backend B and an
 * image patched for B: only the header line says which one this is.
 */
#include "hv.h"
#include "kernel.h"
#include "paging.h"
#include "percpu.h"
#include "raw.h"

enum {
	OP_IRQ_DISABLE, OP_IRQ_ENABLE, OP_SAVE_FL, OP_RESTORE_FL, OP_READ_CR2, OP_READ_CR3,
	OP_WRITE_CR3, OP_SET_PTE, OP_FLUSH_TLB, OP_IO_DELAY, OP_SAFE_HALT, N_OPS
};

static const char *const op_names[N_OPS] = {
	"irq_disable", "irq_enable", "save_fl", "restore_fl", "read_cr2", "read_cr3",
	"write_cr3", "set_pte", "flush_tlb", "io_delay", "safe_halt",
};

extern unsigned long regcheck_in[16], regcheck_out[16];
void regcheck_irq_disable(void);
void regcheck_irq_enable(void);
void regcheck_save_fl(void);
void regcheck_restore_fl(void);
void regcheck_read_cr2(void);
void regcheck_read_cr3(void);
void regcheck_write_cr3(void);
void regcheck_set_pte(void);
void regcheck_flush_tlb(void);
void regcheck_io_delay(void);
void regcheck_safe_halt(void);

static void (*const regcheck_fn[N_OPS])(void) = {
	regcheck_irq_disable, regcheck_irq_enable, regcheck_save_fl, regcheck_restore_fl,
	regcheck_read_cr2, regcheck_read_cr3, regcheck_write_cr3, regcheck_set_pte,
	regcheck_flush_tlb, regcheck_io_delay, regcheck_safe_halt,
};

#ifdef __x86_64__
#define N_REGS 15
static const char *const reg_names[N_REGS] = {
	"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
	"r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
};
#define R_AX	0
#define R_ARG0	5	/* rdi */
#define R_ARG1	4	/* rsi */
#define SENTINEL(i) (0x5e5e5e5e00000000UL | ((unsigned long)(i) * 0x01010101UL))
#else
#define N_REGS 7
static const char *const reg_names[N_REGS] = { "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp" };
#define R_AX	0
#define R_ARG0	0	/* eax (regparm) */
#define R_ARG1	3	/* edx */
#define SENTINEL(i) (0x5e000000UL | ((unsigned long)(i) * 0x00010101UL))
#endif

/* What each op may change: its result register and declared clobbers. */
static const unsigned long op_clobbers[N_OPS] = {
	[OP_SAVE_FL] = 1UL << R_AX,
	[OP_READ_CR2] = 1UL << R_AX,
	[OP_READ_CR3] = 1UL << R_AX,
	[OP_FLUSH_TLB] = 1UL << R_AX,
};
static const unsigned char op_nargs[N_OPS] = {
	[OP_RESTORE_FL] = 1, [OP_WRITE_CR3] = 1, [OP_SET_PTE] = 2,
};

static unsigned be;		/* the backend whose semantics are checked */
static int pass;		/* 0: C site, 1: assembler site */
static char detail[160];	/* what pass 0 observed */
static char why[160];		/* the first failed expectation */

static void say(const char *fmt, ...)
{
	va_list ap;

	if (pass)
		return;
	va_start(ap, fmt);
	vsnprintk(detail, sizeof(detail), fmt, ap);
	va_end(ap);
}

static void expect(int cond, const char *fmt, ...)
{
	va_list ap;
	int n = 0;

	if (cond || why[0])
		return;
	if (pass)
		n = snprintk(why, sizeof(why), "asm site: ");
	va_start(ap, fmt);
	vsnprintk(why + n, sizeof(why) - n, fmt, ap);
	va_end(ap);
}

/* Run `op` once, from C or from its assembler site. Not inlined: every op
 * has exactly one C site here (tests find and corrupt one of them). */
static __noinline unsigned long do_op(int op, unsigned long a0, unsigned long a1)
{
	if (pass) {
		int i;

		for (i = 0; i < N_REGS; i++)
			regcheck_in[i] = SENTINEL(i);
		if (op_nargs[op] >= 1)
			regcheck_in[R_ARG0] = a0;
		if (op_nargs[op] >= 2)
			regcheck_in[R_ARG1] = a1;
		regcheck_fn[op]();
		for (i = 0; i < N_REGS; i++)
			expect((op_clobbers[op] >> i & 1) || regcheck_out[i] == regcheck_in[i],
			       "%%%s changed from 0x%lx to 0x%lx", reg_names[i], regcheck_in[i],
			       regcheck_out[i]);
		return regcheck_out[R_AX];
	}
	switch (op) {
	case OP_IRQ_DISABLE: irq_disable(); break;
	case OP_IRQ_ENABLE: irq_enable(); break;
	case OP_SAVE_FL: return save_fl();
	case OP_RESTORE_FL: restore_fl(a0); break;
	case OP_READ_CR2: return read_cr2();
	case OP_READ_CR3: return read_cr3();
	case OP_WRITE_CR3: write_cr3(a0); break;
	case OP_SET_PTE: set_pte((unsigned long *)a0, a1); break;
	case OP_FLUSH_TLB: flush_tlb(); break;
	case OP_IO_DELAY: io_delay(); break;
	case OP_SAFE_HALT: safe_halt(); break;
	}
	return 0;
}

static unsigned long hypercalls(void)
{
	return xen_model.hypercalls + lguest_model.hypercalls;
}

static int hw_if(void)
{
	return (raw_save_flags() & X86_EFLAGS_IF) != 0;
}

/* Interrupts off everywhere, nothing pending. */
static void baseline(void)
{
	raw_cli();
	pic_unmask_timer(0);
	percpu0.xen_mask = 1;
	percpu0.xen_pending = 0;
	lguest_data.irq_enabled = 0;
	lguest_data.irq_pending = 0;
}

/* Native: make IRQ0 pending at the PIC (hardware IF is off). */
static int arm_pending_timer(void)
{
	long n;

	pit_oneshot(50);
	pic_unmask_timer(1);
	for (n = 0; n < 1000000 && !pic_timer_pending(); n++)
		;
	return pic_timer_pending();
}

static int wait_timer(unsigned long t0)
{
	long n;

	for (n = 0; n < 1000000 && timer_irqs == t0; n++)
		barrier();
	return timer_irqs != t0;
}

/* ---- the pages TEST_VA is mapped to ---- */
#define WORDS (PAGE_SIZE / sizeof(unsigned long))
static unsigned long page_a[WORDS] __aligned(4096);
static unsigned long page_b[WORDS] __aligned(4096);
static unsigned long page_c[WORDS] __aligned(4096);
#define MAGIC_A 0x0aaaaaa1UL
#define MAGIC_B 0x0bbbbbb2UL
#define MAGIC_C 0x0cccccc3UL

static unsigned long read_test(unsigned idx)
{
	return *(volatile unsigned long *)(TEST_VA + idx * PAGE_SIZE);
}

/* ---- one test per op ---- */

static void t_irq_disable(void)
{
	unsigned long h = hypercalls();

	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		raw_sti();
		do_op(OP_IRQ_DISABLE, 0, 0);
		expect(!hw_if(), "IF still set");
		say("IF 1 -> 0");
		break;
	case LINKFIX_BACKEND_XEN:
		percpu0.xen_mask = 0;
		do_op(OP_IRQ_DISABLE, 0, 0);
		expect(percpu0.xen_mask == 1, "vcpu mask %u, expected 1", percpu0.xen_mask);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		expect(!hw_if(), "hardware IF changed");
		say("vcpu mask 0 -> 1, no hypercall");
		break;
	case LINKFIX_BACKEND_LGUEST:
		lguest_data.irq_enabled = X86_EFLAGS_IF;
		do_op(OP_IRQ_DISABLE, 0, 0);
		expect(lguest_data.irq_enabled == 0, "irq_enabled 0x%x", lguest_data.irq_enabled);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		expect(!hw_if(), "hardware IF changed");
		say("irq_enabled 0x200 -> 0, no hypercall");
		break;
	}
}

static void t_irq_enable(void)
{
	unsigned long h = hypercalls(), t0 = timer_irqs, e0 = events_taken;

	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		expect(arm_pending_timer(), "could not make IRQ0 pending");
		do_op(OP_IRQ_ENABLE, 0, 0);
		expect(hw_if(), "IF not set");
		expect(wait_timer(t0) && timer_irqs == t0 + 1, "%lu timer interrupt(s), expected 1",
		       timer_irqs - t0);
		say("IF 0 -> 1, pending timer interrupt taken");
		break;
	case LINKFIX_BACKEND_XEN:
		/* nothing pending: no hypercall */
		do_op(OP_IRQ_ENABLE, 0, 0);
		expect(percpu0.xen_mask == 0, "vcpu mask %u, expected 0", percpu0.xen_mask);
		expect(hypercalls() == h, "%lu hypercall(s) with nothing pending", hypercalls() - h);
		/* an event arrived while masked: delivered on unmask */
		percpu0.xen_mask = 1;
		xen_raise_event();
		do_op(OP_IRQ_ENABLE, 0, 0);
		expect(percpu0.xen_mask == 0, "vcpu mask %u, expected 0", percpu0.xen_mask);
		expect(events_taken == e0 + 1, "%lu upcall(s), expected 1", events_taken - e0);
		expect(percpu0.xen_pending == 0, "event still pending");
		expect(hypercalls() == h + 1, "%lu hypercall(s), expected 1", hypercalls() - h);
		say("vcpu mask 1 -> 0; pending event delivered by 1 hypercall");
		break;
	case LINKFIX_BACKEND_LGUEST:
		do_op(OP_IRQ_ENABLE, 0, 0);
		expect(lguest_data.irq_enabled == X86_EFLAGS_IF, "irq_enabled 0x%x",
		       lguest_data.irq_enabled);
		expect(hypercalls() == h, "%lu hypercall(s) with nothing pending", hypercalls() - h);
		lguest_data.irq_enabled = 0;
		lguest_raise_interrupt();
		do_op(OP_IRQ_ENABLE, 0, 0);
		expect(lguest_data.irq_enabled == X86_EFLAGS_IF, "irq_enabled 0x%x",
		       lguest_data.irq_enabled);
		expect(events_taken == e0 + 1, "%lu interrupt(s), expected 1", events_taken - e0);
		expect(lguest_data.irq_pending == 0, "interrupt still pending");
		expect(hypercalls() == h + 1, "%lu hypercall(s), expected 1", hypercalls() - h);
		say("irq_enabled 0 -> 0x200; pending interrupt delivered by 1 hypercall");
		break;
	}
}

static void t_save_fl(void)
{
	unsigned long h = hypercalls(), off, on;

	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		off = do_op(OP_SAVE_FL, 0, 0);
		raw_sti();
		on = do_op(OP_SAVE_FL, 0, 0);
		raw_cli();
		expect(!(off & X86_EFLAGS_IF) && (on & X86_EFLAGS_IF),
		       "IF bit 0x%lx / 0x%lx", off & X86_EFLAGS_IF, on & X86_EFLAGS_IF);
		say("IF bit follows the flags register (0 / 0x200)");
		break;
	case LINKFIX_BACKEND_XEN:
		off = do_op(OP_SAVE_FL, 0, 0);
		percpu0.xen_mask = 0;
		on = do_op(OP_SAVE_FL, 0, 0);
		expect(off == 0 && on == X86_EFLAGS_IF, "got 0x%lx / 0x%lx", off, on);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("mask 1 / 0 reads as 0 / 0x200, no hypercall");
		break;
	case LINKFIX_BACKEND_LGUEST:
		off = do_op(OP_SAVE_FL, 0, 0);
		lguest_data.irq_enabled = X86_EFLAGS_IF;
		on = do_op(OP_SAVE_FL, 0, 0);
		expect(off == 0 && on == X86_EFLAGS_IF, "got 0x%lx / 0x%lx", off, on);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("irq_enabled 0 / 0x200 reads as 0 / 0x200, no hypercall");
		break;
	}
}

static void t_restore_fl(void)
{
	unsigned long h = hypercalls(), e0 = events_taken, f = raw_save_flags();

	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		do_op(OP_RESTORE_FL, f | X86_EFLAGS_IF, 0);
		expect(hw_if(), "IF not set by restore_fl(IF)");
		do_op(OP_RESTORE_FL, f & ~X86_EFLAGS_IF, 0);
		expect(!hw_if(), "IF not cleared by restore_fl(0)");
		say("IF 0 -> 1 -> 0");
		break;
	case LINKFIX_BACKEND_XEN:
		percpu0.xen_mask = 0;
		do_op(OP_RESTORE_FL, 0, 0);
		expect(percpu0.xen_mask == 1, "restore_fl(0): mask %u", percpu0.xen_mask);
		expect(hypercalls() == h, "restore_fl(0): %lu hypercall(s)", hypercalls() - h);
		xen_raise_event();
		do_op(OP_RESTORE_FL, X86_EFLAGS_IF, 0);
		expect(percpu0.xen_mask == 0, "restore_fl(IF): mask %u", percpu0.xen_mask);
		expect(events_taken == e0 + 1, "%lu upcall(s), expected 1", events_taken - e0);
		expect(hypercalls() == h + 1, "%lu hypercall(s), expected 1", hypercalls() - h);
		say("mask 0 -> 1 inline; -> 0 delivers the pending event (1 hypercall)");
		break;
	case LINKFIX_BACKEND_LGUEST:
		lguest_data.irq_enabled = X86_EFLAGS_IF;
		do_op(OP_RESTORE_FL, 0, 0);
		expect(lguest_data.irq_enabled == 0, "restore_fl(0): irq_enabled 0x%x",
		       lguest_data.irq_enabled);
		expect(hypercalls() == h, "restore_fl(0): %lu hypercall(s)", hypercalls() - h);
		lguest_raise_interrupt();
		do_op(OP_RESTORE_FL, X86_EFLAGS_IF, 0);
		expect(lguest_data.irq_enabled == X86_EFLAGS_IF, "restore_fl(IF): irq_enabled 0x%x",
		       lguest_data.irq_enabled);
		expect(events_taken == e0 + 1, "%lu interrupt(s), expected 1", events_taken - e0);
		expect(hypercalls() == h + 1, "%lu hypercall(s), expected 1", hypercalls() - h);
		say("irq_enabled 0x200 -> 0; -> 0x200 delivers the pending interrupt (1 hypercall)");
		break;
	}
	expect(!hw_if() || be == LINKFIX_BACKEND_NATIVE, "hardware IF changed");
}

static void t_read_cr2(void)
{
	unsigned long h = hypercalls(), v;
	unsigned long hw = 0x00c0ffeeUL << 4, virt = 0x0badf00dUL << 4;

	raw_write_cr2(hw + pass);
	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		v = do_op(OP_READ_CR2, 0, 0);
		expect(v == hw + pass, "read 0x%lx, cr2 is 0x%lx", v, hw + pass);
		say("returns the hardware cr2");
		break;
	case LINKFIX_BACKEND_XEN:
		xen_set_fault_address(virt + pass);
		v = do_op(OP_READ_CR2, 0, 0);
		expect(v == virt + pass, "read 0x%lx, vcpu_info cr2 is 0x%lx", v, virt + pass);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("returns vcpu_info's cr2, not the hardware's; no hypercall");
		break;
	case LINKFIX_BACKEND_LGUEST:
		lguest_set_fault_address(virt + pass);
		v = do_op(OP_READ_CR2, 0, 0);
		expect(v == virt + pass, "read 0x%lx, lguest_data cr2 is 0x%lx", v, virt + pass);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("returns lguest_data's cr2, not the hardware's; no hypercall");
		break;
	}
}

static void t_read_cr3(void)
{
	unsigned long h = hypercalls(), v, hw = raw_read_cr3(), cached = paging_root(1);

	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		v = do_op(OP_READ_CR3, 0, 0);
		expect(v == hw, "read 0x%lx, cr3 is 0x%lx", v, hw);
		say("returns the hardware cr3");
		break;
	case LINKFIX_BACKEND_XEN:
		/* the guest's cached copy is what counts: make it differ */
		percpu0.xen_cr3 = cached;
		v = do_op(OP_READ_CR3, 0, 0);
		percpu0.xen_cr3 = hw;
		expect(v == cached, "read 0x%lx, cached cr3 is 0x%lx", v, cached);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("returns the per-CPU cached cr3; no hypercall");
		break;
	case LINKFIX_BACKEND_LGUEST:
		lguest_data.cr3 = cached;
		v = do_op(OP_READ_CR3, 0, 0);
		lguest_data.cr3 = hw;
		expect(v == cached, "read 0x%lx, lguest_data cr3 is 0x%lx", v, cached);
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("returns lguest_data's cr3; no hypercall");
		break;
	}
}

static void t_write_cr3(void)
{
	unsigned long h = hypercalls(), boot = paging_root(0), alt = paging_root(1), got;

	*paging_test_pte(0, 0) = make_pte((unsigned long)page_a);
	*paging_test_pte(1, 0) = make_pte((unsigned long)page_b);
	raw_write_cr3(boot);
	expect(read_test(0) == MAGIC_A, "boot root does not map TEST_VA to page A");
	do_op(OP_WRITE_CR3, alt, 0);
	expect(raw_read_cr3() == alt, "cr3 is 0x%lx, expected 0x%lx", raw_read_cr3(), alt);
	got = read_test(0);
	expect(got == MAGIC_B, "TEST_VA reads 0x%lx through the new root", got);
	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		raw_write_cr3(boot);
		say("cr3 switched, TEST_VA now maps the new root's page");
		break;
	case LINKFIX_BACKEND_XEN:
		expect(hypercalls() == h + 1 && xen_model.last_cr3 == alt,
		       "%lu hypercall(s), recorded cr3 0x%lx", hypercalls() - h, xen_model.last_cr3);
		expect(percpu0.xen_cr3 == alt, "cached cr3 not updated");
		xen_write_cr3(boot);
		say("1 NEW_BASEPTR hypercall with the new root; cr3 switched");
		break;
	case LINKFIX_BACKEND_LGUEST:
		expect(hypercalls() == h + 1 && lguest_model.last_cr3 == alt,
		       "%lu hypercall(s), recorded cr3 0x%lx", hypercalls() - h,
		       lguest_model.last_cr3);
		expect(lguest_data.cr3 == alt, "lguest_data cr3 not updated");
		lguest_write_cr3(boot);
		say("1 NEW_PGTABLE hypercall with the new root; cr3 switched");
		break;
	}
	*paging_test_pte(0, 0) = 0;
	*paging_test_pte(1, 0) = 0;
	raw_write_cr3(boot);
}

static void t_set_pte(void)
{
	unsigned long h = hypercalls(), *p = paging_test_pte(0, 1);
	unsigned long val = make_pte((unsigned long)page_c), got;

	*p = 0;
	raw_invlpg(TEST_VA + PAGE_SIZE);
	do_op(OP_SET_PTE, (unsigned long)p, val);
	expect(*p == val, "entry is 0x%lx, expected 0x%lx", *p, val);
	raw_invlpg(TEST_VA + PAGE_SIZE);
	got = read_test(1);
	expect(got == MAGIC_C, "TEST_VA+4K reads 0x%lx", got);
	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("entry written, the page is mapped");
		break;
	case LINKFIX_BACKEND_XEN:
		expect(hypercalls() == h + 1, "%lu hypercall(s), expected 1", hypercalls() - h);
		expect(xen_model.last_ptep == (unsigned long)p && xen_model.last_pteval == val,
		       "mmu_update recorded (0x%lx, 0x%lx)", xen_model.last_ptep,
		       xen_model.last_pteval);
		say("1 mmu_update hypercall with (ptep, val); the page is mapped");
		break;
	case LINKFIX_BACKEND_LGUEST:
		expect(hypercalls() == h + 1, "%lu hypercall(s), expected 1", hypercalls() - h);
		expect(lguest_model.last_ptep == (unsigned long)p && lguest_model.last_pteval == val,
		       "host saw (0x%lx, 0x%lx)", lguest_model.last_ptep, lguest_model.last_pteval);
		say("entry written inline, then 1 SET_PTE hypercall; the page is mapped");
		break;
	}
	*p = 0;
	raw_invlpg(TEST_VA + PAGE_SIZE);
}

static void t_flush_tlb(void)
{
	unsigned long h = hypercalls(), *p = paging_test_pte(0, 2), got;

	*p = make_pte((unsigned long)page_a);
	raw_invlpg(TEST_VA + 2 * PAGE_SIZE);
	expect(read_test(2) == MAGIC_A, "TEST_VA+8K does not read page A");
	/* change the entry behind the TLB's back: only a flush makes it visible */
	*p = make_pte((unsigned long)page_b);
	do_op(OP_FLUSH_TLB, 0, 0);
	got = read_test(2);
	expect(got == MAGIC_B, "TEST_VA+8K reads 0x%lx after the flush", got);
	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("stale translation gone");
		break;
	case LINKFIX_BACKEND_XEN:
		expect(hypercalls() == h + 1 && xen_model.tlb_flushes,
		       "%lu hypercall(s), expected 1", hypercalls() - h);
		say("1 TLB_FLUSH_LOCAL hypercall; stale translation gone");
		break;
	case LINKFIX_BACKEND_LGUEST:
		/* no lguest body: the site keeps the dispatch call to the native body */
		expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
		say("no lguest body: dispatched to native; stale translation gone");
		break;
	}
	*p = 0;
	raw_invlpg(TEST_VA + 2 * PAGE_SIZE);
}

static void t_io_delay(void)
{
	unsigned long h = hypercalls();

	do_op(OP_IO_DELAY, 0, 0);
	expect(hypercalls() == h, "%lu hypercall(s)", hypercalls() - h);
	expect(!hw_if(), "IF changed");
	if (be == LINKFIX_BACKEND_NATIVE)
		say("outb to port 0x80, no flag or register changed");
	else
		say("nothing to do: no hypercall, no register changed");
}

static void t_safe_halt(void)
{
	unsigned long h = hypercalls(), t0 = timer_irqs, e0 = events_taken;

	switch (be) {
	case LINKFIX_BACKEND_NATIVE:
		pic_unmask_timer(1);
		pit_oneshot(1000);
		do_op(OP_SAFE_HALT, 0, 0);
		expect(timer_irqs == t0 + 1, "%lu timer interrupt(s), expected 1", timer_irqs - t0);
		expect(hw_if(), "IF not set after the halt");
		say("halted until the timer interrupt; IF set");
		break;
	case LINKFIX_BACKEND_XEN:
		do_op(OP_SAFE_HALT, 0, 0);
		expect(xen_model.blocks && hypercalls() == h + 1,
		       "%lu hypercall(s), expected 1 SCHEDOP_block", hypercalls() - h);
		expect(events_taken == e0 + 1, "%lu upcall(s), expected 1", events_taken - e0);
		expect(percpu0.xen_mask == 0, "mask %u after the block", percpu0.xen_mask);
		expect(!hw_if(), "hardware IF changed");
		say("1 SCHEDOP_block hypercall; woken by an event; mask 0");
		break;
	case LINKFIX_BACKEND_LGUEST:
		do_op(OP_SAFE_HALT, 0, 0);
		expect(lguest_model.halts && hypercalls() == h + 1,
		       "%lu hypercall(s), expected 1 HALT", hypercalls() - h);
		expect(events_taken == e0 + 1, "%lu interrupt(s), expected 1", events_taken - e0);
		expect(lguest_data.irq_enabled == X86_EFLAGS_IF, "irq_enabled 0x%x after the halt",
		       lguest_data.irq_enabled);
		expect(!hw_if(), "hardware IF changed");
		say("1 HALT hypercall; woken by an interrupt; irq_enabled 0x200");
		break;
	}
}

static void (*const tests[N_OPS])(void) = {
	t_irq_disable, t_irq_enable, t_save_fl, t_restore_fl, t_read_cr2, t_read_cr3,
	t_write_cr3, t_set_pte, t_flush_tlb, t_io_delay, t_safe_halt,
};

static int run_test(int op)
{
	why[0] = 0;
	detail[0] = 0;
	for (pass = 0; pass < 2; pass++) {
		baseline();
		tests[op]();
	}
	pass = 0;
	baseline();
	printk("op %s: %s (%s)\n", op_names[op], why[0] ? "FAIL" : "ok", why[0] ? why : detail);
	return !why[0];
}

/* The branch sites: exactly the selected backend's is true, and only xen
 * made the page-table pin hypercall at boot (main.c). */
static int test_branch(void)
{
	int n = linkfix_backend_is(native) ? 1 : 0;
	int x = linkfix_backend_is(xen) ? 1 : 0;
	int l = linkfix_backend_is(lguest) ? 1 : 0;

	why[0] = 0;
	expect(n == (be == LINKFIX_BACKEND_NATIVE) && x == (be == LINKFIX_BACKEND_XEN) &&
	       l == (be == LINKFIX_BACKEND_LGUEST), "native=%d xen=%d lguest=%d", n, x, l);
	if (be == LINKFIX_BACKEND_XEN)
		expect(xen_model.pins == 1 && xen_model.last_pin_pfn == paging_root(0) >> 12,
		       "%lu pin hypercall(s), pfn 0x%lx", xen_model.pins, xen_model.last_pin_pfn);
	else
		expect(xen_model.pins == 0, "%lu pin hypercall(s) on a non-xen backend",
		       xen_model.pins);
	printk("op backend_is: %s (", why[0] ? "FAIL" : "ok");
	if (why[0])
		printk("%s)\n", why);
	else
		printk("native=%d xen=%d lguest=%d; %s)\n", n, x, l,
		       be == LINKFIX_BACKEND_XEN ? "root table pinned by 1 hypercall"
						 : "no pin hypercall");
	return !why[0];
}

int selftest(void)
{
	unsigned patched = linkfix_patched_target();
	int op, passed = 0;

	be = linkfix_current_backend;
	printk("selftest: arch=%s backend=%s patched=%s paravirt=%s\n", arch_name(),
	       linkfix_backend_name(be), patched ? linkfix_backend_name(patched) : "no",
	       paravirt_enabled ? "y" : "n");
	page_a[0] = MAGIC_A;
	page_b[0] = MAGIC_B;
	page_c[0] = MAGIC_C;
	expect(percpu_self_gs() == (unsigned long)&percpu0, "%%gs does not reach the per-CPU area");
	if (why[0]) {
		printk("selftest: FAIL (%s)\n", why);
		return 1;
	}
	if (patched && patched != be) {
		printk("selftest: FAIL (patched for %s but running %s)\n",
		       linkfix_backend_name(patched), linkfix_backend_name(be));
		return 1;
	}
	for (op = 0; op < N_OPS; op++)
		passed += run_test(op);
	passed += test_branch();
	printk("selftest: %d of %d ops passed\n", passed, N_OPS + 1);
	return passed != N_OPS + 1;
}
