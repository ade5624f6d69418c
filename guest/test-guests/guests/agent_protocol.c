/* The agent test guest's protocol half (see agent.c for the transport): the agent protocol
 * (agent-protocol/src/lib.rs: a u32 little-endian length, then a postcard payload) on the one
 * connection, and the "process" it fakes from the request's argv.
 *
 * Per connection: Hello -> Hello{PROTOCOL_VERSION}; SyncTime, Reseed -> Ack; Create -> Created{pid} or
 * Error{ExecNotFound}; Signal(N) before Start -> Exited{128+N}; Start -> Started{pid}, Stdout,
 * Stderr, Exited{status}, then a vsock SHUTDOWN; Stdin, CloseStdin, Resize are ignored;
 * anything else -> Error{Protocol}. A frame larger than IN_MAX is skipped and answered Error.
 * Only args (the first field of Create's request) is read: mounts, env and the rest are not.
 *
 * What the "process" does, from argv (basename of args[0]):
 *   echo W...      stdout `W W ...\n`, status 0
 *   true / false   status 0 / 1
 *   sh -c SCRIPT   SCRIPT is `;`-separated commands, words split on spaces (no quotes):
 *                  `echo W...` as above, `true`, `false`, `exit [N]` (ends the script),
 *                  anything else: stderr `sh: CMD: not found\n`, status 127; the script's
 *                  status is the last command's
 *   sh             status 0 (stdin is empty)
 *   anything else  Create fails: `exec: "NAME": executable file not found in $PATH`
 * Output past PROC_MAX bytes per stream is cut. Every length read from a frame is
 * bounds-checked. */
#include "agent.h"

#define PROTOCOL_VERSION 8
/* Largest frame reassembled (a Create of a busybox bundle is about 1 KiB). */
#define IN_MAX 16384
/* Largest output of the "process" (stdout and stderr each). */
#define PROC_MAX 1024
#define FIRST_PID 100

/* HostMessage variants. */
#define H_HELLO 0
#define H_STDIN 2
#define H_CLOSE_STDIN 3
#define H_SIGNAL 4
#define H_RESIZE 5
#define H_SYNC_TIME 6
#define H_RESEED 7
#define H_CREATE 8
#define H_START 9
/* AgentMessage variants. */
#define A_HELLO 0
#define A_ACK 1
#define A_STARTED 2
#define A_STDOUT 3
#define A_STDERR 4
#define A_EXITED 5
#define A_ERROR 6
#define A_CREATED 7
/* ErrorKind variants. */
#define E_PROTOCOL 1
#define E_INVALID 2
#define E_EXEC_NOT_FOUND 4

/* The connection's protocol state. */
static struct {
	int hello;   /* Hello done */
	int created; /* a process waits for Start */
	int started; /* it ran */
	u32 in_len;  /* bytes of a frame being reassembled */
	u32 skip;    /* bytes left of an oversized frame */
	u32 pid;
	u8 status;
	u32 out_n, err_n;
} conn;
static u8 in[IN_MAX];
static u8 proc_out[PROC_MAX], proc_err[PROC_MAX];
static u32 next_pid = FIRST_PID;
static u32 out_len, frame_start;
static int out_overflow;

void proto_reset(void)
{
	memset(&conn, 0, sizeof(conn));
	out_len = 0;
	out_overflow = 0;
}

/* ---- frames out: built in vsock_out(), sent as one packet by flush() ---- */

static void put_byte(u8 b)
{
	if (out_len < OUT_MAX)
		vsock_out()[out_len++] = b;
	else
		out_overflow = 1;
}

static void put_varint(u64 v)
{
	while (v >= 0x80) {
		put_byte((u8)(v | 0x80));
		v >>= 7;
	}
	put_byte((u8)v);
}

static void put_bytes(const u8 *p, u32 n)
{
	put_varint(n);
	if (out_len + n > OUT_MAX) {
		out_overflow = 1;
		return;
	}
	agent_copy(vsock_out() + out_len, p, n);
	out_len += n;
}

static void frame_begin(u8 variant)
{
	frame_start = out_len;
	out_len += 4;
	put_byte(variant);
}

static void frame_end(void)
{
	if (out_overflow || out_len > OUT_MAX)
		agent_fail("answer too large");
	u32 len = out_len - frame_start - 4;
	for (int i = 0; i < 4; i++)
		vsock_out()[frame_start + i] = (u8)(len >> (8 * i));
}

static void msg_simple(u8 variant)
{
	frame_begin(variant);
	frame_end();
}

static void msg_u32(u8 variant, u64 v)
{
	frame_begin(variant);
	put_varint(v);
	frame_end();
}

static void msg_error(u8 kind, const u8 *text, u32 n)
{
	frame_begin(A_ERROR);
	put_varint(kind);
	put_bytes(text, n);
	frame_end();
}

