/* kvmscope: lifecycle of TCP connections on the storage ports.
 *
 * Tracepoints: sock:inet_sock_set_state (required); tcp:tcp_receive_reset
 * and tcp:tcp_send_reset (optional, HAVE_*): mark a tracked socket as reset
 * so its close is reported as a reset, not a normal close.
 *
 * A connection is tracked when its destination port is a storage port
 * (this host is the initiator; IS_STORAGE_PORT) or its source port is one
 * (this host is the target). The process is taken at CLOSE -> SYN_SENT,
 * which runs in the connect() caller's context; a target-side socket is
 * born in softirq context and has no process (tgid 0).
 *
 * Maps:
 *   socks    lru_hash  socket address -> start/established time, process,
 *                      4-tuple, reset flags (deleted at CLOSE; LRU bounds
 *                      sockets whose close was missed)
 *   counts   percpu_hash  (family, remote address, storage port, kind) ->
 *                      count (per CPU, no atomics; Python sums the CPUs)
 *   totals   percpu    one element: the TOT_* counters and the stream's
 *                      counters and rate window (one lookup per event)
 *   events   ringbuf   one event per transition (rate-capped; common.h)
 *
 * Key, value and record layouts, kinds, flags and TOT_* live in
 * tcp_lifecycle.h (shared with agent/ebpf/tcp_lifecycle.py, checked by a
 * test).
 *
 * Cost per storage-port transition: one per-CPU array lookup, one socks
 * lookup (plus an insert for a new socket or a delete at CLOSE), one
 * counts lookup for the counted kinds, one ring buffer record. Any other
 * TCP transition returns after the protocol and port compares.
 *
 * Event kinds: see enum kind (tcp_lifecycle.h). Defines: IS_STORAGE_PORT(p),
 * MAX_SOCKS, MAX_REMOTES, EVENTS_PER_SEC_PER_CPU, RINGBUF_PAGES,
 * HAVE_TCP_RECEIVE_RESET, HAVE_TCP_SEND_RESET.
 */
#define KS_EVENT_STREAM /* common.h declares the ring buffer `events` */
#include "common.h"
#include "tcp_lifecycle.h"

#ifndef MAX_SOCKS
#define MAX_SOCKS 4096
#endif
#ifndef MAX_REMOTES
#define MAX_REMOTES 1024
#endif

BPF_TABLE("lru_hash", u64, struct sock_val, socks, MAX_SOCKS);
/* LRU: a flood of connects to many remotes pushes old entries out (user
 * space keeps running totals) instead of filling the map for good */
BPF_TABLE("lru_percpu_hash", struct count_key, u64, counts, MAX_REMOTES);
BPF_PERCPU_ARRAY(totals, struct totals_val, 1);

/* Per-CPU values are bumped without atomics: tracepoint programs never
 * nest on one CPU (a nested run is skipped and counted as a recursion
 * miss, which the loader adds to the lost events). */
static __always_inline void count(struct sock_val *s, u32 kind)
{
    struct count_key ck = {.family = s->family, .kind = kind};
    ck.port = (s->flags & F_TARGET) ? s->sport : s->dport;
    __builtin_memcpy(ck.remote, s->daddr, 16);
    u64 *c = counts.lookup(&ck);
    if (c) {
        (*c)++;
    } else {
        u64 one = 1; /* this CPU's value; the other CPUs' start at zero */
        counts.insert(&ck, &one);
    }
}

