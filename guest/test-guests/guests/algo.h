/* Deterministic formulas shared by the guests; src/lib.rs has bit-exact Rust
 * mirrors (memtouch_value, memtouch_checksum, compute_result) so tests can
 * check guest output. Change both together. */
#ifndef TEST_GUESTS_ALGO_H
#define TEST_GUESTS_ALGO_H

#include "lib.h"

#define GOLDEN64 0x9E3779B97F4A7C15ULL

/* memtouch: value stored for page index `idx` (relative to the range base). */
static inline u64 memtouch_value(u64 idx)
{
	return (idx + 1) * GOLDEN64 ^ 0x5A5A5A5A5A5A5A5AULL;
}

/* memtouch: byte offset of the value inside page `idx` (8-aligned, cycles
 * through all 512 slots). */
static inline u64 memtouch_offset(u64 idx)
{
	return (idx * 72) & 0xff8;
}

/* memtouch: checksum step over the values read back, starting from 0. */
static inline u64 memtouch_mix(u64 sum, u64 v)
{
	return rotl64(sum, 7) ^ v;
}

/* compute: initial state and per-iteration step (i = 0, 1, ..., iters-1). */
#define COMPUTE_SEED 0x0123456789ABCDEFULL
static inline u64 compute_step(u64 x, u64 i)
{
	x ^= x >> 29;
	x = x * GOLDEN64 + i;
	return x;
}

#endif
