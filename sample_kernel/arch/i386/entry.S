/* entry.S (i386): exception and interrupt entry, and the register checks.
 *
 * The interrupt entries use the paravirt ops from assembler through the GAS
 * macros of linkfix_asm.h: LINKFIX_save_fl, LINKFIX_irq_disable and
 * LINKFIX_restore_fl are patchable sites exactly like the C ones. C code is
 * built with -mregparm=3: arguments in eax, edx, ecx.
 */
#include "linkfix_asm.h"

	.text

	.macro IRQ_ENTRY name, vector
	.globl \name
	.balign 16
\name:
	pushal
	LINKFIX_save_fl eax, ecx, edx
	push	%eax
	LINKFIX_irq_disable eax, ecx, edx
	mov	$\vector, %eax
	call	do_irq
	pop	%eax
	LINKFIX_restore_fl eax, ecx, edx
	popal
	iret
	.endm

	IRQ_ENTRY timer_entry, 0x20
	IRQ_ENTRY event_entry, 0x81

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
	mov	(%esp), %eax			/* vector */
	mov	4(%esp), %edx			/* error code */
	mov	8(%esp), %ecx			/* faulting eip */
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
	.balign 4
	.globl fault_stubs
fault_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.long fault_\v
	.endr

/* Register checks: see arch/x86_64/entry.S. Order: eax ebx ecx edx esi edi ebp. */
	.data
	.balign 4
	.globl regcheck_in, regcheck_out
regcheck_in:	.skip 4 * 16
regcheck_out:	.skip 4 * 16

	.text
	.macro REGCHECK op, free:vararg
	.globl regcheck_\op
	.balign 16
regcheck_\op:
	push	%ebx
	push	%esi
	push	%edi
	push	%ebp
	mov	regcheck_in+4*1, %ebx
	mov	regcheck_in+4*2, %ecx
	mov	regcheck_in+4*3, %edx
	mov	regcheck_in+4*4, %esi
	mov	regcheck_in+4*5, %edi
	mov	regcheck_in+4*6, %ebp
	mov	regcheck_in+4*0, %eax
	LINKFIX_\op \free
	mov	%eax, regcheck_out+4*0
	mov	%ebx, regcheck_out+4*1
	mov	%ecx, regcheck_out+4*2
	mov	%edx, regcheck_out+4*3
	mov	%esi, regcheck_out+4*4
	mov	%edi, regcheck_out+4*5
	mov	%ebp, regcheck_out+4*6
	pop	%ebp
	pop	%edi
	pop	%esi
	pop	%ebx
	ret
	.endm

	REGCHECK irq_disable
	REGCHECK irq_enable
	REGCHECK save_fl, eax
	REGCHECK restore_fl
	REGCHECK read_cr2, eax
	REGCHECK read_cr3, eax
	REGCHECK write_cr3
	REGCHECK set_pte
	REGCHECK flush_tlb, eax
	REGCHECK io_delay
	REGCHECK safe_halt
