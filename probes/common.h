/* Shared helpers of the kvmscope probes (included by each probes/<name>.bpf.c).
 *
 * Parameters arrive as -D defines from agent/ebpf (never string
 * replacement). Kernel C only fills maps; naming and decoding happen in
 * Python (agent/ebpf/decode.py).
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


/* 6.10+ tcp:tcp_send_reset carries an enum the bcc-generated argument struct
 * names but no header here defines (include/net/rstreason.h is not pulled
 * in): a complete definition of the same size keeps the struct valid. */
enum sk_rst_reason { KS_SK_RST_REASON_UNUSED = 0 };

#endif
