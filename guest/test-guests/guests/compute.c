/* compute: long deterministic computation with progress output; optionally
 * signals READY part-way (for mid-run snapshots). All state lives in
 * registers and on the stack. */
#include "algo.h"
#include "lib.h"
#include "params.h"

/* Keeps iters * 100 from overflowing. */
#define COMPUTE_MAX_ITERS (1ULL << 56)

static void maybe_ready(u64 pct, u64 ready_at)
{
	if (pct == ready_at) {
		put_str("compute: ready at ");
		put_dec(pct);
		put_str("%\n");
		signal_ready();
	}
}

void guest_main(const u8 *bp)
{
	u64 iters = cmdline_u64(bp, "iters", COMPUTE_DEFAULT_ITERS);
	/* ~0 (never) when absent; values above 100 never trigger. */
	u64 ready_at = cmdline_u64(bp, "ready_at", ~0ULL);
	u64 x = COMPUTE_SEED;
	u64 i = 0;

	if (iters > COMPUTE_MAX_ITERS)
		iters = COMPUTE_MAX_ITERS;
	maybe_ready(0, ready_at);
	for (u64 pct = 1; pct <= 100; pct++) {
		u64 stop = iters * pct / 100;
		for (; i < stop; i++)
			x = compute_step(x, i);
		if (pct % 10 == 0) {
			put_str("compute: ");
			put_dec(pct);
			put_str("%\n");
		}
		maybe_ready(pct, ready_at);
	}
	put_str("compute: result=");
	put_hex(x);
	put_char('\n');
	guest_exit();
}
