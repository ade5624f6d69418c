/* The agent test guest's two halves: the vsock transport (agent.c: device, interrupts, the one
 * connection) and the agent protocol with its faked process (agent_protocol.c). */
#ifndef TEST_GUESTS_AGENT_H
#define TEST_GUESTS_AGENT_H

#include "lib.h"

/* The vsock port the agent listens on (agent_protocol::AGENT_VSOCK_PORT). */
#define AGENT_PORT 1024
/* Largest packet payload sent (all answers to one request go in one packet). */
#define OUT_MAX 4096

typedef u64 __attribute__((may_alias, aligned(1))) u64_unaligned;

/* Prints `agent: FAIL <what>` and exits through the i8042. */
static inline __attribute__((noreturn)) void agent_fail(const char *what)
{
	put_str("agent: FAIL ");
	put_str(what);
	put_char('\n');
	guest_exit();
}

/* Copies n bytes, 8 at a time (every instruction counts at ~1 M instructions/s); overlapping
 * ranges only with d before s. */
static inline void agent_copy(u8 *d, const u8 *s, u32 n)
{
	for (; n >= 8; n -= 8, d += 8, s += 8)
		*(u64_unaligned *)d = *(const u64_unaligned *)s;
	while (n--)
		*d++ = *s++;
}

/* ---- the transport (agent.c) ---- */

/* The payload of the next packet on the connection: OUT_MAX bytes. */
u8 *vsock_out(void);
/* Sends vsock_out()[0..len) as one packet on the connection and waits until the device took
 * it. */
void vsock_send(u32 len);
/* Shuts the connection down both ways (after the last answer). */
void vsock_close(void);

/* ---- the protocol (agent_protocol.c) ---- */

/* A new connection: no Hello yet, no process, nothing buffered. */
void proto_reset(void);
/* Bytes the host sent on the connection; the answers are sent before it returns. */
void proto_on_data(const u8 *p, u32 n);

#endif
