/* spin: prints `tick <n>` forever; never exits by itself. */
#include "lib.h"
#include "params.h"

/* In .bss so a snapshot captures it even if it were spilled. */
static volatile u64 ticks;

void guest_main(const u8 *bp)
{
	u64 tick_iters = cmdline_u64(bp, "tick_iters", SPIN_DEFAULT_TICK_ITERS);

	for (;;) {
		for (u64 i = 0; i < tick_iters; i++)
			__asm__ volatile("" : : : "memory");
		ticks = ticks + 1;
		put_str("tick ");
		put_dec(ticks);
		put_char('\n');
		if (ticks == 1)
			signal_ready();
	}
}
