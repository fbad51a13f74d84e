/* kvmscope: TCP retransmits and resets, per connection.
 *
 * Tracepoints: tcp:tcp_retransmit_skb (required); tcp:tcp_retransmit_synack,
 * tcp:tcp_send_reset, tcp:tcp_receive_reset when the kernel has them
 * (HAVE_* defines set by the loader after looking in tracefs).
 *
 * Maps:
 *   storage_conns  lru_hash  4-tuple+family -> counters, TCP state at the
 *                            last retransmit, for connections whose
 *                            destination port is a storage port
 *                            (IS_STORAGE_PORT)
 *   conns          lru_hash  same for every other connection, only with
 *                            TRACK_ALL_CONNS; without it an event on a
 *                            non-storage connection only bumps its per-CPU
 *                            total (the "other" aggregate) and returns
 *                            before any hash map work
 *   totals         percpu    one element: never-evicted totals (TOT_*
 *                            in tcp_retrans.h) and the stream's counters
 *                            and rate window, so one lookup serves the
 *                            whole event
 *   events         ringbuf   rate-capped stream (time, 4-tuple, state,
 *                            kind) of the tracked connections (common.h)
 *
 * Key, value and record layouts, kinds and TOT_* live in tcp_retrans.h
 * (shared with agent/ebpf/tcp_retrans.py, checked by a test).
 *
 * Defines: IS_STORAGE_PORT(p), TRACK_ALL_CONNS, MAX_CONNS, MAX_STORAGE_CONNS,
 * EVENTS_PER_SEC_PER_CPU, RINGBUF_PAGES, HAVE_TCP_RETRANSMIT_SYNACK,
 * TCP_RETRANSMIT_HAS_ERR (format has err: count only err == 0),
 * HAVE_TCP_SEND_RESET (+ TCP_SEND_RESET_SOCKADDR: 6.10+ layout with
 * sockaddr saddr[28]/daddr[28]), HAVE_TCP_RECEIVE_RESET.
 */
#define KS_EVENT_STREAM /* common.h declares the ring buffer `events` */
#include "common.h"
#include "tcp_retrans.h"

#ifndef MAX_CONNS
#define MAX_CONNS 8192
#endif
#ifndef MAX_STORAGE_CONNS
#define MAX_STORAGE_CONNS 1024
#endif

#ifdef TRACK_ALL_CONNS
BPF_TABLE("lru_hash", struct conn_key, struct conn_val, conns, MAX_CONNS);
#endif
BPF_TABLE("lru_hash", struct conn_key, struct conn_val, storage_conns, MAX_STORAGE_CONNS);
BPF_PERCPU_ARRAY(totals, struct totals_val, 1);

static __always_inline struct totals_val *my_totals(void)
{
    int zero = 0;
    return totals.lookup(&zero);
}

/* Per-CPU counters are bumped without atomics: tracepoint programs never
 * nest on one CPU (a nested run is skipped and counted as a recursion
 * miss, which the loader adds to the lost events). */
static __always_inline void record(struct conn_key *k, int kind, int state, struct totals_val *t)
{
    int storage = IS_STORAGE_PORT(k->dport);
    struct conn_val zero = {};
    struct conn_val *v;
    u64 now = bpf_ktime_get_ns();

    if (storage) {
        t->t[TOT_STORAGE + (kind & 3)]++;
        v = storage_conns.lookup_or_try_init(k, &zero);
    } else {
#ifdef TRACK_ALL_CONNS
        v = conns.lookup_or_try_init(k, &zero);
#else
        return;
#endif
    }
    if (v) {
        __sync_fetch_and_add(&v->count[kind & 3], 1);
        v->last_ns = now;
        if (state >= 0 && state < 32) {
            v->last_state = state;
            v->state_mask |= (1u << state);
        }
    }

    struct event *e = ks_stream_admit(&t->stream, now)
        ? ks_stream_room(&t->stream, events.ringbuf_reserve(sizeof(struct event)))
        : NULL;
    if (!e)
        return;
    e->ts = now;
    e->state = state;
    e->kind = kind;
    e->storage = storage;
    e->family = k->family;
    e->sport = k->sport;
    e->dport = k->dport;
    __builtin_memcpy(e->saddr, k->saddr, 16);
    __builtin_memcpy(e->daddr, k->daddr, 16);
    events.ringbuf_submit(e, KS_RB_NO_WAKEUP);
    ks_stream_sent(&t->stream);
}

