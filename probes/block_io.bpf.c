/* kvmscope: block I/O latency per device and operation, and per submitting
 * process.
 *
 * Two ways to time a request, chosen by agent/ebpf/block_io.py:
 *
 * REQUEST MODE (RQ_OFF_START defined): the kernel already times every
 * request it accounts (struct request: start_time_ns, set when the request
 * starts being accounted, the same start the disk statistics in
 * /sys/block/<dev>/stat use; io_start_time_ns, set at dispatch to the
 * driver when the queue keeps I/O statistics, e.g. for writeback
 * throttling). So no per-request table is needed for the latency: at
 * completion the probe reads both from the request and reads the clock
 * once. The offsets come from the RUNNING kernel's BTF
 * (/sys/kernel/btf/vmlinux, read by agent/ebpf/btf.py) as -D constants,
 * never from the kernel headers bcc compiles against (another kernel's).
 *   block_io_start    (submitter context): the submitter's tgid into the
 *                     owner table, keyed by the request's address (a
 *                     4-way set = one cache line; no clock, no hash map)
 *   block_rq_complete the latencies: total = now - start_time_ns, device
 *                     = now - io_start_time_ns, queue = io_start_time_ns -
 *                     start_time_ns (the last two only when the kernel
 *                     set io_start_time_ns); the submitter from the owner
 *                     table (read only).
 * With RQ_BTF (BTF-typed raw tracepoints, "tp_btf", loaded by the compiler
 * process), the request's fields are plain loads the verifier checks
 * against the kernel's own types; without it (raw tracepoints), one
 * bpf_probe_read_kernel of the request's first RQ_HEAD_LEN bytes and two
 * for the device (request_queue -> gendisk, cached per queue and CPU).
 * A request's completion may come in pieces (blk_update_request with
 * fewer bytes than are left): counted once, at the piece that ends it.
 * Requests the kernel kept no start time for (I/O statistics off on that
 * queue, passthrough) are counted in TOT_UNTIMED, not in the histograms.
 * The per-device counts never depend on the owner table: a submitter not
 * found there (evicted, or started before the probe) only makes the
 * per-process entry tgid 0 (TOT_UNATTRIBUTED).
 *
 * CLASSIC MODE (fallback when BTF lacks an offset): the tracepoints' own
 * arguments. They carry no request pointer, so a request is keyed by
 * (dev, op, sector), as bcc's tracepoint-based tools do, in the 4-way
 * set-associative `inflight` table (insert/issue time, bytes, tgid; a
 * request that never completes is pushed out, never leaked; two requests
 * in flight on the same device, op and sector overwrite each other,
 * counted as lost). block_rq_insert (optional, HAVE_BLOCK_RQ_INSERT)
 * splits queue time from device time.
 *
 * Maps (both modes; the layouts user space reads are in block_io.h):
 *   lat    percpu_array   (dev, op) by open addressing -> log2 slots and
 *                         sum_ns per kind, bytes (the count is the sum of
 *                         the slots, so buckets and _count always agree)
 *   procs  percpu_array   (tgid, dev, op) by open addressing -> total
 *                         latency slots, sum_ns, bytes; when the probed
 *                         entries are all taken the least recently
 *                         completed one is restarted (TOT_PROC_EVICTED)
 *   totals percpu_array   see TOT_*
 * Array lookups are inlined by the verifier (no helper call, no hash, no
 * lock); user space reads each array with one batch lookup.
 *
 * kind: 0 = total, 1 = queue, 2 = device. Slot s holds latencies in
 * [2^(s-1), 2^s) ns (bpf_log2l); SLOT_MAX + 1 holds everything at or above
 * 2^SLOT_MAX ns.
 *
 * Per-CPU values are updated without atomics: tracing programs never nest
 * on one CPU (the kernel skips a nested run and counts it in the
 * program's recursion misses, which the loader adds to the lost events).
 *
 * Defines: SLOT_MAX, LAT_ENTRIES, PROC_ENTRIES, MAX_INFLIGHT (classic),
 * MAX_OWNERS (request mode) (powers of two); request mode: RQ_OFF_Q, RQ_OFF_CMD_FLAGS, RQ_OFF_DATA_LEN,
 * RQ_OFF_START, RQ_OFF_IO_START (struct request), Q_OFF_DISK (struct
 * request_queue), DISK_OFF_MAJOR, DISK_OFF_FIRST_MINOR (struct gendisk),
 * REQ_OP_{READ,WRITE,FLUSH,DISCARD,SECURE_ERASE}_V (enum req_op),
 * RQ_HEAD_LEN (raw mode), RQ_BTF (tp_btf); classic mode:
 * HAVE_BLOCK_RQ_INSERT.
 */
