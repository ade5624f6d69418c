/* hello: one line, then i8042 reset. */
#include "lib.h"

void guest_main(const u8 *bp)
{
	(void)bp;
	put_str("Hello from kata-snap test guest\n");
	guest_exit();
}
