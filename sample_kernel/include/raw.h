/* raw.h: the real instructions, for the self-test's own observations and for
 * the hypervisor models. Never patched: these are not paravirt sites. The
 * same source assembles for x86_64 and i386 (operands are native words). */
#ifndef RAW_H
#define RAW_H

#include <stdint.h>

static inline unsigned long raw_save_flags(void)
{
	unsigned long f;

	__asm__ __volatile__("pushf; pop %0" : "=r"(f) : : "memory");
	return f;
}

static inline void raw_cli(void) { __asm__ __volatile__("cli" : : : "memory"); }
static inline void raw_sti(void) { __asm__ __volatile__("sti" : : : "memory"); }

static inline unsigned long raw_read_cr2(void)
{
	unsigned long v;

	__asm__ __volatile__("mov %%cr2, %0" : "=r"(v));
	return v;
}

static inline void raw_write_cr2(unsigned long v)
{
	__asm__ __volatile__("mov %0, %%cr2" : : "r"(v) : "memory");
}

static inline unsigned long raw_read_cr3(void)
{
	unsigned long v;

	__asm__ __volatile__("mov %%cr3, %0" : "=r"(v) : : "memory");
	return v;
}

static inline void raw_write_cr3(unsigned long v)
{
	__asm__ __volatile__("mov %0, %%cr3" : : "r"(v) : "memory");
}

static inline void raw_invlpg(unsigned long va)
{
	__asm__ __volatile__("invlpg (%0)" : : "r"(va) : "memory");
}

static inline void outb(uint8_t v, uint16_t port)
{
	__asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;

	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

#endif
