/* Shared helpers of the kvmscope probes (included first by each
 * probes/<name>.bpf.c; bcc compiles each probe on its own, with
 * -I<probes dir> from agent/ebpf/loader.py).
 *
 * Parameters arrive as -D defines from agent/ebpf (never string
 * replacement). Kernel C only fills maps; naming and decoding happen in
 * Python (agent/ebpf/decode.py).
 *
 * The layouts and constants user space reads (struct ks_rate, struct
 * ks_stream, KS_AF_*, KS_TCP_*) are mirrored by ctypes in
 * agent/ebpf/decode.py; tests/unit/test_probe_layouts.py compiles this file
 * with cc and compares them field by field. Everything here therefore also
 * compiles as plain C with u8..u64/s32 typedefs, except the ring buffer
 * declaration (KS_EVENT_STREAM), which needs bcc.
 */
#ifndef KVMSCOPE_COMMON_H
#define KVMSCOPE_COMMON_H

#ifndef IS_STORAGE_PORT
#define IS_STORAGE_PORT(p) ((p) == 3260)
#endif

#ifndef EVENTS_PER_SEC_PER_CPU
#define EVENTS_PER_SEC_PER_CPU 200
#endif

#define KS_AF_INET 2
#define KS_AF_INET6 10
#define KS_IPPROTO_TCP 6

/* TCP states (include/net/tcp_states.h) the probes compare with */
#define KS_TCP_ESTABLISHED 1
#define KS_TCP_SYN_SENT 2
#define KS_TCP_SYN_RECV 3
#define KS_TCP_CLOSE 7

/* Ring buffer records are submitted without waking a reader: the agent
 * drains the rings with ring_buffer_consume() every cycle and never sleeps
 * in epoll on them, so a wakeup (irq_work + a reader wake) would be pure
 * cost on every record that finds the ring empty. */
#define KS_RB_NO_WAKEUP 1 /* BPF_RB_NO_WAKEUP */

/* Per-CPU token window for the rate-capped event stream: at most
 * EVENTS_PER_SEC_PER_CPU events per CPU per second reach the ring buffer. */
struct ks_rate {
    u64 window_start;
    u64 sent;
};

static __always_inline int ks_rate_ok(struct ks_rate *r, u64 now)
{
    if (!r)
        return 0;
    if (now - r->window_start >= 1000000000ULL) {
        r->window_start = now;
        r->sent = 0;
    }
    if (r->sent >= EVENTS_PER_SEC_PER_CPU)
        return 0;
    r->sent++;
    return 1;
}

/* The per-CPU state of a probe's event stream, kept in its totals entry
 * (the one per-CPU lookup of an event serves it too). Counted without
 * atomics: tracepoint programs never nest on one CPU. */
struct ks_stream {
    u64 sent;   /* records written to the ring buffer */
    u64 capped; /* records dropped by the rate cap */
    u64 full;   /* records dropped because the ring buffer was full */
    struct ks_rate rate;
};

/* The source and destination addresses of a tcp:* or sock:inet_sock_set_state
 * tracepoint's arguments `a` into 16-byte fields: saddr_v6/daddr_v6 for
 * IPv6, else the 4 bytes of saddr/daddr (the rest stays as it was, zero in
 * a zero-initialised key). */
#define KS_COPY_ADDRS(dst_saddr, dst_daddr, a)               \
    do {                                                     \
        if ((a)->family == KS_AF_INET6) {                    \
            __builtin_memcpy((dst_saddr), (a)->saddr_v6, 16); \
            __builtin_memcpy((dst_daddr), (a)->daddr_v6, 16); \
        } else {                                             \
            __builtin_memcpy((dst_saddr), (a)->saddr, 4);    \
            __builtin_memcpy((dst_daddr), (a)->daddr, 4);    \
        }                                                    \
    } while (0)

/* Writing one record of a probe's rate-capped event stream. bcc rewrites
 * map calls (events.ringbuf_*) only in the probe's own file and outside
 * macros, so those two calls stay at the call site and the rules around
 * them live here:
 *
 *     struct event *e = ks_stream_admit(&t->stream, now)
 *         ? ks_stream_room(&t->stream, events.ringbuf_reserve(sizeof(struct event)))
 *         : NULL;
 *     if (!e)
 *         return;
 *     ...fill e...
 *     events.ringbuf_submit(e, KS_RB_NO_WAKEUP);
 *     ks_stream_sent(&t->stream);
 */
static __always_inline int ks_stream_admit(struct ks_stream *s, u64 now)
{
    if (ks_rate_ok(&s->rate, now))
        return 1;
    s->capped++;
    return 0;
}

/* the ring buffer's answer to a reserve: NULL when full (counted) */
static __always_inline void *ks_stream_room(struct ks_stream *s, void *e)
{
    if (!e)
        s->full++;
    return e;
}

static __always_inline void ks_stream_sent(struct ks_stream *s)
{
    s->sent++;
}

#ifdef KS_EVENT_STREAM
/* The ring buffer of a probe that defines KS_EVENT_STREAM before including
 * this file: `events`, RINGBUF_PAGES pages. */
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 16
#endif
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#endif

/* 6.10+ tcp:tcp_send_reset carries an enum the bcc-generated argument struct
 * names but no header here defines (include/net/rstreason.h is not pulled
 * in): a complete definition of the same size keeps the struct valid. */
enum sk_rst_reason { KS_SK_RST_REASON_UNUSED = 0 };

#endif
