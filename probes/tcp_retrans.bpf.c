/* kvmscope: TCP retransmits and resets, per connection.
 *
 * Tracepoints: tcp:tcp_retransmit_skb (required); tcp:tcp_retransmit_synack,
 * tcp:tcp_send_reset, tcp:tcp_receive_reset when the kernel has them
 * (HAVE_* defines set by the loader after looking in tracefs).
 *
 * Maps:
 *   conns          lru_hash  4-tuple+family -> counters, TCP state at the
 *                            last retransmit (all connections; bounded)
 *   storage_conns  lru_hash  same, only connections whose destination port
 *                            is a storage port (IS_STORAGE_PORT), so churn
 *                            on other ports never evicts them
 *   totals         percpu    never-evicted totals (see TOT_* below)
 *   events         ringbuf   rate-capped stream (time, 4-tuple, state, kind)
 *
 * Defines: IS_STORAGE_PORT(p), MAX_CONNS, MAX_STORAGE_CONNS,
 * EVENTS_PER_SEC_PER_CPU, RINGBUF_PAGES, HAVE_TCP_RETRANSMIT_SYNACK,
 * TCP_RETRANSMIT_HAS_ERR (format has err: count only err == 0),
 * HAVE_TCP_SEND_RESET (+ TCP_SEND_RESET_SOCKADDR: 6.10+ layout with
 * sockaddr saddr[28]/daddr[28]), HAVE_TCP_RECEIVE_RESET.
 */
#include "common.h"

#ifndef MAX_CONNS
#define MAX_CONNS 8192
#endif
#ifndef MAX_STORAGE_CONNS
#define MAX_STORAGE_CONNS 1024
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 16
#endif

enum kind { K_RETRANS = 0, K_SYNACK = 1, K_RST_SENT = 2, K_RST_RECV = 3 };

/* totals indexes: per kind (0..3), storage per kind (4..7), stream (8..10) */
#define TOT_STORAGE 4
#define TOT_EV_SENT 8
#define TOT_EV_CAPPED 9
#define TOT_EV_FULL 10
#define TOT_N 11

struct conn_key {
    u16 family;
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};

struct conn_val {
    u64 count[4]; /* by enum kind */
    u64 last_ns;
    u32 last_state;
    u32 state_mask; /* bit n set: a retransmit happened in TCP state n */
};

struct event {
    u64 ts;
    u32 state;
    u8 kind;
    u8 storage;
    u16 family;
    u16 sport;
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
};

BPF_TABLE("lru_hash", struct conn_key, struct conn_val, conns, MAX_CONNS);
BPF_TABLE("lru_hash", struct conn_key, struct conn_val, storage_conns, MAX_STORAGE_CONNS);
BPF_PERCPU_ARRAY(totals, u64, TOT_N);
BPF_PERCPU_ARRAY(rate, struct ks_rate, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);


static __always_inline void tot(int i)
{
    u64 *v = totals.lookup(&i);
    if (v)
        (*v)++;
}

static __always_inline void record(struct conn_key *k, int kind, int state)
{
    u64 now = bpf_ktime_get_ns();
    int storage = IS_STORAGE_PORT(k->dport);
    struct conn_val zero = {};
    struct conn_val *v;

    tot(kind);
    if (storage) {
        tot(TOT_STORAGE + kind);
        v = storage_conns.lookup_or_try_init(k, &zero);
    } else {
        v = conns.lookup_or_try_init(k, &zero);
    }
    if (v) {
        __sync_fetch_and_add(&v->count[kind & 3], 1);
        v->last_ns = now;
        if (state >= 0 && state < 32) {
            v->last_state = state;
            v->state_mask |= (1u << state);
        }
    }

    int zero_idx = 0;
    if (!ks_rate_ok(rate.lookup(&zero_idx), now)) {
        tot(TOT_EV_CAPPED);
        return;
    }
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        tot(TOT_EV_FULL);
        return;
    }
    e->ts = now;
    e->state = state;
    e->kind = kind;
    e->storage = storage;
    e->family = k->family;
    e->sport = k->sport;
    e->dport = k->dport;
    __builtin_memcpy(e->saddr, k->saddr, 16);
    __builtin_memcpy(e->daddr, k->daddr, 16);
    events.ringbuf_submit(e, 0);
    tot(TOT_EV_SENT);
}

/* The tracepoints below share the field names family/sport/dport (host
 * order), saddr/daddr (IPv4) and saddr_v6/daddr_v6. */
#define FILL_KEY(k, a)                                           \
    do {                                                         \
        (k).family = (a)->family;                                \
        (k).sport = (a)->sport;                                  \
        (k).dport = (a)->dport;                                  \
        if ((a)->family == KS_AF_INET6) {                        \
            __builtin_memcpy((k).saddr, (a)->saddr_v6, 16);      \
            __builtin_memcpy((k).daddr, (a)->daddr_v6, 16);      \
        } else {                                                 \
            __builtin_memcpy((k).saddr, (a)->saddr, 4);          \
            __builtin_memcpy((k).daddr, (a)->daddr, 4);          \
        }                                                        \
    } while (0)

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef TCP_RETRANSMIT_HAS_ERR
    /* 6.x: the event also fires for attempts that sent nothing (e.g.
     * -EBUSY: the original still in a host queue); count what went out */
    if (args->err != 0)
        return 0;
#endif
    struct conn_key k = {};
    FILL_KEY(k, args);
    record(&k, K_RETRANS, args->state);
    return 0;
}

#ifdef HAVE_TCP_RETRANSMIT_SYNACK
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct conn_key k = {};
    FILL_KEY(k, args);
    record(&k, K_SYNACK, 3 /* TCP_SYN_RECV */);
    return 0;
}
#endif

#ifdef HAVE_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    struct conn_key k = {};
    FILL_KEY(k, args);
    record(&k, K_RST_RECV, -1);
    return 0;
}
#endif

#ifdef HAVE_TCP_SEND_RESET
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    struct conn_key k = {};
#ifdef TCP_SEND_RESET_SOCKADDR
    /* 6.10+: saddr/daddr are struct sockaddr_in or sockaddr_in6 (28 bytes):
     * family (host order) at 0, port (network order) at 2, IPv4 address at
     * 4, IPv6 address at 8. */
    u8 s[28], d[28];
    __builtin_memcpy(s, args->saddr, 28);
    __builtin_memcpy(d, args->daddr, 28);
    u16 fam = *(u16 *)&s[0];
    k.family = fam;
    k.sport = ((u16)s[2] << 8) | s[3];
    k.dport = ((u16)d[2] << 8) | d[3];
    if (fam == KS_AF_INET6) {
        __builtin_memcpy(k.saddr, &s[8], 16);
        __builtin_memcpy(k.daddr, &d[8], 16);
    } else if (fam == KS_AF_INET) {
        __builtin_memcpy(k.saddr, &s[4], 4);
        __builtin_memcpy(k.daddr, &d[4], 4);
    } else {
        return 0;
    }
    record(&k, K_RST_SENT, args->state);
#else
    FILL_KEY(k, args);
    record(&k, K_RST_SENT, -1);
#endif
    return 0;
}
#endif