#include "common.h"
#include "block_io.h"

#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 16384 /* a power of two */
#endif
#define INFLIGHT_WAYS 4
#define INFLIGHT_SETS (MAX_INFLIGHT / INFLIGHT_WAYS)
#define LAT_PROBES 4
#define PROC_PROBES 4

BPF_PERCPU_ARRAY(lat, struct lat_val, LAT_ENTRIES);
BPF_PERCPU_ARRAY(procs, struct proc_val, PROC_ENTRIES);
BPF_PERCPU_ARRAY(totals, u64, TOT_N);

static __always_inline void tot(int i)
{
    u64 *v = totals.lookup(&i);
    if (v)
        (*v)++;
}

/* The slot of ns, at most SLOT_MAX + 1. Widened to 64 bits before the
 * check, so the check and the array index are the same register: on a
 * 32-bit value clang compares a zero-extended copy and indexes with the
 * original, a bound the 6.1 verifier does not carry over ("unbounded
 * memory access"). */
static __always_inline u64 slot_of(u64 ns)
{
    u64 slot = bpf_log2l(ns);
    if (slot > SLOT_MAX)
        slot = SLOT_MAX + 1;
    return slot;
}

static __always_inline u32 mix32(u64 x)
{
    return (u32)((x * 0x9E3779B97F4A7C15ULL) >> 32);
}

/* This CPU's entry of (dev, op): the one holding it, else the first free
 * one probed (taken for it); NULL when every probed entry holds another
 * (dev, op) (TOT_FULL). */
static __always_inline struct lat_val *lat_entry(u32 dev, u32 op)
{
    u32 h = mix32(((u64)dev << 3) | op);
#pragma unroll
    for (u32 i = 0; i < LAT_PROBES; i++) {
        u32 idx = (h + i) & (LAT_ENTRIES - 1);
        struct lat_val *l = lat.lookup(&idx);
        if (!l)
            return NULL;
        if (!l->used) {
            l->dev = dev;
            l->op = op;
            l->used = 1;
            return l;
        }
        if (l->dev == dev && l->op == op)
            return l;
    }
    tot(TOT_FULL);
    return NULL;
}

/* This CPU's entry of (tgid, dev, op): the one holding it, else a free
 * one, else the least recently completed of those probed, restarted. */
static __always_inline struct proc_val *proc_entry(u32 tgid, u32 dev, u32 op, u64 now)
{
    u32 h = mix32(((u64)tgid << 35) ^ ((u64)dev << 3) ^ op);
    struct proc_val *victim = NULL;
    u64 oldest = ~0ULL;
#pragma unroll
    for (u32 i = 0; i < PROC_PROBES; i++) {
        u32 idx = (h + i) & (PROC_ENTRIES - 1);
        struct proc_val *p = procs.lookup(&idx);
        if (!p)
            return NULL;
        if (p->gen && p->tgid == tgid && p->dev == dev && p->op == op) {
            p->last_ns = now;
            return p;
        }
        if (!p->gen) {
            victim = p;
            break;
        }
        if (p->last_ns < oldest) {
            oldest = p->last_ns;
            victim = p;
        }
    }
    if (!victim)
        return NULL;
    if (victim->gen) {
        tot(TOT_PROC_EVICTED);
        __builtin_memset(victim->slots, 0, sizeof(victim->slots));
        victim->sum_ns = 0;
        victim->bytes = 0;
    }
    victim->tgid = tgid;
    victim->dev = dev;
    victim->op = op;
    victim->gen++;
    victim->last_ns = now;
    return victim;
}

/* One request's latencies into this CPU's (dev, op) and (tgid, dev, op)
 * entries; queue_ns/device_ns only when has_split. */
static __always_inline void account(u32 dev, u32 op, u32 tgid, u64 now, u64 total, int has_split, u64 queue_ns,
                                    u64 device_ns, int has_queue, u64 bytes)
{
    struct lat_val *l = lat_entry(dev, op);
    if (!l)
        return;
    l->slots[KIND_TOTAL * NSLOTS + slot_of(total)]++;
    l->sum_ns[KIND_TOTAL] += total;
    if (has_split) {
        l->slots[KIND_DEVICE * NSLOTS + slot_of(device_ns)]++;
        l->sum_ns[KIND_DEVICE] += device_ns;
        if (has_queue) {
            l->slots[KIND_QUEUE * NSLOTS + slot_of(queue_ns)]++;
            l->sum_ns[KIND_QUEUE] += queue_ns;
        }
    }
    l->bytes += bytes;
    struct proc_val *p = proc_entry(tgid, dev, op, now);
    if (p) {
        p->slots[slot_of(total)]++;
        p->sum_ns += total;
        p->bytes += bytes;
    }
    tot(TOT_COMPLETED);
}

