/* Entry point of every test guest.
 *
 * Entered in 64-bit long mode (CS=0x08, DS/ES/SS=0x10, identity-mapped
 * 0..4 GiB, RFLAGS=0x2) with RSI = guest-physical address of boot_params.
 * RSP is not trusted: clear .bss (which holds the stack), switch to our own
 * 16 KiB stack and call guest_main(boot_params). */
	.section .text.start, "ax", @progbits
	.code64
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	mov	%rsi, %rdx		/* keep boot_params across rep stosq */
	/* Clear .bss (8-byte granularity; the linker script aligns both ends). */
	lea	__bss_start(%rip), %rdi
	lea	__bss_end(%rip), %rcx
	sub	%rdi, %rcx
	shr	$3, %rcx
	xor	%eax, %eax
	rep stosq
	lea	__stack_top(%rip), %rsp	/* 16-byte aligned */
	xor	%ebp, %ebp
	mov	%rdx, %rdi		/* guest_main(boot_params) */
	call	guest_main
	call	guest_exit		/* guest_main returned: reset */
1:	cli
	hlt
	jmp	1b
	.size _start, . - _start

	/* Non-empty .data: linux-loader skips PT_LOADs with p_filesz == 0 and
	 * computes kernel_end from the loaded ones, so this keeps .bss (and the
	 * stack) inside the range the VMM considers occupied by the kernel. */
	.section .data.guest_magic, "aw", @progbits
	.balign 8
	.globl guest_magic
guest_magic:
	.ascii "KSNAPTG\0"

	.section .bss.stack, "aw", @nobits
	.balign 16
__stack_bottom:
	.skip 16384
	.globl __stack_top
__stack_top:

	.section .note.GNU-stack, "", @progbits
