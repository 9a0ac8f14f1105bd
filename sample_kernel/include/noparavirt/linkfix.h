/* linkfix.h for PARAVIRT=n: the CONFIG_PARAVIRT=n analogue. The same names as
 * the generated header, as plain inline native instructions: no sites, no
 * tables, no dispatch. The benchmark's baseline. */
#ifndef LINKFIX_H
#define LINKFIX_H

#define LINKFIX_NOPARAVIRT 1
#define LINKFIX_N_BACKENDS 3

enum linkfix_backend {
	LINKFIX_BACKEND_GENERIC = 0,
	LINKFIX_BACKEND_NATIVE = 1,
	LINKFIX_BACKEND_XEN = 2,
	LINKFIX_BACKEND_LGUEST = 3,
};
#define LINKFIX_BACKEND_native LINKFIX_BACKEND_NATIVE
#define LINKFIX_BACKEND_xen LINKFIX_BACKEND_XEN
#define LINKFIX_BACKEND_lguest LINKFIX_BACKEND_LGUEST

#ifdef __i386__
#define LINKFIX_CALLEE __attribute__((regparm(3)))
#else
#define LINKFIX_CALLEE
#endif

/* Only native exists; branch sites are constants the compiler folds away. */
#define linkfix_current_backend LINKFIX_BACKEND_NATIVE
#define linkfix_backend_is(b) (LINKFIX_BACKEND_##b == LINKFIX_BACKEND_NATIVE)

static inline unsigned linkfix_patched_target(void) { return 0; }
static inline void linkfix_boot_select(const char *cmdline) { (void)cmdline; }
static inline const char *linkfix_backend_name(unsigned idx)
{
	return idx == 1 ? "native" : idx == 2 ? "xen" : idx == 3 ? "lguest" : "generic";
}

static inline void irq_disable(void) { __asm__ __volatile__("cli" : : : "memory"); }
static inline void irq_enable(void) { __asm__ __volatile__("sti" : : : "memory"); }

static inline unsigned long save_fl(void)
{
	unsigned long f;

	__asm__ __volatile__("pushf; pop %0" : "=r"(f) : : "memory");
	return f;
}

static inline void restore_fl(unsigned long f)
{
	__asm__ __volatile__("push %0; popf" : : "r"(f) : "memory", "cc");
}

static inline unsigned long read_cr2(void)
{
	unsigned long v;

	__asm__ __volatile__("mov %%cr2, %0" : "=r"(v) : : "memory");
	return v;
}

static inline unsigned long read_cr3(void)
{
	unsigned long v;

	__asm__ __volatile__("mov %%cr3, %0" : "=r"(v) : : "memory");
	return v;
}

static inline void write_cr3(unsigned long v)
{
	__asm__ __volatile__("mov %0, %%cr3" : : "r"(v) : "memory");
}

static inline void set_pte(unsigned long *ptep, unsigned long val)
{
	__asm__ __volatile__("mov %1, %0" : "=m"(*ptep) : "r"(val) : "memory");
}

static inline void flush_tlb(void)
{
	unsigned long tmp;

	__asm__ __volatile__("mov %%cr3, %0; mov %0, %%cr3" : "=r"(tmp) : : "memory");
}

static inline void io_delay(void) { __asm__ __volatile__("outb %%al, $0x80" : : : "memory"); }
static inline void safe_halt(void) { __asm__ __volatile__("sti; hlt" : : : "memory"); }

#endif