static void msg_error_str(u8 kind, const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	msg_error(kind, (const u8 *)s, n);
}

static void flush(void)
{
	if (out_len)
		vsock_send(out_len);
	out_len = 0;
}

/* ---- frames in ---- */

struct reader {
	const u8 *p;
	u32 n, i;
	int bad;
};

static u64 get_varint(struct reader *r)
{
	u64 v = 0;
	for (int shift = 0; shift < 64; shift += 7) {
		if (r->i >= r->n)
			break;
		u8 b = r->p[r->i++];
		v |= (u64)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return v;
	}
	r->bad = 1;
	return 0;
}

/* A string or byte vector: its bytes stay in the frame. */
static const u8 *get_bytes(struct reader *r, u32 *len)
{
	u64 n = get_varint(r);
	if (r->bad || n > r->n - r->i) {
		r->bad = 1;
		*len = 0;
		return r->p;
	}
	const u8 *p = r->p + r->i;
	r->i += (u32)n;
	*len = (u32)n;
	return p;
}

/* ---- the "process" ---- */

static int is_word(const u8 *p, u32 n, const char *w)
{
	u32 i = 0;
	for (; i < n; i++)
		if (w[i] == 0 || w[i] != (char)p[i])
			return 0;
	return w[i] == 0;
}

static void out_append(u8 *buf, u32 *len, const u8 *p, u32 n)
{
	if (*len + n > PROC_MAX)
		n = PROC_MAX - *len;
	agent_copy(buf + *len, p, n);
	*len += n;
}

static void out_str(u8 *buf, u32 *len, const char *s)
{
	while (*s && *len < PROC_MAX)
		buf[(*len)++] = (u8)*s++;
}

/* `echo` of the words in p[0..n) (split on spaces). */
static void echo_words(const u8 *p, u32 n)
{
	int first = 1;
	for (u32 i = 0; i < n;) {
		while (i < n && p[i] == ' ')
			i++;
		u32 j = i;
		while (j < n && p[j] != ' ')
			j++;
		if (j > i) {
			if (!first)
				out_str(proc_out, &conn.out_n, " ");
			out_append(proc_out, &conn.out_n, p + i, j - i);
			first = 0;
		}
		i = j;
	}
	out_str(proc_out, &conn.out_n, "\n");
}

static u8 parse_status(const u8 *p, u32 n, u8 def)
{
	u32 i = 0, v = 0;
	while (i < n && p[i] == ' ')
		i++;
	if (i == n || p[i] < '0' || p[i] > '9')
		return def;
	for (; i < n && p[i] >= '0' && p[i] <= '9'; i++)
		v = (v * 10 + (u32)(p[i] - '0')) & 0xffff;
	return (u8)v;
}

static void run_script(const u8 *s, u32 n)
{
	u8 status = 0;
	for (u32 i = 0; i < n;) {
		while (i < n && (s[i] == ' ' || s[i] == ';'))
			i++;
		u32 end = i;
		while (end < n && s[end] != ';')
			end++;
		u32 w = i;
		while (w < end && s[w] != ' ')
			w++;
		if (w == i)
			break;
		const u8 *cmd = s + i;
		u32 cn = w - i;
		if (is_word(cmd, cn, "echo")) {
			echo_words(s + w, end - w);
			status = 0;
		} else if (is_word(cmd, cn, "true")) {
			status = 0;
		} else if (is_word(cmd, cn, "false")) {
			status = 1;
		} else if (is_word(cmd, cn, "exit")) {
			conn.status = parse_status(s + w, end - w, status);
			return;
		} else {
			out_str(proc_err, &conn.err_n, "sh: ");
			out_append(proc_err, &conn.err_n, cmd, cn);
			out_str(proc_err, &conn.err_n, ": not found\n");
			status = 127;
		}
		i = end;
	}
	conn.status = status;
}

/* Handles Create: decides what the process does from its argv (the first field of the
 * request), answers Created or Error. */