/* Count the event in the never-evicted totals; without TRACK_ALL_CONNS a
 * non-storage connection stops here (before the key is even built). */
#ifdef TRACK_ALL_CONNS
#define KS_FILTER(t, kind, dport) ({ (t)->t[(kind)]++; 1; })
#else
#define KS_FILTER(t, kind, dport) ({ (t)->t[(kind)]++; IS_STORAGE_PORT(dport); })
#endif

/* The tracepoints below share the field names family/sport/dport (host
 * order), saddr/daddr (IPv4) and saddr_v6/daddr_v6. */
#define FILL_KEY(k, a)                                   \
    do {                                                 \
        (k).family = (a)->family;                        \
        (k).sport = (a)->sport;                          \
        (k).dport = (a)->dport;                          \
        KS_COPY_ADDRS((k).saddr, (k).daddr, (a));        \
    } while (0)

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef TCP_RETRANSMIT_HAS_ERR
    /* 6.x: the event also fires for attempts that sent nothing (e.g.
     * -EBUSY: the original still in a host queue); count what went out */
    if (args->err != 0)
        return 0;
#endif
    struct totals_val *t = my_totals();
    if (!t || !KS_FILTER(t, K_RETRANSMIT, args->dport))
        return 0;
    struct conn_key k = {};
    FILL_KEY(k, args);
    record(&k, K_RETRANSMIT, args->state, t);
    return 0;
}

#ifdef HAVE_TCP_RETRANSMIT_SYNACK
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct totals_val *t = my_totals();
    if (!t || !KS_FILTER(t, K_SYNACK_RETRANSMIT, args->dport))
        return 0;
    struct conn_key k = {};
    FILL_KEY(k, args);
    record(&k, K_SYNACK_RETRANSMIT, KS_TCP_SYN_RECV, t);
    return 0;
}
#endif

#ifdef HAVE_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    struct totals_val *t = my_totals();
    if (!t || !KS_FILTER(t, K_RESET_RECEIVED, args->dport))
        return 0;
    struct conn_key k = {};
    FILL_KEY(k, args);
    record(&k, K_RESET_RECEIVED, -1, t);
    return 0;
}
#endif

#ifdef HAVE_TCP_SEND_RESET
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    struct totals_val *t = my_totals();
    if (!t)
        return 0;
    struct conn_key k = {};
#ifdef TCP_SEND_RESET_SOCKADDR
    /* 6.10+: saddr/daddr are struct sockaddr_in or sockaddr_in6 (28 bytes):
     * family (host order) at 0, port (network order) at 2, IPv4 address at
     * 4, IPv6 address at 8. */
    u8 s[28], d[28];
    __builtin_memcpy(d, args->daddr, 28);
    u16 fam = *(u16 *)&d[0];
    if (fam != KS_AF_INET && fam != KS_AF_INET6)
        return 0;
    k.family = fam;
    k.dport = ((u16)d[2] << 8) | d[3];
    if (!KS_FILTER(t, K_RESET_SENT, k.dport))
        return 0;
    __builtin_memcpy(s, args->saddr, 28);
    k.sport = ((u16)s[2] << 8) | s[3];
    if (fam == KS_AF_INET6) {
        __builtin_memcpy(k.saddr, &s[8], 16);
        __builtin_memcpy(k.daddr, &d[8], 16);
    } else {
        __builtin_memcpy(k.saddr, &s[4], 4);
        __builtin_memcpy(k.daddr, &d[4], 4);
    }
    record(&k, K_RESET_SENT, args->state, t);
#else
    if (!KS_FILTER(t, K_RESET_SENT, args->dport))
        return 0;
    FILL_KEY(k, args);
    record(&k, K_RESET_SENT, -1, t);
#endif
    return 0;
}
#endif
