/* ready: smallest guest that signals READY on port 0xf4. */
#include "lib.h"

void guest_main(const u8 *bp)
{
	(void)bp;
	put_str("ready: signalling\n");
	signal_ready();
	put_str("ready: done\n");
	guest_exit();
}