static void on_create(struct reader *r)
{
	if (conn.created || conn.started) {
		msg_error_str(E_PROTOCOL, "a process was already created on this connection");
		return;
	}
	u64 argc = get_varint(r);
	u32 n0;
	const u8 *arg0 = get_bytes(r, &n0);
	if (r->bad || argc == 0 || argc > 256) {
		msg_error_str(E_INVALID, "bad args");
		return;
	}
	/* Basename of args[0]. */
	const u8 *name = arg0;
	u32 nn = n0;
	for (u32 i = 0; i < n0; i++) {
		if (arg0[i] == '/') {
			name = arg0 + i + 1;
			nn = n0 - i - 1;
		}
	}
	conn.out_n = conn.err_n = 0;
	conn.status = 0;
	if (is_word(name, nn, "echo")) {
		for (u64 k = 1; k < argc; k++) {
			u32 l;
			const u8 *p = get_bytes(r, &l);
			if (r->bad)
				break;
			if (k > 1)
				out_str(proc_out, &conn.out_n, " ");
			out_append(proc_out, &conn.out_n, p, l);
		}
		out_str(proc_out, &conn.out_n, "\n");
	} else if (is_word(name, nn, "true")) {
		conn.status = 0;
	} else if (is_word(name, nn, "false")) {
		conn.status = 1;
	} else if (is_word(name, nn, "sh")) {
		u32 n1 = 0, n2 = 0;
		const u8 *a1 = argc >= 3 ? get_bytes(r, &n1) : r->p;
		const u8 *a2 = argc >= 3 ? get_bytes(r, &n2) : r->p;
		if (argc >= 3 && !r->bad && is_word(a1, n1, "-c"))
			run_script(a2, n2);
	} else {
		u8 msg[256];
		u32 m = 0;
		const char *a = "exec: \"";
		const char *b = "\": executable file not found in $PATH";
		while (*a)
			msg[m++] = (u8)*a++;
		for (u32 i = 0; i < nn && m < 160; i++)
			msg[m++] = name[i];
		while (*b)
			msg[m++] = (u8)*b++;
		msg_error(E_EXEC_NOT_FOUND, msg, m);
		return;
	}
	conn.created = 1;
	conn.pid = next_pid++;
	msg_u32(A_CREATED, conn.pid);
}

static void finish_process(void)
{
	msg_u32(A_EXITED, (u64)conn.status << 1); /* i32 zigzag */
	conn.created = 0;
	conn.started = 1;
	flush();
	vsock_close();
}

/* One complete frame. Answers go to vsock_out(), sent by the caller's flush(). */
static void on_frame(const u8 *p, u32 n)
{
	struct reader r = { p, n, 0, 0 };
	u64 variant = get_varint(&r);
	if (r.bad) {
		msg_error_str(E_PROTOCOL, "empty frame");
		return;
	}
	if (!conn.hello) {
		if (variant != H_HELLO) {
			msg_error_str(E_PROTOCOL, "Hello must come first");
			return;
		}
		conn.hello = 1;
		msg_u32(A_HELLO, PROTOCOL_VERSION);
		return;
	}
	switch (variant) {
	case H_SYNC_TIME:
	case H_RESEED:
		msg_simple(A_ACK);
		break;
	case H_CREATE:
		on_create(&r);
		break;
	case H_START:
		if (!conn.created) {
			msg_error_str(E_PROTOCOL, "Start without a created process");
			break;
		}
		msg_u32(A_STARTED, conn.pid);
		if (conn.out_n) {
			frame_begin(A_STDOUT);
			put_bytes(proc_out, conn.out_n);
			frame_end();
		}
		if (conn.err_n) {
			frame_begin(A_STDERR);
			put_bytes(proc_err, conn.err_n);
			frame_end();
		}
		finish_process();
		break;
	case H_SIGNAL: {
		u64 z = get_varint(&r);
		u64 sig = z >> 1; /* i32 zigzag: an odd value is negative */
		if (conn.created && !r.bad && !(z & 1) && sig >= 1 && sig <= 64) {
			conn.status = (u8)(128 + sig);
			conn.out_n = conn.err_n = 0;
			finish_process();
		}
		break;
	}
	case H_STDIN:
	case H_CLOSE_STDIN:
	case H_RESIZE:
		break;
	default:
		msg_error_str(E_PROTOCOL, "not supported by the test agent");
	}
}

/* Data of the connection: reassembled into frames, each handled; the answers go out in one
 * packet. */
void proto_on_data(const u8 *p, u32 n)
{
	while (n) {
		if (conn.skip) {
			u32 k = n < conn.skip ? n : conn.skip;
			conn.skip -= k;
			p += k;
			n -= k;
			continue;
		}
		u32 room = IN_MAX - conn.in_len;
		u32 k = n < room ? n : room;
		agent_copy(in + conn.in_len, p, k);
		conn.in_len += k;
		p += k;
		n -= k;
		u32 at = 0;
		while (conn.in_len - at >= 4) {
			u32 len = (u32)in[at] | (u32)in[at + 1] << 8 | (u32)in[at + 2] << 16 |
				  (u32)in[at + 3] << 24;
			if (len > IN_MAX - 4) {
				msg_error_str(E_INVALID, "frame too large for the test agent");
				conn.skip = len - (conn.in_len - at - 4);
				at = conn.in_len;
				break;
			}
			if (conn.in_len - at - 4 < len)
				break;
			on_frame(in + at + 4, len);
			at += 4 + len;
		}
		if (at) {
			conn.in_len -= at;
			agent_copy(in, in + at, conn.in_len); /* forward copy: the source is ahead */
		}
	}
	flush();
}