#ifdef RQ_OFF_START
/* ---------------------------------------------------------------- request mode */

/* Who submitted each request: 4 ways of 16 bytes (one cache line) per set,
 * the set a hash of the request's address (its key). A way is free when
 * rq == 0. Requests are preallocated and reused (one per tag), so a way
 * keeps its request from one I/O to the next: block_io_start writes it only
 * when the request is new to the set or another process submits it, and
 * completion only reads it. In the steady state (a queue's requests reused
 * by the same processes) the line is read on the submitting and on the
 * completing CPU and written by neither: no cache line moves between them
 * per request (freeing the way at completion and writing it at every start
 * cost ~30 ns per program run here, docs/performance.md). A request that
 * finds its set full pushes out a way (pseudo-randomly); if that way's
 * request is still in flight its completion is not attributed (tgid 0).
 * Every path that makes a request passes block_io_start (blk-mq's bio to
 * request, blk_execute_rq, dm's cloned requests); the flush machinery's own
 * request never does and is never in the table. */
struct owner_way {
    u64 rq;
    u64 tgid;
};

struct owner_set {
    struct owner_way way[INFLIGHT_WAYS];
};

#ifndef MAX_OWNERS
#define MAX_OWNERS 2048 /* requests in flight whose submitter is kept (a power of two): 32 KB, cache-warm */
#endif
BPF_ARRAY(owners, struct owner_set, MAX_OWNERS / INFLIGHT_WAYS);

static __always_inline struct owner_set *owner_set_of(u64 key)
{
    u32 idx = mix32(key) & (MAX_OWNERS / INFLIGHT_WAYS - 1);
    return owners.lookup(&idx);
}

/* op from cmd_flags (REQ_OP_BITS = 8: the op is the low byte); the
 * enumerator values come from the kernel's BTF (enum req_op) */
static __always_inline u32 op_of_flags(u32 flags)
{
    u32 o = flags & 0xff;
    if (o == REQ_OP_READ_V)
        return OP_READ;
    if (o == REQ_OP_WRITE_V)
        return OP_WRITE;
    if (o == REQ_OP_FLUSH_V)
        return OP_FLUSH;
    if (o == REQ_OP_DISCARD_V || o == REQ_OP_SECURE_ERASE_V)
        return OP_DISCARD;
    return OP_OTHER;
}

#ifdef RQ_BTF
/* tp_btf: ctx is the tracepoint's argument array; the request pointer is
 * typed (struct request *), its fields are direct loads. The verifier
 * allows no arithmetic on such a pointer, except the difference of two
 * pointers (a plain number for a privileged program): the owner key is
 * the request's distance from a fixed map value, unique per request like
 * its address. */
#define RQ_PROG(tp) int ks_btf__##tp(u64 *ctx)
#define LD64(p, off) (*(u64 *)((p) + (off)))
#define LD32(p, off) (*(u32 *)((p) + (off)))
static __always_inline u64 rq_key(u64 rq)
{
    u32 zero = 0;
    struct owner_set *base = owners.lookup(&zero);
    return base ? rq - (u64)base : 0;
}
#else
#define rq_key(rq) (rq)
#define RQ_PROG(tp) RAW_TRACEPOINT_PROBE(tp)
/* the queue -> device number cache of raw mode: per CPU, by queue address */
struct devc {
    u64 q;
    u32 dev;
    u32 pad;
};
BPF_PERCPU_ARRAY(devcache, struct devc, 64);
#endif
#define ARG(i) (((u64 *)ctx)[i])

