/*
 * noncepool: precomputed ECDSA P-256 nonces for keyd's software keys (DESIGN.md, "Nonce pool").
 *
 * An ES256 signature is r = x(kG) mod n and s = k^-1 (z + r d) mod n. Everything that depends
 * only on the random nonce k -- the scalar multiplication kG and the inversion of k, nearly
 * all of the cost -- can be done before the message is known. A pool holds such entries,
 * computed in idle time, and signing with one costs two multiplications mod n.
 *
 * The rules (each has a test in tests/test_noncepool.py):
 *   - every entry comes from fresh OpenSSL randomness, is used at most once, and its slot is
 *     wiped (OPENSSL_cleanse) the moment it is taken; all slots are wiped when the pool is
 *     cleared or freed;
 *   - the entries live in one anonymous mapping that is mlock'ed where RLIMIT_MEMLOCK allows
 *     (dcc_pool_info says whether it is), excluded from core dumps (MADV_DONTDUMP) and zeroed
 *     in a forked child (MADV_WIPEONFORK); nothing here writes them anywhere else;
 *   - a forked child never spends its parent's entries: every call (for signing, the start
 *     of each batch) compares getpid() with the pid that made the pool and, on a mismatch,
 *     wipes the child's copy and stops using it;
 *   - an empty pool is not an error: dcc_pool_sign returns 0 and the caller signs normally.
 *
 * Thread safety: any number of threads may refill and sign at once. The lock covers only the
 * taking and putting of entries; the arithmetic runs outside it. Nothing here touches Python,
 * so the background refill thread never holds the GIL: at SCHED_IDLE it cannot stall a
 * signing thread by being descheduled while holding a lock the signer needs for long.
 */
#ifndef NONCEPOOL_H
#define NONCEPOOL_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/evp.h>

/* One entry: k^-1 in Montgomery form (k^-1 * 2^256 mod n) and r, 32 bytes each, big-endian. */
#define DCC_POOL_ENTRY_SIZE 64
/* Entries computed together by dcc_pool_refill (one batch inversion mod n and one mod p for
 * all of them) and inserted under one taking of the lock. The two inversions cost about four
 * scalar multiplications together: shared by a chunk this size they add little to an entry
 * (bench/README.md, "Refill cost and pool sizing"). */
#define DCC_POOL_REFILL_CHUNK 64
/* Entries the background thread computes before it looks again whether a batch is signing:
 * a short stretch of one core (it is SCHED_IDLE and holds no lock meanwhile: a signing thread that
 * wants the core gets it). A whole refill chunk, so that its inversions are shared widely. */
#define DCC_POOL_BACKGROUND_CHUNK DCC_POOL_REFILL_CHUNK

typedef struct dcc_pool dcc_pool;

typedef struct {
    size_t capacity;     /* entries the pool may hold */
    size_t level;        /* entries it holds now */
    uint64_t refilled;   /* entries ever added */
    uint64_t spent;      /* entries used for a signature (each once) */
    uint64_t misses;     /* signatures asked of an empty pool (signed normally instead) */
    uint64_t discarded;  /* entries wiped unused: clear, a forked child, s = 0 */
    int locked;          /* the mapping is mlock'ed */
    int dontdump;        /* MADV_DONTDUMP took effect */
    int wipeonfork;      /* MADV_WIPEONFORK took effect */
    int lock_errno;      /* why mlock failed (0 when locked) */
    int orphaned;        /* this process is not the one that made the pool (a forked child) */
    int refill_policy;   /* the background refill thread: DCC_REFILL_* */
} dcc_pool_info;

/* How the background refill thread runs (dcc_pool_info.refill_policy). */
enum {
    DCC_REFILL_NONE = 0,   /* no background thread: the caller refills */
    DCC_REFILL_IDLE = 1,   /* SCHED_IDLE: runs only on a core nothing else wants */
    DCC_REFILL_NICE = 2,   /* SCHED_IDLE refused: nice 19 */
    DCC_REFILL_NORMAL = 3  /* both refused: normal priority (still in small chunks) */
};

