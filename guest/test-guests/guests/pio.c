/* pio: a tight loop of port writes, to measure how many PIO exits per second the VMM handles. */
#include "lib.h"
#include "params.h"

/* Port 0x80 (the POST diagnostic port) has no device: each write is one unhandled PIO exit. */
#define POST_PORT 0x80

void guest_main(const u8 *bp)
{
	u64 iters = cmdline_u64(bp, "iters", PIO_DEFAULT_ITERS);

	put_str("pio: start\n");
	signal_ready();
	for (u64 i = 0; i < iters; i++)
		outb(POST_PORT, (u8)i);
	put_str("pio: done ");
	put_dec(iters);
	put_char('\n');
	guest_exit();
}