static __always_inline void emit(struct totals_val *t, struct sock_val *s, u32 kind, int oldstate, int newstate,
                                 u64 now)
{
    struct event *e = ks_stream_admit(&t->stream, now)
        ? ks_stream_room(&t->stream, events.ringbuf_reserve(sizeof(struct event)))
        : NULL;
    if (!e)
        return;
    e->ts = now;
    e->age_ns = now - s->start_ns;
    e->estab_ns = s->estab_ns ? now - s->estab_ns : 0;
    e->tgid = s->tgid;
    e->kind = kind;
    e->oldstate = oldstate;
    e->newstate = newstate;
    e->flags = s->flags;
    e->family = s->family;
    e->sport = s->sport;
    e->dport = s->dport;
    e->pad = 0;
    __builtin_memcpy(e->saddr, s->saddr, 16);
    __builtin_memcpy(e->daddr, s->daddr, 16);
    __builtin_memcpy(e->comm, s->comm, 16);
    events.ringbuf_submit(e, KS_RB_NO_WAKEUP);
    ks_stream_sent(&t->stream);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != KS_IPPROTO_TCP)
        return 0;
    u16 sport = args->sport, dport = args->dport;
    int initiator = IS_STORAGE_PORT(dport);
    int target = !initiator && IS_STORAGE_PORT(sport);
    if (!initiator && !target)
        return 0;
    int zero = 0;
    struct totals_val *t = totals.lookup(&zero);
    if (!t)
        return 0;
    t->t[TOT_TRANSITIONS]++;

    u64 sk = (u64)args->skaddr;
    u64 now = bpf_ktime_get_ns();
    int oldstate = args->oldstate, newstate = args->newstate;
    int connect = oldstate == KS_TCP_CLOSE && newstate == KS_TCP_SYN_SENT;
    struct sock_val n = {};
    int fresh = 0;
    struct sock_val *s = socks.lookup(&sk);
    if (!s) {
        if (newstate == KS_TCP_CLOSE) {
            t->t[TOT_UNTRACKED_CLOSE]++; /* born before the probe, or evicted */
            return 0;
        }
        /* a new socket: built here, used for this event as is and
         * stored once at the end (no second lookup) */
        s = &n;
        fresh = 1;
        n.start_ns = now;
        n.family = args->family;
        n.flags = target ? F_TARGET : 0;
        KS_COPY_ADDRS(n.saddr, n.daddr, args);
        if (connect) {
            n.tgid = bpf_get_current_pid_tgid() >> 32;
            bpf_get_current_comm(&n.comm, sizeof(n.comm));
        }
    } else if (connect) {
        /* a socket address reused for a new connect */
        s->start_ns = now;
        s->estab_ns = 0;
        s->flags &= F_TARGET;
        s->tgid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&s->comm, sizeof(s->comm));
    }
    /* ports are known only once bound: refresh the tuple on every step */
    s->sport = sport;
    s->dport = dport;

    u32 kind = K_STATE;
    if (connect) {
        kind = K_CONNECT;
    } else if (newstate == KS_TCP_ESTABLISHED) {
        kind = K_ESTABLISHED;
        s->estab_ns = now;
    } else if (newstate == KS_TCP_CLOSE) {
        if (s->flags & (F_RST_RECV | F_RST_SENT))
            kind = K_RESET;
        else if (oldstate == KS_TCP_SYN_SENT)
            kind = K_FAILED;
        else if (oldstate == KS_TCP_ESTABLISHED)
            kind = K_ABORT;
        else
            kind = K_CLOSE;
    }
    if (kind != K_STATE)
        count(s, kind);
    emit(t, s, kind, oldstate, newstate, now);
    if (fresh) {
        /* newstate is not CLOSE here (returned above) */
        if (socks.update(&sk, &n) == 0)
            t->t[TOT_TRACKED]++;
    } else if (newstate == KS_TCP_CLOSE) {
        socks.delete(&sk);
    }
    return 0;
}

#ifdef HAVE_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 sk = (u64)args->skaddr;
    struct sock_val *s = socks.lookup(&sk);
    if (s)
        s->flags |= F_RST_RECV;
    return 0;
}
#endif

#ifdef HAVE_TCP_SEND_RESET
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    u64 sk = (u64)args->skaddr;
    if (!sk)
        return 0;
    struct sock_val *s = socks.lookup(&sk);
    if (s)
        s->flags |= F_RST_SENT;
    return 0;
}
#endif