RQ_PROG(block_io_start)
{
    u64 rq = rq_key(ARG(0));
    struct owner_set *set = owner_set_of(rq);
    if (!set)
        return 0;
    tot(TOT_INSERTED);
    struct owner_way *w = &set->way[0];
#pragma unroll
    for (int i = 0; i < INFLIGHT_WAYS; i++) {
        struct owner_way *c = &set->way[i];
        if (c->rq == rq || !c->rq) {
            w = c;
            break;
        }
        if (i == INFLIGHT_WAYS - 1)
            w = &set->way[(rq >> 6) & (INFLIGHT_WAYS - 1)]; /* all taken: push one out */
    }
    u64 tgid = bpf_get_current_pid_tgid() >> 32;
    if (w->rq != rq || w->tgid != tgid) { /* else: written already, the line stays shared */
        w->tgid = tgid;
        w->rq = rq;
    }
    return 0;
}

RQ_PROG(block_rq_complete)
{
    u64 rq = ARG(0);
    u32 nr_bytes = (u32)ARG(2);
#ifdef RQ_BTF
    u64 start = LD64(rq, RQ_OFF_START);
    u64 io_start = LD64(rq, RQ_OFF_IO_START);
    u32 flags = LD32(rq, RQ_OFF_CMD_FLAGS);
    u32 left = LD32(rq, RQ_OFF_DATA_LEN);
    u64 q = LD64(rq, RQ_OFF_Q);
    u64 disk = LD64(q, Q_OFF_DISK);
    u32 dev = disk ? (LD32(disk, DISK_OFF_MAJOR) << 20) | LD32(disk, DISK_OFF_FIRST_MINOR) : 0;
#else
    u64 head[RQ_HEAD_LEN / 8];
    if (bpf_probe_read_kernel(head, sizeof(head), (void *)rq))
        return 0;
    u64 start = *(u64 *)((char *)head + RQ_OFF_START);
    u64 io_start = *(u64 *)((char *)head + RQ_OFF_IO_START);
    u32 flags = *(u32 *)((char *)head + RQ_OFF_CMD_FLAGS);
    u32 left = *(u32 *)((char *)head + RQ_OFF_DATA_LEN);
    u64 q = *(u64 *)((char *)head + RQ_OFF_Q);
    u32 ci = mix32(q) & 63;
    struct devc *dc = devcache.lookup(&ci);
    if (!dc)
        return 0;
    u32 dev = dc->dev;
    if (dc->q != q) {
        u64 disk = 0;
        u32 mm[2] = {};
        bpf_probe_read_kernel(&disk, sizeof(disk), (void *)(q + Q_OFF_DISK));
        if (disk) {
            bpf_probe_read_kernel(&mm[0], 4, (void *)(disk + DISK_OFF_MAJOR));
            bpf_probe_read_kernel(&mm[1], 4, (void *)(disk + DISK_OFF_FIRST_MINOR));
        }
        dev = disk ? (mm[0] << 20) | mm[1] : 0;
        dc->q = q;
        dc->dev = dev;
    }
#endif
    if (nr_bytes < left) {
        /* more to come: the request is counted when it ends; its bytes as they complete */
        tot(TOT_PARTIAL);
        struct lat_val *l = lat_entry(dev, op_of_flags(flags));
        if (l)
            l->bytes += nr_bytes;
        return 0;
    }
    if (!start)
        start = io_start;
    if (!start) {
        tot(TOT_UNTIMED);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    u32 tgid = 0;
    u64 key = rq_key(rq);
    struct owner_set *set = owner_set_of(key);
    if (set) {
#pragma unroll
        for (int i = 0; i < INFLIGHT_WAYS; i++) {
            struct owner_way *c = &set->way[i];
            if (c->rq == key) {
                tgid = c->tgid; /* the way stays: read only, see owner_way */
                break;
            }
        }
    }
    if (!tgid)
        tot(TOT_UNATTRIBUTED);
    int split = io_start != 0 && io_start >= start;
    account(dev, op_of_flags(flags), tgid, now, now - start, split, io_start - start, now - io_start,
            split && io_start > start, nr_bytes);
    return 0;
}

#else
/* ---------------------------------------------------------------- classic mode */

/* The in-flight table is the kernel's own: user space never reads it. */
struct rq_key {
    u32 dev;
    u32 op;
    u64 sector;
};

/* One in-flight request. Free when insert_ns == issue_ns == 0. */
struct rq_val {
    u64 sector;
    u32 dev;
    u32 op;
    u64 insert_ns;
    u64 issue_ns;
    u32 tgid;
    u32 bytes;
};

struct rq_set {
    struct rq_val way[INFLIGHT_WAYS];
};

BPF_ARRAY(inflight, struct rq_set, INFLIGHT_SETS);

/* The set a request lives in: a multiplicative hash of its key. */
static __always_inline struct rq_set *set_of(struct rq_key *k)
{
    u32 idx = mix32(k->sector ^ ((u64)k->dev << 40) ^ ((u64)k->op << 60)) & (INFLIGHT_SETS - 1);
    return inflight.lookup(&idx);
}

static __always_inline int busy(struct rq_val *w)
{
    return w->insert_ns || w->issue_ns;
}

static __always_inline int same(struct rq_val *w, struct rq_key *k)
{
    return w->sector == k->sector && w->dev == k->dev && w->op == k->op;
}

/* The way holding request k, or NULL. */
static __always_inline struct rq_val *find(struct rq_set *set, struct rq_key *k)
{
#pragma unroll
    for (int i = 0; i < INFLIGHT_WAYS; i++) {
        struct rq_val *w = &set->way[i];
        if (busy(w) && same(w, k))
            return w;
    }
    return NULL;
}

/* A way for a new request: a free one, else the one seen first (the
 * eviction of an LRU: a request that never completes is pushed out, never
 * leaked; its completion, if it ever comes, counts as unmatched). */
static __always_inline struct rq_val *place(struct rq_set *set)
{
    struct rq_val *victim = &set->way[0];
    u64 oldest = ~0ULL;
#pragma unroll
    for (int i = 0; i < INFLIGHT_WAYS; i++) {
        struct rq_val *w = &set->way[i];
        if (!busy(w))
            return w;
        u64 seen = w->insert_ns ? w->insert_ns : w->issue_ns;
        if (seen < oldest) {
            oldest = seen;
            victim = w;
        }
    }
    return victim;
}

static __always_inline void fill(struct rq_val *w, struct rq_key *k, u64 insert_ns, u64 issue_ns, u32 bytes)
{
    w->sector = k->sector;
    w->dev = k->dev;
    w->op = k->op;
    w->tgid = bpf_get_current_pid_tgid() >> 32;
    w->bytes = bytes;
    w->issue_ns = issue_ns;
    w->insert_ns = insert_ns; /* busy from here on */
}

/* rwbs (blk_fill_rwbs): an optional leading 'F' (preflush), then the op:
 * W write, R read, D discard (DE secure erase), F flush, N other. */
static __always_inline u32 op_of(const char *rwbs)
{
    char c0 = rwbs[0], c1 = rwbs[1];
    if (c0 == 'F') {
        if (c1 == 'W')
            return OP_WRITE;
        if (c1 == 'R')
            return OP_READ;
        if (c1 == 'D')
            return OP_DISCARD;
        return OP_FLUSH;
    }
    if (c0 == 'R')
        return OP_READ;
    if (c0 == 'W')
        return OP_WRITE;
    if (c0 == 'D')
        return OP_DISCARD;
    return OP_OTHER;
}

#ifdef HAVE_BLOCK_RQ_INSERT
TRACEPOINT_PROBE(block, block_rq_insert)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_set *set = set_of(&k);
    if (!set)
        return 0;
    tot(TOT_INSERTED);
    struct rq_val *w = find(set, &k);
    if (w)
        tot(TOT_OVERWRITTEN); /* rare: the key is taken */
    else
        w = place(set);
    fill(w, &k, bpf_ktime_get_ns(), 0, args->bytes);
    return 0;
}
#endif

TRACEPOINT_PROBE(block, block_rq_issue)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_set *set = set_of(&k);
    if (!set)
        return 0;
    u64 now = bpf_ktime_get_ns();
    tot(TOT_ISSUED);
    struct rq_val *w = find(set, &k);
    if (w && w->insert_ns && !w->issue_ns) {
        /* seen at insert: keep the submitter, add the issue time */
        w->issue_ns = now;
        return 0;
    }
    if (w)
        tot(TOT_OVERWRITTEN);
    else
        w = place(set);
    fill(w, &k, 0, now, args->bytes);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct rq_key k = {.dev = args->dev, .op = op_of(args->rwbs), .sector = args->sector};
    struct rq_set *set = set_of(&k);
    struct rq_val *v = set ? find(set, &k) : NULL;
    if (!v || !v->issue_ns) {
        tot(TOT_UNMATCHED);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    u64 issue = v->issue_ns, insert = v->insert_ns;
    u64 start = insert ? insert : issue;
    u32 tgid = v->tgid, bytes = v->bytes;
    v->insert_ns = 0;
    v->issue_ns = 0; /* free */
    account(k.dev, k.op, tgid, now, now - start, 1, issue - insert, now - issue, insert != 0, bytes);
    return 0;
}
#endif
