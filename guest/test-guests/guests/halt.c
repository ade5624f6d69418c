/* halt: halts with interrupts disabled, forever. */
#include "lib.h"

void guest_main(const u8 *bp)
{
	(void)bp;
	put_str("halt: interrupts off\n");
	halt_forever();
}
