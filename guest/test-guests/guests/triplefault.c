/* triplefault: loads an empty IDT and raises an exception; the vCPU triple
 * faults (KVM_EXIT_SHUTDOWN). */
#include "lib.h"

struct __attribute__((packed)) idt_desc {
	u16 limit;
	u64 base;
};

void guest_main(const u8 *bp)
{
	static const struct idt_desc empty = { 0, 0 };

	(void)bp;
	put_str("triplefault: now\n");
	__asm__ volatile("lidt %0" : : "m"(empty) : "memory");
	/* ud2 -> #UD; delivering it needs IDT entry 6, beyond the limit -> #GP
	 * -> #DF -> triple fault. Not int3: on this project's (nested) KVM host
	 * int3 goes through KVM's instruction emulator, which cannot deliver a
	 * software interrupt in long mode and reports KVM_EXIT_INTERNAL_ERROR
	 * (emulation) instead of a shutdown. int3 stays as a fallback. */
	__asm__ volatile("ud2; int3" : : : "memory");
	halt_forever();
}
