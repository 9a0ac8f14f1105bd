/* cpu.c (x86_64): per-CPU %gs, the IDT, the PVH command line. */
#include "kernel.h"
#include "percpu.h"

#define MSR_GS_BASE	0xc0000101
#define HVM_START_MAGIC	0x336ec578
#define SEL_CODE64	0x08

extern void timer_entry(void);
extern void event_entry(void);
extern void *const fault_stubs[32];

/* struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) */
struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
};

struct idt_gate {
	uint16_t off0;
	uint16_t sel;
	uint8_t ist;
	uint8_t type;		/* 0x8e: present, DPL 0, 64-bit interrupt gate */
	uint16_t off1;
	uint32_t off2;
	uint32_t zero;
} __attribute__((packed));

static struct idt_gate idt[256] __aligned(16);

const char *arch_name(void)
{
	return "x86_64";
}

static void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ __volatile__("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

static void set_gate(unsigned vec, void (*fn)(void))
{
	unsigned long a = (unsigned long)fn;

	idt[vec] = (struct idt_gate){
		.off0 = a & 0xffff, .sel = SEL_CODE64, .ist = 0, .type = 0x8e,
		.off1 = (a >> 16) & 0xffff, .off2 = a >> 32, .zero = 0,
	};
}

void arch_cpu_init(void)
{
	struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr;
	unsigned i;

	/* %gs base = the per-CPU area: %gs:xen_vcpu_mask is percpu0.xen_mask */
	percpu0.self = &percpu0;
	__asm__ __volatile__("mov %0, %%gs" : : "r"(0));
	wrmsr(MSR_GS_BASE, (unsigned long)&percpu0);

	for (i = 0; i < 32; i++)
		set_gate(i, (void (*)(void))fault_stubs[i]);
	set_gate(VEC_TIMER, timer_entry);
	set_gate(VEC_EVENT, event_entry);
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (unsigned long)idt;
	__asm__ __volatile__("lidt %0" : : "m"(idtr));
}

const char *arch_cmdline(unsigned long magic, unsigned long info)
{
	const struct hvm_start_info *si = (const void *)info;

	if (magic != HVM_START_MAGIC || !si || si->magic != HVM_START_MAGIC)
		return "";
	return si->cmdline_paddr ? (const char *)(unsigned long)si->cmdline_paddr : "";
}
