/* percpu.c: the (single) per-CPU area and the absolute symbols the xen
 * backend's bodies use as %gs offsets. */
#include "kernel.h"
#include "percpu.h"

#define STR(x) #x
#define XSTR(x) STR(x)

struct percpu percpu0;

_Static_assert(offsetof(struct percpu, xen_pending) == PERCPU_XEN_PENDING, "percpu layout");
_Static_assert(offsetof(struct percpu, xen_mask) == PERCPU_XEN_MASK, "percpu layout");
_Static_assert(offsetof(struct percpu, xen_cr2) == PERCPU_XEN_CR2, "percpu layout");
_Static_assert(offsetof(struct percpu, xen_cr3) == PERCPU_XEN_CR3, "percpu layout");
_Static_assert(offsetof(struct percpu, self) == PERCPU_SELF, "percpu layout");
_Static_assert(sizeof(struct percpu) == PERCPU_SIZE, "percpu layout");

__asm__(
	".globl xen_vcpu_pending, xen_vcpu_mask, xen_vcpu_cr2, xen_cr3\n"
	".set xen_vcpu_pending, " XSTR(PERCPU_XEN_PENDING) "\n"
	".set xen_vcpu_mask, " XSTR(PERCPU_XEN_MASK) "\n"
	".set xen_vcpu_cr2, " XSTR(PERCPU_XEN_CR2) "\n"
	".set xen_cr3, " XSTR(PERCPU_XEN_CR3) "\n");
