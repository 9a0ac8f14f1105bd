/* linkfix_asm.h for PARAVIRT=n: the GAS macros as the bare native
 * instructions (the free-register list is accepted and ignored). */
#ifndef LINKFIX_ASM_H
#define LINKFIX_ASM_H

#ifdef __x86_64__
#define LF_AX %rax
#define LF_ARG0 %rdi
#define LF_ARG1 %rsi
#else
#define LF_AX %eax
#define LF_ARG0 %eax
#define LF_ARG1 %edx
#endif

.macro LINKFIX_irq_disable free:vararg
	cli
.endm
.macro LINKFIX_irq_enable free:vararg
	sti
.endm
.macro LINKFIX_save_fl free:vararg
	pushf
	pop LF_AX
.endm
.macro LINKFIX_restore_fl free:vararg
	push LF_ARG0
	popf
.endm
.macro LINKFIX_read_cr2 free:vararg
	mov %cr2, LF_AX
.endm
.macro LINKFIX_read_cr3 free:vararg
	mov %cr3, LF_AX
.endm
.macro LINKFIX_write_cr3 free:vararg
	mov LF_ARG0, %cr3
.endm
.macro LINKFIX_set_pte free:vararg
	mov LF_ARG1, (LF_ARG0)
.endm
.macro LINKFIX_flush_tlb free:vararg
	mov %cr3, LF_AX
	mov LF_AX, %cr3
.endm
.macro LINKFIX_io_delay free:vararg
	outb %al, $0x80
.endm
.macro LINKFIX_safe_halt free:vararg
	sti
	hlt
.endm

#endif
