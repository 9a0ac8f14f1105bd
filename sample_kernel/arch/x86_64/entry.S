/* entry.S (x86_64): exception and interrupt entry, and the register checks.
 *
 * The interrupt entries use the paravirt ops from assembler through the GAS
 * macros of linkfix_asm.h: LINKFIX_save_fl, LINKFIX_irq_disable and
 * LINKFIX_restore_fl are patchable sites exactly like the C ones.
 */
#include "linkfix_asm.h"

	.text

	.macro PUSH_CALLER_SAVED
	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	.endm

	.macro POP_CALLER_SAVED
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	.endm

/* Interrupts: the virtual interrupt flag is saved and disabled around the C
 * handler, as a paravirtualized entry path would do. Every caller-saved
 * register is saved first, so all of them are free for the sites. */
	.macro IRQ_ENTRY name, vector
	.globl \name
	.balign 16
\name:
	PUSH_CALLER_SAVED
	LINKFIX_save_fl rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11
	push	%rax
	LINKFIX_irq_disable rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11
	mov	$\vector, %edi
	call	do_irq
	pop	%rdi
	LINKFIX_restore_fl rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11
	POP_CALLER_SAVED
	iretq
	.endm

	IRQ_ENTRY timer_entry, 0x20
	IRQ_ENTRY event_entry, 0x81

/* Exceptions: print and exit (do_fault does not return). */
	.macro FAULT vector, has_error
	.balign 16
fault_\vector:
	.if \has_error == 0
	push	$0
	.endif
	push	$\vector
	jmp	fault_common
	.endm

fault_common:
	mov	(%rsp), %rdi			/* vector */
	mov	8(%rsp), %rsi			/* error code */
	mov	16(%rsp), %rdx			/* faulting rip */
	call	do_fault
1:	cli
	hlt
	jmp	1b

	.irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,28,31
	FAULT \v, 0
	.endr
	.irp v, 8,10,11,12,13,14,17,21,29,30
	FAULT \v, 1
	.endr
	.irp v, 22,23,24,25,26,27
	FAULT \v, 0
	.endr

	.section .rodata
	.balign 8
	.globl fault_stubs
fault_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad fault_\v
	.endr

/* Register checks: load every register (but %rsp) from regcheck_in, run one
 * site, store every register to regcheck_out. The self-test compares them: a
 * site may change only what its op declares (the free-register list given to
 * each macro is exactly that, so the assembler checks our expectation too). */
	.data
	.balign 8
	.globl regcheck_in, regcheck_out
regcheck_in:	.skip 8 * 16
regcheck_out:	.skip 8 * 16

	.text
	.macro REGCHECK op, free:vararg
	.globl regcheck_\op
	.balign 16
regcheck_\op:
	push	%rbx
	push	%rbp
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	mov	regcheck_in+8*1(%rip), %rbx
	mov	regcheck_in+8*2(%rip), %rcx
	mov	regcheck_in+8*3(%rip), %rdx
	mov	regcheck_in+8*4(%rip), %rsi
	mov	regcheck_in+8*5(%rip), %rdi
	mov	regcheck_in+8*6(%rip), %rbp
	mov	regcheck_in+8*7(%rip), %r8
	mov	regcheck_in+8*8(%rip), %r9
	mov	regcheck_in+8*9(%rip), %r10
	mov	regcheck_in+8*10(%rip), %r11
	mov	regcheck_in+8*11(%rip), %r12
	mov	regcheck_in+8*12(%rip), %r13
	mov	regcheck_in+8*13(%rip), %r14
	mov	regcheck_in+8*14(%rip), %r15
	mov	regcheck_in+8*0(%rip), %rax
	LINKFIX_\op \free
	mov	%rax, regcheck_out+8*0(%rip)
	mov	%rbx, regcheck_out+8*1(%rip)
	mov	%rcx, regcheck_out+8*2(%rip)
	mov	%rdx, regcheck_out+8*3(%rip)
	mov	%rsi, regcheck_out+8*4(%rip)
	mov	%rdi, regcheck_out+8*5(%rip)
	mov	%rbp, regcheck_out+8*6(%rip)
	mov	%r8, regcheck_out+8*7(%rip)
	mov	%r9, regcheck_out+8*8(%rip)
	mov	%r10, regcheck_out+8*9(%rip)
	mov	%r11, regcheck_out+8*10(%rip)
	mov	%r12, regcheck_out+8*11(%rip)
	mov	%r13, regcheck_out+8*12(%rip)
	mov	%r14, regcheck_out+8*13(%rip)
	mov	%r15, regcheck_out+8*14(%rip)
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%rbp
	pop	%rbx
	ret
	.endm

	REGCHECK irq_disable
	REGCHECK irq_enable
	REGCHECK save_fl, rax
	REGCHECK restore_fl
	REGCHECK read_cr2, rax
	REGCHECK read_cr3, rax
	REGCHECK write_cr3
	REGCHECK set_pte
	REGCHECK flush_tlb, rax
	REGCHECK io_delay
	REGCHECK safe_halt
