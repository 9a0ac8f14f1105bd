/* boot.S (i386): multiboot (v1) entry. QEMU's -kernel loads this ELF32 at
 * 1 MiB and jumps here in 32-bit protected mode, paging off, with
 * %eax = 0x2badb002 and %ebx = the multiboot information structure. */
#define MB_MAGIC	0x1badb002
#define MB_FLAGS	0x00000000

#define SEL_CODE	0x08
#define SEL_DATA	0x10

	.section .multiboot, "a"
	.balign 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.section .text.boot, "ax"
	.globl _start
_start:
	cli
	cld
	mov	%eax, %esi			/* bootloader magic */
	lgdt	gdt_desc
	ljmp	$SEL_CODE, $1f
1:	mov	$SEL_DATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	$boot_stack_top, %esp

	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	xor	%eax, %eax
	rep stosb

	mov	%esi, %eax			/* kmain(magic, mbi), regparm(3) */
	mov	%ebx, %edx
	call	kmain
2:	cli
	hlt
	jmp	2b

	.data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff		/* 0x08: code */
	.quad 0x00cf92000000ffff		/* 0x10: data */
	.quad 0				/* 0x18: per-CPU data, set by arch_cpu_init */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.section .bss
	.balign 16
boot_stack:	.skip 16384
boot_stack_top:
