/* percpu.h: layout of the per-CPU area that %gs points at.
 *
 * The xen backend's inline bodies address it as %gs:xen_vcpu_mask and so on:
 * those symbols are absolute offsets into this area (kernel/percpu_syms.S),
 * the way Linux reaches this_cpu(xen_vcpu_info). Shared by C and assembler.
 */
#ifndef PERCPU_H
#define PERCPU_H

/* struct vcpu_info as Xen lays it out: pending byte, mask byte, arch.cr2 */
#define PERCPU_XEN_PENDING	0
#define PERCPU_XEN_MASK		1
#define PERCPU_XEN_CR2		8
#define PERCPU_XEN_CR3		16	/* the guest's cached cr3 (Linux: xen_cr3) */
#define PERCPU_SELF		24	/* address of the area itself */
#define PERCPU_SIZE		64

#ifndef __ASSEMBLER__
struct percpu {
	volatile unsigned char xen_pending;	/* an event is waiting */
	volatile unsigned char xen_mask;	/* events masked (the virtual IF, inverted) */
	unsigned char pad[6];
	volatile unsigned long long xen_cr2;	/* only the low word is used on i386 */
	volatile unsigned long long xen_cr3;
	struct percpu *self;
	unsigned char pad2[PERCPU_SIZE - 32];
} __attribute__((aligned(64)));

extern struct percpu percpu0;

/* Read through %gs, the way the inline bodies do. */
static inline unsigned long percpu_self_gs(void)
{
	unsigned long v;

	__asm__ __volatile__("mov %%gs:%c1, %0" : "=r"(v) : "i"(PERCPU_SELF));
	return v;
}
#endif
#endif
