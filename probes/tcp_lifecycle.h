/* Layouts and constants of probes/tcp_lifecycle.bpf.c that user space
 * reads (map keys and values, ring buffer records, totals indexes, kinds,
 * flags).
 *
 * Mirrored by ctypes in agent/ebpf/tcp_lifecycle.py; tests/unit/
 * test_probe_layouts.py compiles this file with cc and compares every
 * field's name, offset and size and every constant. Needs common.h first.
 */
#ifndef KVMSCOPE_TCP_LIFECYCLE_H
#define KVMSCOPE_TCP_LIFECYCLE_H

/* in order: the Python KINDS (agent/ebpf/tcp_lifecycle.py); every kind
 * before K_STATE is counted per remote */
enum kind {
    K_CONNECT = 0,     /* CLOSE -> SYN_SENT */
    K_ESTABLISHED = 1, /* -> ESTABLISHED */
    K_CLOSE = 2,       /* -> CLOSE after an orderly shutdown */
    K_RESET = 3,       /* -> CLOSE after a reset was received or sent */
    K_FAILED = 4,      /* SYN_SENT -> CLOSE without reset (connect timed out) */
    K_ABORT = 5,       /* ESTABLISHED -> CLOSE without reset or FIN (timeout) */
    K_STATE = 6,       /* any other transition */
    K_N = 7,
};

/* sock_val.flags, event.flags */
#define F_RST_RECV 1
#define F_RST_SENT 2
#define F_TARGET 4

/* totals indexes */
#define TOT_TRANSITIONS 0
#define TOT_TRACKED 1
#define TOT_UNTRACKED_CLOSE 2
#define TOT_N 3

struct sock_val {
    u64 start_ns;
    u64 estab_ns;
    u32 tgid;
    u16 family;
    u16 sport;
    u16 dport;
    u8 flags;
    u8 pad;
    u8 saddr[16];
    u8 daddr[16];
    char comm[16];
};

struct count_key {
    u16 family;
    u16 port; /* the storage port */
    u32 kind;
    u8 remote[16];
};

struct event {
    u64 ts;
    u64 age_ns;   /* since connect (or first sight) */
    u64 estab_ns; /* time spent established, 0 if never */
    u32 tgid;
    u8 kind;
    u8 oldstate;
    u8 newstate;
    u8 flags;
    u16 family;
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
    char comm[16];
};

struct totals_val {
    u64 t[TOT_N];
    struct ks_stream stream;
};

#endif