/* A pool of `capacity` entries for the P-256 key pkey (which must hold its private key).
 * Returns NULL with a message in err (not a P-256 key, capacity 0 or too large, no memory).
 * The pool starts empty; the key stays owned by the caller and must outlive the pool. */
dcc_pool *dcc_pool_new(EVP_PKEY *pkey, size_t capacity, char *err, size_t errlen);
/* Wipes every slot and the pool's copy of the private scalar, then frees it all. NULL is a
 * no-op. No other call may run on the pool at the same time. */
void dcc_pool_free(dcc_pool *pool);

/* Computes up to `max_new` entries (at most what fits) and adds them; returns how many were
 * added, or (size_t)-1 when OpenSSL failed (nothing half-added). Runs in chunks of
 * DCC_POOL_REFILL_CHUNK, taking the lock only to insert each chunk; each chunk's nonces come
 * from one RAND_priv_bytes call (32 fresh bytes per nonce), and its inversions are batched
 * (noncepool.c, "refill"). */
size_t dcc_pool_refill(dcc_pool *pool, size_t max_new);

/* Starts the pool's own refill thread: a pthread that never touches Python, lowers itself to
 * SCHED_IDLE (else nice 19), and keeps the pool full in chunks of DCC_POOL_REFILL_CHUNK,
 * sleeping while it is full. dcc_pool_free stops and joins it. Returns 0, or an errno. */
int dcc_pool_start_refill(dcc_pool *pool);

/* A signing batch begins / ends: while any batch is between the two, the background refill
 * thread does not start another chunk (it yields to live signing, on top of SCHED_IDLE).
 * dcc_pool_enter makes the fork check and returns 0 in a forked child (the pool is then
 * wiped and unusable: sign the ordinary way, and do not call dcc_pool_leave); else 1. */
int dcc_pool_enter(dcc_pool *pool);
void dcc_pool_leave(dcc_pool *pool);

/* Per-thread scratch for dcc_pool_sign (BIGNUMs allocated once per batch, not per call). */
typedef struct dcc_pool_work dcc_pool_work;
dcc_pool_work *dcc_pool_work_new(void);
void dcc_pool_work_free(dcc_pool_work *w); /* clears every BIGNUM it held */

/* ES256 over a SHA-256 digest with one pool entry: writes r || s (64 bytes, s low) and
 * returns 1; returns 0 when the pool is empty (sign normally then), -1 when OpenSSL failed.
 * The entry is wiped whatever happens. Only between dcc_pool_enter (returning 1) and
 * dcc_pool_leave. */
int dcc_pool_sign(dcc_pool *pool, dcc_pool_work *w, const uint8_t digest[32], uint8_t sig[64]);

/* Wipes every entry (the pool stays usable and refillable). */
void dcc_pool_clear(dcc_pool *pool);
void dcc_pool_info_get(dcc_pool *pool, dcc_pool_info *info);
/* Test support: the batch inversion of a refill chunk (Montgomery's trick, blinded) on the
 * caller's values. in: count (1..DCC_POOL_REFILL_CHUNK) big-endian 32-byte values below the
 * modulus (the group order n, or the field prime p when `field`); out: their inverses, same
 * layout; ok[i] = 0 where in[i] is 0 (no inverse: out[i] = 0, and the others are still
 * right). Returns 1; 0 for a bad count or a value not below the modulus; -1 when OpenSSL
 * failed. */
int dcc_pool_batch_inverse(int field, const uint8_t *in, size_t count, uint8_t *out,
                           uint8_t *ok);
/* Test support: how many bytes of the mapping outside the live entries are not zero (every
 * taken or cleared slot must read as zeros). Reveals nothing of the entries themselves. */
size_t dcc_pool_residue(dcc_pool *pool);

#endif
