/* Layouts and constants of probes/tcp_retrans.bpf.c that user space reads
 * (map keys and values, ring buffer records, totals indexes, kinds).
 *
 * Mirrored by ctypes in agent/ebpf/tcp_retrans.py; tests/unit/
 * test_probe_layouts.py compiles this file with cc and compares every
 * field's name, offset and size and every constant. Needs common.h first.
 */
#ifndef KVMSCOPE_TCP_RETRANS_H
#define KVMSCOPE_TCP_RETRANS_H

/* in order: the Python KINDS (agent/ebpf/tcp_retrans.py) */
enum kind {
    K_RETRANSMIT = 0,
    K_SYNACK_RETRANSMIT = 1,
    K_RESET_SENT = 2,
    K_RESET_RECEIVED = 3,
    K_N = 4,
};

/* totals indexes: per kind (0..3), storage per kind (4..7) */
#define TOT_STORAGE 4
#define TOT_N 8

struct conn_key {
    u16 family;
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};

struct conn_val {
    u64 count[K_N]; /* by enum kind */
    u64 last_ns;
    u32 last_state;
    u32 state_mask; /* bit n set: a retransmit happened in TCP state n */
};

struct event {
    u64 ts;
    s32 state; /* -1: not known (resets) */
    u8 kind;
    u8 storage;
    u16 family;
    u16 sport;
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
};

struct totals_val {
    u64 t[TOT_N];
    struct ks_stream stream;
};

#endif
