/* cpu.c (i386): per-CPU %gs (a GDT data segment based at the per-CPU area),
 * the IDT, the multiboot command line. */
#include "kernel.h"
#include "percpu.h"

#define MULTIBOOT_LOADER_MAGIC	0x2badb002
#define MB_INFO_CMDLINE		(1u << 2)
#define SEL_CODE		0x08
#define SEL_PERCPU		0x18

extern uint64_t gdt[4];
extern void timer_entry(void);
extern void event_entry(void);
extern void *const fault_stubs[32];

struct idt_gate {
	uint16_t off0;
	uint16_t sel;
	uint8_t zero;
	uint8_t type;		/* 0x8e: present, DPL 0, 32-bit interrupt gate */
	uint16_t off1;
} __attribute__((packed));

static struct idt_gate idt[256] __aligned(8);

const char *arch_name(void)
{
	return "i386";
}

static void set_gate(unsigned vec, void (*fn)(void))
{
	unsigned long a = (unsigned long)fn;

	idt[vec] = (struct idt_gate){
		.off0 = a & 0xffff, .sel = SEL_CODE, .zero = 0, .type = 0x8e, .off1 = a >> 16,
	};
}

void arch_cpu_init(void)
{
	struct { uint16_t limit; uint32_t base; } __attribute__((packed)) idtr;
	uint64_t base = (unsigned long)&percpu0, limit = sizeof(percpu0) - 1;
	unsigned i;

	/* byte-granular, 32-bit, read/write data; the limit stops a stray
	 * %gs access past the area */
	percpu0.self = &percpu0;
	gdt[SEL_PERCPU / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x92ULL << 40) |
			      (((limit >> 16) & 0xf) << 48) | (0x4ULL << 52) |
			      ((base >> 24) << 56);
	__asm__ __volatile__("mov %0, %%gs" : : "r"(SEL_PERCPU) : "memory");

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
	const uint32_t *mbi = (const uint32_t *)info;

	if (magic != MULTIBOOT_LOADER_MAGIC || !mbi || !(mbi[0] & MB_INFO_CMDLINE))
		return "";
	return (const char *)(unsigned long)mbi[4];
}
